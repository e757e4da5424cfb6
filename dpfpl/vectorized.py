"""Vectorised clients (``train.vectorize_clients``): one batched pass for all sampled clients' step.

The sequential engine runs, for each sampled client in turn, ``prepare`` (its batch, its local
view, its context), the gradient of its batch, and ``finish`` (its release through
``privacy.release``, its optimiser step). Here every client's ``prepare`` runs first, in the
same order, drawing from its OWN generators (batch sampler, factorisation), so the same seed
gives the same batches; then ONE pass computes all gradients:

- the contexts are stacked, ctx (K, n_ctx, D), and the frozen text encoder runs once on K
  shared prefixes and K x C class suffixes (:meth:`dpfpl.text.PromptTextEncoder.forward_stacked`,
  :mod:`dpfpl.prefix`) -> text features (K, C, E);
- batches are padded to B_max = max_k B_k with a mask (Poisson sampling draws a different B_k per
  client; padded rows get a zero cotangent / zero loss weight, so they contribute nothing); the
  per-example "vjp" pass, whose cost grows with B_max, groups clients of similar B_k
  (:func:`size_groups`: at most 1/8 of a group's pullbacks go to padding), one pass per group;
- per example (DP): one ``torch.func.vjp`` of the stacked encoder and one ``vmap`` of its
  pullback over the B_max cotangents (K, C, E): client k's features depend only on ctx[k], so
  the pullback of row b gives every client's example-b gradient at once -> G (K, B_max, n_ctx, D);
  or, when B_max is large (strategy "jacobian"/"auto"), each client's text Jacobian from E
  basis pullbacks of the stacked encoder and G_k = U_k @ J_k as one batched product;
- batch mean (non-private, reference mode): one backward of sum_k mean-loss_k -> G (K, n_ctx, D).

Then every client's ``finish`` runs in the sampled order with ITS gradient: the same
``privacy.release`` call, hence the same release objects, noise generator (each client draws its
own noise, in the same per-client order as the sequential path), ledger events and optimiser
step. Contract: with the same seeds (reproducible noise) the prompts, accuracies and ledger equal
the sequential path's up to float summation order (tests/test_vectorize.py, tolerance 1e-5).

One sampled client takes its sequential step (nothing to batch). Fallback for the whole run
(sequential, stated by :func:`fallback_reason`): a method that trains nothing (zeroshot:
no step runs at all), a method class with ``vectorizable = False`` (none of the built-in ones: every
built-in method's trainable tensors enter only through ctx, :mod:`dpfpl.methods`), and
``vectorize_clients = false``. The option's default (unset) turns it on here; the Flower engine runs
one ClientApp per client, steps clients one by one, and refuses ``vectorize_clients = true``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .federation import Client, Contribution, PendingStep
from .grads import DEFAULTS, STRATEGIES, _out_dim, auto_chunk, choose_strategy
from .text import PromptTextEncoder

__all__ = ["fallback_reason", "stacked_grads", "grad_step", "fedavg_round"]

Grads = list[tuple[float, torch.Tensor]]  # per client: (its last_loss, its G)
PAD_TOLERANCE = 0.125  # per-example "vjp": clients whose batch sizes differ by up to 1/8 share one pass


def fallback_reason(method, vectorize: bool) -> Optional[str]:
    """Why this run's clients step one after another (None: they are vectorised)."""
    if not vectorize:
        return "train.vectorize_clients=false"
    if not method.trainable:
        return f"method {method.name} trains nothing"
    if not getattr(method, "vectorizable", True):
        return f"method {method.name} declares vectorizable=False"
    return None


