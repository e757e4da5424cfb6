"""The prompt learner's per-example gradients through Opacus (bench-only; ``pip install .[bench]``).

:class:`PromptLogits` is a module whose one trainable parameter is the context (n_ctx, D) and whose
forward maps image features (B, E) to logits s * f_img @ f_txt(ctx)^T (B, C) through the frozen text
encoder. Opacus' ``GradSampleModule(force_functorch=True)`` finds no per-layer rule for it
and computes per-sample gradients with ``torch.func`` (vmap of the gradient of the module's forward
at one example), which is the reference :func:`opacus_per_example_grads` times against
:func:`dpfpl.grads.per_example_ctx_grads`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpfpl.text import PromptTextEncoder


class _Frozen:
    """Holds the frozen encoder outside the module tree: Opacus' functorch path refuses a trainable
    layer with buffers anywhere below it ("This layer has buffers and is not supported by Opacus":
    the encoder's prefix/suffix/mask buffers, the image tower's BatchNorm statistics) and would take
    per-sample gradients of every registered parameter, frozen ones included. Deep copies (Opacus
    copies the layer once to make it functional) share the encoder."""

    def __init__(self, enc: PromptTextEncoder):
        self.enc = enc

    def __deepcopy__(self, memo) -> "_Frozen":
        return self


class PromptLogits(nn.Module):
    def __init__(self, enc: PromptTextEncoder, ctx: torch.Tensor, scale: float):
        super().__init__()
        self.frozen, self.scale = _Frozen(enc.requires_grad_(False)), float(scale)
        self.ctx = nn.Parameter(ctx.detach().clone())  # (n_ctx, D): the only parameter, no buffers

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.scale * feats @ self.frozen.enc(self.ctx).T  # (B, C)


def opacus_module(enc: PromptTextEncoder, ctx: torch.Tensor, scale: float):
    from opacus import GradSampleModule

    return GradSampleModule(PromptLogits(enc, ctx, scale), batch_first=True, loss_reduction="sum",
                            force_functorch=True)


def opacus_per_example_grads(gsm, feats: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses (B,), G (B, n_ctx, D)) from Opacus' per-sample gradients of the summed loss."""
    gsm.zero_grad(set_to_none=True)
    ctx = gsm._module.ctx
    ctx.grad_sample = None
    with sdpa_kernel(SDPBackend.MATH):
        losses = F.cross_entropy(gsm(feats), labels, reduction="none")  # (B,)
        losses.sum().backward()
    return losses.detach(), ctx.grad_sample  # (B, n_ctx, D)
