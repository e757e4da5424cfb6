"""Secret, fixed canary directions in the noised release space (white-box gradient canaries).

A part of a release (``"local"``: DP-FPL's carrier gradients u and v, clipped and noised jointly;
``"global"``: the global-prompt gradient) is a group of tensors; its flattened concatenation (in
the release's tensor order) has dimension ``d_p``. Canary k has a unit direction in part p when
``k < min(m, d_p)``: the first ``d_p`` canaries fill an orthonormal basis of that part, the others
have no component there (so up to ``max_p d_p`` canaries never interfere; the first ``min_p d_p``
reach every part, the worst case that the step's joint event accounts, and the white-box attack's
default m).

Kinds: ``orthonormal`` (the Q factor of a Gaussian matrix) or ``coordinate`` (Dirac canaries:
distinct coordinate vectors, Nasr et al. 2023), both from a secret seed and the shapes only.
They are fixed BEFORE training and never derived from the audited run's gradients, which would
make the inclusion tests depend on the outputs and void the one-run guarantee.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dpfpl.errors import ConfigError

__all__ = ["DIRECTION_KINDS", "PartDirections", "make_directions"]

DIRECTION_KINDS = ("orthonormal", "coordinate")


@dataclass
class PartDirections:
    """Unit directions of the first ``n`` canaries in one part: ``rows (n, d_p)``; tensors ``names``
    of ``shapes`` (flattened in this order)."""

    part: str
    names: list[str]
    shapes: list[tuple[int, ...]]
    rows: torch.Tensor

    @property
    def n(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """(k, d_p) -> name -> (k, *shape)."""
        sizes = [int(np.prod(s)) for s in self.shapes]
        return {n: piece.reshape(flat.shape[0], *s) for n, s, piece in zip(self.names, self.shapes,
                                                                             torch.split(flat, sizes, dim=1))}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """name -> (*shape) -> (d_p,)."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])


def make_directions(parts: dict[str, dict[str, tuple[int, ...]]], m: int, kind: str, seed: int
                    ) -> dict[str, PartDirections]:
    """Directions of ``m`` canaries in each part of ``parts`` (part -> tensor name -> shape)."""
    if kind not in DIRECTION_KINDS:
        raise ConfigError(f"canary directions {kind!r}: expected one of {list(DIRECTION_KINDS)}")
    dims = {p: int(sum(int(np.prod(s)) for s in t.values())) for p, t in parts.items()}
    if not dims:
        raise ConfigError("white-box canaries: the mechanism releases no noised part")
    if isinstance(m, bool) or int(m) != m or not 1 <= m <= max(dims.values()):
        raise ConfigError(f"--canaries {m!r}: between 1 and {max(dims.values())} (the largest noised part's "
                          f"dimension: {dims}) orthogonal white-box canaries")
    out = {}
    for j, (p, tensors) in enumerate(sorted(parts.items())):
        d, n = dims[p], min(int(m), dims[p])
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, j]).generate_state(1)[0]))
        if kind == "orthonormal":
            q, r = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=torch.float64))
            rows = (q * torch.sign(torch.diagonal(r))).T  # (n, d) orthonormal rows
        else:
            idx = torch.randperm(d, generator=g)[:n]
            rows = torch.zeros(n, d, dtype=torch.float64)
            rows[torch.arange(n), idx] = 1.0
        out[p] = PartDirections(p, list(tensors), [tuple(s) for s in tensors.values()], rows.float())
    return out
