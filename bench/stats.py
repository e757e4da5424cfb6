"""The statistics behind every table: 95% t-intervals over seeds, paired tests, Welch deltas.

- :func:`t_halfwidth`: the half-width of the two-sided ``1 - alpha`` Student-t interval of a mean,
  ``t_{1-alpha/2, n-1} * s / sqrt(n)`` (``s``: sample standard deviation, ddof 1); NaN for n < 2.
- :func:`paired_test`: two methods compared on the seeds both ran (the same seed gives the same
  data split, initialisation and batches to every method, so the per-seed differences
  ``d_i = a_i - b_i`` are paired): the mean difference, its t-interval, and the two-sided p-value
  of the paired t-test ``t = mean(d) / (s_d / sqrt(n))`` with n - 1 degrees of freedom. The
  t-test, not Wilcoxon's signed-rank test: with 3-5 seeds the smallest two-sided Wilcoxon p-value
  is 0.25 (n = 3) or 0.0625 (n = 5), so Wilcoxon could never mark a difference at 0.05.
  Degenerate cases: n < 2 gives p = NaN (never significant); ``s_d = 0`` gives p = 0 when the
  (constant) difference is non-zero and p = 1 when every difference is 0.
- :func:`welch_delta`: the difference of two independent means (two result folders: different
  code or settings, so no pairing is assumed) with the Welch interval
  ``t_{1-alpha/2, nu} * sqrt(s1^2/n1 + s2^2/n2)``, ``nu`` from Welch-Satterthwaite. A side
  without spread (a published number: n = 1, s = 0) contributes nothing, so the interval is the
  other side's own t-interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05


def t_quantile(n: int | np.ndarray, alpha: float = ALPHA) -> np.ndarray | float:
    """``t_{1-alpha/2, n-1}`` (NaN where n < 2)."""
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore"):
        q = stats.t.ppf(1 - alpha / 2, np.where(n >= 2, n - 1, np.nan))
    return float(q) if q.ndim == 0 else q


def t_halfwidth(std: float | np.ndarray, n: int | np.ndarray, alpha: float = ALPHA) -> np.ndarray | float:
    """Half-width ``t_{1-alpha/2, n-1} * std / sqrt(n)`` of the interval of a mean (NaN for n < 2)."""
    n_arr = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = t_quantile(n_arr, alpha) * np.asarray(std, dtype=float) / np.sqrt(n_arr)
    return float(h) if np.ndim(h) == 0 else h


def mean_interval(values: Iterable[float], alpha: float = ALPHA) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n) of the finite values."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    s = float(np.std(x, ddof=1)) if len(x) > 1 else math.nan
    return float(x.mean()), float(t_halfwidth(s, len(x), alpha)), len(x)


@dataclass(frozen=True)
class Paired:
    """Outcome of :func:`paired_test` (differences a - b over the ``n`` common seeds)."""

    n: int
    diff: float
    half: float
    p: float

    def significant(self, alpha: float = ALPHA) -> bool:
        return self.n >= 2 and not math.isnan(self.p) and self.p < alpha


def paired_test(a: pd.Series, b: pd.Series, alpha: float = ALPHA) -> Paired:
    """Paired t-test of ``a - b`` on the seeds (index) where both are finite; see the module doc."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").astype(float)
    both = both[np.isfinite(both["a"]) & np.isfinite(both["b"])]
    d = (both["a"] - both["b"]).to_numpy()
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return Paired(1, mean, math.nan, math.nan)
    sd = float(np.std(d, ddof=1))
    if sd == 0.0:
        return Paired(n, mean, 0.0, 0.0 if mean != 0 else 1.0)
    t = mean / (sd / math.sqrt(n))
    p = float(2 * stats.t.sf(abs(t), n - 1))
    return Paired(n, mean, float(t_halfwidth(sd, n, alpha)), p)


def welch_delta(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int,
                alpha: float = ALPHA) -> tuple[float, float]:
    """(m1 - m2, half-width of its Welch interval); see the module doc. NaN half-width when a
    side with spread has n < 2, or when neither side has any spread information."""
    delta = m1 - m2
    parts, dfs = [], []
    for s, n in ((s1, n1), (s2, n2)):
        if n >= 2 and not math.isnan(s):
            v = s * s / n
            parts.append(v)
            dfs.append((v, n - 1))
        elif n == 1 and (s == 0 or math.isnan(s)):
            continue  # a single number (e.g. published): no spread to add
        else:
            return delta, math.nan
    if not parts:
        return delta, math.nan
    var = sum(parts)
    if var == 0:
        return delta, 0.0
    nu = var ** 2 / sum(v ** 2 / df for v, df in dfs)
    return delta, float(stats.t.ppf(1 - alpha / 2, nu) * math.sqrt(var))


def summarize(df: pd.DataFrame, keys: list[str], metric: str, alpha: float = ALPHA) -> pd.DataFrame:
    """Per group of ``keys``: mean, std, n and the 95% t half-width ``ci`` of ``metric`` over its
    finite values (one row per group, the keys as columns)."""
    x = df[keys + [metric]].copy()
    x[metric] = pd.to_numeric(x[metric], errors="coerce")
    x = x[np.isfinite(x[metric])]
    g = x.groupby(keys, sort=False, dropna=False)[metric].agg(["mean", "std", "count"]).reset_index()
    g = g.rename(columns={"count": "n"})
    g["ci"] = t_halfwidth(g["std"].to_numpy(), g["n"].to_numpy(), alpha) if len(g) else []
    return g


def finite_or_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
