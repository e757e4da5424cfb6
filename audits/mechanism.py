"""Mechanism-level audit: a sound eps lower bound for a release function under test.

The auditor controls the inputs of the mechanism and sees every output (Nasr et al., "Tight
Auditing of Differentially Private Machine Learning", USENIX Security 2023): it runs the release
many times in two neighbouring worlds (canary present / canary absent or replaced) and tests which
world produced each trial's outputs. Each trial is an independent run of the mechanism, so the
scores of the two worlds are i.i.d. samples, and threshold tests (Clopper-Pearson: one threshold
planned from the claim, :func:`audits.bounds.plan_threshold`, and a Bonferroni grid or held-out
split, :func:`audits.bounds.eps_lower_bound_from_roc`) give a lower bound that exceeds the true eps
with probability at most ``1 - confidence``.

Contract of a release function under test (what an adapter writes, e.g. for Opacus or Flower)::

    release(neighbour: bool, trials: int, rng: numpy.random.Generator) -> np.ndarray  # (trials, T, P)

``neighbour=True`` is the canary-present world. Row t holds what the adversary observes of trial
t: T steps, P projections per step (e.g. one per noised part, on the canary's coordinate, in units
of the clip norm). The statistic ``score(obs) -> (trials,)`` (higher = canary present) must be fixed
before the trials are drawn (it may depend on the CLAIMED mechanism, never on the audited outputs):
:func:`gaussian_mixture_llr` is the likelihood-ratio test of a Poisson-subsampled Gaussian with
known parameters, the most powerful test when the claim is the truth (Neyman-Pearson).

Tightness comes from testing the claim where it is weakest: the first statistic's threshold is
planned before the audit from a simulation of the claimed output distribution (the Neyman-Pearson
test at the false-positive rate that maximises the expected Clopper-Pearson bound for the trial
budget), so it needs no multiple-testing correction; a Bonferroni grid over every statistic runs
beside it (half the error budget each) so that a mechanism the claim misdescribes is still caught.

Beside the sound bound an INDICATIVE Gaussian-DP estimate (Nasr et al. 2023's GDP fit, here from
the empirical ROC) is reported; it is labelled ``eps_estimate`` and is not a bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import special, stats

from dpfpl.errors import ConfigError

from .bounds import eps_lower_bound_at_threshold, eps_lower_bound_from_roc, gaussian_eps, plan_threshold

__all__ = ["ReleaseFn", "ScoreFn", "MechanismAuditResult", "audit_mechanism", "GaussianMixtureClaim",
           "gaussian_mixture_llr", "sum_statistic", "gdp_estimate", "accounted_epsilon", "neighbouring_release"]

ReleaseFn = Callable[[bool, int, np.random.Generator], np.ndarray]  # -> (trials, T, P)
ScoreFn = Callable[[np.ndarray], np.ndarray]                        # (trials, T, P) -> (trials,)


@dataclass
class MechanismAuditResult:
    """Outcome of :func:`audit_mechanism` (``as_dict`` is what audit.json stores)."""

    eps_lower_bound: float          # SOUND at ``confidence`` (Clopper-Pearson, corrected threshold choice)
    bound_sound: bool
    claimed_eps: Optional[float]
    verdict: str                    # "consistent" or "claim refuted"
    statistic: str
    method: str                     # bonferroni | holdout, or planned+bonferroni | planned+holdout
    confidence: float
    delta: float
    trials: int                     # of the canary world
    steps: int
    eps_estimate: Optional[float]   # INDICATIVE Gaussian-DP estimate, not a bound
    mu_estimate: Optional[float]
    tightness: Optional[float]      # eps_lower_bound / claimed_eps
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    trials_other: Optional[int] = None  # of the other world (None: as many as ``trials``)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def accounted_epsilon(events: Sequence[tuple[Any, int]], delta: float, accountant: str = "pld") -> float:
    """Eps of ``[(DpEvent, count), ...]`` by the project's accountant (dp-accounting)."""
    from dpfpl.privacy.accountants import epsilon

    return float(epsilon(list(events), delta, accountant))


