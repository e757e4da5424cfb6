"""Statistically sound empirical-epsilon lower bounds (pure numpy/scipy).

Three tools, all returning a *lower* bound on the epsilon of the audited mechanism that holds
with probability >= ``confidence`` over the audit's randomness (if the mechanism really is
(eps, delta)-DP, the reported bound exceeds eps with probability <= 1 - confidence):

1. :func:`clopper_pearson`: exact binomial confidence bounds.
2. :func:`eps_lower_bound_from_roc`: threshold-test audit. (eps, delta)-DP implies, for every
   test with true/false positive rates TPR/FPR (Kairouz, Oh, Viswanath 2015),
   ``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta``, hence
   ``eps >= log((TPR_lo - delta) / FPR_hi)`` and ``eps >= log((1 - FPR_hi - delta) / (1 - TPR_lo))``
   with Clopper-Pearson bounds TPR_lo, FPR_hi. Both directions use the *same* two bounds, so the
   symmetric direction costs no extra correction. Choosing the threshold on the audited data
   needs a correction (``method="bonferroni"``) or a held-out split (``method="holdout"``).
   Assumption: members' scores are i.i.d. draws of the "in" world and non-members' scores i.i.d.
   draws of the "out" world (e.g. one target per independently trained model). Many canaries
   inside *one* training run are not independent trials: use the one-run audit for that.
   :func:`plan_threshold` + :func:`eps_lower_bound_at_threshold`: the threshold chosen in
   advance from a simulation of the CLAIMED mechanism (expected bound at the audit's sizes), then
   one test on the audited data with no correction (Nasr et al. 2023: the optimal test for a known
   output distribution is what makes a mechanism audit tight).
3. :func:`one_run_eps_lower_bound` / :func:`one_run_audit` / :func:`one_run_audit_search`:
   Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023.
   Requires that each of the m canaries was included independently with probability 1/2.

Also :func:`gaussian_delta` / :func:`gaussian_eps`: the exact privacy profile of the Gaussian
mechanism (Balle & Wang, ICML 2018, Thm. 8), the ground truth used by the soundness tests.

Errors: :class:`dpfpl.errors.ConfigError` (a ``ValueError``) naming the argument.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
from scipy import optimize, special, stats

from dpfpl.errors import ConfigError

from .metrics import check_scores_labels

__all__ = [
    "clopper_pearson",
    "eps_lower_bound_from_roc",
    "plan_threshold",
    "eps_lower_bound_at_threshold",
    "one_run_p_value",
    "one_run_eps_lower_bound",
    "one_run_audit",
    "one_run_audit_search",
    "one_run_ceiling",
    "default_one_run_levels",
    "gaussian_delta",
    "gaussian_eps",
]


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not (0.0 < c < 1.0):
        raise ConfigError(f"confidence: must be in (0, 1), got {confidence!r}")
    return c


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not (0.0 <= d < 1.0):
        raise ConfigError(f"delta: must be in [0, 1), got {delta!r}")
    return d


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not (0.0 < a < 1.0):
        raise ConfigError(f"alpha: must be in (0, 1), got {alpha!r}")
    return a


def _check_count(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
        raise ConfigError(f"{name}: must be an integer, got {value!r}")
    v = int(value)
    if v < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value!r}")
    return v


# --------------------------------------------------------------------------------------------
# Clopper-Pearson
# --------------------------------------------------------------------------------------------

def _cp_lower(k: np.ndarray, n: np.ndarray, a: float) -> np.ndarray:
    """One-sided level-``a`` lower bound: the p with P[Bin(n, p) >= k] = a (0 when k = 0)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = special.betaincinv(np.maximum(k, 1e-300), np.maximum(n - k + 1.0, 1e-300), a)
    return np.where(k <= 0, 0.0, lo)


