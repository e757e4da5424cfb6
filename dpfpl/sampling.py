"""Minibatch samplers of a client's training set, with explicit, checkpointable state.

- ``poisson``: every example joins each batch independently with probability q = B / n (expected
  batch size B; batches may be empty). This is the sampling that privacy amplification by
  subsampling assumes (add/remove-one neighbouring relation).
- ``shuffle``: a seeded permutation per epoch cut into batches of B (the last one may be smaller).
  Each example is used once per epoch; the accountant gets no amplification for it.
"""

from __future__ import annotations

import torch


class BatchSampler:
    def __init__(self, n: int, batch_size: int, mode: str, generator: torch.Generator):
        if n <= 0:
            raise ValueError("a client needs at least one training example")
        self.n, self.batch_size, self.mode, self.gen = n, batch_size, mode, generator
        self.perm: torch.Tensor | None = None
        self.pos = 0
        self.epochs = 0

    @property
    def sampling_rate(self) -> float:
        return min(1.0, self.batch_size / self.n)

    def next(self) -> torch.Tensor:
        """Local indices (b,) in [0, n) of the next batch."""
        if self.mode == "poisson":
            return torch.nonzero(torch.rand(self.n, generator=self.gen) < self.sampling_rate).flatten()
        if self.perm is None or self.pos >= self.n:
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
            self.epochs += 1
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

    def state_dict(self) -> dict:
        return {"perm": self.perm, "pos": self.pos, "epochs": self.epochs}

    def load_state_dict(self, s: dict) -> None:
        self.perm, self.pos, self.epochs = s["perm"], s["pos"], s["epochs"]
