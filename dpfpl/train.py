"""Train one run into a run directory (what ``dpfpl train`` does), with resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional

from .config import RunConfig
from .engine import Engine
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
             overrides: Optional[dict[str, Any]]) -> tuple[RunConfig, Optional[RunDir], Optional[dict[str, Any]]]:
    """(config, run directory or None, checkpoint state or None) of a new or resumed run, for every
    engine. A resumed run keeps its saved config; only ``rounds`` may be raised."""
    if resume is not None:
        rd = RunDir(resume)
        cfg = rd.load_config()
        if overrides:
            extra = set(overrides) - {"rounds"}
            if extra:
                raise ConfigError(f"--resume continues the saved config; only --rounds may change (got {sorted(extra)})")
            cfg.update(overrides)
        return cfg.validate(), rd, rd.load_checkpoint()
    cfg = cfg or RunConfig()
    if overrides:
        cfg.update(overrides)
    cfg.validate()
    rd = RunDir(out) if out is not None else None
    if rd is not None:
        rd.start(cfg)
    return cfg, rd, None


def train(cfg: Optional[RunConfig] = None, out: Optional[str | Path] = None, resume: Optional[str | Path] = None,
          overrides: Optional[dict[str, Any]] = None, callbacks: tuple = (),
          on_status: Optional[Callable[[str], None]] = None,
          on_step: Optional[Callable[[int, int], None]] = None, **engine_kwargs: Any) -> dict[str, Any]:
    """Run (or resume) training; returns the summary (its ``_engine`` key holds the Engine).

    ``out``/``resume`` name the run directory; ``engine_kwargs`` (clip, dataset, clients_data) go to
    :class:`~dpfpl.engine.Engine`."""
    t0 = time.perf_counter()
    cfg, rd, state = open_run(cfg, out, resume, overrides)
    engine = Engine(cfg, on_status=on_status, **engine_kwargs)
    if state is not None:
        engine.load_state_dict(state)
        if engine.round < engine.total_rounds:
            reason = engine.privacy.check_round(list(range(len(engine.clients))), engine.local_steps)
            if reason is not None:
                raise BudgetExhausted(f"cannot resume {resume}: {reason}; nothing was trained")
    cbs = ((rd,) if rd is not None else ()) + tuple(callbacks)
    engine.run(cbs, on_step=on_step)
    summary = summarize(engine, time.perf_counter() - t0)
    if rd is not None:
        rd.finish(engine, summary)
    summary["_engine"] = engine
    return summary
