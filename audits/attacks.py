"""Membership-inference attacks as pure functions of model signals (numpy), and their evaluation.

Every attack returns membership scores for the candidates, **higher = more likely a member**
(the convention of :mod:`audits.metrics`). Inputs are the target model's :class:`Signals` on the
candidates and, for the attacks that need them, the same signals from K shadow (reference) models
with their IN masks (``in_mask[k, j]``: candidate j was in shadow k's training data). Nothing here
looks at the target's membership labels: scores depend only on the target's outputs and on shadow
models trained independently of the target's data draw, which is what makes the bounds valid.

- :func:`loss_attack` (Yeom et al. 2018): ``-loss`` (a global threshold on the loss).
- :func:`shokri_attack` (Shokri et al. 2017): one attack model per class, trained on the shadow
  models' log-probability vectors labelled IN/OUT, applied to the target's vectors. The attack model
  is an L2-regularised logistic regression on standardised features.
- :func:`lira_scores` (Carlini et al. 2022): Gaussians fitted to the shadows' logit-scaled
  confidences with the candidate IN and OUT. Online: likelihood ratio of the target's value under
  the IN and OUT fits. Offline: one-sided test against the OUT fit only. Variance per example, or
  one global ("fixed") variance, which is better with few shadows.
- :func:`rmia_scores` (Zarifzadeh et al. 2024): ``LR(x, z) = [p(x|theta)/p(x)] / [p(z|theta)/p(z)]``
  with p(.) the average over reference models; score = fraction of population points z with
  ``LR(x, z) >= gamma``. Offline (no IN references): ``p(x) = ((1+a) p_OUT(x) + (1-a)) / 2``.

:func:`evaluate_scores` turns scores + labels into the audit metrics and a sound eps lower bound.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import optimize, special, stats

from dpfpl.errors import ConfigError

from .bounds import eps_lower_bound_from_roc, one_run_audit_search
from .metrics import roc_curve, summarize
from .target import Signals

__all__ = ["ATTACKS", "MIN_SHADOWS", "loss_attack", "shokri_attack", "lira_scores", "rmia_scores",
           "fit_logistic", "evaluate_scores", "check_shadow_count"]

ATTACKS = ("loss", "shadow", "lira", "rmia", "canary", "gradient-canary", "whitebox", "final-cosine")
MIN_SHADOWS = {"loss": 0, "shadow": 1, "lira": 2, "rmia": 1, "canary": 0, "gradient-canary": 0, "whitebox": 0,
               "final-cosine": 0}
FIXED_VARIANCE_BELOW = 32  # LiRA "auto" variance: global below this many shadows


def check_shadow_count(attacks: list[str], k: int) -> None:
    for a in attacks:
        need = MIN_SHADOWS.get(a, 0)
        if k < need:
            what = {"lira": "LiRA fits IN and OUT Gaussians: it needs >= 2 shadow models (one IN, one OUT "
                            "per example)",
                    "rmia": "RMIA needs >= 1 reference model",
                    "shadow": "the shadow-model attack needs >= 1 shadow model"}[a]
            raise ConfigError(f"--attack {a} with --shadows {k}: {what}; pass --shadows {max(need, 2 if a == 'lira' else need)} or more")


# ------------------------------------------------------------------------------------------------
# loss

def loss_attack(target: Signals) -> np.ndarray:
    """Yeom et al.: members have lower loss. Score = -loss (every threshold is on the ROC)."""
    return -np.asarray(target.loss, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Shokri

def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (L-BFGS); returns (w, b) for standardised X."""
    X = np.asarray(X, np.float64)
    t = np.asarray(y, np.float64)
    n, d = X.shape

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        z = X @ w + b
        # mean log-loss: log(1 + e^z) - t z
        loss = np.mean(np.logaddexp(0.0, z) - t * z) + 0.5 * l2 * (w @ w) / n
        g = special.expit(z) - t
        return loss, np.r_[X.T @ g / n + l2 * w / n, g.mean()]

    res = optimize.minimize(f, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:d], float(res.x[d])


def _shokri_features(s: Signals, idx: np.ndarray) -> np.ndarray:
    lp = np.asarray(s.logprobs)[idx]
    return np.c_[lp, np.asarray(s.logit_conf)[idx]]