def _padded(pendings: Sequence[PendingStep]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """feats (K, B_max, E), labels (K, B_max), mask (K, B_max) and the sizes B_k."""
    sizes = [p.batch_size for p in pendings]
    B, f0 = max(sizes), pendings[0].feats
    K, E = len(pendings), f0.shape[-1]
    feats = torch.zeros(K, B, E, dtype=f0.dtype, device=f0.device)  # (K, B_max, E)
    labels = torch.zeros(K, B, dtype=torch.long, device=f0.device)  # (K, B_max); padding: class 0, masked
    mask = torch.zeros(K, B, dtype=f0.dtype, device=f0.device)  # (K, B_max)
    for k, p in enumerate(pendings):
        feats[k, :sizes[k]] = p.feats
        labels[k, :sizes[k]] = p.labels.to(f0.device)
        mask[k, :sizes[k]] = 1
    return feats, labels, mask, sizes


def _stacked_logits(txt: torch.Tensor, feats: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * feats @ txt.transpose(1, 2)  # (K, B, E) @ (K, E, C) -> (K, B, C)


def _losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    K, B, C = logits.shape
    return F.cross_entropy(logits.reshape(K * B, C), labels.reshape(-1), reduction="none").reshape(K, B)  # (K, B)


def _batch_mean_grads(enc: PromptTextEncoder, ctx: torch.Tensor, feats, labels, mask, sizes, scale: float) -> Grads:
    """Per client (mean loss, G (n_ctx, D)) of its batch-mean loss; (0.0, 0) for an empty batch
    (as :func:`dpfpl.grads.batch_ctx_grad`)."""
    ctx = ctx.detach().requires_grad_(True)  # (K, n_ctx, D)
    losses = _losses(_stacked_logits(enc.forward_stacked(ctx), feats, scale), labels) * mask  # (K, B)
    n = torch.tensor(sizes, dtype=losses.dtype, device=losses.device).clamp(min=1)  # (K,)
    mean = losses.sum(1) / n  # (K,)
    (G,) = torch.autograd.grad(mean.sum(), ctx)  # (K, n_ctx, D): client k's loss depends on ctx[k] only
    return [(float(mean[k].detach()) if sizes[k] else 0.0, G[k]) for k in range(len(sizes))]


def _cotangents(txt, feats, labels, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (K, B), U (K, B, C, E)), U_kb = s (softmax_kb - onehot_kb) f_img_kb^T, 0 on padding."""
    logits = _stacked_logits(txt, feats, scale)  # (K, B, C)
    resid = logits.softmax(-1) - F.one_hot(labels, logits.shape[-1]).to(logits.dtype)  # (K, B, C)
    resid = resid * mask[..., None]
    return _losses(logits, labels), scale * resid[..., None] * feats[:, :, None, :]  # (K, B, C, E)


def _vjp_grads(enc, ctx, feats, labels, mask, scale: float, chunk: int):
    txt, vjp_fn = torch.func.vjp(enc.forward_stacked, ctx)  # (K, C, E)
    with torch.no_grad():
        losses, cot = _cotangents(txt, feats, labels, mask, scale)  # (K, B, C, E)
    B = cot.shape[1]
    (G,) = torch.func.vmap(vjp_fn, in_dims=1, chunk_size=None if chunk >= B else chunk)(cot)  # (B, K, n_ctx, D)
    return losses, G.transpose(0, 1)  # (K, B, n_ctx, D)


def _jacobian_grads(enc, ctx, feats, labels, mask, scale: float, chunk: int):
    """G_kb = J_k^T u_kb with each client's text Jacobian J_k from E basis pullbacks of the stacked
    encoder (the context replicated per class, as :func:`dpfpl.grads._jacobian_rows`)."""
    K, n, D = ctx.shape
    C = enc.n_classes
    ctx_c = ctx.unsqueeze(1).expand(K, C, n, D).contiguous()  # (K, C, n_ctx, D)
    txt, vjp_fn = torch.func.vjp(enc.forward_stacked, ctx_c)  # (K, C, E)
    with torch.no_grad():
        losses, cot = _cotangents(txt, feats, labels, mask, scale)  # (K, B, C, E)
    E, B = txt.shape[-1], cot.shape[1]
    eye = torch.eye(E, dtype=txt.dtype, device=txt.device)
    G = torch.zeros(K, B, n * D, dtype=cot.dtype, device=cot.device)  # (K, B, P)
    for e0 in range(0, E, chunk):
        basis = eye[e0:e0 + chunk, None, None, :].expand(-1, K, C, E)  # (k, K, C, E)
        Je = torch.func.vmap(vjp_fn)(basis)[0]  # (k, K, C, n_ctx, D)
        k = Je.shape[0]
        U = cot[..., e0:e0 + k].transpose(2, 3).reshape(K, B, k * C)  # (K, B, k*C)
        G += U @ Je.transpose(0, 1).reshape(K, k * C, n * D)  # (K, B, k*C) @ (K, k*C, P)
    return losses, G.reshape(K, B, n, D)  # (K, B, n_ctx, D)


def _per_example_grads(enc, ctx, feats, labels, mask, sizes, scale: float, strategy: Optional[str],
                       chunk_size: Optional[int]) -> Grads:
    """Per client (mean loss or nan, G (B_k, n_ctx, D)), as :func:`dpfpl.grads.per_example_ctx_grads`."""
    K = len(sizes)
    B = max(sizes)
    if B == 0:
        z = torch.zeros(0, *ctx.shape[1:], dtype=ctx.dtype, device=ctx.device)
        return [(float("nan"), z) for _ in range(K)]
    strategy = strategy or DEFAULTS["strategy"]
    if strategy not in STRATEGIES:
        raise ValueError(f"per-example strategy {strategy!r} is not one of {list(STRATEGIES)}")
    ctx = ctx.detach()
    out: Grads = [(float("nan"), torch.zeros(0, *ctx.shape[1:], dtype=ctx.dtype, device=ctx.device))] * K
    with sdpa_kernel(SDPBackend.MATH):
        if strategy == "auto":
            strategy = "vjp" if B <= _out_dim(enc) else choose_strategy(enc, ctx[0], B)
        # "vjp" costs B_max pullbacks of the whole group: clients of similar B_k go together;
        # "jacobian" costs E pullbacks whatever B is: one group
        groups = size_groups(sizes) if strategy == "vjp" else [[k for k in range(K) if sizes[k]]]
        fn = _vjp_grads if strategy == "vjp" else _jacobian_grads
        for idx in groups:
            b = max(sizes[k] for k in idx)
            # a vmapped unit here is len(idx) times one client's (len(idx) x C sequences): scale the chunk
            # and at most ~b examples' worth of sequences per call, as one sequential client's pass
            # (larger calls measured slower on CPU: results/microbench/vectorize.md)
            per_unit = auto_chunk(enc, per_class=strategy == "jacobian")  # the Jacobian's pullbacks share no prefix
            chunk = chunk_size or DEFAULTS["chunk_size"] or max(1, min(per_unit, b) // len(idx))
            sel = torch.as_tensor(idx, device=ctx.device)
            losses, G = fn(enc, ctx[sel], feats[sel, :b], labels[sel, :b], mask[sel, :b], scale, chunk)
            for j, k in enumerate(idx):  # losses (k, b), G (k, b, n_ctx, D)
                out[k] = (float(losses[j, :sizes[k]].mean()), G[j, :sizes[k]])
    return out


def size_groups(sizes: Sequence[int], tolerance: float = PAD_TOLERANCE) -> list[list[int]]:
    """Indices of the non-empty batches grouped by size, largest first: a group whose largest batch
    has b0 examples takes every batch of at least (1 - tolerance) b0, so the pullbacks spent on
    padding stay below tolerance / (1 - tolerance) of the real ones."""
    order = sorted((k for k in range(len(sizes)) if sizes[k]), key=lambda k: -sizes[k])
    groups: list[list[int]] = []
    for k in order:
        if groups and sizes[k] >= (1 - tolerance) * sizes[groups[-1][0]]:
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def stacked_grads(clients: Sequence[Client], pendings: Sequence[PendingStep]) -> Grads:
    """Every client's gradient of its pending step in one batched pass: per example (B_k, n_ctx, D)
    when the privacy mode needs it, else the batch mean (n_ctx, D); with the loss each client's
    sequential ``grad`` would set as ``last_loss``. All clients share one encoder, scale and mode."""
    c0 = clients[0]
    enc, scale = c0.enc, c0.scale
    if any(c.enc is not enc or c.scale != scale or c.privacy is not c0.privacy for c in clients):
        raise ValueError("vectorised clients must share one text encoder, logit scale and privacy mechanism")
    ctx = torch.stack([p.ctx for p in pendings])  # (K, n_ctx, D)
    feats, labels, mask, sizes = _padded(pendings)
    if c0.privacy.per_example:
        return _per_example_grads(enc, ctx, feats, labels, mask, sizes, scale, c0.s.per_example_grads, None)
    return _batch_mean_grads(enc, ctx, feats, labels, mask, sizes, scale)


def grad_step(clients: Sequence[Client], p_G: torch.Tensor) -> list[Contribution]:
    """One local step of every client at p_G (grad protocol): their contributions, in order.
    One client: its own sequential step (nothing to batch)."""
    if len(clients) == 1:
        contrib = clients[0].step(p_G)
        return [contrib] if contrib is not None else []
    pendings = [c.prepare(p_G) for c in clients]
    contribs = []
    for c, p, (loss, G) in zip(clients, pendings, stacked_grads(clients, pendings)):
        c.last_loss = loss
        contrib = c.contribution(c.finish(p, G, "grad"))
        if contrib is not None:
            contribs.append(contrib)
    return contribs


def fedavg_round(clients: Sequence[Client], p_G: torch.Tensor, steps: int,
                 on_step: Optional[Callable[[int, int], None]] = None) -> list[Contribution]:
    """``steps`` local steps of every client on its own copy of p_G, the clients in lockstep (one
    batched pass per step); returns each client's contribution, in order. One client: its own
    sequential round."""
    if len(clients) == 1:
        contrib = clients[0].fedavg_round(p_G, steps)
        if on_step:
            on_step(steps, steps)
        return [contrib]
    runs = [c.fedavg_start(p_G) for c in clients]
    for s in range(steps):
        pendings = [c.prepare(r.param) for c, r in zip(clients, runs)]
        for c, r, p, (loss, G) in zip(clients, runs, pendings, stacked_grads(clients, pendings)):
            c.last_loss = loss
            c.fedavg_apply(r, c.finish(p, G, "fedavg"))
        if on_step:
            on_step(s + 1, steps)
    return [c.fedavg_end(r, p_G) for c, r in zip(clients, runs)]
