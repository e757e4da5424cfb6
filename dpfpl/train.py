"""Train one run into a run directory (what ``dpfpl train`` does), with resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from .config import RunConfig
from .engine import Engine
from .preflight import check_config
from .errors import BudgetExhausted, ConfigError
from .rundir import RunDir


def summarize(engine: Engine, wall_s: float, pld: bool = True) -> dict[str, Any]:
    """summary.json of a finished (or stopped) run; ``pld=False`` skips the PLD epsilon (seconds per
    run: audits' shadow and canary models use it)."""
    final = engine.final_metrics()
    cfg = engine.cfg
    steps = sum(c.steps for c in engine.clients)
    return {
        "engine": engine.engine_name, "method": cfg.train.method, "dataset": cfg.data.dataset, "rounds": engine.round if engine.method.trainable
        else 0, "rounds_planned": cfg.train.rounds, "seed": cfg.train.seed, "protocol": engine.protocol,
        "num_clients": cfg.data.num_clients, "local_steps": engine.local_steps,
        "local_acc": final.get("local_acc"), "neighbor_acc": final.get("neighbor_acc"),
        "local_acc_per_client": final.get("local_acc_per_client"),
        "neighbor_acc_per_client": final.get("neighbor_acc_per_client"),
        **({"val_local_acc": final["val_local_acc"]} if "val_local_acc" in final else {}),
        "zeroshot_local_acc": engine.zeroshot["local_acc"], "zeroshot_neighbor_acc": engine.zeroshot["neighbor_acc"],
        "client_steps": steps, "wall_s": wall_s, "train_s": sum(r.get("train_s", 0.0) for r in engine.history),
        "stopped_reason": engine.stopped_reason, "model": cfg.model.model, "pretrained": cfg.model.pretrained,
        **engine.privacy.summary(pld=pld),
    }


def open_run(cfg: Optional[RunConfig], out: Optional[str | Path], resume: Optional[str | Path],
             overrides: Optional[dict[str, Any]], start: bool = True, engine: str = "inprocess"
             ) -> tuple[RunConfig, Optional[RunDir], Optional[dict[str, Any]]]:
    """(config, run directory or None, checkpoint state or None) of a new or resumed run, for every
    engine. Everything knowable from the config is checked first (:mod:`dpfpl.preflight`) and
    nothing is created when a check fails (``engine``: the one the run is for, see ``check_config``).

    New run: ``out`` must be a new or empty directory; with ``start`` it is created, locked and
    given config.json now, otherwise the caller calls ``rd.start(cfg)`` (the in-process engine does
    once the privacy mechanism is built). Resume: the directory is locked first (a second writer
    gets :class:`~dpfpl.rundir.RunDirBusy`); it keeps its saved config, only ``rounds`` may be
    raised, and the checkpoint must belong to that config.json."""
    if resume is not None:
        rd = RunDir(resume)
        if not rd.file("config.json").is_file():
            raise ConfigError(f"--resume {rd.path}: no config.json there (not a dpfpl run directory)")
        rd.acquire()
        try:
            cfg = rd.load_config()
            state = rd.load_checkpoint()
            if state is not None:
                rd.check_checkpoint(cfg, state)
            if overrides:
                extra = set(overrides) - {"rounds"}
                if extra:
                    raise ConfigError(f"--resume continues the saved config; only --rounds may change (got {sorted(extra)})")
                cfg.update(overrides)
            check_config(cfg, engine)
        except BaseException:
            rd.release()
            raise
        return cfg, rd, state
    cfg = cfg or RunConfig()
    if overrides:
        cfg.update(overrides)
    check_config(cfg, engine)
    rd = RunDir(out) if out is not None else None
    if rd is not None:
        rd.check_new()
        if start:
            rd.start(cfg)
    return cfg, rd, None


def load_resumed(engine: Any, state: dict[str, Any], rd: RunDir) -> None:
    """Load a checkpoint into a freshly built engine; a checkpoint that does not fit the config
    (e.g. an older one whose config.json was edited) is a ConfigError, not a traceback."""
    try:
        engine.load_state_dict(state)
    except (RuntimeError, KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{rd.file('checkpoint.pt')} does not fit {rd.file('config.json')} "
                          f"({type(exc).__name__}: {str(exc)[:160]}): restore config.json, or start a new run") from None


def finished_noop(rd: RunDir, summary: dict[str, Any]) -> dict[str, Any]:
    """The result of resuming a finished run: its summary as saved, nothing written."""
    return {**summary, "_noop": (f"run {rd.path} is already finished ({summary.get('rounds')} of "
                                 f"{summary.get('rounds_planned')} rounds): nothing was done")}


def train(cfg: Optional[RunConfig] = None, out: Optional[str | Path] = None, resume: Optional[str | Path] = None,
          overrides: Optional[dict[str, Any]] = None, callbacks: tuple = (),
          on_status: Optional[Callable[[str], None]] = None,
          on_step: Optional[Callable[[int, int], None]] = None, **engine_kwargs: Any) -> dict[str, Any]:
    """Run (or resume) training; returns the summary (its ``_engine`` key holds the Engine).

    ``out``/``resume`` name the run directory; ``engine_kwargs`` (clip, dataset, clients_data) go to
    :class:`~dpfpl.engine.Engine`. Resuming a finished run (no more rounds asked) does nothing and
    returns the saved summary with a ``_noop`` line saying so (and no ``_engine``)."""
    t0 = time.perf_counter()
    cfg, rd, state = open_run(cfg, out, resume, overrides, start=False)
    try:
        if rd is not None and resume is not None:
            done = rd.finished_summary(cfg)
            if done is not None:
                return finished_noop(rd, done)
        on_ready = (lambda: rd.start(cfg)) if rd is not None and resume is None else None
        engine = Engine(cfg, on_status=on_status, on_ready=on_ready, **engine_kwargs)
        if state is not None:
            load_resumed(engine, state, rd)
            if engine.round < engine.total_rounds:
                reason = engine.privacy.check_round(list(range(len(engine.clients))), engine.local_steps)
                if reason is not None:
                    raise BudgetExhausted(f"cannot resume {resume}: {reason}; nothing was trained")
        if rd is not None and resume is not None and (rd.file("summary.json").is_file()
                                                      or rd.load_config().train.rounds != cfg.train.rounds):
            rd.reopen(cfg)  # more rounds than planned: config.json says so, the old summary goes
        cbs = ((rd,) if rd is not None else ()) + tuple(callbacks)
        engine.run(cbs, on_step=on_step)
        summary = summarize(engine, time.perf_counter() - t0)
        if rd is not None:
            rd.finish(engine, summary)
    finally:
        if rd is not None:
            rd.release()
    summary["_engine"] = engine
    return summary