def _cp_upper(k: np.ndarray, n: np.ndarray, a: float) -> np.ndarray:
    """One-sided level-``a`` upper bound: the p with P[Bin(n, p) <= k] = a (1 when k = n)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        hi = special.betaincinv(k + 1.0, np.maximum(n - k, 1e-300), 1.0 - a)
    return np.where(k >= n, 1.0, hi)


def clopper_pearson(k: Any, n: Any, alpha: float = 0.05,
                    side: str = "two-sided") -> tuple[Any, Any]:
    """Exact (Clopper-Pearson 1934) confidence bounds for a binomial proportion.

    Returns ``(lower, upper)`` (floats, or arrays if ``k``/``n`` are arrays; they broadcast):

    - ``side="lower"``: ``lower = Beta(k, n-k+1).ppf(alpha)`` (0 if k = 0), ``upper = 1``;
      P[p < lower] <= alpha.
    - ``side="upper"``: ``lower = 0``, ``upper = Beta(k+1, n-k).ppf(1-alpha)`` (1 if k = n);
      P[p > upper] <= alpha.
    - ``side="two-sided"``: both, each at ``alpha/2``; P[p outside] <= alpha.
    """
    a = _check_alpha(alpha)
    if side not in ("two-sided", "lower", "upper"):
        raise ConfigError(f"side: must be 'two-sided', 'lower' or 'upper', got {side!r}")
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    if np.any(k_arr != np.round(k_arr)) or np.any(n_arr != np.round(n_arr)):
        raise ConfigError(f"k, n: must be integers, got k={k!r}, n={n!r}")
    if np.any(n_arr < 1):
        raise ConfigError(f"n: must be >= 1, got {n!r}")
    if np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ConfigError(f"k: must be in [0, n], got k={k!r}, n={n!r}")
    a_side = a / 2.0 if side == "two-sided" else a
    lo = _cp_lower(k_arr, n_arr, a_side) if side != "upper" else np.zeros(np.broadcast(k_arr, n_arr).shape)
    hi = _cp_upper(k_arr, n_arr, a_side) if side != "lower" else np.ones(np.broadcast(k_arr, n_arr).shape)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


# --------------------------------------------------------------------------------------------
# threshold-test audit
# --------------------------------------------------------------------------------------------

def _eps_from_rates(tpr_lo: np.ndarray, fpr_hi: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Both DP inequalities solved for eps (``-inf`` where nothing can be claimed)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        num_f = tpr_lo - delta
        fwd = np.where((num_f > 0) & (fpr_hi > 0), np.log(np.maximum(num_f, 1e-300) / fpr_hi), -np.inf)
        num_s = 1.0 - fpr_hi - delta
        den_s = 1.0 - tpr_lo
        sym = np.where((num_s > 0) & (den_s > 0), np.log(np.maximum(num_s, 1e-300) / den_s), -np.inf)
    return fwd, sym


def _fp_grid(n0: int, n_thresholds: int) -> np.ndarray:
    """Fixed grid of false-positive counts j in [0, n0-1], depending only on (n0, n_thresholds).

    Half geometric from 0 (low-FPR tests, best for the ``TPR/FPR`` direction), half mirrored
    from n0-1 (tests below almost every member, best for the ``TNR/FNR`` direction).
    """
    half = max(1, n_thresholds // 2)
    g = np.unique(np.round(np.geomspace(1, n0, half)).astype(np.int64) - 1)
    grid = np.unique(np.r_[g, n0 - 1 - g])
    return grid[(grid >= 0) & (grid <= n0 - 1)]


def eps_lower_bound_from_roc(scores: Any, is_member: Any, delta: float,
                             confidence: float = 0.95, method: str = "bonferroni",
                             seed: Optional[int] = 0, n_thresholds: int = 64) -> dict[str, Any]:
    """Sound empirical-eps lower bound from a threshold membership test.

    For the chosen test, eps >= max(log((TPR_lo - delta)/FPR_hi),
    log((1 - FPR_hi - delta)/(1 - TPR_lo))) with one-sided Clopper-Pearson TPR_lo, FPR_hi.
    The result is >= eps_true with probability <= 1 - confidence (under the i.i.d. assumption
    in the module docstring). Members and non-members are independent samples, so the two
    families of intervals are each run at ``1 - sqrt(confidence)`` (product = confidence).

    ``method="bonferroni"``: threshold selected on the same data among m candidates; every
    candidate's intervals are at level ``(1 - sqrt(confidence)) / m``. By the union bound, with
    probability >= confidence *all* candidates' intervals hold at once, so whichever candidate
    (and direction) maximises the bound, it is valid. The candidates are the (j+1)-th largest
    non-member scores for j in a grid of false-positive counts fixed by ``(n_non-members,
    n_thresholds)`` only (:func:`_fp_grid`), with the test "score strictly above". This keeps
    the union bound exact although the thresholds are data values: with continuous scores
    the FPR of the test above the (j+1)-th largest of n0 i.i.d. non-member scores is
    Beta(j+1, n0-j)-distributed, whose (1-a) quantile is exactly the Clopper-Pearson upper
    bound for j false positives; and given the non-member data the threshold is fixed and the
    member count above it is Binomial(n1, TPR), independent of the non-members. (Thresholds
    at *pooled* score quantiles would not have this property.) Ties are broken by an
    independent uniform draw (``seed``), i.e. a randomised threshold test, which DP covers.

    ``method="holdout"``: a random half of each class (``seed``) selects the threshold (best
    bound on that half over all its distinct scores, test ``score >= t``); the intervals are
    computed on the other half, with no correction.

    Returns a dict: ``eps_lower_bound`` (>= 0; 0 when nothing can be claimed), ``threshold``,
    ``direction`` ("tpr/fpr" or "tnr/fnr"), ``tp``, ``fp``, ``n_members``, ``n_nonmembers``
    (the counts the bound was computed from), ``tpr_lo``, ``fpr_hi``, ``n_candidates``,
    ``confidence``, ``delta``, ``method``, ``seed``.
    """
    s, y = check_scores_labels(scores, is_member)
    d = _check_delta(delta)
    c = _check_confidence(confidence)
    if method not in ("bonferroni", "holdout"):
        raise ConfigError(f"method: must be 'bonferroni' or 'holdout', got {method!r}")
    n_thr = _check_count("n_thresholds", n_thresholds, minimum=1)
    rng = np.random.default_rng(seed)
    a_family = 1.0 - math.sqrt(c)  # per family (TPR bounds / FPR bounds)

    if method == "bonferroni":
        u = rng.random(s.size)  # independent tie-breaker: randomised threshold test
        s_mem, s_non = np.sort(s[y]), np.sort(s[~y])[::-1]  # members ascending, non-members descending
        pooled = np.sort(s)
        ties = bool(np.any(pooled[1:] == pooled[:-1]))
        n1, n0 = s_mem.size, s_non.size
        fp = _fp_grid(n0, n_thr)
        m = fp.size
        if not ties:  # distinct scores: (score, u) order is the score order, no tie-breaker needed
            thr_val = s_non[fp]  # (fp+1)-th largest non-member; fp non-members lie strictly above
            tp = n1 - np.searchsorted(s_mem, thr_val, side="right")
        else:
            order = np.lexsort((u, s))  # ascending by (score, u); keys distinct almost surely
            rank = np.empty(s.size, dtype=np.int64)
            rank[order] = np.arange(s.size)
            r_non = np.sort(rank[~y])[::-1]  # non-member ranks, descending
            r_mem = np.sort(rank[y])
            thr_rank = r_non[fp]
            tp = n1 - np.searchsorted(r_mem, thr_rank, side="right")
            thr_val = s[order[thr_rank]]
        a_each = a_family / m
        tpr_lo = _cp_lower(tp, n1, a_each)
        fpr_hi = _cp_upper(fp, n0, a_each)
        fwd, sym = _eps_from_rates(tpr_lo, fpr_hi, d)
        best_each = np.maximum(fwd, sym)
        i = int(np.argmax(best_each))
        eps = float(best_each[i])
        return {
            "eps_lower_bound": max(0.0, eps) if np.isfinite(eps) else 0.0,
            "threshold": float(thr_val[i]),
            "direction": "tpr/fpr" if fwd[i] >= sym[i] else "tnr/fnr",
            "tp": int(tp[i]), "fp": int(fp[i]), "n_members": int(n1), "n_nonmembers": int(n0),
            "tpr_lo": float(tpr_lo[i]), "fpr_hi": float(fpr_hi[i]), "n_candidates": int(m),
            "confidence": c, "delta": d, "method": method, "seed": seed,
        }

    # ---- holdout
    idx_m = rng.permutation(np.nonzero(y)[0])
    idx_n = rng.permutation(np.nonzero(~y)[0])
    if idx_m.size < 2 or idx_n.size < 2:
        raise ConfigError(
            f"is_member: method='holdout' needs >= 2 members and >= 2 non-members, got "
            f"{idx_m.size} and {idx_n.size}")
    sel = np.r_[idx_m[: idx_m.size // 2], idx_n[: idx_n.size // 2]]
    ev = np.r_[idx_m[idx_m.size // 2:], idx_n[idx_n.size // 2:]]

    def counts(ss: np.ndarray, yy: np.ndarray, thr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sm = np.sort(ss[yy])
        sn = np.sort(ss[~yy])
        return (sm.size - np.searchsorted(sm, thr, side="left"),
                sn.size - np.searchsorted(sn, thr, side="left"))

    s_sel, y_sel = s[sel], y[sel]
    cand = np.unique(s_sel)
    tp_s, fp_s = counts(s_sel, y_sel, cand)
    f_s, g_s = _eps_from_rates(_cp_lower(tp_s, int(y_sel.sum()), a_family),
                               _cp_upper(fp_s, int((~y_sel).sum()), a_family), d)
    i = int(np.argmax(np.maximum(f_s, g_s)))
    thr = float(cand[i])

    s_ev, y_ev = s[ev], y[ev]
    n1, n0 = int(y_ev.sum()), int((~y_ev).sum())
    tp_e, fp_e = counts(s_ev, y_ev, np.array([thr]))
    tpr_lo = _cp_lower(tp_e, n1, a_family)
    fpr_hi = _cp_upper(fp_e, n0, a_family)
    fwd, sym = _eps_from_rates(tpr_lo, fpr_hi, d)
    eps = float(max(fwd[0], sym[0]))
    return {
        "eps_lower_bound": max(0.0, eps) if np.isfinite(eps) else 0.0,
        "threshold": thr,
        "direction": "tpr/fpr" if fwd[0] >= sym[0] else "tnr/fnr",
        "tp": int(tp_e[0]), "fp": int(fp_e[0]), "n_members": n1, "n_nonmembers": n0,
        "tpr_lo": float(tpr_lo[0]), "fpr_hi": float(fpr_hi[0]), "n_candidates": int(cand.size),
        "confidence": c, "delta": d, "method": method, "seed": seed,
    }


# --------------------------------------------------------------------------------------------
# a threshold planned from the claim (no correction: it is fixed before the audited data exist)
# --------------------------------------------------------------------------------------------

def _bound_at_counts(tp: np.ndarray, n1: int, fp: np.ndarray, n0: int, delta: float,
                     a: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(fwd, sym, TPR_lo, FPR_hi) of the threshold tests with counts tp / n1, fp / n0 (counts may be
    fractional: the plug-in expected counts of a plan), each interval one-sided at level ``a``."""
    tpr_lo = _cp_lower(tp, n1, a)
    fpr_hi = _cp_upper(fp, n0, a)
    fwd, sym = _eps_from_rates(tpr_lo, fpr_hi, delta)
    return fwd, sym, tpr_lo, fpr_hi


