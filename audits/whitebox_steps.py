"""White-box canaries scored by the per-step likelihood ratio (attack ``whitebox``; one-run audit).

Adversary (Nasr et al., "Tight Auditing of Differentially Private Machine Learning", USENIX
Security 2023): sees EVERY step's noised release of the audited client's batch (its local carrier
release and the server's noised global sum), knows the claimed mechanism (noise multipliers,
sampling rate) and chooses gradients. Stronger than the DP-FPL paper's downstream user; the bound
is compared with the eps of the whole batch mechanism (``epsilon_spent``, the joint event of the
local and global parts), or with the claim in reference mode.

Canaries (:mod:`audits.canary_directions`): m secret directions fixed before training, canary k
with a unit direction in each noised part where ``k < d_p``. A canary is an example of the audited
client's dataset whose per-example gradient is ``BIG x C x`` its direction in every part (norm
>> C, so per-example clipping leaves exactly C per part). Each canary is in the dataset with
probability 1/2 (seeded coins, one-run audit of Steinke, Nasr, Jagielski, NeurIPS 2023) and, when
in, joins each batch like any example: independently with the client's Poisson rate q, or (shuffled
batches, reference mode) once per epoch at a uniformly random step.

Audit data (``data``): ``real`` (the clients' own examples, whose gradients also project on the
canary directions: extra, non-Gaussian background) or ``zero`` (every real example's gradient on
the noised parts is zero: an audit dataset chosen in gradient space, which DP must cover like any
other; the canaries then see exactly the claimed Gaussian, the best case for the test).

Score of canary k (:mod:`audits.step_llr`): from each step's release ``R_p`` (the noised clipped
sum of part p), ``y_p = <R_p, u_kp> / C``; Poisson: ``sum_t log((1-q) + q exp(l_t))`` with
``l_t = sum_p (y_p - 1/2) / nm_p^2``; shuffle: per epoch ``log mean_t exp(l_t)``; each standardised by
its mean and std in the canary-absent world under the claim (:func:`audits.step_llr.standardize`), so
canaries with directions in different parts rank on one scale. The bound is the
one-run bound of these scores (Bonferroni over fixed abstention levels); beside it the ceiling of m
canaries (:func:`audits.bounds.one_run_ceiling`), the most any score could give.

Supported: the ``grad`` protocol (one release per step), example-level DP with per-example
clipping (``dp``) or reference mode (global part only: it clips u and v on their own, batch means).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from dpfpl.errors import ConfigError

from .canary_directions import PartDirections, make_directions
from .shadow import ModelCache, TrainedModel, build_clients, derive_seed, recipe_dict, shared_store
from .target import World

__all__ = ["CANARY_DATA", "BIG", "CanaryTrace", "canary_parts", "train_with_canaries", "run_whitebox"]

CANARY_DATA = ("real", "zero")
BIG = 1e4  # canary gradient norm in units of C: clipped to exactly C (per example) or dominating a batch mean


@dataclass
class CanaryTrace:
    """What the white-box auditor recorded: per audited client, per step it took part in, the
    projections ``obs[i] (T_i, P, m)`` of each part's noised clipped sum on every canary's direction
    (units of C), the epoch of each step, the initial and final global prompts."""

    parts: list[str]
    obs: dict[int, np.ndarray]
    epoch: dict[int, np.ndarray]
    p_G0: Optional[torch.Tensor]
    p_G1: Optional[torch.Tensor]
    summary: dict[str, Any] = field(default_factory=dict)


def _check(cfg, engine) -> None:
    if engine.protocol != "grad":
        raise ConfigError(f"white-box canaries need the grad protocol (one release per step); this recipe uses "
                          f"{engine.protocol!r}")
    p = cfg.privacy
    if p.privacy == "dp" and (p.clip_unit != "example" or p.dp_level != "example"):
        raise ConfigError("white-box canaries audit example-level DP with per-example clipping "
                          f"(clip unit {p.clip_unit!r}, level {p.dp_level!r} given)")


def canary_parts(cfg, width: int) -> dict[str, dict[str, tuple[int, ...]]]:
    """The noised parts a canary can live in, from the recipe alone: part -> tensor name -> shape
    (what the mechanism clips jointly). Reference mode: the global part only (it clips u and v as
    separate tensors)."""
    from dpfpl.registry import get_method

    t = cfg.train
    method = get_method(t.method)(rank=t.rank, ctx_init_std=t.ctx_init_std)
    shape = (t.n_ctx, int(width))
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    if method.uses_global:
        parts["global"] = {"G": shape}
    if method.uses_local and cfg.privacy.privacy != "reference":
        gen = torch.Generator().manual_seed(0)
        view = method.local_view(method.init_local(*shape, gen), gen, torch.zeros(shape))
        parts["local"] = {k: tuple(v.shape[1:]) for k, v in view.carrier_grads(torch.zeros(1, *shape)).items()}
    if not parts:
        raise ConfigError("white-box canaries: this recipe releases no noised part a canary can enter")
    return parts


def _stds(cfg, engine, parts: list[str], client: int) -> np.ndarray:
    """Claimed noise std / C of the noised clipped sum of each part (what the auditor divides by)."""
    if cfg.privacy.privacy == "none":
        return np.full(len(parts), 1e-3)  # no noise: any small std ranks the canaries the same way
    mech = engine.privacy.mechanisms[client]
    return np.array([mech.part(p).noise_multiplier for p in parts], np.float64)


def _zero_grads(client, per_example: bool) -> Callable[..., torch.Tensor]:
    """The client's ``_grad`` for the zero audit dataset: G = 0, (B, n_ctx, D) or (n_ctx, D)."""
    def grad(ctx: torch.Tensor, feats, labels) -> torch.Tensor:
        client.last_loss = 0.0
        return torch.zeros(len(labels), *ctx.shape, dtype=ctx.dtype) if per_example else torch.zeros_like(ctx)
    return grad


