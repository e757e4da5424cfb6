"""White-box gradient canaries observed through the per-step global prompts (one-run audit).

Adversary modelled: someone who sees EVERY release of the global prompt p_G (the server's
broadcast after each aggregation step, as any participating client receives it) and knows the
training hyperparameters (optimizer, learning rate, momentum, weight decay). This is stronger than
the DP-FPL paper's adversary (a downstream user of the final personalised prompts); it audits the
GLOBAL mechanism (the server's aggregation and its noise), and its bound is compared with the
accountant's eps of that mechanism (``epsilon_global``). Local prompts are never observed.

Canaries (Nasr et al. 2021/2023 "Dirac"-style, in gradient space): m random directions ``g_c`` in
the context space (n_ctx x D), of norm C under per-example clipping (clipping leaves them intact) and
of norm 1e4 C where a whole batch mean/sum is clipped (reference mode, ``clip_unit=batch``: the
canary then dominates the clipped batch, the worst case the sensitivity must cover); see
:func:`canary_norm`.
Each is included in the audited client's data independently with probability 1/2 (seeded coins).
At every step an included canary joins the client's batch with the client's sampling rate
``q = B / n`` (Poisson), contributing exactly ``g_c`` as its per-example global-prompt gradient
(with batch-mean mechanisms, as one more example of the batch mean). Only the global contribution
carries canaries: the local prompt is not observed by this adversary.

Observation: from consecutive broadcasts the adversary inverts the server's SGD step
(``buf_t = (p_t - p_{t+1}) / lr``, ``d_t = buf_t - momentum * buf_{t-1}``,
``g_t = d_t - weight_decay * p_t``) to get each step's aggregated (noised) gradient, and scores
canary c by ``sum_t <g_t, u_c>`` with ``u_c`` its unit direction. Guesses with abstention give the one-run bound (Steinke et al.).

Requirements (else ConfigError): a method with a global prompt, the ``grad`` protocol (one
broadcast per step), Poisson sampling, and per-example or whole-batch clipping units.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import numpy as np
import torch

from dpfpl.errors import ConfigError

from .attacks import evaluate_scores
from .shadow import ModelCache, TrainedModel, build_clients, derive_seed, recipe_dict, shared_store
from .target import World

__all__ = ["run_gradient_canaries", "invert_sgd"]


def invert_sgd(params: list[torch.Tensor], lr: float, momentum: float, weight_decay: float) -> list[torch.Tensor]:
    """Per-step gradients from consecutive parameters of torch SGD (dampening 0, no Nesterov).

    ``params[0]`` is the initial value; steps where the parameters did not move (no update
    happened) must already be removed. Returns one gradient per step.
    """
    grads = []
    buf_prev: Optional[torch.Tensor] = None
    for p0, p1 in zip(params[:-1], params[1:]):
        buf = (p0 - p1) / lr
        d = buf if buf_prev is None or momentum == 0 else buf - momentum * buf_prev
        grads.append(d - weight_decay * p0)
        buf_prev = buf
    return grads


BIG = 1e4  # canary norm, in units of C, where the mechanism clips a batch mean/sum: the canary dominates it


def canary_norm(cfg) -> float:
    """Norm of a gradient canary: C under per-example clipping (clipping leaves it intact); BIG x C where a
    whole batch mean/sum is clipped (the canary then dominates the clipped batch: the worst case the DP
    analysis must cover); C without privacy (no clipping: a larger canary would derail training)."""
    C = float(cfg.privacy.clip_norm)
    p = cfg.privacy
    if p.privacy == "reference" or (p.privacy == "dp" and p.clip_unit == "batch"):
        return BIG * C
    return C


def _check(cfg, engine) -> None:
    if not engine.method.uses_global:
        raise ConfigError(f"gradient canaries: method {cfg.train.method!r} has no global prompt to observe")
    if engine.protocol != "grad":
        raise ConfigError("gradient canaries need the grad protocol (one global broadcast per step); "
                          f"this recipe uses {engine.protocol!r}")
    if cfg.privacy.sampling != "poisson":
        raise ConfigError("gradient canaries need Poisson sampling (--sampling poisson)")
    if cfg.privacy.privacy == "dp" and cfg.privacy.clip_unit not in ("example", "batch"):
        raise ConfigError(f"gradient canaries: clip unit {cfg.privacy.clip_unit!r} is not supported "
                          "(example or batch)")
    if cfg.privacy.privacy == "dp" and cfg.privacy.dp_level == "client":
        raise ConfigError("gradient canaries audit example-level DP; this recipe is client-level")


def _train_with_canaries(cfg, world: World, clients, dirs: dict[int, torch.Tensor], included: dict[int, np.ndarray],
                         seed: int, C: float, on_step=None) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Train once with the canaries injected; returns the broadcast p_G sequence and the summary."""
    from dpfpl.engine import Engine
    from dpfpl.train import summarize

    cfg = copy.deepcopy(cfg)
    cfg.train.eval_every = cfg.train.rounds
    store = world.engine_store(False)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), shared_store(store) as extra:
        engine = Engine(cfg, clip=world.clip, dataset=world.dataset, clients_data=clients, **extra)
        _check(cfg, engine)
        priv = engine.privacy
        orig = priv.release
        inc_t = {i: torch.as_tensor(v, dtype=torch.bool) for i, v in included.items()}

        def release(client, local, G, protocol):
            if client.id in dirs and G is not None:
                d = dirs[client.id].to(G.device, G.dtype)
                q = client.sampler.sampling_rate
                pick = (torch.rand(d.shape[0], generator=gen) < q) & inc_t[client.id]
                rows = d[pick]
                if rows.shape[0]:
                    if getattr(priv, "per_example", False):
                        G = torch.cat([G, rows])  # norm C: per-example clipping leaves them as they are
                        # the canaries carry no local gradient (the local prompt is not observed)
                        local = {k: torch.cat([v, v.new_zeros(rows.shape[0], *v.shape[1:])]) for k, v in local.items()}
                    else:
                        b = len(getattr(client, "last_local_idx", ())) or 0
                        G = (G * b + rows.sum(0)) / (b + rows.shape[0])  # one more example of the mean
            return orig(client, local, G, protocol)

        priv.release = release  # instance attribute: this engine only
        seq = [engine.server.p_G.detach().clone()]

        def step(done: int, total: int) -> None:
            p = engine.server.p_G.detach()
            if not torch.equal(p, seq[-1]):  # a step happened (with momentum p always moves)
                seq.append(p.clone())
            if on_step:
                on_step(done, total)

        engine.run((), on_step=step)
        summary = summarize(engine, 0.0, pld=False)
    return seq, summary


