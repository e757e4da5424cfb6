"""The public DP-FPL code's calibration (paper digest, section 4), kept as a labelled CLAIM.

Its epsilon is a closed form the code asserts (:func:`reference_sigma`), not an accounted value;
:func:`reference_accounted_events` describes the mechanism that code really runs so that our
accountant (and the audits) can say what it spends.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from dp_accounting import dp_event

from ..errors import ConfigError
from .accountants import epsilon as _accounted
from .events import check_delta, check_epsilon, check_noise, check_steps, make_event

__all__ = ["reference_sigma", "reference_claimed_epsilon", "reference_noise_multiplier",
           "reference_accounted_events", "reference_epsilons"]


def reference_sigma(epsilon: float, rounds: int, delta: float) -> float:
    """Public DP-FPL code's rule: sigma = q * sqrt(T log(1/delta)) / eps with q = 1, T = rounds.
    (A closed form, labelled as the code's claim; it is not an accounted epsilon.)"""
    eps = check_epsilon(epsilon)
    return math.sqrt(check_steps(rounds, "rounds") * math.log(1 / check_delta(delta))) / eps


def reference_claimed_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Inverse of :func:`reference_sigma`: the eps the public code CLAIMS for its sigma."""
    s = check_noise(sigma, "sigma")
    if s == 0:
        return math.inf
    return math.sqrt(check_steps(rounds, "rounds") * math.log(1 / check_delta(delta))) / s


def reference_noise_multiplier(sigma: float, batch_size: int, sensitivity_factor: float = 2.0) -> float:
    """Noise multiplier the public code really applies, relative to the true sensitivity.

    The code clips the batch-MEAN gradient g_bar to norm C and adds N(0, (sigma C / B)^2),
    i.e. it assumes sensitivity C / B (true only for per-example clipping). Without per-example
    clipping one example's gradient is unbounded, so adding/removing (or replacing) it can move
    the mean anywhere, and its clipped value anywhere in the C-ball: the sensitivity is
    ``2C`` under add/remove-one AND replace-one (two antipodal points of the ball). Hence
    nm = (sigma C / B) / (2C) = sigma / (2B). ``sensitivity_factor=1`` gives the optimistic
    ``C`` ("of order C") and nm = sigma / B. The same holds for the server's release: the mean
    over N clients of clipped global gradients has sensitivity 2C/N and noise std
    sigma C / (B N), the same nm.
    """
    s = check_noise(sigma, "sigma")
    b = check_steps(batch_size, "batch size")
    if not sensitivity_factor > 0:
        raise ConfigError(f"sensitivity_factor must be positive, got {sensitivity_factor!r}")
    return s / (sensitivity_factor * b)


def reference_accounted_events(sigma: float, batch_size: int, steps_per_round: int, rounds: int,
                               n_clients: int, sensitivity_factor: float = 2.0,
                               local_releases_per_step: int = 2,
                               global_releases_per_round: Optional[int] = None,
                               epochs: Optional[int] = None,
                               ) -> dict[str, list[tuple[dp_event.DpEvent, int]]]:
    """Events the public code REALLY runs, for one client (see :func:`reference_noise_multiplier`).

    Noise is drawn on every minibatch of every round (``rounds * steps_per_round``), for u and v
    separately (``local_releases_per_step=2``; 1 for a full-rank local prompt), and the server
    noises the global gradient average ``global_releases_per_round`` times a round (default:
    every step). Batches are shuffled fixed-size batches: no amplification, each release a plain
    Gaussian.

    ``epochs=None``: every draw counts for every example (valid under add/remove-one, where
    adding an example reshuffles all batches). ``epochs=E`` (the passes over the client's data,
    ``ceil(rounds * steps_per_round * B / n)``): replace-one, where an epoch's batches partition the
    data, so by parallel composition an example is exposed once per epoch per mechanism: E
    releases of each (the tightest honest count, and what the engine records in reference mode).
    Returns ``{'local': ..., 'global': ..., 'personalized': ...}``.
    """
    r = check_steps(rounds, "rounds")
    s = check_steps(steps_per_round, "steps per round")
    n = check_steps(n_clients, "clients")
    nm_local = reference_noise_multiplier(sigma, batch_size, sensitivity_factor)
    # server: std = (sigma C / B) / N on the mean of N clipped means (sensitivity 2C/N)
    nm_global = (sigma / batch_size / n) / (sensitivity_factor / n)
    g = s if global_releases_per_round is None else int(global_releases_per_round)
    if epochs is None:
        n_local, n_glob = r * s * int(local_releases_per_step), r * g
    else:
        e = min(check_steps(epochs, "epochs"), r * s)
        n_local, n_glob = e * int(local_releases_per_step), (e if g > 0 else 0)
    local = [(make_event(nm_local, 1.0, "none"), n_local)]
    glob = [(make_event(nm_global, 1.0, "none"), n_glob)] if n_glob > 0 else []
    return {"local": local, "global": glob, "personalized": local + glob}


def reference_epsilons(epsilon: float, rounds: int, delta: float, batch_size: int,
                       steps_per_round: int, n_clients: int, view: str = "personalized",
                       accountant: str = "rdp", **kw: Any) -> tuple[float, float]:
    """(claimed_eps, accounted_eps) of the public code run at nominal ``epsilon``: the claim is
    :func:`reference_claimed_epsilon` of :func:`reference_sigma` (= ``epsilon``); the accounted
    value composes :func:`reference_accounted_events` ``[view]`` with the accountant."""
    sigma = reference_sigma(epsilon, rounds, delta)
    claimed = reference_claimed_epsilon(sigma, rounds, delta)
    events = reference_accounted_events(sigma, batch_size, steps_per_round, rounds, n_clients, **kw)
    if view not in events:
        raise ConfigError(f"view must be one of {list(events)}, got {view!r}")
    return claimed, _accounted(events[view], delta, accountant)
