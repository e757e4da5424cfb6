"""Where the randomness that privacy relies on comes from: noise and batch selection.

Default (``noise_seed=None``): every generator is seeded from the OS CSPRNG (``secrets``, 64 bits)
when the run starts, and its state is never written anywhere (not in config.json, summaries, the
ledger, prompts, nor the checkpoint): nobody holding a run directory can regenerate a noise draw or
a Poisson batch. A resumed run draws fresh secret seeds (same distribution, other values).

``noise_seed=N`` (debugging, exact replays): generators are derived from N with
``numpy.random.SeedSequence`` and their states are checkpointed, so a resume is bit-exact. Such a
run is labelled ``noise_secret: false`` in its summary and in every table: its noise is public.

``secure=True`` (``--secure-noise``): Gaussian noise is built from the OS CSPRNG directly, each
N(0, 1) value the sum of four Box-Muller normals divided by 2 (Holohan & Braghin 2021, "Secure
random sampling in differential privacy", as in Opacus' ``secure_mode``), against floating-point
attacks on the sampler (Mironov 2012) and generator-state recovery. Batch selection then also
reads the CSPRNG. Cost: see results/microbench.
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["NoiseSource", "secure_standard_normal"]


def secure_standard_normal(n: int) -> np.ndarray:
    """n draws of N(0, 1) (float64) from os.urandom: 4 Box-Muller normals summed, / 2."""
    m = 2 * n  # Box-Muller pairs: 2 normals each, 4n normals needed
    raw = np.frombuffer(os.urandom(16 * m), dtype=np.uint64).reshape(m, 2)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53  # (m, 2) in (0, 1)
    r = np.sqrt(-2.0 * np.log(u[:, 0]))
    z = np.concatenate([r * np.cos(2 * math.pi * u[:, 1]), r * np.sin(2 * math.pi * u[:, 1])])  # (4n,)
    return z.reshape(4, n).sum(0) / 2.0


class NoiseSource:
    """Factory of the generators behind noise and batch selection (see the module docstring)."""

    def __init__(self, noise_seed: Optional[int] = None, secure: bool = False):
        if secure and noise_seed is not None:
            raise ConfigError("privacy.secure_noise draws from the OS CSPRNG; it cannot be combined with "
                              f"privacy.noise_seed={noise_seed} (reproducible noise)")
        if noise_seed is not None and not (isinstance(noise_seed, int) and noise_seed >= 0):
            raise ConfigError(f"privacy.noise_seed must be an integer >= 0 (or unset for secret noise), got {noise_seed!r}")
        self.noise_seed, self.secure = noise_seed, bool(secure)

    @property
    def secret(self) -> bool:
        """True when no file of the run lets anyone regenerate the noise or the batches."""
        return self.noise_seed is None

    def generator(self, *key: int, device: str | torch.device = "cpu") -> torch.Generator:
        """A torch generator: secret-seeded, or derived from (noise_seed, *key) when reproducible."""
        seed = secrets.randbits(64) if self.secret else int(
            np.random.SeedSequence([self.noise_seed, *key]).generate_state(2, np.uint64)[0])
        return torch.Generator(device="cpu").manual_seed(seed)

    def gaussian(self, shape: Sequence[int], std: float, gen: torch.Generator, dtype: torch.dtype,
                 device: torch.device | str) -> torch.Tensor:
        """N(0, std^2 I) of ``shape``: from ``gen`` (torch), or the CSPRNG when ``secure``."""
        if self.secure:
            n = int(np.prod(shape)) if len(shape) else 1
            z = torch.from_numpy(secure_standard_normal(n)).reshape(tuple(shape))
            return (z * std).to(dtype=dtype, device=device)
        return (torch.randn(tuple(shape), generator=gen, dtype=dtype) * std).to(device)

    def bernoulli_mask(self, n: int, p: float, gen: torch.Generator) -> torch.Tensor:
        """(n,) bool, each True with probability p (Poisson batch selection)."""
        if self.secure:
            raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
            u = (raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
            return torch.from_numpy(u < p)
        return torch.rand(n, generator=gen) < p

    def describe(self) -> dict:
        return {"noise_secret": self.secret, "secure_noise": self.secure}
