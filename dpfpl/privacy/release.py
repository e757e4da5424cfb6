"""Releases: clip, sum, add noise and return the DpEvent, in one object.

A :class:`GaussianRelease` is one noised group of tensors (e.g. DP-FPL's u and v, clipped jointly):
per-unit clipping to C, a sum, N(0, (nm C)^2 I), and the sensitivity of the clipped sum under the
run's neighbouring relation. A :class:`BatchMechanism` is everything ONE batch of one client
releases (its local part and its global-prompt part) with the batch's ONE event
(:func:`dpfpl.privacy.events.batch_event`): calling it clips, sums, noises and returns the values
and that event together, so a draw and its accounting cannot drift apart.

The global part of the ``grad`` protocol is noised at the server, once on the sum of all sampled
clients' clipped sums (a trusted server, paper Sec. 4.2): its :class:`GaussianRelease` has
``noise_at="server"``; the client returns the clipped sum, and the server calls
:meth:`GaussianRelease.noise` on the total with the same object. The batch's event covers it.

Shapes: per-example gradients ``name -> (B, *shape)``; units ``(B,)`` in [0, U).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from dp_accounting import dp_event

from ..errors import ConfigError
from .events import batch_event, event_to_dict
from .randomness import NoiseSource

__all__ = ["parse_clip_unit", "clip_and_sum", "GaussianRelease", "BatchMechanism", "BatchRelease",
           "ReferenceBatchMechanism"]

NOOP = dp_event.NoOpDpEvent()


def parse_clip_unit(unit: str) -> tuple[str, int]:
    """'example' -> ('example', 1); 'microbatch:M' -> ('microbatch', M); 'batch' -> ('batch', 0)."""
    if unit in ("example", "batch"):
        return unit, 1 if unit == "example" else 0
    if isinstance(unit, str) and unit.startswith("microbatch:"):
        try:
            m = int(unit.split(":", 1)[1])
        except ValueError:
            m = 0
        if m >= 1:
            return ("example", 1) if m == 1 else ("microbatch", m)
    raise ConfigError(f"privacy.clip_unit={unit!r}: expected example, microbatch:M (M >= 1) or batch")


def clip_and_sum(grads: dict[str, torch.Tensor], units: Optional[torch.Tensor], n_units: int,
                 C: float) -> dict[str, torch.Tensor]:
    """Sum per clipping unit, clip each unit's joint norm (over all tensors) to C, sum the units.

    grads: name -> (B, *shape); units: (B,) unit id of each example in [0, n_units), or None when
    every example is its own unit (per-example clipping: no per-unit sum is formed).
    Returns name -> (*shape): sum_u min(1, C / ||g_u||) g_u, each unit a vector of joint norm <= C.
    """
    if not grads:
        return {}
    if units is None:
        sums = {k: g.flatten(1) for k, g in grads.items()}  # (B, D_k) views
    else:
        sums = {k: torch.zeros(n_units, *g.shape[1:], dtype=g.dtype, device=g.device).index_add_(0, units, g).flatten(1)
                for k, g in grads.items()}  # (U, D_k)
    sq = sum(torch.linalg.vector_norm(s, dim=1) ** 2 for s in sums.values())  # (U,) squared joint norms
    factor = (C / (sq.sqrt() + 1e-12)).clamp(max=1.0)  # (U,)
    shapes = {k: g.shape[1:] for k, g in grads.items()}
    return {k: (factor.to(s.dtype) @ s).reshape(shapes[k]) for k, s in sums.items()}  # (U,) @ (U, D_k) -> (D_k,)


@dataclass(frozen=True)
class GaussianRelease:
    """One Gaussian release of a clipped sum: std ``noise_multiplier * clip_norm``; one example moves
    the clipped sum by at most ``sensitivity * clip_norm`` under the run's relation."""

    part: str                    # "local" or "global"
    noise_multiplier: float      # applied std / C
    clip_norm: float
    sensitivity: float           # in units of C: 1 (add/remove, per example) or 2 (replace / groups)
    noise_at: str = "client"     # "client", or "server" (added once to the sum over clients)
    tensors: int = 1             # >1: each tensor clipped and noised on its own (reference mode)

    @property
    def std(self) -> float:
        return self.noise_multiplier * self.clip_norm

    @property
    def accountant_multiplier(self) -> float:
        """Noise std / sensitivity: what the accountant sees."""
        return self.noise_multiplier / self.sensitivity

    def noise(self, tensors: dict[str, torch.Tensor], source: NoiseSource, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """ONE Gaussian draw N(0, std^2 I) on the concatenation of ``tensors``, returned shaped like them."""
        items = list(tensors.items())
        sizes = [t.numel() for _, t in items]
        first = items[0][1]
        z = source.gaussian((sum(sizes),), self.std, gen, first.dtype, first.device)  # (sum sizes,)
        return {k: piece.reshape(t.shape).to(t.dtype) for (k, t), piece in zip(items, torch.split(z, sizes))}


@dataclass
class BatchRelease:
    """What one batch released: ``values[part]`` (noised means, or the clipped sum of a server-noised
    part), the normaliser of the means, the batch's ONE event, and the number of noise draws."""

    values: dict[str, dict[str, torch.Tensor]]
    normaliser: float
    event: dp_event.DpEvent
    draws: int


@dataclass(frozen=True)
class BatchMechanism:
    """Everything one batch of one client releases (see the module docstring).

    ``sampling="poisson"``: the event is ``PoissonSampled(q, Gaussian(s))`` with s the joint
    multiplier of all parts. ``"shuffle"`` (replace-one, an epoch's batches partition the data): the
    first batch of an epoch carries ``Gaussian(s)`` for the whole epoch (parallel composition), the
    other batches of the epoch a no-op event.
    """

    releases: tuple[GaussianRelease, ...]
    sampling_rate: float
    sampling: str
    clip_unit: str = "example"
    microbatch: int = 1

    def part(self, name: str) -> Optional[GaussianRelease]:
        return next((r for r in self.releases if r.part == name), None)

    @property
    def joint_event(self) -> dp_event.DpEvent:
        """The event of one batch that is accounted (the first of an epoch under shuffle)."""
        s = "poisson" if self.sampling == "poisson" else "none"
        return batch_event([r.accountant_multiplier for r in self.releases for _ in range(r.tensors)],
                           self.sampling_rate, s)

    def event(self, first_of_epoch: bool = True) -> dp_event.DpEvent:
        if self.sampling != "poisson" and not first_of_epoch:
            return NOOP
        return self.joint_event

    def units(self, B: int, positions: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], int]:
        """Clipping unit of each of the B examples: itself (None: no grouping), the whole batch, or its
        microbatch (fixed groups of M consecutive training positions: ``positions // M``)."""
        if self.clip_unit == "example":
            return None, B  # each example its own unit
        if self.clip_unit == "batch":
            return torch.zeros(B, dtype=torch.long), 1
        if positions is None:
            raise ConfigError("microbatch clipping needs the batch's training positions")
        uniq, inv = torch.unique(positions // self.microbatch, return_inverse=True)
        return inv, len(uniq)

    def __call__(self, grads: dict[str, dict[str, torch.Tensor]], normaliser: float, source: NoiseSource,
                 gen: torch.Generator, positions: Optional[torch.Tensor] = None,
                 first_of_epoch: bool = True) -> BatchRelease:
        """Release one batch: ``grads[part]`` = name -> per-example (B, *shape) gradients for every
        part of this mechanism. Client-noised parts come back as (clipped sum + noise) / normaliser,
        server-noised parts as the clipped sum."""
        missing = {r.part for r in self.releases} - set(grads)
        if missing or set(grads) - {r.part for r in self.releases}:
            raise ValueError(f"batch release needs exactly the parts {[r.part for r in self.releases]}, got {sorted(grads)}")
        B = next(iter(next(iter(grads.values())).values())).shape[0]
        units, n_units = self.units(B, positions)
        values, draws = {}, 0
        for r in self.releases:
            s = clip_and_sum(grads[r.part], units, n_units, r.clip_norm)
            if r.noise_at == "server":
                values[r.part] = s
                continue
            z = r.noise(s, source, gen)
            draws += 1
            values[r.part] = {k: (s[k] + z[k]) / normaliser for k in s}
        return BatchRelease(values, normaliser, self.event(first_of_epoch), draws)

    def describe(self) -> dict:
        return {"parts": [{"part": r.part, "noise_multiplier": r.noise_multiplier, "sensitivity": r.sensitivity,
                           "accountant_multiplier": r.accountant_multiplier, "noise_at": r.noise_at}
                          for r in self.releases],
                "sampling_rate": self.sampling_rate, "sampling": self.sampling, "clip_unit": self.clip_unit,
                "microbatch": self.microbatch, "event": event_to_dict(self.joint_event)}


@dataclass(frozen=True)
class ReferenceBatchMechanism(BatchMechanism):
    """The public DP-FPL code's release (digest Sec. 4): the batch-MEAN gradient of every tensor
    clipped to C on its own and noised on its own with std nm C (``tensors`` draws per part).
    ``grads[part]`` are batch means ``name -> (*shape)``; the mean moves by up to 2C when one
    example changes (sensitivity 2)."""

    clip_unit: str = "batch-mean"

    def __call__(self, grads, normaliser, source, gen, positions=None, first_of_epoch=True) -> BatchRelease:
        values, draws = {}, 0
        for r in self.releases:
            out = {}
            for k, g in grads[r.part].items():
                clipped = g * min(1.0, r.clip_norm / (float(g.detach().norm()) + 1e-12))
                if r.noise_at == "server":
                    out[k] = clipped
                    continue
                out[k] = clipped + r.noise({k: g}, source, gen)[k]
                draws += 1
            values[r.part] = out
        return BatchRelease(values, 1.0, self.event(first_of_epoch), draws)