@dataclass(frozen=True)
class GaussianMixtureClaim:
    """The CLAIMED output distribution of one step of a worst-case audit, and its optimal statistic.

    P observed projections per step: other world y_p ~ N(mu_out_p, s_p^2); canary world the mixture
    (1-q) N(mu_out, s^2) + q N(mu_in, s^2) (the canary is in the batch with probability q, the same
    coin for all parts: one shared batch). With d_p = mu_in_p - mu_out_p,
    l = sum_p ((y_p - mu_out_p) d_p - d_p^2 / 2) / s_p^2 and the step's log-likelihood ratio is
    log((1-q) + q e^l) = log1p(q expm1(l)), summed over steps (Neyman-Pearson: the most powerful
    test when the claim is the truth). Parameters come from the claim, never from audited outputs.
    """

    mu_in: tuple[float, ...]
    mu_out: tuple[float, ...]
    stds: tuple[float, ...]
    q: float

    def __post_init__(self):
        mi, mo, s = (np.asarray(x, dtype=np.float64) for x in (self.mu_in, self.mu_out, self.stds))
        if not (mi.shape == mo.shape == s.shape) or mi.ndim != 1:
            raise ConfigError("gaussian_mixture_llr: mu_in, mu_out and stds need one entry per projection")
        if np.any(s <= 0):
            raise ConfigError(f"gaussian_mixture_llr: stds must be > 0, got {s.tolist()}")
        if not 0 < self.q <= 1:
            raise ConfigError(f"gaussian_mixture_llr: q must be in (0, 1], got {self.q!r}")

    def _coef(self, parts: Sequence[int]) -> tuple[np.ndarray, float, np.ndarray]:
        mi, mo, s = (np.asarray(x, dtype=np.float64)[list(parts)] for x in (self.mu_in, self.mu_out, self.stds))
        d = mi - mo
        a = d / s ** 2  # l = y . a - b
        return a, float(((mo * d + d ** 2 / 2) / s ** 2).sum()), s

    def _mix(self, l: np.ndarray) -> np.ndarray:
        """(trials, T) per-step l -> (trials,) summed step LLRs (l capped at 700: a fixed function of
        the output, so any cap keeps the test valid; only a broken mechanism reaches it)."""
        if self.q == 1:
            return l.sum(-1)
        l = np.minimum(l, 700.0)  # a new array: the caller's l is left alone
        np.expm1(l, out=l)
        l *= self.q
        return np.log1p(l, out=l).sum(-1)

    def llr(self, parts: Optional[Sequence[int]] = None) -> ScoreFn:
        """The statistic (trials, T, P) -> (trials,) over the projections ``parts`` (default all).
        The returned function carries ``.claim`` (this object) and ``.parts``."""
        idx = list(range(len(self.stds))) if parts is None else [int(i) for i in parts]
        a, b, _ = self._coef(idx)

        def score(obs: np.ndarray) -> np.ndarray:
            l = obs[..., idx[0]] * a[0]  # (trials, T): y . a - b, one projection at a time (P is small)
            for j in range(1, len(idx)):
                l += obs[..., idx[j]] * a[j]
            l -= b
            return self._mix(l)  # (trials,)

        score.__name__ = f"gaussian_mixture_llr(q={self.q:.4g})"
        score.claim, score.parts = self, tuple(idx)
        return score

    def pilot_scores(self, neighbour: bool, trials: int, steps: int, rng: np.random.Generator,
                     chunk: int = 1 << 15) -> np.ndarray:
        """Scores of :meth:`llr` (all projections) on ``trials`` draws of the CLAIM itself, (trials,).

        The joint statistic depends on y only through u = y . a, a Gaussian under the claim
        (mean mu_out . a, variance sum s^2 a^2, shifted by d . a when the canary is in), so one
        scalar per step is drawn. This simulates the claim, never the audited code: it plans the
        audit's threshold (:func:`audits.bounds.plan_threshold`)."""
        a, b, s = self._coef(range(len(self.stds)))
        mo = np.asarray(self.mu_out, dtype=np.float64)
        d = np.asarray(self.mu_in, dtype=np.float64) - mo
        m0, sd, shift = float(mo @ a), float(np.sqrt(np.sum((s * a) ** 2))), float(d @ a)
        out = []
        for start in range(0, trials, chunk):
            n = min(chunk, trials - start)
            u = rng.standard_normal((n, steps)) * sd + m0  # (n, T)
            if neighbour:
                u += (rng.random((n, steps)) < self.q) * shift
            out.append(self._mix(u - b))
        return np.concatenate(out) if out else np.zeros(0)


def gaussian_mixture_llr(mu_in: Sequence[float], mu_out: Sequence[float], stds: Sequence[float],
                         q: float) -> ScoreFn:
    """Per-step log-likelihood ratio of "canary world" vs "other world", summed over steps: the
    statistic of :class:`GaussianMixtureClaim` (see there). The function carries ``.claim``, so
    :func:`audit_mechanism` can plan its threshold from the claim."""
    return GaussianMixtureClaim(tuple(float(x) for x in mu_in), tuple(float(x) for x in mu_out),
                                tuple(float(x) for x in stds), float(q)).llr()