def shokri_attack(target: Signals, shadows: list[Signals], in_mask: np.ndarray, labels: np.ndarray,
                  l2: float = 1.0) -> np.ndarray:
    """Shokri et al.: per class c, a logistic model on (log-probs, logit-conf) of the shadows'
    candidates of class c labelled IN/OUT; score = its logit on the target's vector.

    A class whose shadow data hold only one label (no IN or no OUT example) falls back to a model
    fitted on all classes.
    """
    labels = np.asarray(labels)
    K = len(shadows)
    if K < 1:
        raise ConfigError("shadow attack: needs >= 1 shadow model")
    in_mask = np.asarray(in_mask, bool)
    X_all = np.concatenate([_shokri_features(s, np.arange(labels.size)) for s in shadows])
    y_all = in_mask.reshape(-1)
    lab_all = np.tile(labels, K)
    mu, sd = X_all.mean(0), X_all.std(0) + 1e-9
    Xs = (X_all - mu) / sd
    Xt = (_shokri_features(target, np.arange(labels.size)) - mu) / sd
    glob = None
    scores = np.zeros(labels.size)
    for c in np.unique(labels):
        sel = lab_all == c
        yc = y_all[sel]
        if yc.all() or not yc.any():
            if glob is None:
                glob = fit_logistic(Xs, y_all, l2)
            w, b = glob
        else:
            w, b = fit_logistic(Xs[sel], yc, l2)
        tsel = labels == c
        scores[tsel] = Xt[tsel] @ w + b
    return scores


# ------------------------------------------------------------------------------------------------
# LiRA

def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, in_mask: np.ndarray,
                variance: str = "auto") -> dict[str, Any]:
    """LiRA online and offline scores.

    ``target_phi`` (n,), ``shadow_phi`` (K, n) logit-scaled confidences; ``in_mask`` (K, n).
    ``variance``: "per-example", "fixed" (one pooled variance for IN, one for OUT) or "auto"
    (fixed below 32 shadows). Where a candidate has no IN (OUT) shadow, its IN (OUT) mean is its
    other mean shifted by the average IN-OUT gap. Returns ``online``, ``offline`` (arrays) and
    ``variance`` (the variant used).
    """
    phi = np.asarray(target_phi, np.float64)
    S = np.asarray(shadow_phi, np.float64)
    M = np.asarray(in_mask, bool)
    K, n = S.shape
    if K < 2:
        raise ConfigError(f"lira: needs >= 2 shadow models, got {K}")
    if variance not in ("auto", "fixed", "per-example"):
        raise ConfigError(f"lira variance: 'auto', 'fixed' or 'per-example', got {variance!r}")
    var_kind = ("fixed" if K < FIXED_VARIANCE_BELOW else "per-example") if variance == "auto" else variance
    n_in, n_out = M.sum(0), (~M).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(n_in > 0, (S * M).sum(0) / np.maximum(n_in, 1), np.nan)
        mu_out = np.where(n_out > 0, (S * ~M).sum(0) / np.maximum(n_out, 1), np.nan)
    both = ~np.isnan(mu_in) & ~np.isnan(mu_out)
    gap = float(np.mean(mu_in[both] - mu_out[both])) if both.any() else 0.0
    mu_in = np.where(np.isnan(mu_in), mu_out + gap, mu_in)
    mu_out = np.where(np.isnan(mu_out), mu_in - gap, mu_out)
    r_in = np.where(M, S - mu_in[None], np.nan)
    r_out = np.where(~M, S - mu_out[None], np.nan)
    floor = 1e-6
    g_in = np.nanvar(r_in) if np.isfinite(r_in).any() else 1.0
    g_out = np.nanvar(r_out) if np.isfinite(r_out).any() else 1.0
    g_in, g_out = max(float(g_in), floor), max(float(g_out), floor)
    if var_kind == "fixed":
        v_in = np.full(n, g_in)
        v_out = np.full(n, g_out)
    else:
        with np.errstate(invalid="ignore"):
            v_in = np.where(n_in >= 2, np.nanvar(r_in, axis=0, ddof=0), g_in)
            v_out = np.where(n_out >= 2, np.nanvar(r_out, axis=0, ddof=0), g_out)
        v_in = np.maximum(np.nan_to_num(v_in, nan=g_in), floor)
        v_out = np.maximum(np.nan_to_num(v_out, nan=g_out), floor)
    online = (stats.norm.logpdf(phi, mu_in, np.sqrt(v_in)) - stats.norm.logpdf(phi, mu_out, np.sqrt(v_out)))
    offline = -stats.norm.logsf(phi, mu_out, np.sqrt(v_out))  # -log P[OUT value >= phi]
    return {"online": online, "offline": offline, "variance": var_kind}


# ------------------------------------------------------------------------------------------------
# RMIA