def run_gradient_canaries(world: World, cfg, base_sets: dict[int, np.ndarray], classes: dict[int, np.ndarray],
                          clients: list[int], m: int, seed: int, delta: float, confidence: float,
                          cache: ModelCache, untrained: bool = False, on_step=None) -> dict[str, Any]:
    """Insert ``m`` gradient canaries (spread over ``clients``), train once, score, bound."""
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ConfigError(f"--canaries must be a positive integer, got {m!r}")
    shape = (cfg.train.n_ctx, world.enc.width)
    if m > 4 * shape[0] * shape[1]:
        raise ConfigError(f"--canaries {m}: at most {4 * shape[0] * shape[1]} gradient canaries in a "
                          f"{shape[0]}x{shape[1]} context space (beyond that they are far from orthogonal)")
    C = float(cfg.privacy.clip_norm)
    norm = canary_norm(cfg)
    g = torch.Generator().manual_seed(derive_seed(seed, 5))
    per = np.array_split(np.arange(m), len(clients))
    inc_all = np.random.default_rng([seed, 0xC02]).random(m) < 0.5
    dirs, included, owner = {}, {}, np.zeros(m, np.int64)
    all_dirs = torch.randn(m, *shape, generator=g)
    all_dirs = all_dirs / all_dirs.flatten(1).norm(dim=1).view(-1, 1, 1)  # unit directions
    for i, chunk in zip(clients, per):
        dirs[i] = all_dirs[chunk] * norm
        included[i] = inc_all[chunk]
        owner[chunk] = i
    key = ModelCache.key("gradcanary", recipe=recipe_dict(cfg), world=world.fingerprint(), sets=base_sets,
                         classes=classes, m=m, seed=seed, untrained=untrained)

    def make() -> TrainedModel:
        if untrained:
            scores = np.zeros(m)
            summ: dict[str, Any] = {"untrained": True}
        else:
            seq, summ = _train_with_canaries(cfg, world, build_clients(world, base_sets, classes), dirs, included,
                                             derive_seed(seed, 6), C, on_step)
            t = cfg.train
            grads = invert_sgd(seq, t.global_lr or t.lr, t.momentum, t.weight_decay)
            total = torch.stack(grads).sum(0) if grads else torch.zeros(shape)
            scores = (all_dirs.flatten(1) @ total.flatten().to(all_dirs.dtype)).numpy()
            summ = {k: v for k, v in summ.items() if isinstance(v, (int, float, str, bool, type(None)))}
            summ["broadcasts"] = len(seq) - 1
        summ["wb_scores"] = [float(x) for x in scores]
        empty = torch.zeros(0)
        return TrainedModel(empty, {}, {}, summ)

    run = cache.get(key, make)
    scores = np.asarray(run.summary["wb_scores"], np.float64)
    r = evaluate_scores(scores, inc_all, delta=delta, confidence=confidence, design="randomized", seed=seed)
    r["signal"] = ("sum over steps of <aggregated global gradient recovered from consecutive broadcasts, unit canary "
                   "direction> (white-box: every global broadcast observed)")
    r["canaries"] = {"kind": "gradient (Dirac-style random directions)", "norm": norm, "n": int(m),
                     "n_included": int(inc_all.sum()), "broadcasts_observed": run.summary.get("broadcasts")}
    r["members_definition"] = "gradient canaries inserted by a fair coin into the audited client's data"
    r["_summary"] = run.summary
    r["_owner"] = owner
    return r