def neighbouring_release(mechanism: Callable[[np.ndarray, np.random.Generator], np.ndarray],
                         canary: Sequence[float], other: Sequence[float], steps: int = 1) -> ReleaseFn:
    """Release function of a batched mechanism run on two neighbouring inputs.

    ``mechanism(x, rng) -> (trials, P)`` releases one step for each row of ``x`` (trials, d): row t
    is trial t's input. The canary world feeds ``canary`` (d,) to every trial, the other world
    ``other`` (d,); each of the ``steps`` steps is a fresh call (fresh noise). Returns the
    ``release(neighbour, trials, rng) -> (trials, steps, P)`` that :func:`audit_mechanism` takes.
    The worst-case neighbours are the caller's choice (Nasr et al. 2023: a canary far outside the
    clip norm, everything else zero).
    """
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"neighbouring_release: steps must be a positive integer, got {steps!r}")
    xin, xout = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (canary, other))
    if xin.shape != xout.shape:
        raise ConfigError(f"neighbouring_release: canary {xin.shape} and other {xout.shape} differ in shape")

    def release(neighbour: bool, trials: int, rng: np.random.Generator) -> np.ndarray:
        x = np.broadcast_to(xin if neighbour else xout, (trials, xin.size))  # (trials, d)
        obs = [np.asarray(mechanism(x, rng), dtype=np.float64).reshape(trials, -1) for _ in range(int(steps))]
        return np.stack(obs, 1)  # (trials, T, P)

    return release


def sum_statistic(obs: np.ndarray) -> np.ndarray:
    """Baseline: the plain sum of all projections (trials, T, P) -> (trials,)."""
    return obs.reshape(obs.shape[0], -1).sum(-1)


def gdp_estimate(s_in: np.ndarray, s_out: np.ndarray, delta: float,
                 fprs: Sequence[float] = (0.5, 0.2, 0.1, 0.05, 0.01)) -> tuple[Optional[float], Optional[float]]:
    """INDICATIVE Gaussian-DP fit (Nasr et al. 2023): mu = Phi^-1(TPR) - Phi^-1(FPR) at fixed FPRs of
    the empirical ROC (median over those with >= 50 negatives above the threshold), and the eps at
    ``delta`` of that mu. An estimate, not a bound: (None, None) when it cannot be formed."""
    s_out = np.sort(s_out)
    mus = []
    for a in fprs:
        if a * s_out.size < 50:
            continue
        thr = s_out[int(math.floor((1 - a) * s_out.size))]
        tpr = float(np.mean(s_in > thr))
        fpr = float(np.mean(s_out > thr))
        if 0 < tpr < 1 and 0 < fpr < 1:
            mus.append(stats.norm.ppf(tpr) - stats.norm.ppf(fpr))
    if not mus:
        return None, None
    mu = max(0.0, float(np.median(mus)))
    return mu, gaussian_eps(delta, mu)


def _scores(release: ReleaseFn, neighbour: bool, trials: int, rng: np.random.Generator, score: ScoreFn,
            chunk: int) -> tuple[np.ndarray, int]:
    out, steps, done = [], 0, 0
    while done < trials:
        n = min(chunk, trials - done)
        obs = np.asarray(release(neighbour, n, rng), dtype=np.float64)
        if obs.ndim == 2:
            obs = obs[:, :, None]
        if obs.ndim != 3 or obs.shape[0] != n:
            raise ConfigError(f"release returned shape {obs.shape}; expected (trials={n}, T, P)")
        steps = obs.shape[1]
        out.append(score(obs))  # (n,)
        done += n
    return np.concatenate(out), steps