def plan_threshold(pilot_in: Any, pilot_out: Any, n_members: int, n_nonmembers: int, delta: float,
                   alpha: float, min_count: int = 10, llr: bool = False) -> dict[str, Any]:
    """The threshold whose bound is largest IN EXPECTATION, planned on a pilot sample of the claim.

    ``pilot_in`` / ``pilot_out``: scores of a simulation of the CLAIMED mechanism (never of the
    audited one) in the two worlds. For each candidate threshold t (pilot scores at a fixed grid of
    tail fractions) the pilot's rates are scaled to the audit's sizes (expected counts) and the bound
    of :func:`eps_lower_bound_at_threshold` at level ``alpha`` is evaluated; the best (threshold,
    direction) is returned with that expected bound. Because the threshold depends on the claim
    only, the audit's test needs no multiple-testing correction.

    ``llr=True``: the scores ARE the claim's log-likelihood ratio S = log dP_in/dP_out, so
    P_out(S > t) = E_in[e^-S 1{S > t}] and P_in(S <= t) = E_out[e^S 1{S <= t}]: each small tail is
    estimated from the world whose samples support it better (the plain count, or the importance
    estimate's effective sample size), which removes most of the pilot's noise, and its winner's
    curse, at the low false-positive rates a tight audit lives at. Candidates whose deciding tail
    rests on fewer than ``min_count`` (effective) pilot samples are skipped.
    """
    pi = np.sort(np.asarray(pilot_in, dtype=np.float64).ravel())
    po = np.sort(np.asarray(pilot_out, dtype=np.float64).ravel())
    if pi.size < 2 * min_count or po.size < 2 * min_count:
        raise ConfigError(f"plan_threshold: the pilot needs >= {2 * min_count} scores per world, got "
                          f"{pi.size} and {po.size}")
    d, a = _check_delta(delta), _check_alpha(alpha)
    n1 = _check_count("n_members", n_members, minimum=1)
    n0 = _check_count("n_nonmembers", n_nonmembers, minimum=1)
    fr = np.geomspace(min_count / min(pi.size, po.size), 0.5, 200)
    fr = np.r_[fr, 1.0 - fr]  # both tails of both worlds: the best threshold may sit in either, or between them

    def quantiles(x: np.ndarray) -> np.ndarray:
        return x[np.clip(np.round(fr * x.size).astype(np.int64), 0, x.size - 1)]

    cand = np.unique(np.r_[quantiles(pi), quantiles(po), (pi[0] + po[-1]) / 2])
    above_i = pi.size - np.searchsorted(pi, cand, side="right")  # pilot members with S > t
    above_o = po.size - np.searchsorted(po, cand, side="right")
    below_i, below_o = pi.size - above_i, po.size - above_o
    tp_rate, fp_rate, fn_rate = above_i / pi.size, above_o / po.size, below_i / pi.size
    n_fp, n_fn = above_o.astype(np.float64), below_i.astype(np.float64)  # samples behind each small tail
    if llr:
        # importance estimates and their effective sample sizes (sum w)^2 / sum w^2, in logs (no overflow):
        # P_out(S > t) from members above t with weights e^-S, P_in(S <= t) from non-members below with e^S
        lw_i = np.r_[np.logaddexp.accumulate(-pi[::-1])[::-1], -np.inf]       # log sum_{j >= k} e^-pi_j
        lw2_i = np.r_[np.logaddexp.accumulate(-2 * pi[::-1])[::-1], -np.inf]
        lw_o = np.r_[-np.inf, np.logaddexp.accumulate(po)]                    # log sum_{j < k} e^po_j
        lw2_o = np.r_[-np.inf, np.logaddexp.accumulate(2 * po)]
        k_i, k_o = below_i, below_o  # first member above t; non-members at or below t
        with np.errstate(invalid="ignore", over="ignore"):
            ess_fp = np.nan_to_num(np.exp(2 * lw_i[k_i] - lw2_i[k_i]))
            ess_fn = np.nan_to_num(np.exp(2 * lw_o[k_o] - lw2_o[k_o]))
        use_fp, use_fn = ess_fp > n_fp, ess_fn > n_fn  # the estimate resting on more (effective) samples
        fp_rate = np.where(use_fp, np.minimum(1.0, np.exp(lw_i[k_i]) / pi.size), fp_rate)
        fn_rate = np.where(use_fn, np.minimum(1.0, np.exp(lw_o[k_o]) / po.size), fn_rate)
        n_fp, n_fn = np.maximum(n_fp, ess_fp), np.maximum(n_fn, ess_fn)
    # TPR/FPR direction: members above t; TNR/FNR direction: members at or below t (1 - TPR = FNR)
    fwd = np.where(n_fp >= min_count, _bound_at_counts(tp_rate * n1, n1, fp_rate * n0, n0, d, a)[0], -np.inf)
    sym = np.where(n_fn >= min_count, _bound_at_counts((1.0 - fn_rate) * n1, n1, fp_rate * n0, n0, d, a)[1], -np.inf)
    best = np.maximum(fwd, sym)
    i = int(np.argmax(best))
    return {"threshold": float(cand[i]), "direction": "tpr/fpr" if fwd[i] >= sym[i] else "tnr/fnr",
            "expected_eps": float(max(0.0, best[i])) if np.isfinite(best[i]) else 0.0,
            "pilot_trials": int(min(pi.size, po.size)), "alpha": a, "tilted": bool(llr)}


