"""``python -m audits.external --out results/external [--trials N] [--eps 1 4] [--only NAME ...]``

Runs every adapter of :mod:`audits.external` at each eps and writes ``OUT/summary.md`` (table,
settings, findings with minimal reproductions), ``OUT/summary.csv`` and ``OUT/summary.jsonl`` (one
:class:`~audits.external.ExternalAudit` per line). ``--trials N`` sets every adapter's trials per
world (default: each adapter's own, sized for ``make external-audits`` on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from . import ExternalAudit

#: name -> (default trials per world, what it audits)
ADAPTERS: dict[str, tuple[int, str]] = {
    "opacus": (20_000, "Opacus 1.6 make_private, Poisson sampling, q=0.25, T=16 steps, SGD"),
    "opacus-bmm": (20_000, "the same with BatchMemoryManager(max_physical_batch_size=128), logical batch 512"),
    "flower-server": (20_000, "flwr 1.42 DifferentialPrivacyServerSideFixedClipping(FedAvg), 256 clients, T=4 rounds"),
    "flower-client": (5_000, "flwr 1.42 DifferentialPrivacyClientSideFixedClipping + fixedclipping_mod, 256 clients, "
                             "T=4 rounds"),
    "flower-server-weighted": (1_000, "server-side wrapper, 32 clients: 4 canaries reporting num_examples=32, 28 "
                                      "zero clients num_examples=1 (FedAvg weights by num_examples)"),
    "ours-dp": (100_000, "dpfpl audit RUN_DIR --attack mechanism on results/audits/runs/dpfpl_eps*_s0"),
    "ours-reference": (2_000, "the same on results/audits/runs/dpfpl_ref*_s0 (the public code's rule)"),
}


def run_one(name: str, eps: float, trials: int, seed: int, command: str) -> ExternalAudit:
    """One adapter at one eps (imports the library only when its adapter runs)."""
    if name in ("opacus", "opacus-bmm"):
        from .opacus import audit_opacus
        return audit_opacus(eps, trials, physical_batch=128 if name == "opacus-bmm" else None, seed=seed,
                            command=command)
    if name in ("flower-server", "flower-client"):
        from .flower import audit_flower
        return audit_flower(name.split("-")[1], eps, trials, seed=seed, command=command)
    if name == "flower-server-weighted":
        from .flower import audit_flower
        return audit_flower("server", eps, trials, clients=32, fillers=28, canary_weight=32, seed=seed,
                            command=command)
    if name in ("ours-dp", "ours-reference"):
        from .ours import audit_ours, run_dir_for
        return audit_ours(run_dir_for(name.split("-")[1], eps), trials, seed=seed,
                          command=command)
    raise SystemExit(f"unknown adapter {name!r}; one of {', '.join(ADAPTERS)}")


def flower_zero_update_probe() -> Optional[str]:
    """Flower's clipping on an all-zero update (a client that returns the global model unchanged):
    the error message, or None when it clips without error."""
    try:
        import numpy as np
        from flwr.supercore.differential_privacy import compute_clip_model_update
    except ImportError:
        return None
    try:
        compute_clip_model_update([np.zeros(3)], [np.zeros(3)], 1.0)
    except Exception as e:  # noqa: BLE001 - reported verbatim
        return f"{type(e).__name__}: {e}"
    return None


def frame(rows: list[ExternalAudit]) -> pd.DataFrame:
    """The summary table (one row per adapter x eps; the numbers of summary.csv)."""
    return pd.DataFrame([{"adapter": r.adapter, "eps_target": r.eps_target, "claimed_eps": r.claimed_eps,
                          "claim_by": r.claim_by, "eps_lower_bound": r.eps_lower_bound, "ratio": r.ratio,
                          "verdict": r.verdict, "trials": r.trials, "trials_other": r.trials_other or r.trials,
                          "steps": r.steps, "seconds": r.seconds,
                          "eps_estimate": r.eps_estimate,
                          **{f"eps [{k}]": v for k, v in r.eps_beside.items()}} for r in rows])


def _g(x: Any, d: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else (f"{x:.{d}g}" if isinstance(x, float) else str(x))


def markdown(rows: list[ExternalAudit], command: str, probe: Optional[str]) -> str:
    """summary.md: the table, then per row the settings and checks; findings for refuted claims."""
    from bench.render import to_markdown
    from bench.tables import Table

    df = frame(rows)
    body = pd.DataFrame({"adapter": df.adapter, "eps target": df.eps_target.map(_g),
                         "claimed eps (by)": [f"{_g(r.claimed_eps)} ({r.claim_by})" for r in rows],
                         "sound lower bound": df.eps_lower_bound.map(_g), "ratio": df.ratio.map(lambda x: _g(x, 2)),
                         "verdict": df.verdict,
                         "trials (canary / other world)": [f"{r.trials} / {r.trials_other or r.trials}" for r in rows],
                         "T": df.steps,
                         "seconds": df.seconds.map(lambda x: f"{x:.0f}"),
                         "GDP estimate (not a bound)": df.eps_estimate.map(_g)})
    t = Table("external", "Mechanism audits of what others ship", (
        "Sound eps lower bound (Clopper-Pearson, 95%, delta 1e-5: the claim's likelihood ratio at a threshold "
        "planned from the claim, beside a Bonferroni grid over thresholds and statistics) of each "
        "library's real code path on Dirac-canary worst cases (Nasr et al., USENIX Security 2023), against "
        "the eps the library's own accountant claims for the same settings. ratio = bound / claim; "
        "'consistent' = the bound does not exceed the claim."), body)
    lines = [f"# External mechanism audits\n\nCommand: `{command}`\n", to_markdown(t)]
    for r in rows:
        lines += [f"\n## {r.adapter}, eps {r.eps_target:g}: {r.verdict}\n",
                  f"- claim {r.claimed_eps:.4f} by {r.claim_by}; beside it: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in r.eps_beside.items()),
                  f"- sound lower bound {r.eps_lower_bound:.4f} at {r.trials} / {r.trials_other or r.trials} trials "
                  f"(canary / other world), T={r.steps} "
                  f"(ratio {r.ratio:.3f}); " + ("the claim holds up to that tightness" if r.verdict == "consistent"
                                                 else "**the bound exceeds the claim**"),
                  f"- settings: `{json.dumps(r.settings, default=str)}`",
                  f"- observed: `{json.dumps(r.checks, default=str)}`",
                  f"- reproduce: `{r.command}`"]
    if probe:
        lines += ["\n## Finding: Flower's fixed clipping fails on an all-zero update\n",
                  "`flwr.supercore.differential_privacy.compute_clip_model_update([np.zeros(3)], [np.zeros(3)], 1.0)` "
                  f"(what both wrappers and `fixedclipping_mod` call) raises `{probe}` (flwr 1.42.0): a client "
                  "returning the global model unchanged stops `aggregate_fit`. Not a privacy leak; the Flower "
                  "adapter moves one unobserved coordinate of every client by 1e-3 C to run at all "
                  "(audits/external/flower.py, PAD)."]
    weighted = [r for r in rows if r.adapter.startswith("flower-server-weighted")]
    if weighted:
        lines += ["\n## Finding: the legacy wrappers' noise assumes equal client weights\n",
                  "`flwr.server.strategy.DifferentialPrivacyServerSideFixedClipping(FedAvg(...), sigma, C, n)` adds "
                  "std sigma C / n, calibrated for each client moving the mean by at most C / n. FedAvg weights by "
                  "`num_examples`, which the client reports: with 32 clients, a canary reporting num_examples = 32 "
                  "(4 such canaries, 28 clients reporting 1) has weight 32/156 instead of 1/32, i.e. 6.6x the "
                  "sensitivity the noise is for, and the "
                  "sound bound exceeds the eps Flower's accountant gives for sigma (rows above). Flower's message-API "
                  "wrappers (`flwr.serverapp.strategy`, accountant enabled) refuse unequal weights "
                  "(`_validate_uniform_weights`); the legacy `flwr.server.strategy` wrappers do not check. Minimal "
                  "reproduction: `python -m audits.external --only flower-server-weighted --eps 1 --trials 1000`. "
                  "With equal weights (rows flower-server / flower-client) the claims hold."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m audits.external", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/external"))
    p.add_argument("--trials", type=int, default=None, help="trials per world for every adapter (default: each "
                                                            "adapter's own)")
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--only", nargs="+", choices=list(ADAPTERS), default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    argv_s = sys.argv[1:] if argv is None else argv
    command = "python -m audits.external " + " ".join(shlex.quote(x) for x in argv_s)
    a.out.mkdir(parents=True, exist_ok=True)
    rows: list[ExternalAudit] = []
    for name in a.only or list(ADAPTERS):
        for eps in a.eps:
            trials = a.trials or ADAPTERS[name][0]
            one = (f"python -m audits.external --only {name} --eps {eps:g} --trials {trials} --seed {a.seed}")
            t0 = time.perf_counter()
            try:
                r = run_one(name, eps, trials, a.seed, one)
            except ImportError as e:
                print(f"{name}: skipped ({e})", flush=True)
                break
            rows.append(r)
            print(f"{name} eps {eps:g}: claim {r.claimed_eps:.3f} ({r.claim_by}), sound bound {r.eps_lower_bound:.3f}, "
                  f"ratio {r.ratio:.2f}, {r.trials} / {r.trials_other or r.trials} trials (canary / other world), "
                  f"{time.perf_counter() - t0:.0f} s: {r.verdict}",
                  flush=True)
    probe = flower_zero_update_probe()
    frame(rows).to_csv(a.out / "summary.csv", index=False)
    (a.out / "summary.jsonl").write_text("".join(json.dumps(r.as_dict(), default=str) + "\n" for r in rows))
    (a.out / "summary.md").write_text(markdown(rows, command, probe))
    print(f"wrote {a.out}/summary.md, summary.csv, summary.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