def audit_mechanism(release: ReleaseFn, score: Union[ScoreFn, Mapping[str, ScoreFn]], delta: float, trials: int, *,
                    claimed_eps: Optional[float] = None, events: Optional[Sequence[tuple[Any, int]]] = None,
                    accountant: str = "pld", confidence: float = 0.95, method: str = "bonferroni",
                    seed: int = 0, chunk: int = 1 << 16, statistic: Optional[str] = None,
                    plan: Union[str, bool, "GaussianMixtureClaim", None] = "auto", plan_share: float = 0.5,
                    pilot_trials: Optional[int] = None, trials_other: Optional[int] = None) -> MechanismAuditResult:
    """Audit ``release`` with ``trials`` independent runs of the canary world and ``trials_other``
    (default ``trials``) of the other world (see the module docstring). A tight bound is limited by
    the few false positives counted in the other world, so where that world is cheaper to run (a
    batch without the canary), giving it more trials buys tightness at little cost.

    ``score`` is one statistic or several ``{name: statistic}``. Tests, all at once sound by the
    union bound (each family of intervals, members' and non-members', fails with probability at
    most ``a = 1 - sqrt(confidence)`` in total):

    - planned (``plan``): the FIRST statistic at one threshold chosen before the audit from a pilot
      simulation of the claim (:meth:`GaussianMixtureClaim.pilot_scores`, ``pilot_trials`` per
      world, default ``trials // 2`` in [20k, 1M]) to maximise the expected bound at ``trials``
      (:func:`audits.bounds.plan_threshold`); its intervals at level ``a * plan_share``.
      ``plan="auto"`` uses the first statistic's ``.claim`` when it has one
      (:func:`gaussian_mixture_llr` sets it); ``False`` turns planning off.
    - data-chosen (``method``): every statistic's Bonferroni grid (or holdout) at level
      ``a * (1 - plan_share) / m`` (all of ``a / m``-ish when nothing is planned), so choosing the
      best statistic and threshold after the fact stays sound, and a broken mechanism, whose
      outputs the claim does not describe, is still caught where the planned threshold is wrong.

    The largest bound is reported. The claim is ``claimed_eps`` or, if ``events`` is given, the
    accountant's eps of them. ``verdict`` is "claim refuted" iff the sound bound exceeds the claim.
    ``chunk``: trials per release call (memory). Randomness of the worlds:
    ``numpy.random.default_rng(seed)``, of the pilot ``default_rng([seed, 1])`` (the release's own
    noise may come from anywhere; it must not depend on ``neighbour`` other than through the canary).
    """
    n_other = int(trials if trials_other is None else trials_other)
    if trials < 2 or n_other < 2:
        raise ConfigError(f"trials must be >= 2 in each world, got {trials!r} and {trials_other!r}")
    if not 0 < plan_share < 1:
        raise ConfigError(f"plan_share must be in (0, 1), got {plan_share!r}")
    if events is not None:
        claimed_eps = accounted_epsilon(events, delta, accountant)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    scores_by = dict(score) if isinstance(score, Mapping) else {statistic or getattr(score, "__name__", "score"): score}
    names = list(scores_by)
    first = scores_by[names[0]]
    claim = (getattr(first, "claim", None) if plan == "auto" else None if plan in (False, None) else plan)
    if claim is not None and plan == "auto" and getattr(first, "parts", None) != tuple(range(len(claim.stds))):
        claim = None  # the first statistic is not the claim's joint likelihood ratio: nothing to plan

    def all_scores(obs: np.ndarray) -> np.ndarray:  # (trials, T, P) -> (trials, m)
        return np.stack([scores_by[n](obs) for n in names], -1)

    s_in, steps = _scores(release, True, trials, rng, all_scores, chunk)  # (trials, m)
    s_out, _ = _scores(release, False, n_other, rng, all_scores, chunk)
    y = np.r_[np.ones(trials, bool), np.zeros(n_other, bool)]
    a_side = 1.0 - math.sqrt(confidence)
    if claim is None:
        conf_each = 1.0 - (1.0 - confidence) / len(names)
    else:
        conf_each = (1.0 - a_side * (1.0 - plan_share) / len(names)) ** 2
    per = {n: eps_lower_bound_from_roc(np.r_[s_in[:, j], s_out[:, j]], y, delta, confidence=conf_each,
                                       method=method, seed=seed) for j, n in enumerate(names)}
    planned = None
    if claim is not None:
        n_pilot = int(pilot_trials or min(1_000_000, max(20_000, trials // 2)))
        prng = np.random.default_rng([seed, 1])  # the pilot's own stream: the claim only
        pin, pout = (claim.pilot_scores(nb, n_pilot, steps, prng) for nb in (True, False))
        p = plan_threshold(pin, pout, trials, n_other, delta, a_side * plan_share, llr=True)
        planned = eps_lower_bound_at_threshold(s_in[:, 0], s_out[:, 0], p["threshold"], delta, a_side * plan_share)
        planned.update({"statistic": names[0], "expected_eps": p["expected_eps"], "pilot_trials": n_pilot,
                        "planned_direction": p["direction"]})
        per[f"{names[0]} [planned threshold]"] = planned
    best = max(per, key=lambda n: per[n]["eps_lower_bound"])
    b = per[best]
    mu, eps_hat = gdp_estimate(s_in[:, 0], s_out[:, 0], delta)  # of the first (the claim's) statistic
    lb = float(b["eps_lower_bound"])
    refuted = claimed_eps is not None and lb > claimed_eps
    return MechanismAuditResult(
        eps_lower_bound=lb, bound_sound=True, claimed_eps=claimed_eps,
        verdict="claim refuted" if refuted else "consistent",
        statistic=best, method=method if planned is None else f"planned+{method}", confidence=confidence,
        delta=delta, trials=trials, steps=steps, eps_estimate=eps_hat, mu_estimate=mu,
        tightness=(lb / claimed_eps) if claimed_eps else None, seconds=time.perf_counter() - t0,
        trials_other=n_other,
        details={**{k: b[k] for k in ("tp", "fp", "n_members", "n_nonmembers", "tpr_lo", "fpr_hi", "direction",
                                      "n_candidates")},
                 "statistics": {n: per[n]["eps_lower_bound"] for n in per}, "confidence_each": conf_each,
                 "planned": planned, "plan_share": plan_share if planned is not None else None})
