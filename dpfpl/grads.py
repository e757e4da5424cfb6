"""Gradients of the cross-entropy loss with respect to the context.

logits (B, C) = s * f_img (B, E) @ f_txt(ctx)^T (C, E), s = exp(logit_scale) (frozen).
Every trainable tensor of every method enters only through ctx (n_ctx, D), so G = dLoss/dctx is all
the engine needs (methods map it to their own tensors, see :mod:`dpfpl.methods`).

Per-example gradients (the hook the DP mechanisms use): the text encoder does not depend on the
example, so one ``torch.func.vjp`` through it suffices; the per-example cotangent of the text
features is d loss_i / d f_txt = s (softmax_i - onehot_i) f_img_i^T (C, E), and ``vmap`` applies the
vjp to all B cotangents at once. Attention runs with the math SDPA backend there, the only CPU
kernel with a vmap rule for its backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .text import PromptTextEncoder


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


def per_example_ctx_grads(enc: PromptTextEncoder, ctx: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), G (B, n_ctx, D)) with G[i] = d loss_i / d ctx."""
    B = len(labels)
    if B == 0:
        return torch.zeros(0), torch.zeros(0, *ctx.shape, dtype=ctx.dtype, device=ctx.device)
    with sdpa_kernel(SDPBackend.MATH):
        txt, vjp_fn = torch.func.vjp(enc, ctx.detach())  # (C, E)
        with torch.no_grad():
            logits = scale * feats @ txt.T  # (B, C)
            losses = F.cross_entropy(logits, labels, reduction="none")
            resid = logits.softmax(-1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)  # (B, C)
            cot = scale * resid[:, :, None] * feats[:, None, :]  # (B, C, E)
        (G,) = torch.func.vmap(vjp_fn)(cot)  # (B, n_ctx, D)
    return losses, G
