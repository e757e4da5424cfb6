"""Baseline methods (paper Sec. 5 / digest Sec. 3), all on the shared engine."""

from __future__ import annotations

import torch

from dpfpl import lowrank
from dpfpl.methods import DPFPL, Identity, LocalView, Method, register


@register
class PromptFL(Method):
    """PromptFL (Guo et al. 2023): one global CoOp prompt, no personalisation."""

    name = "promptfl"
    description = "global prompt only (federated CoOp)"


@register
class FedPrompt(Method):
    """FedPrompt (Zhao et al. 2023): soft prompts averaged by the server (FedAvg of prompt
    parameters after K local steps); global prompt only."""

    name = "fedprompt"
    description = "global prompt only, FedAvg of prompt parameters every K local steps"
    default_protocol = "fedavg"


@register
class FedOTP(Method):
    """"Full-rank" baseline (FedOTP as run in the DP-FPL paper): global + full-rank local prompt;
    local DP noise goes on the full local gradient. (Original FedOTP also matches image patches to
    prompts with optimal transport; the paper's baseline and ours do not.)"""

    name = "fedotp"
    description = "global + full-rank local prompt"
    uses_local = True

    def init_local(self, n_ctx, width, gen):
        return {"p_L": self._randn((n_ctx, width), gen)}

    def local_view(self, local, gen, like):
        return Identity("p_L", local["p_L"])


class PersistentLowRank(LocalView):
    """Local context u v^T with u (n, k), v (D, k) learned directly."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor):
        self.u, self.v = u, v

    def context(self):
        return (self.u @ self.v.T).detach()

    def carrier_grads(self, G):
        gu, gv = lowrank.carrier_grads(G, self.u, self.v)
        return {"u": gu, "v": gv}

    def param_grads(self, grads):
        return {"u": grads["u"], "v": grads["v"]}


@register
class FedPGP(Method):
    """FedPGP (Cui et al. 2024) as in the DP-FPL paper: global + persistent low-rank local u v^T
    (no contrastive loss). u ~ N(0, s^2), v random orthonormal, so u v^T starts at the prompt scale."""

    name = "fedpgp"
    description = "global + persistent low-rank local prompt u v^T"
    uses_local = True
    low_rank = True

    def init_local(self, n_ctx, width, gen):
        v = lowrank.orthonormalize(torch.randn(width, self.rank, generator=gen))
        return {"u": self._randn((n_ctx, self.rank), gen), "v": v}

    def local_view(self, local, gen, like):
        return PersistentLowRank(local["u"], local["v"])

    def local_context(self, local):
        return (local["u"] @ local["v"].T).detach()


@register
class DPFPLNoResidual(DPFPL):
    """Ablation: DP-FPL without the residual (DP-LoRA style); the local prompt is truncated to its
    rank-k part every step."""

    name = "dpfpl-nores"
    description = "DP-FPL without the residual (rank-k local prompt)"
    residual = False


@register
class LocalOnly(Method):
    """Local prompt only, no federation (each client trains CoOp on its own data)."""

    name = "local"
    description = "local prompt only, no federation"
    uses_global = False
    uses_local = True

    def init_local(self, n_ctx, width, gen):
        return {"p_L": self._randn((n_ctx, width), gen)}

    def local_view(self, local, gen, like):
        return Identity("p_L", local["p_L"])


@register
class ZeroShot(Method):
    """Zero-shot CLIP with the hand-written template "a photo of a {}."; no training."""

    name = "zeroshot"
    description = "hand-written template 'a photo of a {}.', no training"
    trainable = False
    template = "a photo of a {}."
