"""Accountants: epsilon of a composition of DpEvents, by RDP, PLD, or exactly for Gaussians.

- RDP (Mironov 2017; subsampled Gaussian of Mironov-Talwar-Zhang 2019) by ``dp_accounting``'s
  ``RdpAccountant`` at its default orders (1.1 ... 1024), conversion of Canonne-Kamath-Steinke 2020.
  Cheap (curves cached per event); used for per-round curves and budget checks.
- PLD (Meiser-Mohammadi 2018; Koskela et al. 2020) by ``dp_accounting``'s ``PLDAccountant`` with
  pessimistic discretisation :data:`PLD_DISCRETIZATION` (an upper bound, tighter than RDP).
- Plain Gaussians (no subsampling) compose exactly into one Gaussian with
  s^-2 = sum_i n_i / s_i^2, whose (eps, delta) curve is known in closed form (Balle & Wang 2018,
  Thm. 8): delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s). :func:`gaussian_epsilon`
  inverts it; this is exact at any eps and costs microseconds (the PLD grid at eps ~ 1e4 took
  > 24 GB in a reference-mode run).

``epsilon(events, delta, "pld")`` (the suite's tight accountant) returns the smallest of the valid
upper bounds it computes: RDP, and PLD (or the exact Gaussian value when every event is a plain
Gaussian). PLD is skipped when RDP's eps exceeds :data:`PLD_MAX_EPSILON`: the PLD grid grows with
eps, and at such eps no guarantee is meaningful anyway; the RDP bound stands there (stated in
summaries as ``epsilon_pld_skipped``).

dp-accounting logs "_compute_log_a_frac failed to converge" for a few low RDP orders when q is
large and sigma small; it then drops those orders, so the epsilon is still a valid upper bound.
Those messages are silenced (absl logger set to ERROR).
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Optional

import numpy as np
from dp_accounting import dp_event
from scipy.optimize import brentq
from scipy.special import log_ndtr

logging.getLogger("absl").setLevel(logging.ERROR)
from dp_accounting.pld import PLDAccountant  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .events import Composition, as_composition, check_accountant, check_delta, event_key, group  # noqa: E402

__all__ = ["PLD_DISCRETIZATION", "PLD_MAX_EPSILON", "rdp_epsilon", "pld_epsilon", "gaussian_epsilon",
           "epsilon", "pld_skipped"]

#: PLD value discretisation. 1e-4 matches the anchors to <2e-4 relative (0.3 s per call).
PLD_DISCRETIZATION = 1e-4
#: Above this RDP eps the PLD is not computed (its grid grows with eps); RDP's bound is reported.
PLD_MAX_EPSILON = 50.0

_RDP_CACHE: dict[str, np.ndarray] = {}
_RDP_ORDERS = np.array(DEFAULT_RDP_ORDERS, dtype=float)


def _rdp_curve(event: dp_event.DpEvent) -> np.ndarray:
    """RDP of one occurrence of ``event`` at dp_accounting's default orders (cached)."""
    key = event_key(event)
    curve = _RDP_CACHE.get(key)
    if curve is None:
        acc = RdpAccountant()  # default orders, add/remove-one
        if not acc.supports(event):
            raise ConfigError(f"the RDP accountant does not support {event}")
        acc.compose(event)
        curve = acc.rdp
        if len(_RDP_CACHE) > 4096:
            _RDP_CACHE.clear()
        _RDP_CACHE[key] = curve
    return curve


def check_supported(event: dp_event.DpEvent) -> None:
    _rdp_curve(event)


def _rdp_from_groups(groups: Mapping[str, tuple[dp_event.DpEvent, int]], delta: float) -> float:
    if not groups:
        return 0.0
    total = np.zeros_like(_RDP_ORDERS)
    for key in sorted(groups):  # fixed order: reproducible float sums
        ev, n = groups[key]
        total = total + n * _rdp_curve(ev)
    return float(compute_epsilon(_RDP_ORDERS, total, delta)[0])


def rdp_epsilon(events: Composition, delta: float) -> float:
    """Epsilon at ``delta`` of the composition by RDP (k-fold self-composition = k x RDP)."""
    return _rdp_from_groups(group(as_composition(events)), check_delta(delta))


