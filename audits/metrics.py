"""Membership-inference metrics from scores and labels (pure numpy).

Convention everywhere: ``scores`` are membership scores, **higher = more likely a member**;
``is_member`` is a boolean array of the same length. A threshold test at ``t`` predicts
"member" iff ``score >= t``. ROC curves are the exact empirical ones (one point per distinct
score, ties grouped, so a tie never splits into an artificial staircase).

Following LiRA (Carlini et al., "Membership Inference Attacks From First Principles", S&P 2022)
we report, besides AUC and balanced accuracy, the TPR at low FPR (1% and 0.1%): average-case
metrics hide the leakage that matters.

Errors: :class:`dpfpl.errors.ConfigError` (a ``ValueError``) naming the argument, for empty
arrays, mismatched lengths, non-finite scores, labels that are not boolean/0-1, or a single class.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dpfpl.errors import ConfigError

__all__ = [
    "check_scores_labels",
    "roc_curve",
    "auc",
    "auc_from_curve",
    "tpr_at_fpr",
    "balanced_accuracy",
    "summarize",
]


def check_scores_labels(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to ``(float64 1-D scores, bool 1-D labels)``.

    Raises ConfigError (a ValueError) naming ``scores`` or ``is_member`` when: either is empty or
    not 1-D, lengths differ, a score is NaN/inf, a label is not boolean/0/1, or only one class
    is present (no ROC is defined then).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ConfigError(f"scores: expected a 1-D array, got shape {s.shape}")
    if s.size == 0:
        raise ConfigError("scores: empty array")
    if not np.all(np.isfinite(s)):
        raise ConfigError(f"scores: {int(np.sum(~np.isfinite(s)))} non-finite value(s) (NaN/inf)")
    y_raw = np.asarray(is_member)
    if y_raw.ndim != 1:
        raise ConfigError(f"is_member: expected a 1-D array, got shape {y_raw.shape}")
    if y_raw.shape != s.shape:
        raise ConfigError(f"is_member: length {y_raw.size} does not match scores length {s.size}")
    if y_raw.dtype != np.bool_:
        if not np.all((y_raw == 0) | (y_raw == 1)):
            raise ConfigError("is_member: labels must be boolean or 0/1")
    y = y_raw.astype(bool)
    n1 = int(y.sum())
    if n1 == 0 or n1 == y.size:
        raise ConfigError(
            f"is_member: need both members and non-members, got {n1} member(s) "
            f"and {y.size - n1} non-member(s)")
    return s, y


def roc_curve(scores: Any, is_member: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact empirical ROC curve of the test ``score >= t`` over all thresholds.

    Returns ``(fpr, tpr, thresholds)``: ``thresholds`` is ``+inf`` followed by the distinct
    scores in decreasing order; ``fpr[i]``/``tpr[i]`` are the fractions of non-members/members
    with ``score >= thresholds[i]``. So the curve starts at (0, 0) and ends at (1, 1), is
    non-decreasing in both coordinates, and tied scores form one point (the segment joining two
    consecutive points is achieved by randomising at the tied threshold).
    """
    s, y = check_scores_labels(scores, is_member)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    tp = np.cumsum(y_sorted)
    fp = np.cumsum(~y_sorted)
    # last index of each group of tied scores
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    n1, n0 = int(y.sum()), int((~y).sum())
    tpr = np.r_[0.0, tp[last] / n1]
    fpr = np.r_[0.0, fp[last] / n0]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


def auc_from_curve(fpr: Any, tpr: Any) -> float:
    """Area under a ROC curve given by its points (trapezoid rule; points sorted by FPR, TPR)."""
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(tpr, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ConfigError(f"fpr: expected a non-empty 1-D array, got shape {x.shape}")
    if y.shape != x.shape:
        raise ConfigError(f"tpr: shape {y.shape} does not match fpr shape {x.shape}")
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def auc(scores: Any, is_member: Any) -> float:
    """ROC AUC = P(score of a random member > that of a random non-member) + 0.5 P(tie).

    Computed exactly as the trapezoid area of :func:`roc_curve` (equal to the normalised
    Mann-Whitney U statistic, ties counting one half).
    """
    fpr, tpr, _ = roc_curve(scores, is_member)
    return auc_from_curve(fpr, tpr)


def tpr_at_fpr(scores: Any, is_member: Any, fpr_target: float) -> float:
    """Highest TPR among empirical ROC points with FPR <= ``fpr_target`` (no interpolation).

    With n non-members, a target below 1/n can only be met by the (0, 0) point, unless some
    members score above every non-member: that is the honest reading of "TPR at 0.1% FPR"
    from fewer than 1000 non-members.
    """
    target = float(fpr_target)
    if not (0.0 <= target <= 1.0) or not np.isfinite(target):
        raise ConfigError(f"fpr_target: must be in [0, 1], got {fpr_target!r}")
    fpr, tpr, _ = roc_curve(scores, is_member)
    ok = fpr <= target + 1e-12
    return float(np.max(tpr[ok]))


def balanced_accuracy(scores: Any, is_member: Any, threshold: Optional[float] = None) -> float:
    """Balanced accuracy ``(TPR + TNR) / 2`` of the test ``score >= threshold``.

    With ``threshold=None`` (default): the best value over all thresholds of the empirical ROC
    (>= 0.5, since predicting everything one way scores 0.5). This is an optimistic, in-sample
    number; use it as a descriptive metric, not as a privacy claim (see ``audits.bounds``).
    """
    if threshold is None:
        fpr, tpr, _ = roc_curve(scores, is_member)
        return float(np.max((tpr + 1.0 - fpr) / 2.0))
    t = float(threshold)
    if np.isnan(t):
        raise ConfigError("threshold: must not be NaN")
    s, y = check_scores_labels(scores, is_member)
    pred = s >= t
    tpr1 = float(np.mean(pred[y]))
    tnr = float(np.mean(~pred[~y]))
    return (tpr1 + tnr) / 2.0


def summarize(scores: Any, is_member: Any) -> dict[str, Any]:
    """Headline metrics: ``auc``, ``balanced_accuracy`` (best threshold), ``tpr_at_1pct_fpr``,
    ``tpr_at_0_1pct_fpr``, ``n_members``, ``n_nonmembers`` (floats and ints, JSON-ready)."""
    s, y = check_scores_labels(scores, is_member)
    fpr, tpr, _ = roc_curve(s, y)

    def at(target: float) -> float:
        return float(np.max(tpr[fpr <= target + 1e-12]))

    return {
        "auc": auc_from_curve(fpr, tpr),
        "balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
        "tpr_at_1pct_fpr": at(0.01),
        "tpr_at_0_1pct_fpr": at(0.001),
        "n_members": int(y.sum()),
        "n_nonmembers": int((~y).sum()),
    }