def rmia_scores(target_px: np.ndarray, ref_px: np.ndarray, ref_in: np.ndarray,
                target_pz: np.ndarray, ref_pz: np.ndarray, gamma: float = 1.0, a: float = 0.3,
                mode: str = "auto") -> dict[str, Any]:
    """RMIA scores.

    ``target_px`` (n,) and ``ref_px`` (K, n): probability of the true label of each candidate under
    the target and the reference models; ``ref_in`` (K, n) IN masks; ``target_pz`` (nz,) and
    ``ref_pz`` (K, nz): the same for population points (in no model's training data).
    ``mode``: "online" (p(x) = mean over all references), "offline" (OUT references only, with the
    linear correction ``a``) or "auto" (online when every candidate has an IN and an OUT
    reference). Returns ``scores`` and ``mode``.
    """
    px_t = np.asarray(target_px, np.float64)
    R = np.asarray(ref_px, np.float64)
    Min = np.asarray(ref_in, bool)
    pz_t = np.asarray(target_pz, np.float64)
    Rz = np.asarray(ref_pz, np.float64)
    K = R.shape[0]
    if K < 1:
        raise ConfigError("rmia: needs >= 1 reference model")
    if pz_t.size == 0:
        raise ConfigError("rmia: needs population points z (none available)")
    has_both = bool(((Min.sum(0) > 0) & ((~Min).sum(0) > 0)).all())
    m = ("online" if has_both else "offline") if mode == "auto" else mode
    if m == "online":
        p_x = R.mean(0)
        p_z = Rz.mean(0)
    elif m == "offline":
        n_out = (~Min).sum(0)
        out_mean = np.where(n_out > 0, (R * ~Min).sum(0) / np.maximum(n_out, 1), R.mean(0))
        p_x = 0.5 * ((1 + a) * out_mean + (1 - a))
        p_z = 0.5 * ((1 + a) * Rz.mean(0) + (1 - a))
    else:
        raise ConfigError(f"rmia mode: 'auto', 'online' or 'offline', got {mode!r}")
    tiny = 1e-30
    ratio_x = px_t / np.maximum(p_x, tiny)
    ratio_z = np.sort(pz_t / np.maximum(p_z, tiny))
    # LR(x, z) >= gamma  <=>  ratio_z <= ratio_x / gamma
    counts = np.searchsorted(ratio_z, ratio_x / gamma, side="right")
    return {"scores": counts / ratio_z.size, "mode": m, "ratio_x": ratio_x}


# ------------------------------------------------------------------------------------------------
# evaluation

def evaluate_scores(scores: np.ndarray, is_member: np.ndarray, delta: float, confidence: float = 0.95,
                    design: str = "randomized", seed: int = 0) -> dict[str, Any]:
    """Metrics of one attack and its eps lower bound.

    ``design="randomized"``: each candidate was included in the target's training data
    independently with probability 1/2 (one training run): the sound bound is the one-run audit
    (Steinke et al. 2023, abstention levels Bonferroni-corrected). ``design="fixed"``: members and
    non-members were not randomised (e.g. an existing run's training vs. test examples): the bound
    is the threshold test of :func:`audits.bounds.eps_lower_bound_from_roc` (Bonferroni over
    thresholds), valid only under its i.i.d.-trials assumption. Both bounds are reported
    (``eps_lower_bound_one_run`` only for randomised designs); ``eps_lower_bound`` is the one the
    design supports, named in ``bound_method``.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(is_member, bool)
    out: dict[str, Any] = dict(summarize(s, y))
    roc = eps_lower_bound_from_roc(s, y, delta=delta, confidence=confidence, method="bonferroni", seed=seed)
    out["eps_lower_bound_roc"] = roc["eps_lower_bound"]
    out["bound_roc"] = {k: roc[k] for k in ("threshold", "direction", "tp", "fp", "tpr_lo", "fpr_hi",
                                           "n_candidates", "method")}
    if design == "randomized":
        one = one_run_audit_search(s, y, delta=delta, confidence=confidence, seed=seed)
        out["eps_lower_bound_one_run"] = one["eps_lower_bound"]
        out["bound_one_run"] = {k: one[k] for k in ("n_guesses", "n_correct", "n_guess_pos", "n_guess_neg",
                                                   "n_canaries", "n_levels", "per_level_confidence")}
        out["eps_lower_bound"] = one["eps_lower_bound"]
        out["bound_method"] = ("one-run audit (Steinke, Nasr, Jagielski 2023): members included "
                               "independently with probability 1/2; abstention level chosen among a "
                               "fixed grid, Bonferroni-corrected")
        out["bound_sound"] = True
    elif design == "fixed":
        out["eps_lower_bound"] = roc["eps_lower_bound"]
        out["bound_method"] = ("threshold test, Clopper-Pearson with Bonferroni over a fixed threshold "
                               "grid; assumes members and non-members are independent trials, which "
                               "examples of one training run are not: indicative, not a DP proof")
        out["bound_sound"] = False
    else:
        raise ConfigError(f"design: 'randomized' or 'fixed', got {design!r}")
    out["confidence"] = float(confidence)
    out["delta"] = float(delta)
    fpr, tpr, _ = roc_curve(s, y)
    out["_roc"] = (fpr, tpr)
    return out
