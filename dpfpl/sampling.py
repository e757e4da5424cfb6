"""Minibatch samplers of a client's training set, with explicit, checkpointable state.

- ``poisson``: every example joins each batch independently with probability q = min(1, B / n)
  (expected batch size q n; batches may be empty). This is the sampling that privacy amplification
  by subsampling assumes (add/remove-one neighbouring relation); its coin flips must stay secret,
  so a DP run's generator comes from :class:`dpfpl.privacy.randomness.NoiseSource`.
- ``shuffle``: a permutation per epoch cut into batches of B (the last one may be smaller). Each
  example is used once per epoch; the accountant gets no amplification for it (replace-one).
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class BatchSampler:
    def __init__(self, n: int, batch_size: int, mode: str, generator: torch.Generator, source: Optional[Any] = None):
        """``source``: a NoiseSource whose ``bernoulli_mask`` draws the Poisson coins (secure mode);
        None: ``torch.rand`` from ``generator``."""
        if n <= 0:
            raise ValueError("a client needs at least one training example")
        self.n, self.batch_size, self.mode, self.gen, self.source = n, batch_size, mode, generator, source
        self.perm: torch.Tensor | None = None
        self.pos = 0
        self.epochs = 0
        self.last_started_epoch = False  # did the last batch start a new epoch (shuffle)

    @property
    def sampling_rate(self) -> float:
        return min(1.0, self.batch_size / self.n)

    @property
    def expected_batch_size(self) -> float:
        """q n under Poisson (= B unless n < B), B under shuffle."""
        return self.sampling_rate * self.n if self.mode == "poisson" else float(self.batch_size)

    def next(self) -> torch.Tensor:
        """Local indices (b,) in [0, n) of the next batch."""
        if self.mode == "poisson":
            self.last_started_epoch = True
            if self.source is not None:
                mask = self.source.bernoulli_mask(self.n, self.sampling_rate, self.gen)
            else:
                mask = torch.rand(self.n, generator=self.gen) < self.sampling_rate
            return torch.nonzero(mask).flatten()
        self.last_started_epoch = False
        if self.perm is None or self.pos >= self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
            self.epochs += 1
            self.last_started_epoch = True
        batch = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += len(batch)
        return batch

    def epochs_started_by(self, steps: int) -> int:
        """How many new epochs (shuffle) the next ``steps`` batches will start, without drawing them."""
        if self.mode == "poisson":
            return 0
        pos, started = (self.n if self.perm is None else self.pos), 0
        for _ in range(steps):
            if pos >= self.n:
                pos, started = 0, started + 1
            pos += min(self.batch_size, self.n - pos)
        return started

    def state_dict(self, with_generator: bool = True) -> dict:
        """Position and permutation; the generator's state only when ``with_generator`` (never for
        a secret generator: a resumed run draws from a fresh secret seed)."""
        return {"perm": self.perm, "pos": self.pos, "epochs": self.epochs,
                "gen": self.gen.get_state() if with_generator else None}

    def load_state_dict(self, s: dict) -> None:
        self.perm, self.pos, self.epochs = s["perm"], s["pos"], s["epochs"]
        if s.get("gen") is not None:
            self.gen.set_state(s["gen"])
