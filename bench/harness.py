"""Run a benchmark grid: one ``dpfpl.train`` run per cell, resumable, with a live progress view.

Layout of the output folder ``OUT`` (``results/<preset>`` by default)::

    OUT/grid.json              the grid (spec, cells, command) of the last invocation
    OUT/runs/<cell-id>/        one run directory per cell (see dpfpl.rundir), plus
        cell.json              what the cell is (written first; compared on rerun)
        bench.json             harness measurements: device, wall time, peak memory, step times
        audit.json             audit metrics, when the audits are available
    OUT/runs.csv, OUT/table_*.md, OUT/*.png, OUT/README.md   (bench.report)

A cell is finished iff its ``summary.json`` exists (the run directory writes it last, atomically).
A rerun skips finished cells; a cell directory without ``summary.json`` (an interrupted cell) is
resumed from its last checkpoint when it has one for the same cell, and otherwise deleted and run
from scratch. A finished cell whose ``cell.json`` no longer matches the grid (e.g. the preset's
rounds changed) is an error unless ``rerun_changed`` is set. ``fresh`` runs every cell again (what
``make bench`` does, so that the committed results/default are reproduced, not skipped): a cell's old
run directory is replaced when that cell starts.

Cells share the loaded CLIP model and datasets (one load per process). With ``jobs > 1`` cells run
in that many worker processes (spawned, one torch thread each unless told otherwise); on small
models this uses the cores better than intra-op threads.
"""

from __future__ import annotations

import json
import math
import os
import queue as queue_mod
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dpfpl.errors import ConfigError
from dpfpl.rundir import atomic_write_json

from .audit_hook import find_audit_hook, normalize_audit, run_audit
from .grid import Cell, GridSpec, eps_label
from .timing import PeakMemory, Stopwatch, device_name

Emit = Callable[[tuple], None]


# ------------------------------------------------------------------------------------ resources

class Resources:
    """Per-process cache of loaded CLIP models and datasets (``clip``/``dataset`` force one)."""

    def __init__(self, clip: Any = None, dataset: Any = None):
        self.fixed_clip, self.fixed_dataset = clip, dataset
        self._clips: dict[tuple, Any] = {}
        self._data: dict[tuple, Any] = {}

    def clip(self, cfg) -> Any:
        if self.fixed_clip is not None:
            return self.fixed_clip
        from dpfpl.clip import load_clip

        key = (cfg.model.model, cfg.model.pretrained, cfg.model.device)
        if key not in self._clips:
            self._clips[key] = load_clip(cfg.model.model, cfg.model.pretrained, cfg.model.device)
        return self._clips[key]

    def dataset(self, cfg, options: dict[str, Any]) -> Any:
        if self.fixed_dataset is not None:
            return self.fixed_dataset
        from dpfpl.data import load_run_dataset

        key = (cfg.data.dataset, cfg.data.root, cfg.train.seed, json.dumps(options, sort_keys=True))
        if key not in self._data:
            self._data[key] = load_run_dataset(cfg, **options)
        return self._data[key]


# audit hook: bench.audit_hook (membership and mechanism-level attacks)


# ------------------------------------------------------------------------------------ one cell

def cell_status(cell: Cell, runs_dir: Path) -> str:
    """'done', 'changed' (finished, different spec), 'partial' (started, unfinished) or 'todo'."""
    d = runs_dir / cell.id
    if (d / "summary.json").is_file() and not (d / PENDING).is_file():
        return "done" if stored_spec_matches(cell, d) else "changed"
    return "partial" if d.exists() else "todo"


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def stored_spec_matches(cell: Cell, d: Path) -> bool:
    f = d / "cell.json"
    if f.is_file():
        try:
            return _normal(json.loads(f.read_text())) == _normal(cell.spec())
        except json.JSONDecodeError:
            return False
    f = d / "config.json"  # a run made outside the harness: compare the configuration only
    if not f.is_file():
        return False
    stored = json.loads(f.read_text())
    for key in ("dpfpl_version", "run_id"):  # run-directory facts, not configuration
        stored.pop(key, None)
    return _normal(stored) == _normal(cell.config().to_dict())


