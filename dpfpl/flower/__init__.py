"""dpfpl on Flower: the same clients, server, privacy mechanisms and accountant as Flower apps.

- :func:`run_flower` (``dpfpl train --engine flower``): runs a training run through Flower's
  simulation engine (Ray backend, on loopback, Ray's temporary files inside the run directory) and
  writes the same run directory and ``summary.json`` as the in-process engine.
- :mod:`dpfpl.flower.apps`: ``client_app`` (one dpfpl Client per SuperNode, its state in the
  node's ``context.state``), ``server_app`` (for ``flwr run``) and :class:`DPFPLStrategy`, which
  drives dpfpl rounds over a Flower ``Grid``.

Flower is optional (``pip install 'dpfpl[flower]'``); importing this package does not import it.
See ``dpfpl/flower/README.md`` for the protocol mapping, the communication cost and the fault
policy.
"""

from __future__ import annotations

import os

# no telemetry, no usage reports, no update checks: these runs never leave the machine. Flower reads
# FLWR_TELEMETRY_ENABLED when it is first imported, so set it before any flwr import.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

from .engine import Fault, FaultPolicy, FlowerEngine, flwr_available, require_flwr  # noqa: E402
from .run import run_flower  # noqa: E402

__all__ = ["Fault", "FaultPolicy", "FlowerEngine", "flwr_available", "require_flwr", "run_flower"]
