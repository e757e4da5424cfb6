"""Calibration: the smallest noise that meets a target (eps, delta), through dp-accounting's
``mechanism_calibration`` on the same event description the ledger records.

:func:`calibrate` takes a function ``sigma -> [(DpEvent, count), ...]`` (the whole planned run of
one client as a function of one free noise multiplier) and returns the smallest sigma whose
composition has eps <= target under the chosen accountant (``rdp``, or ``pld`` = min(RDP, PLD or
the exact Gaussian), :func:`dpfpl.privacy.accountants.epsilon`). The search brackets sigma by
doubling/halving, then runs ``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` (Brent's
method; the returned value is on the private side). A PLD search uses the pessimistic grid
:data:`PLD_SEARCH_DISCRETIZATION` (1e-3: an upper bound of the finer 1e-4 grid reported later,
10x faster).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from dp_accounting import dp_event, privacy_accountant
from dp_accounting import mechanism_calibration as mc

from ..errors import ConfigError
from .accountants import epsilon
from .events import check_accountant, check_delta, check_epsilon

__all__ = ["MAX_NOISE_MULTIPLIER", "MIN_NOISE_MULTIPLIER", "PLD_SEARCH_DISCRETIZATION", "calibrate",
           "SuiteAccountant"]

#: Largest noise multiplier calibration searches before declaring a target unreachable (beyond it
#: nothing is learnt, and RDP at far larger multipliers sits on its order-1024 floor).
MAX_NOISE_MULTIPLIER = 1e4
#: Smallest noise multiplier calibration searches (below it the target is "no noise needed").
MIN_NOISE_MULTIPLIER = 1e-4
#: PLD grid used while searching (pessimistic, so it bounds the finer reported value from above).
PLD_SEARCH_DISCRETIZATION = 1e-3

Parts = Callable[[float], Sequence[tuple[dp_event.DpEvent, int]]]


class SuiteAccountant(privacy_accountant.PrivacyAccountant):
    """A dp-accounting accountant whose epsilon is the suite's :func:`~dpfpl.privacy.accountants.epsilon`
    (so ``mechanism_calibration`` searches exactly what the suite reports). Composes Gaussian,
    Poisson-sampled Gaussian, self-composed, composed and no-op events."""

    def __init__(self, accountant: str = "pld", discretization: Optional[float] = PLD_SEARCH_DISCRETIZATION):
        super().__init__(privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE)
        self.accountant, self.discretization = check_accountant(accountant), discretization
        self.parts: list[tuple[dp_event.DpEvent, int]] = []

    def _maybe_compose(self, event: dp_event.DpEvent, count: int,
                       do_compose: bool) -> Optional[privacy_accountant.CompositionErrorDetails]:
        """None when ``event`` is supported (and composed if ``do_compose``), else the error details."""
        if isinstance(event, dp_event.ComposedDpEvent):
            for e in event.events:
                err = self._maybe_compose(e, count, do_compose)
                if err is not None:
                    return err
            return None
        if isinstance(event, dp_event.SelfComposedDpEvent):
            return self._maybe_compose(event.event, count * event.count, do_compose)
        ok = isinstance(event, (dp_event.GaussianDpEvent, dp_event.NoOpDpEvent, dp_event.NonPrivateDpEvent)) or (
            isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent))
        if not ok:
            return privacy_accountant.CompositionErrorDetails(invalid_event=event, error_message="unsupported event")
        if do_compose and count:
            self.parts.append((event, count))
        return None

    def get_epsilon(self, target_delta: float) -> float:
        return epsilon(self.parts, target_delta, self.accountant, self.discretization)


def _composed(parts: Sequence[tuple[dp_event.DpEvent, int]]) -> dp_event.DpEvent:
    return dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(e, n) for e, n in parts])


def calibrate(parts: Parts, target_epsilon: float, delta: float, accountant: str = "pld",
              guess: float = 1.0, rel_tol: float = 1e-3) -> float:
    """Smallest noise multiplier x (within ``rel_tol``) whose composition ``parts(x)`` has
    eps <= ``target_epsilon`` at ``delta``; ConfigError when no x in [1e-4, 1e4] does."""
    target = check_epsilon(target_epsilon)
    delta = check_delta(delta)
    check_accountant(accountant)
    if accountant == "pld":  # RDP >= the suite's PLD value: its solution brackets from above
        guess = calibrate(parts, target, delta, "rdp", guess, rel_tol)

    def eps_at(x: float) -> float:
        return epsilon(parts(x), delta, accountant, PLD_SEARCH_DISCRETIZATION)

    x = min(max(guess, MIN_NOISE_MULTIPLIER), MAX_NOISE_MULTIPLIER)
    if eps_at(x) <= target:
        hi, lo = x, x / 2
        while eps_at(lo) <= target:
            hi, lo = lo, lo / 2
            if lo < MIN_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"epsilon={target} is met with noise multiplier below {MIN_NOISE_MULTIPLIER}: the "
                    "target is too loose to calibrate; set the noise multiplier explicitly")
    else:
        lo, hi = x, 2 * x
        while eps_at(hi) > target:
            lo, hi = hi, 2 * hi
            if hi > MAX_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"epsilon={target} at delta={delta} cannot be met with a noise multiplier "
                    f"<= {MAX_NOISE_MULTIPLIER:g}; raise epsilon or delta, or release less")
    return float(mc.calibrate_dp_mechanism(
        lambda: SuiteAccountant(accountant), lambda v: _composed(parts(v)), target, delta,
        mc.ExplicitBracketInterval(lo, hi), tol=rel_tol * lo))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float, steps: int,
                               sampling: str = "poisson", accountant: str = "pld", tol: float = 1e-3) -> float:
    """Noise multiplier s such that ``steps`` releases of ``make_event(s, q, sampling)`` have
    eps(delta) <= target (one Poisson-sampled Gaussian per step, or one Gaussian per release)."""
    from .events import check_rate, check_steps, make_event

    q, n = check_rate(sampling_rate), check_steps(steps)
    make_event(1.0, q, sampling)  # validates sampling
    return calibrate(lambda x: [(make_event(x, q, sampling), n)], target_epsilon, delta, accountant, rel_tol=tol)