def eps_lower_bound_at_threshold(s_in: Any, s_out: Any, threshold: float, delta: float,
                                 alpha: float) -> dict[str, Any]:
    """Sound bound of ONE threshold test fixed before the data: "score > threshold".

    tp ~ Bin(n1, TPR) and fp ~ Bin(n0, FPR) are independent, so with one-sided Clopper-Pearson
    intervals at level ``alpha`` each, both hold with probability >= (1 - alpha)^2, and then
    eps >= max(log((TPR_lo - delta) / FPR_hi), log((1 - FPR_hi - delta) / (1 - TPR_lo))).
    """
    si = np.asarray(s_in, dtype=np.float64).ravel()
    so = np.asarray(s_out, dtype=np.float64).ravel()
    if si.size < 1 or so.size < 1:
        raise ConfigError("eps_lower_bound_at_threshold: both worlds need scores")
    d, a = _check_delta(delta), _check_alpha(alpha)
    tp, fp = int(np.sum(si > threshold)), int(np.sum(so > threshold))
    fwd, sym, lo, hi = _bound_at_counts(np.array([tp]), si.size, np.array([fp]), so.size, d, a)
    eps = float(max(fwd[0], sym[0]))
    return {"eps_lower_bound": max(0.0, eps) if np.isfinite(eps) else 0.0, "threshold": float(threshold),
            "direction": "tpr/fpr" if fwd[0] >= sym[0] else "tnr/fnr", "tp": tp, "fp": fp,
            "n_members": int(si.size), "n_nonmembers": int(so.size), "tpr_lo": float(lo[0]),
            "fpr_hi": float(hi[0]), "n_candidates": 1, "alpha": a, "delta": d}


