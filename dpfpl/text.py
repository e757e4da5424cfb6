"""The CoOp text path: learnable context vectors fed through open_clip's frozen text tower.

For class c the token sequence is ``[SOT] X_1 .. X_n {classname} . [EOT] pad..``; the embeddings of
the n placeholder tokens are replaced by the context ``ctx`` (n_ctx, D). The rest of the tower is
open_clip's own modules (positional embedding, causal transformer, final LayerNorm, pooling at the
end-of-text token, projection), so with ``ctx`` set to the token embeddings of a fixed phrase the
output equals ``model.encode_text`` of that phrase (tested).

Text cut: CLIP's text transformer is causal and the feature is read at the end-of-text (EOT)
position, so positions after the last EOT of all classes cannot change any feature. With
``cut=True`` the sequence is truncated to ``max(eot) + 1`` tokens (e.g. 77 -> ~22), which is exact
and much cheaper. The cut is refused for towers without a causal mask.

Shared prefix: for the same causal reason, the SOT and context positions are computed once for all
classes when the context is shared (:mod:`dpfpl.prefix`; ``share_prefix``, default on where the
tower supports it), another exact saving of ~3.6x in the tower's linear layers on the tiny benchmark.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .clip import FrozenClip
from .errors import ConfigError
from .prefix import shared_prefix_states, supports_prefix_sharing

PLACEHOLDER = "X"


def text_tower(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/positional_embedding/transformer/ln_final."""
    tower = model.text if hasattr(model, "text") and hasattr(model.text, "token_embedding") else model
    for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
        if not hasattr(tower, attr):
            raise ConfigError(f"text tower of {type(model).__name__} has no {attr}: not a CLIP-style text transformer")
    if getattr(tower, "cls_emb", None) is not None:
        raise ConfigError(f"{type(model).__name__}: text towers with a CLS embedding are not supported")
    return tower


