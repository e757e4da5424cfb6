"""Final-model canaries with the exact null (attack ``final-cosine``; Andrew et al., "One-shot
empirical privacy estimation for federated learning", ICLR 2024).

Adversary: sees ONLY the final global prompt (and its public initial value, so the model delta
``Delta = p_G(final) - p_G(initial)``), knows the canaries. No intermediate release is observed.

Canaries: m directions ``c_k`` drawn i.i.d. uniformly on the unit sphere of the global prompt
(dimension d = n_ctx x D) from a secret seed, ALL inserted: canary k is an example of the audited
client's dataset whose per-example global gradient is ``BIG x C x c_k`` (clipped to exactly C), no
local gradient; it joins batches like any example. Score: ``cos(c_k, -Delta)`` (gradient descent
moves the prompt against the canary's gradient; the sign is fixed before the audit).

Exact null: for a unit vector drawn uniformly and independently of ``Delta != 0``, the cosine T has
density proportional to ``(1 - t^2)^((d-3)/2)``, i.e. ``(T + 1)/2 ~ Beta((d-1)/2, (d-1)/2)``, whatever
``Delta`` is (isotropy). In the world WITHOUT canary k, c_k is such a vector (it enters training only
through its insertion), so its tail ``U_k = P_null[T >= cos_k]`` (:func:`null_sf`) is exactly uniform;
(eps, delta)-DP with respect to canary k then gives ``P[U_k <= u] <= e^eps u + delta`` for every u.

Sound bound (holds with probability >= confidence if every canary is (eps, delta)-DP): the hits
``H_j = #{k : U_k <= u_j}`` at a FIXED grid of L exact false-positive rates u_j satisfy
``E[H_j] <= m (e^eps u_j + delta)``, so by Markov's inequality (valid whatever the dependence between
canaries of one run) and Bonferroni over the grid, ``eps >= log((alpha H_j / (m L) - delta) / u_j)``
for all j at once, alpha = 1 - confidence. ``ceiling``: that bound with all m canaries hit at the
smallest u_j. Beside it an INDICATIVE estimate in the manner of Andrew et al. (Gaussian fit: the
canaries' mean cosine over the null's std 1/sqrt(d) as a Gaussian-DP mu) labelled ``eps_estimate``:
it assumes the canaries are independent and is not a bound.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
from scipy import stats

from dpfpl.errors import ConfigError

from .bounds import gaussian_eps
from .canary_directions import PartDirections
from .shadow import ModelCache, TrainedModel, build_clients, derive_seed, recipe_dict
from .target import World
from .whitebox_steps import train_with_canaries

__all__ = ["FPR_GRID", "null_sf", "null_cdf", "cosine_bound", "run_final_cosine"]

FPR_GRID = tuple(10.0 ** (-j / 2) for j in range(2, 61))  # 1e-1 ... 1e-30, half decades; fixed in advance
DEFAULT_CANARIES = 4


def _beta_param(d: int) -> float:
    if isinstance(d, bool) or int(d) != d or d < 2:
        raise ConfigError(f"dimension must be an integer >= 2, got {d!r}")
    return (int(d) - 1) / 2.0


def null_cdf(t: Any, d: int) -> np.ndarray:
    """P[T <= t] for the cosine T of a uniform random unit vector with a fixed vector in d dims."""
    a = _beta_param(d)
    return stats.beta.cdf((np.clip(np.asarray(t, np.float64), -1, 1) + 1) / 2, a, a)


def null_sf(t: Any, d: int) -> np.ndarray:
    """P[T >= t] (exact false-positive rate of the test ``cos >= t``)."""
    a = _beta_param(d)
    return stats.beta.sf((np.clip(np.asarray(t, np.float64), -1, 1) + 1) / 2, a, a)


def cosine_bound(cosines: Any, d: int, delta: float, confidence: float = 0.95,
                 grid: tuple[float, ...] = FPR_GRID) -> dict[str, Any]:
    """Sound eps lower bound from the cosines of m inserted canaries (module docstring)."""
    c = np.asarray(cosines, np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ConfigError("cosine_bound: one cosine per canary expected")
    if not 0 < confidence < 1 or not 0 <= delta < 1:
        raise ConfigError(f"cosine_bound: confidence in (0, 1) and delta in [0, 1) expected, got {confidence}, {delta}")
    m, L, alpha = c.size, len(grid), 1.0 - confidence
    tails = null_sf(c, d)
    u = np.asarray(grid)
    hits = (tails[None, :] <= u[:, None]).sum(1)  # (L,)
    num = alpha * hits / (m * L) - delta
    with np.errstate(divide="ignore"):
        eps = np.where(num > 0, np.log(np.maximum(num, 1e-300) / u), -np.inf)
    j = int(np.argmax(eps))
    top = alpha / L - delta
    return {"eps_lower_bound": max(0.0, float(eps[j])) if np.isfinite(eps[j]) else 0.0,
            "fpr": float(u[j]), "hits": int(hits[j]), "n_canaries": m, "n_thresholds": L,
            "ceiling": max(0.0, math.log(top / u[-1])) if top > 0 else 0.0,
            "tails": tails.tolist(), "confidence": confidence, "delta": delta,
            "bound_method": ("exact null of the cosine (Beta((d-1)/2, (d-1)/2)), Markov's inequality on the hits at a "
                             f"fixed grid of {L} false-positive rates, Bonferroni over the grid")}


def run_final_cosine(world: World, cfg, base_sets: dict[int, np.ndarray], classes: dict[int, np.ndarray],
                     clients: list[int], m: Optional[int], seed: int, delta: float, confidence: float,
                     cache: ModelCache, data: str = "zero", untrained: bool = False, on_step=None,
                     prepare: Optional[Callable[[Any], None]] = None) -> dict[str, Any]:
    """Insert m random unit canaries (all of them) into the audited clients' data, train once, and
    bound eps from the final global prompt's delta alone (:func:`cosine_bound`)."""
    m = DEFAULT_CANARIES if m is None else int(m)
    if m < 1:
        raise ConfigError(f"--canaries must be a positive integer, got {m!r}")
    shape = (cfg.train.n_ctx, world.enc.width)
    d = shape[0] * shape[1]
    g = torch.Generator().manual_seed(derive_seed(seed, 11))
    rows = torch.randn(m, d, generator=g, dtype=torch.float64)
    rows = (rows / rows.norm(dim=1, keepdim=True)).float()  # i.i.d. uniform on the sphere
    dirs = {"global": PartDirections("global", ["G"], [shape], rows)}
    owner = np.zeros(m, np.int64)
    for i, chunk in zip(clients, np.array_split(np.arange(m), len(clients))):
        owner[chunk] = i
    key = ModelCache.key("final-cosine", recipe=recipe_dict(cfg), world=world.fingerprint(), sets=base_sets,
                         classes=classes, m=m, seed=seed, data=data, untrained=untrained)

    def make() -> TrainedModel:
        if untrained:
            return TrainedModel(torch.zeros(0), {}, {}, {"untrained": True, "cosines": [0.0] * m})
        tr = train_with_canaries(cfg, world, build_clients(world, base_sets, classes), dirs, owner,
                                 np.ones(m, bool), data, derive_seed(seed, 12), on_step, prepare)
        delta_p = (tr.p_G0 - tr.p_G1).double().reshape(-1)  # minus the model delta: SGD steps against gradients
        n = float(delta_p.norm())
        cos = (rows.double() @ delta_p / n).numpy() if n > 0 else np.zeros(m)
        keep = {k: v for k, v in tr.summary.items() if isinstance(v, (int, float, str, bool, type(None)))}
        keep["cosines"] = cos.tolist()
        keep["delta_norm"] = n
        keep["steps"] = {i: int(o.shape[0]) for i, o in tr.obs.items()}
        keep["q"] = tr.summary["_q"]
        return TrainedModel(torch.zeros(0), {}, {}, keep)

    run = cache.get(key, make)
    sm = run.summary
    cos = np.asarray(sm["cosines"], np.float64)
    b = cosine_bound(cos, d, delta, confidence)
    mu = float(np.mean(cos) * math.sqrt(d))
    r: dict[str, Any] = {
        "eps_lower_bound": b["eps_lower_bound"], "bound_sound": True, "bound_method": b["bound_method"],
        "ceiling": b["ceiling"],
        "ceiling_note": f"all {m} canaries hit at the smallest false-positive rate of the grid",
        "m": m, "dim": d, "steps": sm.get("steps"), "q": sm.get("q"), "statistic": "cos(canary, initial global prompt - final)", "canary_data": data,
        "cosines": cos.tolist(), "null_tails": b["tails"], "fpr": b["fpr"], "hits": b["hits"],
        "n_thresholds": b["n_thresholds"], "confidence": confidence, "delta": delta,
        "mu_estimate": max(0.0, mu), "eps_estimate": gaussian_eps(delta, max(0.0, mu)) if delta > 0 else None,
        "estimate_note": ("INDICATIVE (Andrew et al. 2024 style): mean canary cosine / null std 1/sqrt(d) read as a "
                          "Gaussian-DP mu; assumes independent canaries; not a bound"),
        "epsilon_accounted": sm.get("epsilon_global", sm.get("epsilon_spent")),
        "members_definition": "all canaries inserted; non-members replaced by the exact null of an unseen direction",
        "_summary": sm,
    }
    tails = np.asarray(b["tails"])
    fpr = np.r_[0.0, np.sort(tails), 1.0]
    r.update({  # ROC against the exact null: FPR u, TPR = share of canaries whose null tail is <= u
        "auc": float(np.mean(1.0 - tails)), "tpr_at_1pct_fpr": float(np.mean(tails <= 0.01)),
        "tpr_at_0_1pct_fpr": float(np.mean(tails <= 0.001)),
        "balanced_accuracy": float((np.mean(tails <= 0.5) + 0.5) / 2), "n_members": m, "n_nonmembers": 0,
        "_roc": (fpr, np.r_[0.0, np.arange(1, m + 1) / m, 1.0])})
    acc = r["epsilon_accounted"]
    r["ratio"] = (r["eps_lower_bound"] / acc) if acc else None
    return r