def spec_diff(cell: Cell, d: Path) -> str:
    """A short description of how the stored cell differs from the grid's (for error messages)."""
    try:
        old = _normal(json.loads((d / "cell.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return "no readable cell.json"
    new = _normal(cell.spec())
    diffs = []
    for sec in ("dataset_options",):
        if old.get(sec) != new.get(sec):
            diffs.append(f"{sec} {old.get(sec)} -> {new.get(sec)}")
    for sec, vals in new.get("config", {}).items():
        for k, v in vals.items():
            ov = old.get("config", {}).get(sec, {}).get(k)
            if ov != v:
                diffs.append(f"{k} {ov} -> {v}")
    return ", ".join(diffs[:4]) or "spec differs"


class _RoundEvents:
    """Engine callback forwarding round ends to the progress view."""

    def __init__(self, cell_id: str, emit: Emit):
        self.cell_id, self.emit = cell_id, emit

    def on_round_end(self, engine, row: dict[str, Any]) -> None:
        self.emit(("round", self.cell_id, int(row.get("round", 0)), int(engine.total_rounds),
                   row.get("local_acc"), row.get("epsilon_spent_rdp")))


def _median_step_ms(history: list[dict[str, Any]], local_steps: int) -> Optional[float]:
    """Median over rounds (the first one dropped as warm-up when there are several) of the
    per-client-step time."""
    per = []
    for r in history:
        n = local_steps * len(r.get("clients") or [])
        if n and r.get("train_s"):
            per.append(1e3 * float(r["train_s"]) / n)
    if len(per) > 1:
        per = per[1:]
    if not per:
        return None
    per.sort()
    mid = len(per) // 2
    return per[mid] if len(per) % 2 else 0.5 * (per[mid - 1] + per[mid])


PENDING = "cell.pending"  # what a started cell still owes (its audit); removed once all is written


def run_cell(cell: Cell, runs_dir: Path, res: Resources, emit: Emit = lambda e: None,
             audit_hook: Optional[Callable[..., Any]] = None, keep_checkpoint: bool = False,
             audit_attacks: Sequence[str] = ("loss",), audit_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run (or resume) one cell into ``runs_dir/<id>``; returns the harness record (bench.json).
    With ``audit_hook``, the finished run is then audited with ``audit_attacks``.

    A cell is finished only when everything it promises is written: with an audit, ``cell.pending``
    is written before training and removed after audit.json (the checkpoint is kept until then),
    so a cell killed during its audit is not "done"; a rerun finds its finished run and only audits
    it (see :func:`_finish_pending`)."""
    import torch

    from dpfpl.train import train

    d = runs_dir / cell.id
    cfg = cell.config()
    resume = d.is_dir() and (d / "checkpoint.pt").is_file() and (d / "cell.json").is_file() \
        and stored_spec_matches(cell, d)
    if resume and (d / "summary.json").is_file() and (d / PENDING).is_file():
        return _finish_pending(cell, d, res, emit, audit_hook, keep_checkpoint, audit_attacks, audit_options)
    if d.exists() and not resume:
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    if not resume:
        atomic_write_json(d / "cell.json", cell.spec())
    if audit_hook is not None:
        atomic_write_json(d / PENDING, {"audit": list(audit_attacks)})
    emit(("start", cell.id, "resuming" if resume else "loading"))
    if res.fixed_clip is None:
        from dpfpl.clip import resolve_device

        resolve_device(cfg.model.device)  # a clear error for an unavailable device
    clip = res.clip(cfg)
    dataset = res.dataset(cfg, dict(cell.dataset_options))
    dev = clip.device
    cb = _RoundEvents(cell.id, emit)
    status = lambda msg: emit(("status", cell.id, msg))  # noqa: E731
    started = time.time()
    with PeakMemory(dev) as mem, Stopwatch(dev) as sw:
        if resume:
            summary = train(resume=d, clip=clip, dataset=dataset, callbacks=(cb,), on_status=status)
        else:
            summary = train(cfg, out=d, clip=clip, dataset=dataset, callbacks=(cb,), on_status=status)
    engine = summary.pop("_engine")
    steps = int(summary.get("client_steps") or 0)
    train_s = float(summary.get("train_s") or 0.0)
    record: dict[str, Any] = {
        "cell": cell.id, "device": device_name(dev), "device_type": dev.type, "torch_threads": torch.get_num_threads(),
        "cell_wall_s": sw.seconds, "peak_mem_mb": mem.peak_mb, "mem_kind": mem.kind,
        "process_maxrss_mb": mem.process_maxrss_mb, "resumed": resume,
        "steps_per_s": steps / train_s if train_s > 0 else None,
        "examples_per_s": steps * cfg.train.batch_size / train_s if train_s > 0 else None,
        "step_ms_median": _median_step_ms(engine.history, engine.local_steps),
        "started_at": started, "finished_at": time.time(), "pid": os.getpid(),
    }
    atomic_write_json(d / "bench.json", record)
    _audit_and_close(cell, d, record, clip, dataset, audit_hook, keep_checkpoint, audit_attacks, audit_options, emit)
    record["done_event"] = ("done", cell.id, summary.get("local_acc"), summary.get("neighbor_acc"),
                            summary.get("epsilon_spent"), sw.seconds)
    return record


def _audit_and_close(cell: Cell, d: Path, record: dict[str, Any], clip: Any, dataset: Any,
                     audit_hook: Optional[Callable[..., Any]], keep_checkpoint: bool, audit_attacks: Sequence[str],
                     audit_options: Optional[dict[str, Any]], emit: Emit) -> None:
    """Audit a trained cell (when asked), then mark it finished: remove ``cell.pending`` once the
    audit is written, and only then the checkpoint. An audit that raises leaves its error in
    audit.json and the cell pending (a rerun audits again); a kill leaves it pending too."""
    if audit_hook is not None:
        emit(("status", cell.id, "auditing"))
        try:
            record["audit"] = run_audit(audit_hook, d, clip, dataset, audit_attacks, audit_options)
        except Exception as exc:  # an audit failure must not lose the finished run
            record["audit_error"] = f"{type(exc).__name__}: {exc}"
            atomic_write_json(d / "audit.json", {"error": record["audit_error"]})
            return
    if not (d / "summary.json").is_file():
        return  # the run stopped early (it stays resumable)
    (d / PENDING).unlink(missing_ok=True)
    if not keep_checkpoint:
        (d / "checkpoint.pt").unlink(missing_ok=True)  # only needed to resume an unfinished cell


def _finish_pending(cell: Cell, d: Path, res: Resources, emit: Emit, audit_hook: Optional[Callable[..., Any]],
                    keep_checkpoint: bool, audit_attacks: Sequence[str],
                    audit_options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """A cell whose run finished but whose promises (its audit) were not all written: write them,
    training nothing; the record is the cell's bench.json from its training session."""
    cfg = cell.config()
    emit(("start", cell.id, "auditing a finished run"))
    summary = json.loads((d / "summary.json").read_text())
    try:
        record = json.loads((d / "bench.json").read_text())
    except (OSError, json.JSONDecodeError):
        record = {"cell": cell.id, "resumed": True, "started_at": time.time(), "pid": os.getpid()}
    clip = res.clip(cfg) if audit_hook is not None else None
    dataset = res.dataset(cfg, dict(cell.dataset_options)) if audit_hook is not None else None
    _audit_and_close(cell, d, record, clip, dataset, audit_hook, keep_checkpoint, audit_attacks, audit_options, emit)
    record["done_event"] = ("done", cell.id, summary.get("local_acc"), summary.get("neighbor_acc"),
                            summary.get("epsilon_spent"), float(record.get("cell_wall_s") or 0.0))
    return record


# ------------------------------------------------------------------------------------ workers

_WORKER: dict[str, Any] = {}


def _worker_init(q: Any, threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    _WORKER["queue"] = q
    _WORKER["res"] = Resources()


def _worker_run(cell: Cell, runs_dir: str, audit: Optional[tuple[list[str], dict[str, Any]]],
                keep_checkpoint: bool) -> dict[str, Any]:
    """``audit``: (attacks, options), or None for no audit."""
    q = _WORKER["queue"]
    hook = find_audit_hook() if audit else None
    attacks, options = audit or (("loss",), {})
    return run_cell(cell, Path(runs_dir), _WORKER["res"], emit=q.put, audit_hook=hook, keep_checkpoint=keep_checkpoint,
                    audit_attacks=attacks, audit_options=options)


# ------------------------------------------------------------------------------------ progress

def cell_weight(cell: Cell) -> float:
    """Relative cost estimate of a cell, for the ETA (per-example gradients dominate DP cells)."""
    from dpfpl.registry import get_method

    cfg = cell.config()
    if not get_method(cell.method).trainable:
        return 1.0
    t = cfg.train
    steps = t.rounds * (t.local_steps or 5) * max(1, round(cfg.data.num_clients * t.client_fraction))
    return 2.0 + steps * (0.2 if not cell.private else 0.2 * max(2.0, t.batch_size / 2.0))


def _fmt_pct(x: Any) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def _fmt_eta(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class GridProgress:
    """A rich live view over the grid (cells done / total, running cells, ETA), or plain lines."""

    def __init__(self, cells: list[Cell], done: set[str], enabled: bool = True, stream=None):
        from rich.console import Console

        self.console = Console(stderr=True, file=stream)
        self.enabled = enabled and self.console.is_terminal
        self.weights = {c.id: cell_weight(c) for c in cells}
        self.total = len(cells)
        self.n_done = len(done)
        self.todo_weight = sum(w for cid, w in self.weights.items() if cid not in done)
        self.done_weight = 0.0
        self.t0 = time.perf_counter()
        self.progress = None
        self.cell_tasks: dict[str, Any] = {}
        self.log_lines: list[str] = []
        self.finished: set[str] = set()

    def __enter__(self) -> "GridProgress":
        if self.enabled:
            from rich.progress import (BarColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=self.console, refresh_per_second=4)
            self.progress.start()
            self.grid_task = self.progress.add_task(self._grid_desc(), total=max(self.todo_weight, 1e-9),
                                                    info=f"{self.n_done}/{self.total} cells")
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def _grid_desc(self) -> str:
        return "grid"

    def eta_s(self) -> float:
        el = time.perf_counter() - self.t0
        if self.done_weight <= 0:
            return float("inf")
        return el * (self.todo_weight - self.done_weight) / self.done_weight

    def log(self, msg: str) -> None:
        self.log_lines.append(msg)
        if self.progress:
            self.progress.console.log(msg)
        else:
            print(f"[bench] {msg}", file=self.console.file, flush=True)

    def handle(self, event: tuple) -> None:
        kind, cid = event[0], event[1]
        if cid in self.finished:
            return  # a late event of a finished cell (worker queues are asynchronous)
        if kind == "start":
            if self.progress and cid not in self.cell_tasks:
                self.cell_tasks[cid] = self.progress.add_task(f"  {cid}", total=None, info=event[2])
        elif kind == "status":
            if self.progress and cid in self.cell_tasks:
                self.progress.update(self.cell_tasks[cid], info=event[2])
        elif kind == "round":
            _, _, rnd, total, acc, eps = event
            if self.progress and cid in self.cell_tasks:
                info = f"round {rnd}/{total}" + (f" local {_fmt_pct(acc)}" if acc is not None else "") + \
                       (f" eps {eps:.3g}" if eps is not None else "")
                self.progress.update(self.cell_tasks[cid], total=max(total, 1), completed=rnd, info=info)
        elif kind == "done":
            _, _, local, neigh, eps, secs = event
            self.finish(cid)
            extra = f" eps {eps:.3g}" if eps is not None else ""
            self.log(f"{self.n_done}/{self.total} {cid}: local {_fmt_pct(local)} neighbour {_fmt_pct(neigh)}{extra} "
                     f"({secs:.1f} s; ETA {_fmt_eta(self.eta_s())})")
        elif kind == "failed":
            self.finish(cid)
            self.log(f"{cid} FAILED: {event[2]}")

    def finish(self, cid: str) -> None:
        self.finished.add(cid)
        self.n_done += 1
        self.done_weight += self.weights.get(cid, 1.0)
        if self.progress:
            if cid in self.cell_tasks:
                self.progress.remove_task(self.cell_tasks.pop(cid))
            self.progress.update(self.grid_task, completed=self.done_weight, info=f"{self.n_done}/{self.total} cells")


# ------------------------------------------------------------------------------------ the grid

@dataclass
class BenchResult:
    out: Path
    cells: list[Cell]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0
    cpu_s: Optional[float] = None      # user + system CPU of this process and its (finished) workers
    loadavg: Optional[tuple[float, float]] = None  # 1-min load average at start and end (shared cores?)
    jobs: int = 1
    records: dict[str, dict] = field(default_factory=dict)


class Harness:
    """Runs ``grid`` into ``out``; see the module doc."""

    def __init__(self, grid: GridSpec, out: str | Path, *, jobs: int = 1, threads: Optional[int] = None,
                 progress: bool = True, audit: Optional[bool] = None, rerun_changed: bool = False,
                 command: Optional[str] = None, clip: Any = None, dataset: Any = None, stream=None,
                 keep_going: bool = False, keep_checkpoints: bool = False, fresh: bool = False):
        self.grid = grid
        self.fresh = fresh
        self.out = Path(out)
        self.runs_dir = self.out / "runs"
        self.jobs = max(1, int(jobs))
        self.threads = threads
        self.show_progress = progress
        self.audit = grid.audit if audit is None else audit
        self.rerun_changed = rerun_changed
        self.command = command
        self.res = Resources(clip, dataset)
        self.stream = stream
        self.keep_going = keep_going
        self.keep_checkpoints = keep_checkpoints
        if self.jobs > 1 and (clip is not None or dataset is not None):
            raise ConfigError("injected clip/dataset objects need jobs=1")

    def _audits(self, cell: Cell) -> bool:
        return bool(self.audit) and self.grid.audits_cell(cell)

    # ------------------------------------------------------------------ planning
    def plan(self) -> tuple[list[Cell], dict[str, str]]:
        """(cells, status per cell id)."""
        cells = self.grid.cells()
        return cells, {c.id: cell_status(c, self.runs_dir) for c in cells}

    def preflight(self, cells: list[Cell], todo: list[Cell]) -> None:
        """Fail fast: every config valid, datasets and weights present (loaded once, reused)."""
        for c in cells:
            c.config()
        if "root" in self.grid.requires:
            missing = sorted({c.config().data.dataset for c in todo if c.config().data.root is None})
            if missing:
                raise ConfigError(f"preset {self.grid.name} needs --root DIR holding {', '.join(missing)} "
                                  f"(see `dpfpl datasets` and the dataset layouts in the docs)")
        seen_models, seen_data = set(), set()
        for c in todo:
            cfg = c.config()
            mkey = (cfg.model.model, cfg.model.pretrained, cfg.model.device)
            if mkey not in seen_models:
                seen_models.add(mkey)
                if "weights" in self.grid.requires and cfg.model.pretrained in (None, "none"):
                    raise ConfigError(f"preset {self.grid.name} needs pretrained {cfg.model.model} weights: "
                                      "pass --pretrained /path/to/checkpoint (or an open_clip tag in the local cache)")
                self.res.clip(cfg)  # raises a clear error when the weights are absent
            dkey = (cfg.data.dataset, cfg.data.root)
            if dkey not in seen_data:
                seen_data.add(dkey)
                self.res.dataset(cfg, dict(c.dataset_options))

    def write_grid(self, cells: list[Cell], status: dict[str, str]) -> None:
        from dpfpl import __version__

        atomic_write_json(self.out / "grid.json", {
            "grid": self.grid.to_dict(), "command": self.command, "dpfpl_version": __version__,
            "cells": [{"id": c.id, "status": status.get(c.id)} for c in cells], "written_at": time.time()})

    # ------------------------------------------------------------------ running
    def run(self, report: bool = True) -> BenchResult:
        t0 = time.perf_counter()
        import torch

        self._cpu0, self._load0 = _cpu_seconds(), _loadavg()
        threads_before = torch.get_num_threads()
        if self.threads is not None and self.jobs == 1:
            torch.set_num_threads(self.threads)
        try:
            return self._run(t0, report)
        finally:
            torch.set_num_threads(threads_before)

    def _run(self, t0: float, report: bool) -> BenchResult:
        cells, status = self.plan()
        changed = [c for c in cells if status[c.id] == "changed"]
        if changed and not (self.rerun_changed or self.fresh):
            c = changed[0]
            raise ConfigError(
                f"{len(changed)} finished cell(s) in {self.runs_dir} were run with different settings "
                f"(e.g. {c.id}: {spec_diff(c, self.runs_dir / c.id)}); pass --rerun-changed to run them again, "
                f"or --out DIR to keep both")
        done = set() if self.fresh else {cid for cid, s in status.items() if s == "done"}
        todo = [c for c in cells if c.id not in done]
        if self.fresh:  # a finished cell has no checkpoint: run_cell replaces its directory when it starts
            for c in todo:
                (self.runs_dir / c.id / "checkpoint.pt").unlink(missing_ok=True)
        result = BenchResult(self.out, cells, skipped=sorted(done), jobs=self.jobs)
        self.out.mkdir(parents=True, exist_ok=True)
        self.write_grid(cells, status)
        self.preflight(cells, todo)
        hook = find_audit_hook() if self.audit else None
        prog = GridProgress(cells, done, enabled=self.show_progress, stream=self.stream)
        try:
            with prog:
                if done:
                    prog.log(f"{len(done)} finished cell(s) in {self.runs_dir} skipped")
                if self.jobs == 1:
                    self._run_serial(todo, prog, hook, result)
                else:
                    self._run_parallel(todo, prog, result)
        finally:
            result.wall_s = time.perf_counter() - t0
            result.cpu_s = _cpu_seconds() - self._cpu0
            result.loadavg = (self._load0, _loadavg())
            if report:
                from .report import write_report

                write_report(self.out, self.grid, cells, command=self.command, result=result)
        return result

    def _run_serial(self, todo: list[Cell], prog: GridProgress, hook, result: BenchResult) -> None:
        for cell in todo:
            try:
                rec = run_cell(cell, self.runs_dir, self.res, emit=prog.handle,
                               audit_hook=hook if self._audits(cell) else None, keep_checkpoint=self.keep_checkpoints,
                               audit_attacks=self.grid.audit_attacks, audit_options=self.grid.audit_options)
                result.records[cell.id] = rec
                result.ran.append(cell.id)
                prog.handle(rec.pop("done_event"))
            except (KeyboardInterrupt, ConfigError):
                raise
            except Exception as exc:
                if not self.keep_going:
                    raise
                result.failed[cell.id] = f"{type(exc).__name__}: {exc}"
                prog.handle(("failed", cell.id, result.failed[cell.id]))

    def _run_parallel(self, todo: list[Cell], prog: GridProgress, result: BenchResult) -> None:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        threads = self.threads if self.threads is not None else max(1, available_cpus() // self.jobs)
        ex = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_worker_init,
                                 initargs=(q, threads))
        # longest cells first: the grid's makespan is then close to total work / jobs
        order = sorted(todo, key=cell_weight, reverse=True)
        audit = (list(self.grid.audit_attacks), dict(self.grid.audit_options))
        futures = {ex.submit(_worker_run, c, str(self.runs_dir), audit if self._audits(c) else None,
                             self.keep_checkpoints): c
                   for c in order}
        pending = set(futures)
        try:
            while pending:
                done_f, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                self._drain(q, prog)
                for f in done_f:
                    cell = futures[f]
                    exc = f.exception()
                    if exc is None:
                        rec = f.result()
                        self._drain(q, prog)
                        result.records[cell.id] = rec
                        result.ran.append(cell.id)
                        prog.handle(tuple(rec.pop("done_event")))
                    elif self.keep_going and not isinstance(exc, ConfigError):
                        result.failed[cell.id] = f"{type(exc).__name__}: {exc}"
                        prog.handle(("failed", cell.id, result.failed[cell.id]))
                    else:
                        raise exc
            self._drain(q, prog)
        except BaseException:
            # stop now: cancel queued cells and end the workers (a worker that caught the interrupt
            # inside a cell would otherwise go on with the cells already handed to it)
            for f in pending:
                f.cancel()
            procs = list(getattr(ex, "_processes", {}).values())
            ex.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
            raise
        ex.shutdown(wait=True)

    @staticmethod
    def _drain(q, prog: GridProgress) -> None:
        while True:
            try:
                prog.handle(q.get_nowait())
            except queue_mod.Empty:
                return


def _cpu_seconds() -> float:
    import resource

    r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(x.ru_utime + x.ru_stime for x in r)


def _loadavg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_jobs(grid: GridSpec) -> int:
    """Worker processes for ``--jobs auto``: 1 on a GPU (one device), else one per core (at most 8)
    for tiny models and 1 for anything else (a large model per core would not fit in memory)."""
    import torch

    cells = grid.cells()
    models = {c.config().model.model for c in cells}
    devices = {c.config().model.device for c in cells}
    if any(d.startswith("cuda") for d in devices) or ("auto" in devices and torch.cuda.is_available()):
        return 1
    if not all(m.startswith("dpfpl-") for m in models):
        return 1
    return max(1, min(8, available_cpus(), len(cells)))


def default_out(grid: GridSpec) -> Path:
    return Path("results") / grid.name


def command_line(argv: Optional[list[str]] = None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return "dpfpl " + shlex.join(args) if args else "dpfpl"


__all__ = ["Harness", "BenchResult", "Resources", "run_cell", "cell_status", "find_audit_hook", "normalize_audit",
           "default_out", "command_line", "eps_label"]
