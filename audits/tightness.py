"""How tight is the mechanism audit? Sound bound / accounted eps for every method's real mechanism.

For each method x target eps, the mechanism a run of that recipe would use is built by the code
training uses (:func:`dpfpl.privacy.dp.build_dp_privacy` on the recipe's dataset partition: the
same calibration, split and sampling rates), and the client that spends most is audited over the
run's steps with :func:`audits.mechanism_run.audit_batch_mechanism` (Dirac canary, Poisson rate q,
per-step likelihood ratio; Nasr et al., USENIX Security 2023). Nothing is trained: the audit needs
the release code only. ``--joint Q T`` audits DP-FPL's two-part joint mechanism (local client-noised,
global server-noised, equal multipliers) at a chosen rate and step count instead.

Usage::

    python -m audits.tightness --preset audits --methods dpfpl fedpgp fedotp promptfl local \\
        --eps 4 2 1 --trials 1000000 --out results/audits/tightness
    python -m audits.tightness --joint 0.1 16 --eps 4 --trials 1000000 --out /tmp/t

writes ``OUT/tightness.jsonl`` (one line per setting) and ``OUT/table_tightness.md / .tex / .csv``
(the table, with the command). The ratio is only as good as the trial budget: the bound's Clopper-Pearson intervals at
delta 1e-5 need false positives deep in the tail (see results/audits/tightness/table_tightness.md).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["method_mechanism", "joint_mechanism", "tightness_row", "main"]


def method_mechanism(cfg) -> tuple[Any, int]:
    """(mechanism of the client that spends most, steps) of a DP run of ``cfg``, built as training
    builds it (dataset partition, local steps, calibration), without loading a model."""
    from dpfpl.data import load_run_dataset, partition
    from dpfpl.plan import plan_engine
    from dpfpl.privacy.dp import build_dp_privacy

    t, d = cfg.train, cfg.data
    clients = partition(load_run_dataset(cfg), d.num_clients, d.partition, seed=t.seed, beta=d.dirichlet_beta,
                        shots=d.shots, val_fraction=d.val_fraction)
    engine = plan_engine(cfg, clients)
    local_steps = engine.local_steps
    priv = build_dp_privacy(cfg, engine)
    cid = max(priv.mechanisms, key=lambda i: (priv.mechanisms[i].sampling_rate, -i))
    mech = priv.mechanisms[cid]
    steps = t.rounds * local_steps
    if mech.sampling != "poisson":
        steps = priv._epochs(cid, steps)
    return mech, steps


def joint_mechanism(q: float, steps: int, eps: float, delta: float, accountant: str = "pld"):
    """DP-FPL's joint mechanism (two equal parts, local client-noised, global server-noised, one
    Poisson batch) calibrated to ``eps`` over ``steps``."""
    from dpfpl.privacy.calibration import calibrate
    from dpfpl.privacy.events import batch_event
    from dpfpl.privacy.release import BatchMechanism, GaussianRelease

    s = calibrate(lambda x: [(batch_event([x * math.sqrt(2)] * 2, q, "poisson"), steps)], eps, delta, accountant)
    nm = s * math.sqrt(2)
    return BatchMechanism((GaussianRelease("local", nm, 1.0, 1.0),
                           GaussianRelease("global", nm, 1.0, 1.0, noise_at="server")), q, "poisson")


def tightness_row(mech, steps: int, delta: float, trials: int, accountant: str, seed: int = 0,
                  label: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One audited setting: accounted eps of ``steps`` x the mechanism's event, sound bound, ratio."""
    from .mechanism_run import audit_batch_mechanism

    t0 = time.perf_counter()
    r = audit_batch_mechanism(mech, steps, delta, trials, accountant=accountant, seed=seed)
    parts = {p.part: p.noise_multiplier for p in mech.releases}
    return {**(label or {}), "q": mech.sampling_rate, "steps": steps, "trials": trials, "delta": delta,
            "noise_multipliers": parts, "eps_accounted": r.claimed_eps, "eps_lower_bound": r.eps_lower_bound,
            "ratio": r.eps_lower_bound / r.claimed_eps if r.claimed_eps else None, "verdict": r.verdict,
            "statistic": r.statistic, "eps_estimate": r.eps_estimate, "tp": r.details["tp"], "fp": r.details["fp"],
            "seconds": round(time.perf_counter() - t0, 1)}