def gaussian_delta(eps: float, sigma: float) -> float:
    """delta(eps) of the Gaussian mechanism of sensitivity 1 and noise std ``sigma`` (exact)."""
    a, b = 0.5 / sigma - eps * sigma, -0.5 / sigma - eps * sigma
    return float(math.exp(log_ndtr(a)) - math.exp(eps + log_ndtr(b)))


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """Smallest eps >= 0 with delta(eps) <= ``delta`` for one Gaussian (Balle & Wang 2018, Thm. 8)."""
    delta = check_delta(delta)
    if sigma <= 0:
        return math.inf
    if gaussian_delta(0.0, sigma) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, sigma) > delta:
        hi *= 2
        if hi > 1e12:
            return math.inf
    # brentq's root; nudge up to the private side of the tolerance
    eps = brentq(lambda e: gaussian_delta(e, sigma) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12)
    while gaussian_delta(eps, sigma) > delta:
        eps = eps * (1 + 1e-12) + 1e-12
    return float(eps)


def _split_gaussians(groups: Mapping[str, tuple[dp_event.DpEvent, int]]) -> tuple[float, list]:
    """(sum n_i / s_i^2 over plain Gaussians, the other events)."""
    inv_var, others = 0.0, []
    for key in sorted(groups):
        ev, n = groups[key]
        if isinstance(ev, dp_event.GaussianDpEvent) and ev.noise_multiplier > 0:
            inv_var += n / ev.noise_multiplier ** 2
        elif isinstance(ev, dp_event.NoOpDpEvent):
            continue
        else:
            others.append((ev, n))
    return inv_var, others


def pld_epsilon(events: Composition, delta: float, value_discretization_interval: Optional[float] = None) -> float:
    """Epsilon at ``delta`` by PLD (pessimistic). Plain Gaussians are merged into one first; when
    nothing else is present the exact Gaussian value is returned (no discretisation)."""
    delta = check_delta(delta)
    groups = group(as_composition(events))
    inv_var, others = _split_gaussians(groups)
    if not others:
        return 0.0 if inv_var == 0 else gaussian_epsilon(1 / math.sqrt(inv_var), delta)
    if inv_var > 0:
        others.append((dp_event.GaussianDpEvent(1 / math.sqrt(inv_var)), 1))
    acc = PLDAccountant(value_discretization_interval=value_discretization_interval or PLD_DISCRETIZATION)
    for ev, n in others:
        if not acc.supports(ev):
            raise ConfigError(f"the PLD accountant does not support {ev}")
        acc.compose(ev, n)
    return float(acc.get_epsilon(delta))


def pld_skipped(events: Composition, delta: float) -> bool:
    """True when :func:`epsilon` with ``pld`` would not run the PLD (RDP eps above the cap)."""
    groups = group(as_composition(events))
    _, others = _split_gaussians(groups)
    return bool(others) and _rdp_from_groups(groups, check_delta(delta)) > PLD_MAX_EPSILON


def epsilon(events: Composition, delta: float, accountant: str = "pld",
            value_discretization_interval: Optional[float] = None) -> float:
    """Epsilon of ``[(DpEvent, count), ...]``: ``rdp``, or ``pld`` = min(RDP, PLD or exact Gaussian),
    every term a valid upper bound (PLD skipped above :data:`PLD_MAX_EPSILON`)."""
    delta = check_delta(delta)
    groups = group(as_composition(events))
    rdp = _rdp_from_groups(groups, delta)
    if check_accountant(accountant) == "rdp" or not groups:
        return rdp
    inv_var, others = _split_gaussians(groups)
    if any(isinstance(ev, dp_event.NonPrivateDpEvent) for ev, _ in others):
        return math.inf
    if not others:
        return min(rdp, 0.0 if inv_var == 0 else gaussian_epsilon(1 / math.sqrt(inv_var), delta))
    if rdp > PLD_MAX_EPSILON:
        return rdp
    return min(rdp, pld_epsilon(list(groups.values()), delta, value_discretization_interval))
