"""The run directory: everything a run produces, written atomically, owned by one process.

    RUN_DIR/config.json        resolved RunConfig (+ dpfpl version, run_id)
    RUN_DIR/metrics.jsonl      one JSON object per round (rewritten atomically every round)
    RUN_DIR/metrics.csv        the same rows, scalar columns only
    RUN_DIR/checkpoint.pt      full engine state after the last finished round (resume point)
    RUN_DIR/ledger.json        privacy accountant ledger (private runs)
    RUN_DIR/membership.json    per client: assigned and actually used training example ids
    RUN_DIR/prompts.safetensors  final global prompt and every client's local prompt tensors
    RUN_DIR/summary.json       final means and run facts (written last: its presence = finished)
    RUN_DIR/.lock              the owner's lock (fcntl.flock) and pid

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a crash never leaves a half-written file; metrics are written before the
checkpoint, and a resume drops metric rows past the checkpoint's round.

Ownership: a process writing or resuming a run holds an exclusive ``flock`` on ``RUN_DIR/.lock``
(the kernel releases it when the process dies, even on ``kill -9``); a second writer gets
:class:`RunDirBusy` naming the owner's pid. Every file carries the run's random ``run_id`` (in
config.json, summary.json, each metrics row, ledger.json, membership.json and the checkpoint), so
:func:`mixed_run_problem` can tell a directory whose files come from different runs.

An OS error while writing (full disk, read-only folder) raises :class:`RunDirError`: one line
naming the path and saying whether the run can be resumed (the files already written are intact).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .config import RunConfig
from .errors import ConfigError, DpfplError

SCALARS = (int, float, str, bool, type(None))
LOCK = ".lock"
ID_FILES = ("summary.json", "ledger.json", "membership.json")  # JSON files with a top-level run_id


class RunDirBusy(DpfplError):
    """Another live process owns the run directory."""


class RunDirError(DpfplError):
    """An OS error while reading or writing a run directory (the message names the path)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN -> None (a missing value), +-inf kept (written ``Infinity``: an infinite eps is
    infinite, never null), tensors -> lists."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if isinstance(v, SCALARS) and k not in cols:
                cols.append(k)
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return out.getvalue()


def os_error_line(exc: OSError, path: Optional[Path | str] = None) -> str:
    """'PATH: reason' for an OS error (the path the error names, else ``path``)."""
    where = exc.filename if exc.filename is not None else path
    return f"{where}: {exc.strerror or exc}" if where is not None else str(exc.strerror or exc)


def _config_diff(a: dict[str, Any], b: dict[str, Any], skip: tuple[str, ...] = ("rounds",)) -> list[str]:
    """'section.field A vs B' for the fields of two RunConfig dicts that differ; a field missing
    from one side (a file written before the field existed) counts as its default."""
    out = []
    defaults = RunConfig().to_dict()
    for sec in RunConfig.SECTIONS:
        for k in sorted(set(a.get(sec, {})) | set(b.get(sec, {}))):
            if k in skip:
                continue
            d = defaults.get(sec, {}).get(k)
            va, vb = a.get(sec, {}).get(k, d), b.get(sec, {}).get(k, d)
            if va != vb:
                out.append(f"{sec}.{k} is {va!r} in config.json but {vb!r} in checkpoint.pt")
    return out


