"""How tight is the mechanism audit? Sound bound / accounted eps for every method's real mechanism.

For each method x target eps, the mechanism a run of that recipe would use is built by the code
training uses (:func:`dpfpl.privacy.dp.build_dp_privacy` on the recipe's dataset partition: the
same calibration, split and sampling rates), and the client that spends most is audited over the
run's steps with :func:`audits.mechanism_run.audit_batch_mechanism` (Dirac canary, Poisson rate q,
the claim's likelihood-ratio test at a threshold planned from the claim; Nasr et al., USENIX
Security 2023). Nothing is trained: the audit needs the release code only. Methods whose release
objects are equal share one audit (:func:`audit_settings`). ``--joint Q T`` audits DP-FPL's
two-part joint mechanism (local client-noised, global server-noised, equal multipliers) at a chosen
rate and step count instead.

Usage (``make tightness``)::

    python -m audits.tightness --preset audits --methods dpfpl dpfpl-nores fedpgp fedotp promptfl \
        fedprompt local --eps 4 2 1 --trials 1000000 --out results/audits/tightness
    python -m audits.tightness --joint 0.1 16 --eps 4 --trials 1000000 --out /tmp/t

writes ``OUT/tightness.jsonl`` (one line per setting) and ``OUT/table_tightness.md / .tex / .csv``
(the table, with the command). ``--trials`` counts the canary world; the other world gets 4x as
many (:data:`audits.mechanism_run.OTHER_WORLD_FACTOR`). The ratio is only as good as the trial
budget: the bound's Clopper-Pearson intervals at delta 1e-5 need false positives deep in the tail.
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

__all__ = ["method_mechanism", "joint_mechanism", "tightness_row", "audit_settings", "main"]


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
    return {**(label or {}), "q": mech.sampling_rate, "steps": steps, "trials": trials,
            "trials_other": r.trials_other, "delta": delta,
            "noise_multipliers": parts, "eps_accounted": r.claimed_eps, "eps_lower_bound": r.eps_lower_bound,
            "ratio": r.eps_lower_bound / r.claimed_eps if r.claimed_eps else None, "verdict": r.verdict,
            "statistic": r.statistic, "test": "planned" if "[planned threshold]" in r.statistic else "grid",
            "expected_planned": (r.details.get("planned") or {}).get("expected_eps"),
            "eps_estimate": r.eps_estimate, "tp": r.details["tp"], "fp": r.details["fp"],
            "seconds": round(time.perf_counter() - t0, 1)}


def _table(rows: list[dict[str, Any]], command: str, wall: float, workers: int):
    """The :class:`bench.tables.Table` of the rows (written as table_tightness.md / .tex / .csv)."""
    import pandas as pd

    from bench.tables import Table

    body = pd.DataFrame([{"method": r["method"], "eps target": f"{r['eps_target']:g}", "q": f"{r['q']:.4g}",
                          "steps": r["steps"],
                          "noise mult.": " / ".join(f"{k} {v:.3g}" for k, v in r["noise_multipliers"].items()),
                          "trials (canary / other world)": f"{r['trials']:,} / {r['trials_other']:,}",
                          "accounted eps": f"{r['eps_accounted']:.3f}",
                          "sound lower bound": f"{r['eps_lower_bound']:.3f}", "ratio": f"{r['ratio']:.2f}",
                          "test": r["test"],
                          "verdict": r["verdict"], "GDP estimate (not a bound)":
                              "-" if r["eps_estimate"] is None else f"{r['eps_estimate']:.2f}",
                          "seconds": f"{r['seconds']:g}" if not r["audited_as"] else f"(as {r['audited_as']})"}
                         for r in rows])
    ok = sum(1 for r in rows if r["ratio"] is not None and r["ratio"] >= 0.7)
    caption = ("Sound eps lower bound (95%, Clopper-Pearson; the claim's likelihood-ratio test at a threshold "
               "planned from the claim, beside a Bonferroni grid over thresholds and statistics) of each "
               "method's real release code on its worst case (Dirac canary of norm 1000 C, other examples zero, the "
               "run's Poisson rate), over the accountant's eps of the same mechanism and steps. "
               f"Ratio >= 0.7 in {ok} of {len(rows)} settings. Methods whose release objects are equal (same parts, "
               "multipliers, sampling and steps) share one audit of that object ('as X' in the seconds column). "
               "Seconds: each audit's wall time in its worker; the whole table "
               f"{wall:.0f} s wall with {workers} worker process(es) (building the mechanisms included).")
    data = pd.DataFrame([{k: v for k, v in r.items() if k != "noise_multipliers"} for r in rows])
    return Table("tightness", "Mechanism-audit tightness", caption, body, data=data, notes=[f"Command: `{command}`"])


def _build(job: dict[str, Any]):
    """(mechanism, steps) of one setting (a picklable job; runs in a worker process)."""
    if job["joint"] is not None:
        q, T = job["joint"]
        return joint_mechanism(q, T, job["eps"], job["delta"], job["accountant"]), T
    from bench.presets import PRESETS

    base = next(c for c in PRESETS[job["preset"]]().cells() if c.config().privacy.privacy == "dp")
    cfg = base.config()
    cfg.train.method, cfg.privacy.epsilon, cfg.privacy.delta = job["method"], job["eps"], job["delta"]
    cfg.privacy.accountant = job["accountant"]
    cfg.privacy.noise_multiplier_local = cfg.privacy.noise_multiplier_global = None
    return method_mechanism(cfg.validate())


def _audit(args: tuple) -> dict[str, Any]:
    """One audit (a worker process): ``tightness_row`` of (mechanism, steps, job)."""
    import torch

    torch.set_num_threads(1)  # one core per worker: the release's tensors are small, processes scale
    mech, steps, job = args
    return tightness_row(mech, steps, job["delta"], job["trials"], job["accountant"], seed=job["seed"],
                         label={"method": job["method"], "eps_target": job["eps"]})


def _pmap(fn, items: list, workers: int) -> list:
    if workers == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(items)), mp_context=mp.get_context("spawn")) as ex:
        return list(ex.map(fn, items))


def audit_settings(jobs: list[dict[str, Any]], workers: int = 2) -> list[dict[str, Any]]:
    """Rows of every job, each mechanism audited ONCE: methods whose release objects are equal (same
    class, parts, multipliers, sensitivities, sampling; same steps: e.g. DP-FPL, FedPGP and FedOTP
    calibrate the same two-part mechanism) share one audit of that object, and their rows say so
    (``audited_as``). An audit depends on nothing but the object it calls, so a second audit of an
    equal object would measure the same code twice."""
    built = _pmap(_build, jobs, workers)
    groups: dict[tuple, list[int]] = {}
    for i, (mech, steps) in enumerate(built):
        # frozen dataclasses: equal = same class (and release classes) and equal fields, so a subclass that
        # behaves differently is never folded into another method's audit
        groups.setdefault((mech, steps), []).append(i)
    first = {i: idx[0] for idx in groups.values() for i in idx}  # job -> the job whose audit it shares
    heads = sorted(set(first.values()))
    audited = dict(zip(heads, _pmap(_audit, [(*built[i], jobs[i]) for i in heads], workers)))
    return [{**audited[first[i]], "method": job["method"], "eps_target": job["eps"],
             "audited_as": None if first[i] == i else jobs[first[i]]["method"]} for i, job in enumerate(jobs)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from dpfpl.errors import ConfigError

    p = argparse.ArgumentParser(prog="python -m audits.tightness", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="audits", help="bench preset whose recipe is audited (default audits)")
    p.add_argument("--methods", nargs="+", default=["dpfpl"], help="methods (default dpfpl)")
    p.add_argument("--joint", nargs=2, metavar=("Q", "T"), default=None,
                   help="audit DP-FPL's joint mechanism at rate Q over T steps instead of a preset's recipe")
    p.add_argument("--eps", nargs="+", type=float, default=[4.0, 2.0, 1.0])
    p.add_argument("--trials", type=int, default=1_000_000,
                   help="trials of the canary world (default 1e6; the other world gets 4x)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    p.add_argument("--workers", type=int, default=2, help="settings audited in parallel processes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="the audit's own coins and pilot (the noise stays secret)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.workers < 1 or a.trials < 2:
        raise ConfigError(f"--workers must be >= 1 and --trials >= 2, got {a.workers} and {a.trials}")
    joint = (float(a.joint[0]), int(a.joint[1])) if a.joint else None
    if joint is None:
        from bench.presets import PRESETS
        from dpfpl.registry import method_names

        if a.preset not in PRESETS:
            raise ConfigError(f"--preset {a.preset!r} is unknown; valid: {', '.join(PRESETS)}")
        if not any(c.config().privacy.privacy == "dp" for c in PRESETS[a.preset]().cells()):
            raise ConfigError(f"preset {a.preset!r} has no DP cell")
        bad = [m for m in a.methods if m not in method_names() or m == "zeroshot"]
        if bad:
            raise ConfigError(f"--methods: {bad[0]!r} has no private mechanism; valid: "
                              f"{', '.join(m for m in method_names() if m != 'zeroshot')}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m audits.tightness " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    jobs = [{"method": "dpfpl (joint)" if joint else m, "eps": e, "joint": joint, "preset": a.preset,
             "delta": a.delta, "accountant": a.accountant, "trials": a.trials, "seed": a.seed}
            for m in (["dpfpl (joint)"] if joint else a.methods) for e in a.eps]
    t0 = time.perf_counter()
    rows = audit_settings(jobs, a.workers)
    for row in rows:
        shared = f", the mechanism audited for {row['audited_as']}" if row["audited_as"] else ""
        print(f"{row['method']} eps {row['eps_target']:g}: bound {row['eps_lower_bound']:.3f} / accounted "
              f"{row['eps_accounted']:.3f} = {row['ratio']:.2f} ({row['seconds']} s{shared})", flush=True)
    wall = time.perf_counter() - t0
    with (out / "tightness.jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    from bench.render import write_table

    paths = write_table(_table(rows, command, wall, a.workers), out)
    print(f"{len(rows)} settings in {wall:.0f} s wall ({a.workers} worker(s)); wrote "
          + ", ".join(str(x) for x in paths))
    return 0


if __name__ == "__main__":
    from dpfpl.errors import ConfigError

    try:
        sys.exit(main())
    except ConfigError as e:  # bad input: one line, exit status 2
        print(f"python -m audits.tightness: {e}", file=sys.stderr)
        sys.exit(2)
