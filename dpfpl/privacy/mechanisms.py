"""Privacy mechanisms at the engine's release points.

:class:`Privacy` is the non-private mechanism (identity releases). The engine calls it at every
release of a trained tensor:

- ``local(client, carrier_grads)``: the gradients that update a client's local prompt;
- ``local_global(client, G)``: a client's gradient of its copy of the global prompt (fedavg);
- ``contribution(client, G)`` / ``fedavg_contribution(client, p_G, copy)``: client -> server;
- ``aggregate(contribs)`` / ``aggregate_parameters(p_G, contribs)``: the server's update.

DP mechanisms subclass it, set ``per_example = True`` to receive per-example gradients
(leading batch dimension), clip, add noise from their own generator, and record every noise draw
in the accountant ledger where it happens.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..federation import Contribution


class Privacy:
    """No privacy: releases are the plain batch means; the server averages clients uniformly."""

    mode = "none"
    per_example = False
    ledger: Optional[Any] = None

    def attach(self, clients) -> None:
        """Called once the engine has built its clients."""
        self._clients = {c.id: c for c in clients}

    def check_round(self, sampled: list[int], steps: int) -> Optional[str]:
        """A reason to stop before the next round (e.g. spent budget), or None to go on."""
        return None

    def local(self, client, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return grads

    def local_global(self, client, G: torch.Tensor) -> torch.Tensor:
        return G

    def contribution(self, client, G: torch.Tensor) -> Contribution:
        return Contribution(client.id, G, 1.0, client.n_train)

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