class RunDir:
    """Reads and writes one run directory; also the engine callback that checkpoints each round.

    Lifecycle: :meth:`check_new` (nothing created) -> :meth:`start` (creates, locks, writes
    config.json) for a new run, or :meth:`acquire` + :meth:`load_config` + :meth:`load_checkpoint`
    for a resume; :meth:`release` when done (the OS releases the lock if the process dies). Wall
    time is recorded per session (one process's start to its last write) and summed in summary.json.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._run_id: Optional[str] = None
        self._lock_fd: Optional[int] = None
        self._t0 = time.perf_counter()
        self.prior_sessions: list[dict[str, Any]] = []  # sessions recorded in the checkpoint
        self.start_round = 0  # the checkpoint's round when this session began
        self.saved_round: Optional[int] = None  # round of the last checkpoint on disk

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def run_id(self) -> Optional[str]:
        """This run's id (from config.json when it was not started by this object)."""
        if self._run_id is None and self.file("config.json").is_file():
            self._run_id = _read_json(self.file("config.json")).get("run_id")
        return self._run_id

    # ------------------------------------------------------------------ ownership
    def check_new(self) -> None:
        """Raise ConfigError if a new run cannot go here; creates nothing."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"--out {p} is a file, not a directory: choose another --out")
        if self.file("checkpoint.pt").exists() or self.file("summary.json").exists():
            raise ConfigError(f"run directory {p} already holds a run: use --resume {p} "
                              "to continue it, or choose another --out")
        anc = p
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise ConfigError(f"--out {p}: {anc} is a file, not a directory")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {p}: {anc} is not writable")

    def acquire(self) -> None:
        """Take the run directory's lock or raise :class:`RunDirBusy` naming the owner's pid."""
        if self._lock_fd is not None:
            return
        lock = self.file(LOCK)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot lock run directory {self.path}: {os_error_line(exc, lock)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            mine = " (this process)" if owner == str(os.getpid()) else ""
            raise RunDirBusy(f"run directory {self.path} is in use by process {owner}{mine}: wait for it "
                             "to finish (or stop it), or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        """Give the lock back (idempotent)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __del__(self) -> None:  # a RunDir dropped without release() must not keep the run locked
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ lifecycle
    def start(self, cfg: RunConfig, overwrite: bool = False) -> None:
        """Create the directory, take its lock and write config.json with a fresh run_id."""
        if not overwrite:
            self.check_new()
        with self._writing("create"):
            self.path.mkdir(parents=True, exist_ok=True)
        self.acquire()
        if not overwrite and (self.file("checkpoint.pt").exists() or self.file("summary.json").exists()):
            self.release()  # another process started a run here between check_new and the lock
            self.check_new()
        self._run_id = secrets.token_hex(8)
        self.write_config(cfg)

    def write_config(self, cfg: RunConfig) -> None:
        """(Re)write config.json for this run (keeps the run_id)."""
        from . import __version__

        with self._writing("config.json"):
            atomic_write_json(self.file("config.json"),
                              {**cfg.to_dict(), "dpfpl_version": __version__, "run_id": self.run_id})

    def load_config(self) -> RunConfig:
        f = self.file("config.json")
        if not f.is_file():
            raise ConfigError(f"--resume {self.path}: no config.json there (not a dpfpl run directory)")
        d = _read_json(f)
        self._run_id = d.get("run_id")
        return RunConfig.from_dict(d, source=str(f))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint (None when the run never finished a round); records its sessions."""
        f = self.file("checkpoint.pt")
        if not f.is_file():
            return None
        try:
            state = torch.load(f, weights_only=True)  # tensors and plain data only: no code runs on load
        except OSError as exc:
            raise RunDirError(f"cannot read {os_error_line(exc, f)}") from None
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            raise ConfigError(f"{f} is not a readable dpfpl checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
        self.prior_sessions = list(state.get("sessions", []))
        self.start_round = self.saved_round = int(state.get("round", 0))
        return state

    def check_checkpoint(self, cfg: RunConfig, state: dict[str, Any]) -> None:
        """Raise ConfigError if ``state`` is not this config.json's run (ignoring ``rounds``, which a
        resume may raise)."""
        cid = state.get("run_id")
        if cid is not None and self.run_id is not None and cid != self.run_id:
            raise ConfigError(f"{self.file('checkpoint.pt')} is from run {cid} but config.json from run "
                              f"{self.run_id}: the files of two runs were mixed; start a new run")
        saved = state.get("config")
        if saved is not None:
            diff = _config_diff(cfg.to_dict(), saved)
            if diff:
                raise ConfigError(f"{self.file('config.json')} no longer matches the checkpoint ({diff[0]}"
                                  f"{f' and {len(diff) - 1} more' if len(diff) > 1 else ''}): restore "
                                  "config.json, or start a new run")

    def finished_summary(self, cfg: RunConfig) -> Optional[dict[str, Any]]:
        """summary.json if the run trained every planned round and ``cfg`` asks for no more, else
        None (a run stopped early, e.g. by its privacy budget, is left to the resume checks)."""
        f = self.file("summary.json")
        if not f.is_file():
            return None
        s = _read_json(f)
        if s.get("stopped_reason") or cfg.train.rounds > int(s.get("rounds_planned") or 0):
            return None
        return s

    def reopen(self, cfg: RunConfig) -> None:
        """Before training a finished run further (``--rounds`` raised): its summary no longer
        describes the directory, and config.json gets the new plan."""
        with self._writing("summary.json"):
            self.file("summary.json").unlink(missing_ok=True)
        self.write_config(cfg)

    # ------------------------------------------------------------------ writing
    def _writing(self, what: str):
        return _Writing(self, what)

    def sessions(self, engine) -> list[dict[str, Any]]:
        """Every session's wall time and rounds, this one included (up to now)."""
        now = {"wall_s": time.perf_counter() - self._t0, "first_round": self.start_round + 1,
               "last_round": int(engine.round), "pid": os.getpid()}
        return self.prior_sessions + [now]

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, "run_id": self.run_id}

    def on_round_end(self, engine, row: dict[str, Any]) -> None:
        rows = [self._stamp(r) for r in engine.history]
        with self._writing("round"):
            atomic_write_bytes(self.file("metrics.jsonl"),
                               "".join(json.dumps(_clean(r)) + "\n" for r in rows).encode())
            atomic_write_bytes(self.file("metrics.csv"), rows_to_csv(rows).encode())
            if engine.privacy.ledger is not None:
                atomic_write_json(self.file("ledger.json"), self._stamp(engine.privacy.ledger_json()))
            atomic_write_json(self.file("membership.json"), self._stamp(engine.membership()))
            state = {**engine.state_dict(), "run_id": self.run_id, "config": engine.cfg.to_dict(),
                     "sessions": self.sessions(engine)}
            atomic_torch_save(self.file("checkpoint.pt"), state)
        self.saved_round = int(engine.round)

    def finish(self, engine, summary: dict[str, Any]) -> None:
        """Write prompts, membership and summary.json; ``summary`` gets the run_id, the sessions
        and ``wall_s`` = the sum of every session's wall time (in place)."""
        from safetensors.torch import save as st_save

        tensors = {"global/p_G": engine.server.p_G.detach().clone().contiguous()}
        for c in engine.clients:
            for k, v in c.local.items():
                tensors[f"client{c.id}/{k}"] = v.detach().clone().contiguous()
            tensors[f"client{c.id}/context"] = c.personal_context(engine.server.p_G).clone().contiguous()
        sessions = self.sessions(engine)
        summary.update(run_id=self.run_id, sessions=sessions, wall_s=sum(s["wall_s"] for s in sessions))
        with self._writing("finish"):
            atomic_write_bytes(self.file("prompts.safetensors"), st_save(tensors))
            atomic_write_json(self.file("membership.json"), self._stamp(engine.membership()))
            atomic_write_json(self.file("summary.json"), summary)


