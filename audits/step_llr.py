"""Per-step likelihood-ratio scores of white-box canaries (pure numpy).

Observation model of one canary at one step (Nasr et al., "Tight Auditing of Differentially
Private Machine Learning", USENIX Security 2023; the Neyman-Pearson test of the claimed mechanism):
the auditor sees, for every noised part p the canary has a direction in, the projection
``y_p`` of the step's noised clipped sum on that unit direction, in units of the clip norm C. With
other examples contributing nothing on the canary's directions, ``y_p ~ N(a, nm_p^2)`` where
``a = 1`` if the canary is in the batch and 0 otherwise (per-example clipping leaves it at norm
exactly C in every part) and ``nm_p`` the part's claimed noise multiplier. The step's log-LR of
"present" vs "absent" is ``l = sum_p (y_p - 1/2) / nm_p^2`` (:func:`step_log_lr`).

How often the canary is present decides how steps combine:

- Poisson sampling at rate q (add/remove-one): each step independently, so the canary's score is
  ``sum_t log((1 - q) + q exp(l_t))`` (:func:`poisson_llr`; the formula of
  :func:`audits.mechanism.gaussian_mixture_llr` with mu_in = 1, mu_out = 0);
- shuffled fixed-size batches: once per epoch at an unknown step, ``sum_e log(mean_{t in e} exp(l_t))``
  (:func:`shuffle_llr`).

Canaries with directions in different parts have LLRs of different null means (each absent step
adds ``E[log((1-q) + q e^l)] < 0``, more negative the more parts), which confounds a ranking across
them when the claim is wrong (a fault). :func:`standardize` therefore reports each score as
``(score - E_0) / SD_0``, its mean and std in the canary-absent world under the CLAIM
(:func:`null_moments`: Gauss-Hermite quadrature; shuffle: a fixed-seed Monte Carlo), a function of
the claimed parameters and the step count only.

The parameters (q, nm_p) come from the CLAIMED mechanism, never from the audited outputs, so any
membership test built on these scores keeps its guarantee. :func:`projection_sum` is the old
statistic (sum over steps of the projections), kept to compare against.

Shapes: ``obs (m, T, P)`` per canary, step, part; ``uses (m, P)`` bool, the parts a canary has a
direction in; ``stds (P,)``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from dpfpl.errors import ConfigError

__all__ = ["step_log_lr", "poisson_llr", "shuffle_llr", "projection_sum", "null_moments", "standardize"]


def _check(obs: np.ndarray, uses: np.ndarray, stds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    o, u, s = np.asarray(obs, np.float64), np.asarray(uses, bool), np.asarray(stds, np.float64)
    if o.ndim != 3 or u.shape != (o.shape[0], o.shape[2]) or s.shape != (o.shape[2],):
        raise ConfigError(f"step scores: obs (m, T, P), uses (m, P), stds (P,) expected; got {o.shape}, "
                          f"{u.shape}, {s.shape}")
    if np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ConfigError(f"step scores: noise multipliers must be finite and > 0, got {s.tolist()}")
    return o, u, s


def step_log_lr(obs: np.ndarray, uses: np.ndarray, stds: np.ndarray) -> np.ndarray:
    """``l[k, t] = sum_p uses[k, p] (obs[k, t, p] - 1/2) / stds[p]^2``: log N(1, s^2) / N(0, s^2) per part."""
    o, u, s = _check(obs, uses, stds)
    return ((o - 0.5) / s ** 2 * u[:, None, :]).sum(-1)  # (m, T)


def poisson_llr(obs: np.ndarray, uses: np.ndarray, stds: np.ndarray, q: float) -> np.ndarray:
    """Score of each canary under Poisson sampling at rate q: ``sum_t log((1-q) + q e^{l_t})`` -> (m,)."""
    if not 0 < q <= 1:
        raise ConfigError(f"poisson_llr: q must be in (0, 1], got {q!r}")
    l = step_log_lr(obs, uses, stds)
    if q == 1:
        return l.sum(-1)
    return np.logaddexp(math.log1p(-q), math.log(q) + l).sum(-1)


def shuffle_llr(obs: np.ndarray, uses: np.ndarray, stds: np.ndarray, epoch: np.ndarray) -> np.ndarray:
    """Score under shuffled batches (present once per epoch, step unknown):
    ``sum_e log(mean_{t: epoch[t] = e} e^{l_t})`` -> (m,). ``epoch (T,)``: the epoch of each step."""
    l = step_log_lr(obs, uses, stds)
    ep = np.asarray(epoch)
    if ep.shape != (l.shape[1],):
        raise ConfigError(f"shuffle_llr: one epoch per step expected, got {ep.shape} for {l.shape[1]} steps")
    out = np.zeros(l.shape[0])
    for e in np.unique(ep):
        cols = l[:, ep == e]
        out += special.logsumexp(cols, axis=1) - math.log(cols.shape[1])
    return out


def projection_sum(obs: np.ndarray, uses: np.ndarray) -> np.ndarray:
    """The old statistic: ``sum_t sum_p uses[k, p] obs[k, t, p]`` -> (m,)."""
    o, u = np.asarray(obs, np.float64), np.asarray(uses, bool)
    return (o * u[:, None, :]).sum((1, 2))


def null_moments(mu2: float, q: float, steps: int, epoch_len: int = 0, draws: int = 20000) -> tuple[float, float]:
    """Mean and std of a canary's score when it is absent, under the claim: ``l ~ N(-mu2/2, mu2)`` per
    step with ``mu2 = sum_p 1/nm_p^2`` over its parts. Poisson (``epoch_len = 0``): ``steps`` i.i.d.
    terms ``log((1-q) + q e^l)`` (Gauss-Hermite, 80 nodes); shuffle: ``steps // epoch_len`` epochs of
    ``log mean exp(l)`` over ``epoch_len`` steps (Monte Carlo, fixed seed 0)."""
    sd = math.sqrt(mu2)
    if epoch_len <= 0:
        x, w = np.polynomial.hermite_e.hermegauss(80)
        w = w / w.sum()
        l = -mu2 / 2 + sd * x
        f = l if q == 1 else np.logaddexp(math.log1p(-q), math.log(q) + l)
        m1 = float((w * f).sum())
        v = float((w * (f - m1) ** 2).sum())
        return steps * m1, math.sqrt(steps * v)
    rng = np.random.default_rng(0)
    l = -mu2 / 2 + sd * rng.standard_normal((draws, epoch_len))
    f = special.logsumexp(l, axis=1) - math.log(epoch_len)
    n_ep = max(1, steps // epoch_len)
    return n_ep * float(f.mean()), math.sqrt(n_ep * float(f.var()))


def standardize(scores: np.ndarray, uses: np.ndarray, stds: np.ndarray, q: float, steps: int,
                epoch_len: int = 0) -> np.ndarray:
    """``(score - E_0) / SD_0`` per canary, the moments of :func:`null_moments` for its parts."""
    sc, u, s = np.asarray(scores, np.float64), np.asarray(uses, bool), np.asarray(stds, np.float64)
    out = np.empty_like(sc)
    mu2 = (u / s ** 2).sum(1)  # (m,)
    for v in np.unique(mu2):
        sel = mu2 == v
        e0, sd0 = null_moments(float(v), q, steps, epoch_len)
        out[sel] = (sc[sel] - e0) / sd0 if sd0 > 0 else sc[sel] - e0
    return out
