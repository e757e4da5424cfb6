"""Adapters that audit what other libraries ship through :func:`audits.mechanism.audit_mechanism`.

Each adapter turns a real, unmodified code path of a library into a release function
``release(neighbour, trials, rng) -> (trials, T, P)`` on worst-case neighbouring inputs (Nasr et
al., "Tight Auditing of Differentially Private Machine Learning", USENIX Security 2023: Dirac
canaries far outside the clip norm, everything else zero, every step observed), and compares the
SOUND eps lower bound (Clopper-Pearson, 95%: a threshold planned from the claim and a Bonferroni grid,
:func:`audits.mechanism.audit_mechanism`) with the eps the library
(or its documentation, accounted by dp-accounting) claims for the same settings:

- :mod:`audits.external.opacus`: ``PrivacyEngine.make_private`` with Poisson sampling, with and
  without ``BatchMemoryManager`` (virtual steps); claim = Opacus' own accountant.
- :mod:`audits.external.flower`: Flower's ``DifferentialPrivacyServerSideFixedClipping`` and
  ``DifferentialPrivacyClientSideFixedClipping`` (+ ``fixedclipping_mod``), called through their
  ``aggregate_fit``; claim = Flower's own ``RdpAccountant`` for the documented mechanism.
- :mod:`audits.external.ours`: DP-FPL's DP and reference modes through ``dpfpl audit --attack
  mechanism``'s own function (same numbers).

``python -m audits.external --out results/external`` runs them all (``make external-audits``).
Every adapter returns one :class:`ExternalAudit` row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..mechanism import MechanismAuditResult

__all__ = ["ExternalAudit", "row_from"]


@dataclass
class ExternalAudit:
    """One audited setting: what was claimed (and by whom) against the sound lower bound."""

    adapter: str                    # e.g. "opacus", "opacus-bmm", "flower-server"
    eps_target: float               # the eps the setting was calibrated for
    claimed_eps: float              # the claim the verdict is against
    claim_by: str                   # which accountant made the claim
    eps_lower_bound: float          # SOUND at ``confidence``
    ratio: float                    # eps_lower_bound / claimed_eps
    verdict: str                    # "consistent" | "claim refuted"
    trials: int                     # of the canary world
    steps: int                      # releases per trial (T)
    seconds: float                  # wall time of the audit (both worlds)
    confidence: float
    delta: float
    eps_estimate: Optional[float]   # INDICATIVE Gaussian-DP fit, not a bound
    eps_beside: dict[str, float] = field(default_factory=dict)  # other accountants' eps, same mechanism
    settings: dict[str, Any] = field(default_factory=dict)      # everything needed to reproduce
    checks: dict[str, Any] = field(default_factory=dict)        # what was observed of the library's state
    command: str = ""
    trials_other: Optional[int] = None  # of the other world (None: as many as ``trials``)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def row_from(adapter: str, eps_target: float, claim_by: str, res: MechanismAuditResult, *,
             eps_beside: Optional[dict[str, float]] = None, settings: Optional[dict[str, Any]] = None,
             checks: Optional[dict[str, Any]] = None, seconds: Optional[float] = None,
             command: str = "") -> ExternalAudit:
    """An :class:`ExternalAudit` row of an :func:`audit_mechanism` result (its claim and verdict)."""
    assert res.claimed_eps is not None
    return ExternalAudit(adapter=adapter, eps_target=float(eps_target), claimed_eps=float(res.claimed_eps),
                         claim_by=claim_by, eps_lower_bound=res.eps_lower_bound,
                         ratio=res.eps_lower_bound / res.claimed_eps, verdict=res.verdict, trials=res.trials,
                         steps=res.steps, seconds=float(res.seconds if seconds is None else seconds),
                         confidence=res.confidence, delta=res.delta, eps_estimate=res.eps_estimate,
                         eps_beside=dict(eps_beside or {}), settings=dict(settings or {}),
                         checks=dict(checks or {}), command=command,
                         trials_other=res.trials_other if res.trials_other != res.trials else None)
