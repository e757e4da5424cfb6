"""The privacy interface the engines call, and the non-private mechanism.

Every release of a trained tensor goes through the run's ``privacy`` object:

- ``release(client, local, global_, protocol)``: everything ONE batch of a client releases: the
  local carrier gradients (``local``, e.g. u and v) and the global-prompt gradient (``global_``);
  returns a :class:`BatchOutput` (the values to apply / send, and the batch's event, recorded once);
- ``aggregate(contribs)`` (grad protocol): the server's update of p_G from the clients' contributions;
- ``fedavg_contribution(client, p_G, copy)`` / ``aggregate_parameters(p_G, contribs)`` (fedavg).

:class:`Privacy` is the non-private mechanism (identity releases, uniform average over clients).
DP mechanisms (:mod:`dpfpl.privacy.dp`) set ``per_example = True`` to receive per-example
gradients (leading batch dimension), and release through :class:`~dpfpl.privacy.release.BatchMechanism`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..federation import Contribution


@dataclass
class BatchOutput:
    """A batch's released values: ``local`` (name -> mean gradient) and ``global_`` (the global
    gradient contribution: a noised mean, or a clipped sum that the server noises), its weight."""

    local: dict[str, torch.Tensor]
    global_: Optional[torch.Tensor]
    weight: float


class Privacy:
    """No privacy: releases are the plain batch means; the server averages clients uniformly."""

    mode = "none"
    per_example = False
    ledger: Optional[Any] = None

    def attach(self, clients) -> None:
        """Called once the engine has built its clients."""
        self._clients = {c.id: c for c in clients}

    def batch_generator(self, client_id: int, seed: int, key: int = 0) -> torch.Generator:
        """The generator of a client's batch selection (non-private: from the run's seed; ``key``
        starts another stream, e.g. on a resume without saved state)."""
        return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0xBA7C, key]).generate_state(1)[0]))

    @property
    def batch_source(self):
        return None

    def check_round(self, sampled: list[int], steps: int) -> Optional[str]:
        """A reason to stop before the next round (e.g. spent budget), or None to go on."""
        return None

    def release(self, client, local: dict[str, torch.Tensor], global_: Optional[torch.Tensor],
                protocol: str) -> BatchOutput:
        return BatchOutput(local, global_, 1.0)

    def aggregate(self, contribs: list[Contribution]) -> torch.Tensor:
        total = sum(c.weight for c in contribs)
        return sum(c.tensor * c.weight for c in contribs) / total

    def fedavg_contribution(self, client, p_G: torch.Tensor, copy: torch.Tensor) -> Contribution:
        return Contribution(client.id, copy, 1.0, client.n_train)

    def aggregate_parameters(self, p_G: torch.Tensor, contribs: list[Contribution]) -> torch.Tensor:
        return self.aggregate(contribs)

    def end_round(self, round_: int) -> dict[str, Any]:
        """Called after each round; returns privacy metrics for the round's row (eps so far)."""
        return {}

    def summary(self, pld: bool = True) -> dict[str, Any]:
        """Privacy facts for summary.json; ``pld=False`` skips the (slow) PLD epsilon."""
        return {"privacy": self.mode, "epsilon_spent": None}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
