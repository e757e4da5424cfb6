"""The causal text tower with the context prefix computed once for all classes.

CoOp's class sequences are ``[SOT] ctx_1 .. ctx_n {classname} . [EOT]``: the first ``Lp = 1 + n``
positions are the same tokens for every class. CLIP's text transformer is causal (position j
attends to positions <= j only), so at every layer the hidden states of those positions are
the same for every class too. They are computed ONCE, (G, Lp, D) for G contexts, and every class
runs only its own ``Ls = L - Lp`` suffix positions, whose attention reads the shared prefix's keys
and values. The result equals the tower on the full (C, L) batch up to float summation order
(tests/test_core.py), at (Lp + C Ls) / (C L) of the linear layers' cost: 97 / 352 token rows on
the tiny benchmark (n_ctx 16, 16 classes, L = 22), and the same saving in every reverse pass, so in
every per-example pullback of the DP step.

Supported: open_clip's ``ResidualAttentionBlock`` (pre-LN, ``nn.MultiheadAttention`` with packed
in-projection, no bias_k/zero-attn, LayerScale or identity) with a causal mask; anything else runs
the plain full-sequence path (:func:`supports_prefix_sharing` says why not). Contexts that differ
per class (the Jacobian strategy's replicated context) have no shared prefix and also take the
plain path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def supports_prefix_sharing(tower: nn.Module) -> Optional[str]:
    """None when :func:`shared_prefix_states` can run ``tower``; else the reason it cannot."""
    blocks = getattr(getattr(tower, "transformer", None), "resblocks", None)
    if blocks is None:
        return "the text transformer has no resblocks"
    for i, b in enumerate(blocks):
        attn = getattr(b, "attn", None)
        if not all(hasattr(b, a) for a in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")) or hasattr(b, "ln_1_kv") \
                or hasattr(b, "ln_attn"):
            return f"block {i} ({type(b).__name__}) is not a plain pre-LN residual attention block"
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim \
                or attn.bias_k is not None or attn.add_zero_attn or attn.in_proj_weight is None:
            return f"block {i}'s attention is not a packed nn.MultiheadAttention"
        if attn.dropout and attn.training:
            return f"block {i}'s attention applies dropout"
    return None


def _qkv(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., T, D) -> q, k, v (..., H, T, D/H)."""
    H = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (..., T, 3D)
    q, k, v = qkv.chunk(3, dim=-1)
    split = lambda t: t.unflatten(-1, (H, -1)).transpose(-3, -2)  # (..., H, T, D/H)
    return split(q), split(k), split(v)


def _attend(attn: nn.MultiheadAttention, q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Heads (..., H, T, dh) with keys/values (..., H, S, dh), additive mask (T, S) -> (..., T, D)."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))  # (..., H, T, dh)
    return attn.out_proj(o.transpose(-3, -2).flatten(-2))  # (..., T, D)


def _attend_split(attn: nn.MultiheadAttention, q, kp, vp, ks, vs, mask: torch.Tensor) -> torch.Tensor:
    """Suffix queries q (G, C, H, Ls, dh) over the shared prefix's keys/values kp, vp (G, H, Lp, dh)
    and their own ks, vs (G, C, H, Ls, dh); additive mask (Ls, Lp + Ls) -> (G, C, Ls, D). The same
    softmax attention as over the concatenated keys, without copying the prefix's keys per class."""
    Lp = kp.shape[-2]
    scale = q.shape[-1] ** -0.5
    s_p = (q * scale) @ kp.unsqueeze(1).transpose(-1, -2)  # (G, C, H, Ls, Lp)
    s_s = (q * scale) @ ks.transpose(-1, -2) + mask[:, Lp:].to(q.dtype)  # (G, C, H, Ls, Ls)
    w = torch.cat([s_p + mask[:, :Lp].to(q.dtype), s_s], dim=-1).softmax(-1)  # (G, C, H, Ls, L)
    o = w[..., :Lp] @ vp.unsqueeze(1) + w[..., Lp:] @ vs  # (G, C, H, Ls, dh)
    return attn.out_proj(o.transpose(-3, -2).flatten(-2))  # (G, C, Ls, D)


def shared_prefix_states(tower: nn.Module, prefix: torch.Tensor, suffix: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """The transformer's output at the suffix positions.

    prefix (G, Lp, D): the embedded shared positions of G contexts (positional embedding added);
    suffix (G, C, Ls, D): every class's own positions; mask (L, L) the tower's additive causal mask.
    Returns (G, C, Ls, D), equal to ``tower.transformer`` on the (G*C, L) full sequences at
    positions Lp..L-1 (module doc)."""
    Lp = prefix.shape[1]
    m_p, m_s = mask[:Lp, :Lp], mask[Lp:, :]  # (Lp, Lp), (Ls, L)
    h_p, h_s = prefix, suffix
    blocks = list(tower.transformer.resblocks)
    for i, b in enumerate(blocks):
        qp, kp, vp = _qkv(b.attn, b.ln_1(h_p))  # (G, H, Lp, dh)
        qs, ks, vs = _qkv(b.attn, b.ln_1(h_s))  # (G, C, H, Ls, dh)
        h_s = h_s + b.ls_1(_attend_split(b.attn, qs, kp, vp, ks, vs, m_s))  # (G, C, Ls, D)
        h_s = h_s + b.ls_2(b.mlp(b.ln_2(h_s)))
        if i + 1 < len(blocks):  # the last block's prefix output is read by no one
            h_p = h_p + b.ls_1(_attend(b.attn, qp, kp, vp, m_p))  # (G, Lp, D)
            h_p = h_p + b.ls_2(b.mlp(b.ln_2(h_p)))
    return h_s
