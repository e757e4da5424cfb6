"""Audits: membership-inference attacks, sound eps lower bounds, and the mechanism-level audit.

The mechanism audit is the public entry point for auditing ANY mechanism (ours, Opacus', Flower's,
yours): write a release function and hand it to :func:`audit_mechanism` (see the README section
"Audit your own mechanism in ten lines" and :mod:`audits.mechanism`; adapters for other libraries
in :mod:`audits.external`)::

    from audits import audit_mechanism, gaussian_mixture_llr, neighbouring_release
"""

from .bounds import gaussian_eps
from .mechanism import (GaussianMixtureClaim, MechanismAuditResult, ReleaseFn, ScoreFn, accounted_epsilon,
                        audit_mechanism, gaussian_mixture_llr, neighbouring_release, sum_statistic)

__all__ = ["GaussianMixtureClaim", "MechanismAuditResult", "ReleaseFn", "ScoreFn", "accounted_epsilon",
           "audit_mechanism", "gaussian_eps", "gaussian_mixture_llr", "neighbouring_release", "sum_statistic"]
