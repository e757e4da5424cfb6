"""Gradients of the cross-entropy loss with respect to the context.

logits (B, C) = s * f_img (B, E) @ f_txt(ctx)^T (C, E), s = exp(logit_scale) (frozen).
Every trainable tensor of every method enters only through ctx (n_ctx, D), so G = dLoss/dctx is all
the engine needs (methods map it to their own tensors, see :mod:`dpfpl.methods`).

Per-example gradients (the hook the DP mechanisms use). The text encoder does not depend on the
example, and the per-example cotangent of the text features is

    u_i = d loss_i / d f_txt = s (softmax_i - onehot_i) f_img_i^T          (C, E)

so G_i = J^T u_i with J = d f_txt / d ctx, a (C*E, P) matrix, P = n_ctx * D. Two exact strategies:

- ``"vjp"``: one ``torch.func.vjp`` through the encoder, ``vmap`` of its pullback over the B
  cotangents (B reverse passes; cost and memory grow with B; the vmap is chunked to bound memory);
- ``"jacobian"``: J once per step, then G (B, P) = U (B, C*E) @ J (C*E, P): one matrix product
  for all examples, so the encoder's cost does not grow with B. Class c's feature depends on ctx
  only through class c's own sequence, so J takes E reverse passes (basis cotangents, vmapped in
  chunks; see :func:`_jacobian`; the per-class pass, without :mod:`dpfpl.prefix`'s shared
  prefix), not P = n_ctx * D forward-mode passes: on the tiny model
  (E = 64, P = 1024) forward mode (``jvp`` vmapped over the P basis directions) measured 25-80x
  slower than this (bench/per_example.py, "jacfwd").

``"auto"`` picks the cheaper one by :func:`choose_strategy` (a cost model measured once per encoder
shape). Attention runs with the math SDPA backend, the only CPU kernel with a vmap rule for its
backward.
"""

from __future__ import annotations

import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .text import PromptTextEncoder

STRATEGIES = ("auto", "vjp", "jacobian")
# Process-wide defaults for callers that pass no keyword (an engine may set them once from
# ``train.per_example_grads``; see :func:`set_per_example_defaults`).
# memory_budget None: 256 MiB on CPU, a quarter of the free memory on CUDA.
DEFAULTS: dict = {"strategy": "auto", "chunk_size": None, "memory_budget": None}
# Bytes of live intermediate state per vmapped unit = this factor * C * L * D * element size
# (an upper estimate for one reverse pass of a pre-LN transformer block, attention included).
_UNIT_FACTOR = 24
_COSTS: dict[tuple, dict[str, float]] = {}  # cost-model cache, see choose_strategy


def set_per_example_defaults(strategy: Optional[str] = None, chunk_size: Optional[int] = None,
                             memory_budget: Optional[int] = None) -> None:
    """Set the process-wide defaults of :func:`per_example_ctx_grads` (None leaves one as it is)."""
    if strategy is not None:
        if strategy not in STRATEGIES:
            raise ValueError(f"per-example strategy {strategy!r} is not one of {list(STRATEGIES)}")
        DEFAULTS["strategy"] = strategy
    if chunk_size is not None:
        DEFAULTS["chunk_size"] = int(chunk_size)
    if memory_budget is not None:
        DEFAULTS["memory_budget"] = int(memory_budget)