# --------------------------------------------------------------------------------------------
# one-run audit (Steinke, Nasr, Jagielski 2023)
# --------------------------------------------------------------------------------------------

def _check_one_run_counts(n_guesses: Any, n_correct: Any, n_canaries: Any) -> tuple[int, int, int]:
    r = _check_count("n_guesses", n_guesses)
    v = _check_count("n_correct", n_correct)
    m = _check_count("n_canaries", n_canaries, minimum=1)
    if v > r:
        raise ConfigError(f"n_correct: must be <= n_guesses ({r}), got {n_correct!r}")
    if r > m:
        raise ConfigError(f"n_guesses: must be <= n_canaries ({m}), got {n_guesses!r}")
    return r, v, m


def _one_run_p(r: int, v: int, m: int, eps: float, delta: float) -> float:
    """Unchecked p-value of Steinke et al. (Thm. 3.3 / Alg. 2 of the paper's appendix)."""
    q = special.expit(eps)  # e^eps / (1 + e^eps): accuracy of eps-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta > 0.0 and v > 0:
        # alpha = max_{i=1..v} (1/i) P[v > Bin(r, q) >= v - i]
        pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # pmf(v-1), pmf(v-2), ..., pmf(0)
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
        beta += 2.0 * m * delta * alpha
    return min(beta, 1.0)


