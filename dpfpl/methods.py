"""Methods as small classes behind one registry.

A method says how a client's context is composed from the global prompt p_G (n_ctx, D) and its own
local state, and which tensors carry the local gradient. The engine computes G = dLoss/dctx (per
example under DP, per batch otherwise); everything a method needs is linear in G:

- the global contribution is G itself (ctx = p_G + local part);
- ``LocalView.carrier_grads(G)`` maps G (..., n_ctx, D) to the gradients of the tensors the local
  DP mechanism protects (e.g. grad_u, grad_v), keeping any leading batch dimension;
- ``LocalView.param_grads(carrier)`` turns (noised, averaged) carrier gradients into gradients of
  the local state parameters, which each client's own optimiser applies.

Baselines live in the ``baselines`` package and register here with :func:`register`;
:mod:`dpfpl.registry` (``get_method``, ``method_names``) loads them, so this module never imports
``baselines`` (no import cycle).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch

from . import lowrank
from .errors import ConfigError

_REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator adding a method to the registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


class LocalView:
    """The local part of the context for one step, and how its gradients map back."""

    carriers: dict[str, torch.Tensor]

    def context(self) -> torch.Tensor:
        """The local context (n_ctx, D), detached."""
        raise NotImplementedError

    def carrier_grads(self, G: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_grads(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class NoLocal(LocalView):
    def __init__(self, like: torch.Tensor):
        self._zero = torch.zeros_like(like)

    def context(self):
        return self._zero

    def carrier_grads(self, G):
        return {}

    def param_grads(self, grads):
        return {}


class Identity(LocalView):
    """The local state is one full tensor used as is (FedOTP-style full-rank local prompt)."""

    def __init__(self, name: str, p: torch.Tensor):
        self.name, self.p = name, p

    def context(self):
        return self.p.detach()

    def carrier_grads(self, G):
        return {self.name: G}

    def param_grads(self, grads):
        return {self.name: grads[self.name]}


class Method:
    """Base class. Subclasses set the class variables and override :meth:`init_local` /
    :meth:`local_view` when they have a local prompt."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    uses_global: ClassVar[bool] = True
    uses_local: ClassVar[bool] = False
    trainable: ClassVar[bool] = True
    default_protocol: ClassVar[str] = "grad"
    low_rank: ClassVar[bool] = False  # uses train.rank

    def __init__(self, rank: int = 8, ctx_init_std: float = 0.02):
        self.rank = rank
        self.ctx_init_std = ctx_init_std

    def check(self, n_ctx: int, width: int) -> None:
        """Raise ConfigError for settings this method cannot run with."""
        if self.low_rank and not 1 <= self.rank <= min(n_ctx, width):
            raise ConfigError(f"train.rank={self.rank} must be in [1, min(n_ctx, width)] = "
                              f"[1, {min(n_ctx, width)}] for method {self.name}")

    def init_local(self, n_ctx: int, width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def local_view(self, local: dict[str, torch.Tensor], gen: torch.Generator, like: torch.Tensor) -> LocalView:
        return NoLocal(like)

    def local_context(self, local: dict[str, torch.Tensor]) -> torch.Tensor:
        """The local part of the personalised context at test time (n_ctx, D)."""
        return local["p_L"].detach()

    def _randn(self, shape, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * self.ctx_init_std


@register
class DPFPL(Method):
    """DP-FPL (Tran et al., ICLR 2025): global prompt + full-rank local prompt factorised every step
    into u v^T (rank k, the DP-protected carriers) plus a residual r that keeps full expressiveness."""

    name = "dpfpl"
    description = "global + local prompt factorised every step (u v^T + residual), local DP on u, v"
    uses_local = True
    low_rank = True
    residual: ClassVar[bool] = True

    def init_local(self, n_ctx, width, gen):
        return {"p_L": self._randn((n_ctx, width), gen)}

    def local_view(self, local, gen, like):
        return FactorisedView(local["p_L"], self.rank, gen, residual=self.residual)


class FactorisedView(LocalView):
    """p_L = u v^T + r by one power iteration. Without residual the state p_L is first truncated to
    its rank-k part u u^T p_L v v^T (the residual is discarded every step), so the forward uses a
    rank-k local prompt; the update then moves it within the rank-k tangent space."""

    def __init__(self, p: torch.Tensor, rank: int, gen: torch.Generator, residual: bool):
        with torch.no_grad():
            self.u, self.v, r = lowrank.power_factorize(p, rank, gen)  # (n,k), (D,k), (n,D)
            if not residual:
                p.copy_(self.u @ (self.u.T @ p @ self.v) @ self.v.T)  # truncate the state to rank k
        self.p = p

    def context(self):
        return self.p.detach()

    def carrier_grads(self, G):
        gu, gv = lowrank.carrier_grads(G, self.u, self.v)
        return {"u": gu, "v": gv}

    def param_grads(self, grads):
        return {"p_L": lowrank.rebuild_grad(grads["u"], grads["v"], self.u, self.v)}


MethodFactory = Callable[..., Method]