def _table(rows: list[dict[str, Any]], command: str):
    """The :class:`bench.tables.Table` of the rows (written as table_tightness.md / .tex / .csv)."""
    import pandas as pd

    from bench.tables import Table

    body = pd.DataFrame([{"method": r["method"], "eps target": f"{r['eps_target']:g}", "q": f"{r['q']:.4g}",
                          "steps": r["steps"],
                          "noise mult.": " / ".join(f"{k} {v:.3g}" for k, v in r["noise_multipliers"].items()),
                          "trials/world": f"{r['trials']:,}", "accounted eps": f"{r['eps_accounted']:.3f}",
                          "sound lower bound": f"{r['eps_lower_bound']:.3f}", "ratio": f"{r['ratio']:.2f}",
                          "verdict": r["verdict"], "GDP estimate (not a bound)":
                              "-" if r["eps_estimate"] is None else f"{r['eps_estimate']:.2f}",
                          "seconds": f"{r['seconds']:g}"} for r in rows])
    ok = sum(1 for r in rows if r["ratio"] is not None and r["ratio"] >= 0.7)
    caption = ("Sound eps lower bound (95%, Clopper-Pearson, Bonferroni over thresholds and statistics) of each "
               "method's real release code on its worst case (Dirac canary of norm 1000 C, other examples zero, the "
               "run's Poisson rate), over the accountant's eps of the same mechanism and steps. "
               f"Ratio >= 0.7 in {ok} of {len(rows)} settings. Seconds are wall time on the machine as loaded.")
    data = pd.DataFrame([{k: v for k, v in r.items() if k != "noise_multipliers"} for r in rows])
    return Table("tightness", "Mechanism-audit tightness", caption, body, data=data, notes=[f"Command: `{command}`"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dpfpl.errors import ConfigError

    p = argparse.ArgumentParser(prog="python -m audits.tightness", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="audits", help="bench preset whose recipe is audited (default audits)")
    p.add_argument("--methods", nargs="+", default=["dpfpl"], help="methods (default dpfpl)")
    p.add_argument("--joint", nargs=2, metavar=("Q", "T"), default=None,
                   help="audit DP-FPL's joint mechanism at rate Q over T steps instead of a preset's recipe")
    p.add_argument("--eps", nargs="+", type=float, default=[4.0, 2.0, 1.0])
    p.add_argument("--trials", type=int, default=1_000_000, help="trials per world (default 1e6)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m audits.tightness " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    rows = []
    if a.joint:
        q, T = float(a.joint[0]), int(a.joint[1])
        settings = [({"method": "dpfpl (joint)", "eps_target": e},
                     lambda e=e: (joint_mechanism(q, T, e, a.delta, a.accountant), T)) for e in a.eps]
    else:
        from bench.presets import PRESETS

        if a.preset not in PRESETS:
            raise ConfigError(f"--preset {a.preset!r} is unknown; valid: {', '.join(PRESETS)}")
        grid = PRESETS[a.preset]()
        base = next((c for c in grid.cells() if c.config().privacy.privacy == "dp"), None)
        if base is None:
            raise ConfigError(f"preset {a.preset!r} has no DP cell")

        def build(m: str, e: float):
            cfg = base.config()
            cfg.train.method, cfg.privacy.epsilon, cfg.privacy.delta = m, e, a.delta
            cfg.privacy.accountant = a.accountant
            cfg.privacy.noise_multiplier_local = cfg.privacy.noise_multiplier_global = None
            return method_mechanism(cfg.validate())

        settings = [({"method": m, "eps_target": e}, lambda m=m, e=e: build(m, e)) for m in a.methods for e in a.eps]
    with (out / "tightness.jsonl").open("w") as f:
        for label, make in settings:
            mech, steps = make()
            row = tightness_row(mech, steps, a.delta, a.trials, a.accountant, label=label)
            rows.append(row)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"{label['method']} eps {label['eps_target']:g}: bound {row['eps_lower_bound']:.3f} / accounted "
                  f"{row['eps_accounted']:.3f} = {row['ratio']:.2f} ({row['seconds']} s)", flush=True)
    from bench.render import write_table

    paths = write_table(_table(rows, command), out)
    print("wrote " + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