def one_run_p_value(n_guesses: int, n_correct: int, n_canaries: int, eps: float,
                    delta: float = 0.0) -> float:
    """Upper bound on P[>= n_correct correct guesses] for an (eps, delta)-DP mechanism.

    Steinke, Nasr, Jagielski (NeurIPS 2023), Theorem 3.1 (delta = 0) and its approximate-DP
    extension (the p-value of their Algorithm 2):
    ``P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta max_{i=1..v} P[v > Bin(r, p) >= v - i] / i``
    with ``p = e^eps / (1 + e^eps)``, r guesses, v correct, m canaries (each included
    independently with probability 1/2; guesses a function of the output).
    """
    r, v, m = _check_one_run_counts(n_guesses, n_correct, n_canaries)
    e = float(eps)
    if not (e >= 0.0) or not math.isfinite(e):
        raise ConfigError(f"eps: must be a finite number >= 0, got {eps!r}")
    return _one_run_p(r, v, m, e, _check_delta(delta))


def one_run_eps_lower_bound(n_guesses: int, n_correct: int, n_canaries: int,
                            delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest eps rejected at level ``1 - confidence`` by the one-run test (0 if none).

    ``delta = 0``: closed form. ``P[Bin(r, p) >= v] = I_p(v, r-v+1)`` is increasing in p, so the
    bound is ``logit(p*)`` with ``p*`` the one-sided Clopper-Pearson lower bound of v out of r at
    level ``1 - confidence``. ``delta > 0``: the paper's p-value (:func:`one_run_p_value`) and
    its bisection (Alg. 2), bracketed by ``[0, bound at delta = 0]`` (the delta term only
    increases the p-value). Anchors at 95%: 100/100 -> 3.49, 1000/1000 -> 5.81,
    900/1000 -> 2.02 (the delta term lowers these slightly: 1000/1000 with m=1000,
    delta=1e-5 -> 5.78).
    """
    r, v, m = _check_one_run_counts(n_guesses, n_correct, n_canaries)
    d = _check_delta(delta)
    a = 1.0 - _check_confidence(confidence)
    if v == 0:
        return 0.0
    p_star = float(special.betaincinv(v, r - v + 1, a))
    eps0 = float(special.logit(p_star)) if p_star > 0.5 else 0.0
    if eps0 <= 0.0:
        return 0.0
    if d == 0.0:
        return eps0
    if _one_run_p(r, v, m, 0.0, d) >= a:
        return 0.0
    lo, hi = 0.0, eps0  # invariant: p(lo) < a, and no eps >= hi has p < a
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _one_run_p(r, v, m, mid, d) < a:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9:
            break
    return lo


def one_run_audit(scores: Any, is_member: Any, n_guess_pos: int, n_guess_neg: int,
                  delta: float = 0.0, confidence: float = 0.95, seed: Optional[int] = 0,
                  n_canaries: Optional[int] = None) -> dict[str, Any]:
    """One-run audit: guess "member" for the ``n_guess_pos`` highest scores, "non-member" for
    the ``n_guess_neg`` lowest, abstain on the rest; bound eps with
    :func:`one_run_eps_lower_bound`.

    ``scores``/``is_member`` are the canaries of ONE training run; each canary must have been
    included independently with probability 1/2 (Steinke et al. 2023), which this function
    cannot check. Ties are broken by an independent uniform draw (``seed``), never by position
    (position may correlate with membership). ``n_canaries`` (default ``len(scores)``) is the m
    of the delta term: pass the total if only some canaries were scored.

    Returns a dict: ``eps_lower_bound``, ``n_guesses``, ``n_correct``, ``n_canaries``,
    ``n_guess_pos``, ``n_guess_neg``, ``correct_pos``, ``correct_neg``, ``confidence``, ``delta``.
    """
    s, y = check_scores_labels(scores, is_member)
    kp = _check_count("n_guess_pos", n_guess_pos)
    kn = _check_count("n_guess_neg", n_guess_neg)
    if kp + kn == 0:
        raise ConfigError("n_guess_pos, n_guess_neg: at least one guess is needed, got 0 and 0")
    if kp + kn > s.size:
        raise ConfigError(
            f"n_guess_pos + n_guess_neg: {kp + kn} guesses exceed the {s.size} scores")
    m = s.size if n_canaries is None else _check_count("n_canaries", n_canaries, minimum=1)
    if m < s.size:
        raise ConfigError(f"n_canaries: must be >= len(scores) = {s.size}, got {n_canaries!r}")
    order = _tie_broken_order(s, seed)
    return _one_run_from_order(y, order, kp, kn, m, _check_delta(delta), _check_confidence(confidence))


def _tie_broken_order(s: np.ndarray, seed: Optional[int]) -> np.ndarray:
    u = np.random.default_rng(seed).random(s.size)
    return np.lexsort((u, s))  # ascending by (score, u)


def _one_run_from_order(y: np.ndarray, order: np.ndarray, kp: int, kn: int, m: int,
                        delta: float, confidence: float) -> dict[str, Any]:
    top = order[order.size - kp:] if kp > 0 else order[:0]
    bottom = order[:kn]
    cp = int(np.sum(y[top]))
    cn = int(np.sum(~y[bottom]))
    r, v = kp + kn, cp + cn
    return {
        "eps_lower_bound": one_run_eps_lower_bound(r, v, m, delta, confidence),
        "n_guesses": r, "n_correct": v, "n_canaries": m,
        "n_guess_pos": kp, "n_guess_neg": kn, "correct_pos": cp, "correct_neg": cn,
        "confidence": confidence, "delta": delta,
    }


def default_one_run_levels(n: int) -> list[tuple[int, int]]:
    """Fixed abstention grid for :func:`one_run_audit_search`, a function of ``n`` only.

    Guess totals of 1%, 2%, 5%, 10%, 20%, 50%, 100% of the n canaries, either all "member"
    guesses (k- = 0) or split evenly between the two ends; duplicates and empty levels dropped.
    """
    n = _check_count("n", n, minimum=1)
    levels: list[tuple[int, int]] = []
    for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        k = int(round(f * n))
        for lv in ((k, 0), (k - k // 2, k // 2)):
            if sum(lv) > 0 and lv not in levels:
                levels.append(lv)
    return levels


def one_run_audit_search(scores: Any, is_member: Any, delta: float = 0.0,
                         confidence: float = 0.95,
                         levels: Optional[Sequence[tuple[int, int]]] = None,
                         seed: Optional[int] = 0,
                         n_canaries: Optional[int] = None) -> dict[str, Any]:
    """Best one-run bound over a fixed set of (k+, k-) abstention levels, Bonferroni-corrected.

    Each of the L levels is evaluated at confidence ``1 - (1 - confidence) / L``; by the union
    bound all L bounds are simultaneously valid with probability >= ``confidence``, so their
    maximum is too. ``levels`` must be fixed before looking at the scores (default:
    :func:`default_one_run_levels` of ``len(scores)``).

    Returns the chosen level's :func:`one_run_audit` dict (whose ``confidence`` is the
    per-level one) plus ``confidence`` (overall), ``per_level_confidence``, ``n_levels`` and
    ``all_levels`` (the L dicts).
    """
    s, y = check_scores_labels(scores, is_member)
    c = _check_confidence(confidence)
    d = _check_delta(delta)
    m = s.size if n_canaries is None else _check_count("n_canaries", n_canaries, minimum=1)
    if m < s.size:
        raise ConfigError(f"n_canaries: must be >= len(scores) = {s.size}, got {n_canaries!r}")
    lv = default_one_run_levels(s.size) if levels is None else [tuple(x) for x in levels]
    if not lv:
        raise ConfigError("levels: empty")
    for kp, kn in lv:
        _check_count("levels[k+]", kp)
        _check_count("levels[k-]", kn)
        if kp + kn == 0 or kp + kn > s.size:
            raise ConfigError(f"levels: ({kp}, {kn}) must make between 1 and {s.size} guesses")
    c_each = 1.0 - (1.0 - c) / len(lv)
    order = _tie_broken_order(s, seed)
    results = [_one_run_from_order(y, order, int(kp), int(kn), m, d, c_each) for kp, kn in lv]
    best = max(results, key=lambda r: r["eps_lower_bound"])
    out = dict(best)
    out.update({"confidence": c, "per_level_confidence": c_each, "n_levels": len(lv),
                "all_levels": results})
    return out


def one_run_ceiling(n_canaries: int, delta: float = 0.0, confidence: float = 0.95) -> float:
    """The largest one-run bound ``n_canaries`` canaries can give: all m guessed, all correct
    (:func:`one_run_eps_lower_bound` (m, m, m)). At 95% and delta = 0: 100 -> 3.49, 1000 -> 5.81.
    An audit whose bound sits near this is limited by m, not by the mechanism."""
    m = _check_count("n_canaries", n_canaries, minimum=1)
    return one_run_eps_lower_bound(m, m, m, delta=delta, confidence=confidence)


# --------------------------------------------------------------------------------------------
# Gaussian mechanism ground truth (Balle & Wang 2018)
# --------------------------------------------------------------------------------------------

def gaussian_delta(eps: float, mu: float) -> float:
    """Exact delta(eps) of the Gaussian mechanism N(0,1) vs N(mu,1) (Balle & Wang 2018, Thm. 8):
    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` (0 for mu = 0)."""
    if mu < 0 or eps < 0:
        raise ConfigError(f"eps, mu: must be >= 0, got eps={eps!r}, mu={mu!r}")
    if mu == 0:
        return 0.0
    a = special.ndtr(-eps / mu + mu / 2.0)
    b = math.exp(eps + special.log_ndtr(-eps / mu - mu / 2.0))
    return max(0.0, float(a - b))


def gaussian_eps(delta: float, mu: float) -> float:
    """Smallest eps >= 0 such that the Gaussian mechanism with shift ``mu`` is (eps, delta)-DP."""
    d = float(delta)
    if not (0.0 < d < 1.0):
        raise ConfigError(f"delta: must be in (0, 1), got {delta!r}")
    if gaussian_delta(0.0, mu) <= d:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, mu) > d:
        hi *= 2.0
    return float(optimize.brentq(lambda e: gaussian_delta(e, mu) - d, 0.0, hi, xtol=1e-12))
