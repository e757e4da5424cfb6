"""Low-rank factorisation of the local prompt (DP-FPL, paper Sec. 4; RGP, Yu et al. 2021).

Every step the full-rank local prompt p_L (n, D) is factorised at rank k by ONE power iteration:
    v0 ~ N(0, 1) (D, k);  u = orth(p_L v0) (n, k);  v = orth(p_L^T u) (D, k);  r = p_L - u v^T.
u and v have orthonormal columns; the forward uses p_G + u v^T + r (= p_G + p_L). u and v are the
"gradient carriers": with G = dLoss/dctx, grad_u = G v and grad_v = G^T u (these are what the local
DP mechanism clips and noises, (n + D) k numbers instead of n D). The update of p_L is rebuilt as
    grad_L = grad_u v^T + u grad_v^T - u u^T grad_u v^T = u u^T G + G v v^T - u u^T G v v^T,
the orthogonal projection of G onto the tangent space of rank-k matrices at span(u, v)
(paper Eq. 4 with the sign the projection needs; the public code adds the last term and divides by
a hard-coded 10: neither is done here).
"""

from __future__ import annotations

import torch


def orthonormalize(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of m (n, k), n >= k, by Gram-Schmidt (reduced QR)."""
    q, r = torch.linalg.qr(m, mode="reduced")
    sign = torch.sign(torch.diagonal(r))  # make the basis unique: positive diagonal, as Gram-Schmidt gives
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign


def power_factorize(p: torch.Tensor, rank: int, generator: torch.Generator | None = None):
    """One power iteration at ``rank``: returns (u (n,k), v (D,k), r (n,D)) with u v^T + r == p."""
    n, d = p.shape
    if not 1 <= rank <= min(n, d):
        raise ValueError(f"rank must be in [1, {min(n, d)}] for a ({n}, {d}) prompt, got {rank}")
    v0 = torch.randn(d, rank, generator=generator, dtype=p.dtype, device="cpu").to(p.device)  # (D, k)
    u = orthonormalize(p @ v0)  # (n, k)
    v = orthonormalize(p.T @ u)  # (D, k)
    r = p - u @ v.T  # (n, D)
    return u, v, r


def carrier_grads(G: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_u = G v (..., n, k) and grad_v = G^T u (..., D, k) for G (..., n, D)."""
    return G @ v, G.transpose(-1, -2) @ u


def rebuild_grad(grad_u: torch.Tensor, grad_v: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 4: grad_L = grad_u v^T + u grad_v^T - u u^T grad_u v^T  -> (n, D)."""
    return grad_u @ v.T + u @ grad_v.T - u @ (u.T @ grad_u) @ v.T


def tangent_projection(G: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """u u^T G + G v v^T - u u^T G v v^T (the reference rebuild_grad must equal)."""
    uu, vv = u @ u.T, v @ v.T
    return uu @ G + G @ vv - uu @ G @ vv