class _Writing:
    """Context manager turning an OSError into one RunDirError line that names the path and says
    what is left on disk."""

    def __init__(self, rd: RunDir, what: str):
        self.rd, self.what = rd, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ, exc, tb) -> bool:
        if exc is None or not isinstance(exc, OSError) or isinstance(exc, BlockingIOError):
            return False
        rd = self.rd
        if rd.saved_round:
            left = (f"the run stays resumable from round {rd.saved_round} (its files are intact): fix this, "
                    f"then dpfpl train --resume {rd.path}")
        elif self.what in ("create", "config.json"):
            left = "nothing was trained"
        else:
            left = "no round was saved: fix this and start the run again"
        raise RunDirError(f"cannot write {os_error_line(exc, rd.path)}; {left}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise RunDirError(f"cannot read {os_error_line(exc, path)}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None


def mixed_run_problem(path: str | Path) -> Optional[str]:
    """None if every file of run directory ``path`` carries config.json's run_id (or, for a run
    written before run ids, none does); else one line naming the file that differs."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return None  # not a run directory: the caller's own checks say so
    want = _read_json(p / "config.json").get("run_id")
    found: list[tuple[str, Any]] = []
    for name in ID_FILES:
        if (p / name).is_file():
            found.append((name, _read_json(p / name).get("run_id")))
    if (p / "metrics.jsonl").is_file():
        for i, line in enumerate((p / "metrics.jsonl").read_text().splitlines()):
            if line.strip():
                found.append((f"metrics.jsonl row {i + 1}", json.loads(line).get("run_id")))
    if (p / "checkpoint.pt").is_file():
        try:
            found.append(("checkpoint.pt", torch.load(p / "checkpoint.pt", weights_only=True).get("run_id")))
        except Exception as exc:  # noqa: BLE001
            return f"{p / 'checkpoint.pt'} is not readable ({type(exc).__name__})"
    if want is None and all(rid is None for _, rid in found):
        return None  # a run directory from before run ids
    for name, rid in found:
        if rid != want:
            return (f"{p}: {name} is from run {rid} but config.json from run {want}: the directory mixes the "
                    "files of different runs (two writers?); train into a fresh directory")
    return None
