"""DP-FPL's own mechanisms through the same table: ``dpfpl audit RUN_DIR --attack mechanism``'s function.

:func:`audit_ours` calls :func:`audits.mechanism_run.mechanism_audit_run_dir` (what ``dpfpl audit
RUN_DIR --attack mechanism`` calls, same defaults: seed 0, 95%, planned test + Bonferroni grid) on a run directory, so
its numbers are those of the CLI at the same ``--trials``. DP mode's claim is the run's accountant
eps of the rebuilt mechanism; reference mode's claim is the public code's claimed eps (which the
audit refutes: batch-mean clipping moves the mean by 2C, see :mod:`audits.mechanism_run`).
The default run directories are the committed ``make audits`` runs (results/audits/runs/).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

from dpfpl.privacy.randomness import NoiseSource

from ..mechanism import MechanismAuditResult
from ..mechanism_run import load_run, mechanism_audit_run_dir
from . import ExternalAudit, row_from

__all__ = ["RUNS", "run_dir_for", "audit_ours"]

RUNS = Path("results/audits/runs")


def run_dir_for(mode: str, eps: float, runs: Union[str, Path] = RUNS) -> Path:
    """The committed audits-preset run of ``mode`` ("dp" | "reference") at ``eps``."""
    tag = "eps" if mode == "dp" else "ref"
    return Path(runs) / f"dpfpl_{tag}{eps:g}_s0"


def audit_ours(run_dir: Union[str, Path], trials: int, *, seed: int = 0, command: str = "",
               source: Optional[NoiseSource] = None) -> ExternalAudit:
    """One row of ``dpfpl audit RUN_DIR --attack mechanism --trials TRIALS`` (reference mode caps
    the trials at 2000 there, as here). ``source``: the audited releases' noise (default secret;
    a seeded one reproduces the CLI's numbers exactly)."""
    t0 = time.perf_counter()
    cfg, _, _ = load_run(run_dir)
    out = mechanism_audit_run_dir(run_dir, trials=trials, seed=seed, source=source)
    res = MechanismAuditResult(**{k: out[k] for k in MechanismAuditResult.__dataclass_fields__})
    mode = cfg.privacy.privacy
    claim_by = (f"dpfpl accountant ({cfg.privacy.accountant})" if mode == "dp"
                else "public DP-FPL code's claim (reference mode)")
    return row_from(f"ours-{mode}", float(cfg.privacy.epsilon), claim_by, res,
                    eps_beside={"accounted": out["epsilon_accounted"]},
                    settings={"run_dir": str(run_dir), "mechanism": out["mechanism"], "client": out["client"],
                              "seed": seed},
                    checks={"mechanism_matches_ledger": out["mechanism_matches_ledger"],
                            "worst_case": out["details"].get("worst_case")},
                    seconds=time.perf_counter() - t0,
                    command=command or f"dpfpl audit {run_dir} --attack mechanism --trials {trials}")