def logits_for(enc: PromptTextEncoder, ctx: torch.Tensor, feats: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * feats @ enc(ctx).T  # (B, C)


def batch_ctx_grad(enc: PromptTextEncoder, ctx: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                   scale: float) -> tuple[float, torch.Tensor]:
    """(mean loss, G (n_ctx, D)) of the batch-mean loss; G = 0 for an empty batch."""
    if len(labels) == 0:
        return 0.0, torch.zeros_like(ctx)
    ctx = ctx.detach().requires_grad_(True)
    loss = F.cross_entropy(logits_for(enc, ctx, feats, scale), labels)
    (G,) = torch.autograd.grad(loss, ctx)
    return float(loss.detach()), G


def auto_chunk(enc: PromptTextEncoder, budget: Optional[int] = None, per_class: bool = False) -> int:
    """Cotangents per vmapped chunk of pullbacks (per-example or basis): the largest count whose estimated
    intermediate state, ``_UNIT_FACTOR * rows * D`` elements each, fits ``budget`` bytes (None:
    ``DEFAULTS["memory_budget"]``, else 256 MiB on CPU, a quarter of the free memory on CUDA).
    rows: ``enc.rows_per_pass`` for a shared context, C * L for per-class contexts (``per_class``:
    the Jacobian strategy's, which have no shared prefix)."""
    budget = DEFAULTS["memory_budget"] if budget is None else budget
    if budget is None:
        dev = enc.prefix.device
        budget = torch.cuda.mem_get_info(dev)[0] // 4 if dev.type == "cuda" else 256 * 2**20
    rows = enc.n_classes * enc.length if per_class else enc.rows_per_pass
    unit = _UNIT_FACTOR * rows * enc.width * enc.prefix.element_size()
    return max(1, int(budget // unit))


def _cotangents(txt: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), U (B, C, E)) with U_i = s (softmax_i - onehot_i) f_img_i^T."""
    logits = scale * feats @ txt.T  # (B, C)
    losses = F.cross_entropy(logits, labels, reduction="none")
    resid = logits.softmax(-1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)  # (B, C)
    return losses, scale * resid[:, :, None] * feats[:, None, :]  # (B, C, E)


def _vjp_grads(enc: PromptTextEncoder, ctx: torch.Tensor, feats, labels, scale: float, chunk: int):
    txt, vjp_fn = torch.func.vjp(enc, ctx)  # (C, E)
    with torch.no_grad():
        losses, cot = _cotangents(txt, feats, labels, scale)  # (B, C, E)
    chunk = None if chunk >= len(labels) else chunk
    (G,) = torch.func.vmap(vjp_fn, chunk_size=chunk)(cot)  # (B, n_ctx, D)
    return losses, G


def _per_class(enc: PromptTextEncoder, ctx: torch.Tensor) -> torch.Tensor:
    """ctx (n_ctx, D) replicated per class, (C, n_ctx, D): the Jacobian strategy's input, whose
    classes share nothing (no shared prefix, :mod:`dpfpl.prefix`), so each has its own gradient."""
    return ctx.unsqueeze(0).expand(enc.n_classes, *ctx.shape).contiguous()


def _jacobian_rows(enc: PromptTextEncoder, ctx: torch.Tensor, chunk: int):
    """f_txt (C, E) and an iterator of (e0, J_e (k, C, n_ctx, D)), J_e[j, c] = d f_txt[c, e0 + j] / d ctx.

    Class c's feature depends only on its own token sequence, so with the context replicated per
    class, ctx_c (C, n_ctx, D), d f[c] / d ctx = d f[c] / d ctx_c: one pullback with the cotangent
    1[e] on every class's row yields row e of all C Jacobians at once, i.e. E reverse passes
    (vmapped ``chunk`` at a time) give J whole, however many examples use it."""
    C = enc.n_classes
    txt, vjp_fn = torch.func.vjp(enc, _per_class(enc, ctx))  # (C, E)
    E = txt.shape[1]
    eye = torch.eye(E, dtype=txt.dtype, device=txt.device)

    def rows():
        for e0 in range(0, E, chunk):
            basis = eye[e0:e0 + chunk, None, :].expand(-1, C, E)  # (k, C, E)
            yield e0, torch.func.vmap(vjp_fn)(basis)[0]  # (k, C, n_ctx, D)
    return txt, rows()


def _jacobian(enc: PromptTextEncoder, ctx: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_txt (C, E), J (C, E, n_ctx, D)) whole (tests; the step streams the rows instead)."""
    txt, rows = _jacobian_rows(enc, ctx, chunk)
    return txt, torch.cat([Je for _, Je in rows]).transpose(0, 1)


def _jacobian_grads(enc: PromptTextEncoder, ctx: torch.Tensor, feats, labels, scale: float, chunk: int):
    """G_i = J^T u_i for all i, accumulated over chunks of J's rows: memory ~ one chunk, not J."""
    txt, rows = _jacobian_rows(enc, ctx, chunk)  # (C, E)
    with torch.no_grad():
        losses, cot = _cotangents(txt, feats, labels, scale)  # (B, C, E)
    B = len(labels)
    G = torch.zeros(B, ctx.numel(), dtype=cot.dtype, device=cot.device)  # (B, P)
    for e0, Je in rows:
        k = len(Je)
        U = cot[:, :, e0:e0 + k].transpose(1, 2).reshape(B, -1)  # (B, k*C)
        G += U @ Je.reshape(k * Je.shape[1], -1)  # (B, k*C) @ (k*C, P)
    return losses, G.reshape(B, *ctx.shape)  # (B, n_ctx, D)


def choose_strategy(enc: PromptTextEncoder, ctx: torch.Tensor, B: int) -> str:
    """The cheaper exact strategy for B examples, by a cost model measured once per encoder shape.

    Both strategies run vmapped pullbacks of the encoder: "vjp" B of them through the shared-context
    pass (with :mod:`dpfpl.prefix`'s shared prefix where the encoder has one), "jacobian" E of them
    through the per-class pass (each class needs its own Jacobian, so nothing is shared) plus a
    (B, C*E) @ (C*E, P) product. With b_v, b_j the measured times of one such pullback (the slope of a
    vmapped chunk's time over its size) and m that of one example's share of the product,
    cost_vjp = B b_v and cost_jac = E b_j + B m. "vjp" without measuring whenever B <= E (b_j >= b_v)."""
    E = _out_dim(enc)
    if B <= E:
        return "vjp"
    key = (id(enc.tower), enc.n_classes, enc.length, enc.width, enc.shares_prefix, tuple(ctx.shape), ctx.dtype,
           str(ctx.device), torch.get_num_threads())
    if key not in _COSTS:
        _COSTS[key] = _measure(enc, ctx)
    c = _COSTS[key]
    return "jacobian" if E * c["pullback_jacobian"] + B * c["product"] < B * c["pullback"] else "vjp"


def _out_dim(enc: PromptTextEncoder) -> int:
    proj = getattr(enc.tower, "text_projection", None)
    if proj is None:
        return enc.width
    return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]


def _timed(fn, device: torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _measure(enc: PromptTextEncoder, ctx: torch.Tensor, sizes: tuple[int, int] = (2, 8)) -> dict[str, float]:
    """Seconds per pullback of the shared-context pass ("pullback") and of the per-class pass
    ("pullback_jacobian"), each the slope of t(k) = a + b k over two vmapped chunk sizes k after a
    warm-up; and per example of the Jacobian product (an 8-row product, "product")."""
    g = torch.Generator(device=ctx.device).manual_seed(0)
    out: dict[str, float] = {}
    for name, c in (("pullback", ctx), ("pullback_jacobian", _per_class(enc, ctx))):
        txt, vjp_fn = torch.func.vjp(enc, c)  # (C, E)
        cots = torch.randn(sizes[1], *txt.shape, generator=g, device=ctx.device, dtype=txt.dtype)  # (k, C, E)
        torch.func.vmap(vjp_fn)(cots[:sizes[0]])  # warm-up
        t = [_timed(lambda k=k: torch.func.vmap(vjp_fn)(cots[:k]), ctx.device) for k in sizes]
        out[name] = max((t[1] - t[0]) / (sizes[1] - sizes[0]), 1e-9)
    U = torch.randn(8, txt.numel(), generator=g, device=ctx.device, dtype=txt.dtype)  # (8, C*E)
    J = torch.randn(txt.numel(), ctx.numel(), generator=g, device=ctx.device, dtype=txt.dtype)  # (C*E, P)
    U @ J  # warm-up
    out["product"] = _timed(lambda: U @ J, ctx.device) / 8
    return out


def per_example_ctx_grads(enc: PromptTextEncoder, ctx: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                          scale: float, *, strategy: Optional[str] = None,
                          chunk_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), G (B, n_ctx, D)) with G[i] = d loss_i / d ctx, exactly (module doc).

    ``strategy``: "vjp", "jacobian" or "auto" (None: ``DEFAULTS["strategy"]``). ``chunk_size``:
    per-example (vjp) or basis (jacobian) cotangents per vmapped chunk, bounding peak memory (None:
    ``DEFAULTS["chunk_size"]``, else :func:`auto_chunk` for ``DEFAULTS["memory_budget"]``)."""
    B = len(labels)
    if B == 0:
        return torch.zeros(0), torch.zeros(0, *ctx.shape, dtype=ctx.dtype, device=ctx.device)
    strategy = strategy or DEFAULTS["strategy"]
    if strategy not in STRATEGIES:
        raise ValueError(f"per-example strategy {strategy!r} is not one of {list(STRATEGIES)}")
    ctx = ctx.detach()
    with sdpa_kernel(SDPBackend.MATH):
        if strategy == "auto":
            strategy = choose_strategy(enc, ctx, B)
        chunk = chunk_size or DEFAULTS["chunk_size"] or auto_chunk(enc, per_class=strategy == "jacobian")
        if strategy == "vjp":
            return _vjp_grads(enc, ctx, feats, labels, scale, chunk)
        return _jacobian_grads(enc, ctx, feats, labels, scale, chunk)