def train_with_canaries(cfg, world: World, clients, dirs: dict[str, PartDirections], owner: np.ndarray,
                        included: np.ndarray, data: str, seed: int,
                        on_step: Optional[Callable[[int, int], None]] = None,
                        prepare: Optional[Callable[[Any], None]] = None) -> CanaryTrace:
    """Train once with canaries injected into the audited clients' batches; record every release.

    ``owner[k]``: the client canary k belongs to; ``included[k]``: in its dataset (coin). ``seed``:
    the presence draws (which steps an included canary is sampled in). ``prepare(engine)`` may adjust
    the engine before training (tests plant faults this way)."""
    from dpfpl.engine import Engine
    from dpfpl.train import summarize

    if data not in CANARY_DATA:
        raise ConfigError(f"--canary-data {data!r}: expected one of {list(CANARY_DATA)}")
    cfg = copy.deepcopy(cfg)
    cfg.train.eval_every = cfg.train.rounds
    parts = sorted(dirs)
    C = float(cfg.privacy.clip_norm)
    gen = torch.Generator().manual_seed(seed)
    audited = sorted({int(i) for i in owner})
    mine = {i: np.flatnonzero(owner == i) for i in audited}
    obs: dict[int, list[np.ndarray]] = {i: [] for i in audited}
    epochs: dict[int, list[int]] = {i: [] for i in audited}
    slots: dict[int, torch.Tensor] = {}
    pos_in_epoch: dict[int, int] = {}
    pending: dict[int, dict[str, np.ndarray]] = {}
    norm = C if cfg.privacy.privacy == "none" else BIG * C  # unclipped without privacy: BIG would derail training
    big = {p: d.rows.double() * norm for p, d in dirs.items()}  # (n_p, d_p) canary gradients
    with torch.random.fork_rng(devices=[]), shared_store(world.engine_store(False)) as extra:
        engine = Engine(cfg, clip=world.clip, dataset=world.dataset, clients_data=clients, **extra)
        _check(cfg, engine)
        if hasattr(engine.privacy, "mechanisms"):
            released = {r.part for r in engine.privacy.mechanisms[audited[0]].releases}
            if set(dirs) - released:
                raise ConfigError(f"white-box canaries in parts {sorted(dirs)}, but this recipe releases "
                                  f"{sorted(released)} per batch")
        if prepare is not None:
            prepare(engine)
        priv = engine.privacy
        per_example = bool(getattr(priv, "per_example", False))
        orig_release, orig_aggregate = priv.release, priv.aggregate
        C_ = C

        def present(client) -> np.ndarray:
            """Canary ids (of this client) in this batch."""
            ids = mine.get(client.id)
            if ids is None or ids.size == 0:
                return np.zeros(0, np.int64)
            s = client.sampler
            if s.mode == "poisson":
                pick = (torch.rand(ids.size, generator=gen) < s.sampling_rate).numpy()
            else:  # once per epoch, at a uniformly random step of it
                steps = max(1, math.ceil(s.n / s.batch_size))
                if s.last_started_epoch or client.id not in slots:
                    slots[client.id] = torch.randint(0, steps, (ids.size,), generator=gen)
                    pos_in_epoch[client.id] = 0
                pick = (slots[client.id] == pos_in_epoch[client.id]).numpy()
                pos_in_epoch[client.id] += 1
            return ids[pick & included[ids]]

        def rows_for(part: str, ids: np.ndarray, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            d = dirs[part]
            flat = torch.zeros(ids.size, d.dim, dtype=torch.float64)
            has = ids < d.n
            if has.any():
                flat[torch.as_tensor(np.flatnonzero(has))] = big[part][torch.as_tensor(ids[has])]
            ref = next(iter(like.values()))
            return {k: v.to(ref.dtype) for k, v in d.unflatten(flat).items()}

        def release(client, local, global_, protocol):
            if data == "zero":
                local = {k: torch.zeros_like(v) for k, v in local.items()}
                global_ = None if global_ is None else torch.zeros_like(global_)
            ids = present(client)
            b = len(client.last_local_idx)
            if ids.size:
                add = {}
                if "local" in dirs:
                    add["local"] = rows_for("local", ids, local)
                if "global" in dirs and global_ is not None:
                    add["global"] = rows_for("global", ids, {"G": global_})["G"]
                if per_example:
                    if "local" in add:
                        local = {k: torch.cat([v, add["local"][k]]) for k, v in local.items()}
                    elif local:
                        local = {k: torch.cat([v, v.new_zeros(ids.size, *v.shape[1:])]) for k, v in local.items()}
                    if global_ is not None:
                        g_add = add.get("global", global_.new_zeros(ids.size, *global_.shape[1:]))
                        global_ = torch.cat([global_, g_add])
                else:  # batch means: one more example of each mean
                    if "local" in add:
                        local = {k: (v * b + add["local"][k].sum(0)) / (b + ids.size) for k, v in local.items()}
                    if global_ is not None and "global" in add:
                        global_ = (global_ * b + add["global"].sum(0)) / (b + ids.size)
            out = orig_release(client, local, global_, protocol)
            if client.id in mine:
                rec: dict[str, np.ndarray] = {}
                if "local" in dirs:
                    scale = priv._normaliser(client) if per_example else 1.0
                    flat = dirs["local"].flatten({k: v.double() for k, v in out.local.items()}) * scale / C_
                    rec["local"] = (dirs["local"].rows.double() @ flat).numpy()
                pending[client.id] = rec
                epochs[client.id].append(int(client.sampler.epochs))
                if "global" not in dirs:
                    _flush(None)
            return out

        def _flush(total: Optional[torch.Tensor]) -> None:
            y_g = None
            if total is not None and "global" in dirs:
                y_g = (dirs["global"].rows.double() @ total.double().reshape(-1) / C_).numpy()
            for i, rec in pending.items():
                row = np.zeros((len(parts), len(owner)))
                for j, p in enumerate(parts):
                    v = y_g if p == "global" else rec.get(p)
                    if v is not None:
                        row[j, :v.size] = v
                obs[i].append(row)
            pending.clear()

        def aggregate(contribs):
            out = orig_aggregate(contribs)
            w = sum(c.weight for c in contribs) if per_example else len(contribs)
            _flush(out.detach() * w)  # the noised clipped sum (the server divides it by the weights)
            return out

        if data == "zero":  # the audit data's gradients are zero by construction: skip computing them
            for c in engine.clients:
                c._grad = _zero_grads(c, per_example)
        priv.release = release  # instance attributes: this engine only
        priv.aggregate = aggregate
        p_G0 = engine.server.p_G.detach().clone() if engine.method.uses_global else None
        engine.run((), on_step=on_step)
        summary = summarize(engine, 0.0, pld=cfg.privacy.privacy != "none" and cfg.privacy.accountant == "pld")
        p_G1 = engine.server.p_G.detach().clone() if engine.method.uses_global else None
        summary["_stds"] = {i: _stds(cfg, engine, parts, i).tolist() for i in audited}
        summary["_q"] = {i: float(engine.clients[i].sampler.sampling_rate) for i in audited}
        summary["_sampling"] = cfg.batch_sampling
    return CanaryTrace(parts, {i: np.stack(v) if v else np.zeros((0, len(parts), len(owner))) for i, v in obs.items()},
                       {i: np.asarray(v) for i, v in epochs.items()}, p_G0, p_G1, summary)


def run_whitebox(world: World, cfg, base_sets: dict[int, np.ndarray], classes: dict[int, np.ndarray],
                 clients: list[int], m: Optional[int], seed: int, delta: float, confidence: float,
                 cache: ModelCache, data: str = "zero", kind: str = "orthonormal", untrained: bool = False,
                 on_step=None, prepare: Optional[Callable[[Any], None]] = None) -> dict[str, Any]:
    """Insert m white-box canaries (default: the smallest noised part's dimension, so that every canary
    has a direction in every part: the worst case the joint event accounts) spread over
    ``clients``, train once, score every canary by its per-step LLR, bound eps (one-run audit)."""
    from .attacks import evaluate_scores
    from .bounds import one_run_audit_search, one_run_ceiling
    from .step_llr import poisson_llr, projection_sum, shuffle_llr, standardize

    shapes = canary_parts(cfg, world.enc.width)
    dims = {p: int(sum(int(np.prod(s)) for s in t.values())) for p, t in shapes.items()}
    m = min(dims.values()) if m is None else int(m)  # default: every canary in every part, exchangeable
    dirs = make_directions(shapes, m, kind, derive_seed(seed, 7))
    owner = np.zeros(m, np.int64)
    for i, chunk in zip(clients, np.array_split(np.arange(m), len(clients))):
        owner[chunk] = i
    included = np.random.default_rng([seed, 0xC03]).random(m) < 0.5
    parts = sorted(dirs)
    key = ModelCache.key("whitebox", recipe=recipe_dict(cfg), world=world.fingerprint(), sets=base_sets,
                         classes=classes, m=m, seed=seed, data=data, directions=kind, untrained=untrained)

    def make() -> TrainedModel:
        if untrained:
            return TrainedModel(torch.zeros(0), {}, {}, {"untrained": True, "scores": [0.0] * m,
                                                          "projection": [0.0] * m, "steps": {}})
        tr = train_with_canaries(cfg, world, build_clients(world, base_sets, classes), dirs, owner, included,
                                 data, derive_seed(seed, 8), on_step, prepare)
        scores, proj = np.zeros(m), np.zeros(m)
        for i, o in tr.obs.items():
            ids = np.flatnonzero(owner == i)
            x = np.transpose(o[:, :, ids], (2, 0, 1))  # (m_i, T_i, P)
            uses = np.stack([ids < dirs[p].n for p in parts], axis=1)  # (m_i, P)
            stds = np.asarray(tr.summary["_stds"][i])
            q_i, T_i = tr.summary["_q"][i], x.shape[1]
            if tr.summary["_sampling"] == "poisson":
                scores[ids] = standardize(poisson_llr(x, uses, stds, q_i), uses, stds, q_i, T_i)
            else:
                L = max(1, math.ceil(1 / q_i - 1e-9))  # steps per epoch: ceil(n / B)
                scores[ids] = standardize(shuffle_llr(x, uses, stds, tr.epoch[i]), uses, stds, q_i, T_i, L)
            proj[ids] = projection_sum(x, uses)
        s = tr.summary
        keep = {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool, type(None)))}
        keep.update({"scores": scores.tolist(), "projection": proj.tolist(), "stds": s["_stds"], "q": s["_q"],
                     "sampling": s["_sampling"], "steps": {i: int(o.shape[0]) for i, o in tr.obs.items()}})
        return TrainedModel(torch.zeros(0), {}, {}, keep)

    run = cache.get(key, make)
    sm = run.summary
    scores = np.asarray(sm["scores"], np.float64)
    r = evaluate_scores(scores, included, delta=delta, confidence=confidence, design="randomized", seed=seed)
    proj = one_run_audit_search(np.asarray(sm["projection"]), included, delta=delta, confidence=confidence, seed=seed)
    stat = ("standardised (mean 0, std 1 in the canary-absent world under the claim) per-step log-likelihood ratio of the claimed Poisson-subsampled Gaussian, summed over steps: "
            "sum_t log((1-q) + q exp(l_t)), l_t = sum_p (y_p - 1/2)/nm_p^2, y_p the step's noised clipped sum of "
            "part p projected on the canary's direction, in units of C" if sm.get("sampling", "poisson") == "poisson"
            else "standardised per-epoch log mean over steps of exp(l_t) (shuffled batches: present once per epoch), summed "
                 "over epochs; l_t as for Poisson")
    r.update({
        "signal": stat, "statistic": "step-llr",
        "m": int(m), "ceiling": one_run_ceiling(m, delta=delta, confidence=confidence),
        "ceiling_note": "the one-run bound of m canaries all guessed correctly (no score can exceed it)",
        "parts": {p: {"dim": dirs[p].dim, "canaries": dirs[p].n} for p in parts},
        "canary_data": data, "directions": kind, "canary_norm": BIG, "n_included": int(included.sum()),
        "steps": sm.get("steps"), "q": sm.get("q"), "noise_multipliers": sm.get("stds"),
        "epsilon_accounted": sm.get("epsilon_spent"), "accountant": sm.get("accountant"),
        "epsilon_rdp": sm.get("epsilon_rdp"), "epsilon_pld": sm.get("epsilon_pld"),
        "eps_lower_bound_projection": proj["eps_lower_bound"],
        "projection_note": "the same one-run bound from the old statistic (sum of projections), for comparison only",
        "members_definition": "white-box gradient canaries put in the audited client's data by fair coins",
    })
    acc = r["epsilon_accounted"]
    r["ratio"] = (r["eps_lower_bound"] / acc) if acc else None
    r["_summary"] = sm
    return r
