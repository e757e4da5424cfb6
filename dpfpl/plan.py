"""What an engine will run, from the config and the partition alone (no model loaded).

:func:`plan_engine` is the one place that decides the aggregation protocol and the number of
local steps per round; :class:`dpfpl.engine.Engine` uses it, and so does everything that needs
the privacy mechanism of a run without training it (the mechanism audit rebuilding a run's
releases, the tightness table building a recipe's): :func:`dpfpl.privacy.dp.build_dp_privacy`
reads exactly these four fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .config import RunConfig
from .errors import ConfigError

__all__ = ["EnginePlan", "effective_protocol", "plan_engine"]


@dataclass(frozen=True)
class EnginePlan:
    """The fields of an engine that privacy construction reads."""

    method: Any                 # a dpfpl.methods.Method instance
    protocol: str               # "grad" | "fedavg"
    clients_data: Sequence[Any]  # each with .client_id and .train_idx
    local_steps: int


def effective_protocol(protocol: Optional[str], method: Any) -> str:
    """The configured protocol or the method's default; ``fedavg`` without a global prompt is
    ``grad`` (nothing to average)."""
    p = protocol or method.default_protocol
    return "grad" if p == "fedavg" and not method.uses_global else p


def plan_engine(cfg: RunConfig, clients_data: Sequence[Any], method: Any = None) -> EnginePlan:
    """The plan of a run of ``cfg`` on ``clients_data``: ``method`` (default: built from the
    config), the effective protocol, and ``train.local_steps`` or one pass over the mean client's
    data per round (ceil(mean n_i / B), at least 1)."""
    t = cfg.train
    if method is None:
        from .registry import get_method

        method = get_method(t.method)(rank=t.rank, ctx_init_std=t.ctx_init_std)
    if not clients_data:
        raise ConfigError("plan_engine: no clients")
    n_mean = sum(len(c.train_idx) for c in clients_data) / len(clients_data)
    return EnginePlan(method=method, protocol=effective_protocol(t.protocol, method), clients_data=clients_data,
                      local_steps=t.local_steps or max(1, math.ceil(n_mean / t.batch_size)))