def pool_positions(tower: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """(C,) index of the pooled token, as open_clip's ``text_global_pool`` picks it."""
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos":
        eos = getattr(tower, "text_eos_id", None) or getattr(tower, "eos_id", None)
        return (tokens == eos).int().argmax(dim=-1)
    if pool == "last":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
    raise ConfigError(f"text pooling {pool!r} is not supported by the prompt learner")


class PromptTextEncoder(nn.Module):
    """Maps a context tensor to L2-normalised class text features.

    forward(ctx): ctx (n_ctx, D) shared by all classes, or (C, n_ctx, D) -> features (C, E).
    forward_stacked(ctx): K contexts at once, (K, n_ctx, D) or (K, C, n_ctx, D) -> (K, C, E).
    All weights are frozen buffers/modules of the CLIP model; only ``ctx`` carries gradients.

    ``share_prefix``: a context shared by all classes runs its positions once (:mod:`dpfpl.prefix`);
    None = wherever the tower supports it, True = required (ConfigError where it cannot), False = never.
    ``shares_prefix`` says which applies.
    """

    def __init__(self, clip: FrozenClip, classnames: Sequence[str], n_ctx: int, cut: bool = True,
                 share_prefix: Optional[bool] = None):
        super().__init__()
        self.tower = text_tower(clip.model)
        self.n_ctx = n_ctx
        self.classnames = list(classnames)
        prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + name + "." for name in self.classnames]
        tokens = clip.tokenizer(prompts).to(clip.device)  # (C, 77)
        ctx_len = tokens.shape[1]
        if tokens[:, -1].ne(0).any():
            raise ConfigError(f"n_ctx={n_ctx} plus a class name exceeds the {ctx_len}-token text context")
        pos = pool_positions(self.tower, tokens)  # (C,)
        mask = getattr(self.tower, "attn_mask", None)
        causal = mask is not None and bool(torch.isinf(mask[0, 1:]).all())
        self.cut = bool(cut and causal)
        if cut and not causal:
            raise ConfigError("cut_text=True needs a causal text transformer; pass --cut-text false")
        length = int(pos.max()) + 1 if self.cut else ctx_len
        tokens = tokens[:, :length]  # (C, L)
        with torch.no_grad():
            emb = self.tower.token_embedding(tokens)  # (C, L, D)
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # (C, 1, D)  SOT
        self.register_buffer("suffix", emb[:, 1 + n_ctx:].clone(), persistent=False)  # (C, L-1-n, D)
        self.register_buffer("pool_pos", pos, persistent=False)  # (C,)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("attn_mask", mask[:length, :length].clone() if mask is not None else None,
                             persistent=False)
        self.length = length
        self.width = emb.shape[-1]
        why_not = "the text transformer is not causal" if not causal else supports_prefix_sharing(self.tower)
        if share_prefix and why_not:
            raise ConfigError(f"share_prefix=True is impossible: {why_not}")
        self.shares_prefix = share_prefix is not False and why_not is None

    @property
    def n_classes(self) -> int:
        return self.prefix.shape[0]

    def placeholder_embedding(self) -> torch.Tensor:
        """The token embeddings the placeholders had: (n_ctx, D)."""
        with torch.no_grad():
            return self.tower.token_embedding(self.tokens[0, 1:1 + self.n_ctx])

    @property
    def rows_per_pass(self) -> int:
        """Token rows one pass of a shared context runs through the tower (memory/cost models)."""
        if self.shares_prefix:
            return 1 + self.n_ctx + self.n_classes * self.suffix.shape[1]
        return self.n_classes * self.length

    def forward(self, ctx: torch.Tensor) -> torch.Tensor:
        C = self.n_classes
        if ctx.dim() == 2 and self.shares_prefix:
            return self._shared_features(ctx.unsqueeze(0))[0]  # (C, E)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(C, -1, -1)  # (C, n_ctx, D)
        x = torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)  # (C, L, D)
        return self._tower_features(x, self.pool_pos)  # (C, E)

    def forward_stacked(self, ctx: torch.Tensor) -> torch.Tensor:
        """K contexts through the tower in ONE pass: ctx (K, n_ctx, D) shared by all classes, or
        (K, C, n_ctx, D) per class -> features (K, C, E). Row k equals ``forward(ctx[k])`` (up to
        float summation order): the K prefixes and K x C suffixes (shared prefix), or the K x C full
        sequences, are independent rows of one batch."""
        K, C = ctx.shape[0], self.n_classes
        if ctx.dim() == 3 and self.shares_prefix:
            return self._shared_features(ctx)  # (K, C, E)
        if ctx.dim() == 3:
            ctx = ctx.unsqueeze(1).expand(K, C, *ctx.shape[1:])  # (K, C, n_ctx, D)
        x = torch.cat([self.prefix.expand(K, *self.prefix.shape), ctx.to(self.prefix.dtype),
                       self.suffix.expand(K, *self.suffix.shape)], dim=2)  # (K, C, L, D)
        feats = self._tower_features(x.reshape(K * C, self.length, self.width), self.pool_pos.repeat(K))  # (K*C, E)
        return feats.reshape(K, C, -1)  # (K, C, E)

    def _shared_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """Contexts (G, n_ctx, D) shared by all classes -> features (G, C, E), prefix run once."""
        G, C, Lp = ctx.shape[0], self.n_classes, 1 + self.n_ctx
        pos = self.tower.positional_embedding[: self.length]  # (L, D)
        sot = self.prefix[:1].expand(G, 1, self.width)  # (G, 1, D): the same SOT token for every class
        prefix = torch.cat([sot, ctx.to(self.prefix.dtype)], dim=1) + pos[:Lp]  # (G, Lp, D)
        suffix = (self.suffix + pos[Lp:]).expand(G, *self.suffix.shape)  # (G, C, Ls, D)
        h = shared_prefix_states(self.tower, prefix, suffix, self.attn_mask)  # (G, C, Ls, D)
        h = self.tower.ln_final(h)
        x = h[:, torch.arange(C, device=h.device), self.pool_pos - Lp]  # (G, C, D)
        return self._project(x)  # (G, C, E)

    def _tower_features(self, x: torch.Tensor, pool_pos: torch.Tensor) -> torch.Tensor:
        """Token embeddings x (N, L, D) -> L2-normalised features (N, E) pooled at ``pool_pos`` (N,)."""
        x = x + self.tower.positional_embedding[: self.length]
        x = self.tower.transformer(x, attn_mask=self.attn_mask)
        x = self.tower.ln_final(x)  # (N, L, D)
        x = x[torch.arange(x.shape[0], device=x.device), pool_pos]  # (N, D)
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled states (..., D) -> L2-normalised features (..., E)."""
        proj = getattr(self.tower, "text_projection", None)
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (N, E)
        return F.normalize(x, dim=-1)


def template_features(clip: FrozenClip, classnames: Sequence[str], template: str = "a photo of a {}.") -> torch.Tensor:
    """Zero-shot class features from a hand-written template: (C, E), L2-normalised."""
    tokens = clip.tokenizer([template.format(c) for c in classnames]).to(clip.device)
    with torch.no_grad():
        return F.normalize(clip.model.encode_text(tokens), dim=-1)


def logit_scale(clip: FrozenClip) -> float:
    return float(clip.model.logit_scale.exp())
