"""Mechanism-level audit: a sound eps lower bound for a release function under test.

The auditor controls the inputs of the mechanism and sees every output (Nasr et al., "Tight
Auditing of Differentially Private Machine Learning", USENIX Security 2023): it runs the release
many times in two neighbouring worlds (canary present / canary absent or replaced) and tests which
world produced each trial's outputs. Each trial is an independent run of the mechanism, so the
scores of the two worlds are i.i.d. samples, and the threshold test of
:func:`audits.bounds.eps_lower_bound_from_roc` (Clopper-Pearson, Bonferroni over a fixed grid of
thresholds or a held-out split) gives a lower bound that exceeds the true eps with probability at
most ``1 - confidence``.

Contract of a release function under test (what an adapter writes, e.g. for Opacus or Flower)::

    release(neighbour: bool, trials: int, rng: numpy.random.Generator) -> np.ndarray  # (trials, T, P)

``neighbour=True`` is the canary-present world. Row t holds what the adversary observes of trial
t: T steps, P projections per step (e.g. one per noised part, on the canary's coordinate, in units
of the clip norm). The statistic ``score(obs) -> (trials,)`` (higher = canary present) must be fixed
before the trials are drawn (it may depend on the CLAIMED mechanism, never on the audited outputs):
:func:`gaussian_mixture_llr` is the likelihood-ratio test of a Poisson-subsampled Gaussian with
known parameters, the most powerful test when the claim is the truth (Neyman-Pearson).

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

from .bounds import eps_lower_bound_from_roc, gaussian_eps

__all__ = ["ReleaseFn", "ScoreFn", "MechanismAuditResult", "audit_mechanism", "gaussian_mixture_llr",
           "sum_statistic", "gdp_estimate", "accounted_epsilon", "neighbouring_release"]

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
    method: str                     # bonferroni | holdout
    confidence: float
    delta: float
    trials: int                     # per world
    steps: int
    eps_estimate: Optional[float]   # INDICATIVE Gaussian-DP estimate, not a bound
    mu_estimate: Optional[float]
    tightness: Optional[float]      # eps_lower_bound / claimed_eps
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def accounted_epsilon(events: Sequence[tuple[Any, int]], delta: float, accountant: str = "pld") -> float:
    """Eps of ``[(DpEvent, count), ...]`` by the project's accountant (dp-accounting)."""
    from dpfpl.privacy.accountants import epsilon

    return float(epsilon(list(events), delta, accountant))


def gaussian_mixture_llr(mu_in: Sequence[float], mu_out: Sequence[float], stds: Sequence[float],
                         q: float) -> ScoreFn:
    """Per-step log-likelihood ratio of "canary world" vs "other world", summed over steps.

    Model of one step (P observed projections): other world y_p ~ N(mu_out_p, s_p^2); canary world
    the mixture (1-q) N(mu_out, s^2) + q N(mu_in, s^2) (the canary is in the batch with
    probability q, the same coin for all parts: one shared batch). With d_p = mu_in_p - mu_out_p,
    l = sum_p ((y_p - mu_out_p) d_p - d_p^2 / 2) / s_p^2 and the step's LLR is
    log((1-q) + q e^l). Parameters come from the claim, never from audited outputs.
    """
    mi, mo, s = (np.asarray(x, dtype=np.float64) for x in (mu_in, mu_out, stds))
    if not (mi.shape == mo.shape == s.shape) or mi.ndim != 1:
        raise ConfigError("gaussian_mixture_llr: mu_in, mu_out and stds need one entry per projection")
    if np.any(s <= 0):
        raise ConfigError(f"gaussian_mixture_llr: stds must be > 0, got {s.tolist()}")
    if not 0 < q <= 1:
        raise ConfigError(f"gaussian_mixture_llr: q must be in (0, 1], got {q!r}")
    d = mi - mo

    def score(obs: np.ndarray) -> np.ndarray:
        l = (((obs - mo) * d - d ** 2 / 2) / s ** 2).sum(-1)  # (trials, T)
        if q == 1:
            return l.sum(-1)
        return np.logaddexp(math.log1p(-q), math.log(q) + l).sum(-1)  # (trials,)

    score.__name__ = f"gaussian_mixture_llr(q={q:.4g})"
    return score


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
                    seed: int = 0, chunk: int = 1 << 16, statistic: Optional[str] = None) -> MechanismAuditResult:
    """Audit ``release`` with ``trials`` independent runs per world (see the module docstring).

    ``score`` is one statistic or several ``{name: statistic}``: with m statistics every bound is
    computed at confidence ``1 - (1 - confidence) / m`` (union bound) and the largest is reported,
    so choosing the best statistic after the fact stays sound.
    The claim is ``claimed_eps`` or, if ``events`` is given, the accountant's eps of them.
    ``verdict`` is "claim refuted" iff the sound bound exceeds the claim. ``chunk``: trials per
    release call (memory). Randomness of the worlds: ``numpy.random.default_rng(seed)`` (the
    release's own noise may come from anywhere; it must not depend on ``neighbour`` other than
    through the canary).
    """
    if trials < 2:
        raise ConfigError(f"trials must be >= 2, got {trials!r}")
    if events is not None:
        claimed_eps = accounted_epsilon(events, delta, accountant)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    scores_by = dict(score) if isinstance(score, Mapping) else {statistic or getattr(score, "__name__", "score"): score}
    names = list(scores_by)

    def all_scores(obs: np.ndarray) -> np.ndarray:  # (trials, T, P) -> (trials, m)
        return np.stack([scores_by[n](obs) for n in names], -1)

    s_in, steps = _scores(release, True, trials, rng, all_scores, chunk)  # (trials, m)
    s_out, _ = _scores(release, False, trials, rng, all_scores, chunk)
    y = np.r_[np.ones(trials, bool), np.zeros(trials, bool)]
    conf_each = 1.0 - (1.0 - confidence) / len(names)
    per = {n: eps_lower_bound_from_roc(np.r_[s_in[:, j], s_out[:, j]], y, delta, confidence=conf_each,
                                       method=method, seed=seed) for j, n in enumerate(names)}
    best = max(names, key=lambda n: per[n]["eps_lower_bound"])
    b = per[best]
    mu, eps_hat = gdp_estimate(s_in[:, 0], s_out[:, 0], delta)  # of the first (the claim's) statistic
    lb = float(b["eps_lower_bound"])
    refuted = claimed_eps is not None and lb > claimed_eps
    return MechanismAuditResult(
        eps_lower_bound=lb, bound_sound=True, claimed_eps=claimed_eps,
        verdict="claim refuted" if refuted else "consistent",
        statistic=best, method=method, confidence=confidence,
        delta=delta, trials=trials, steps=steps, eps_estimate=eps_hat, mu_estimate=mu,
        tightness=(lb / claimed_eps) if claimed_eps else None, seconds=time.perf_counter() - t0,
        details={**{k: b[k] for k in ("tp", "fp", "n_members", "n_nonmembers", "tpr_lo", "fpr_hi", "direction",
                                      "n_candidates")},
                 "statistics": {n: per[n]["eps_lower_bound"] for n in names}, "confidence_each": conf_each})
