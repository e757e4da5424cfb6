"""Privacy events: what one release (or one batch's joint release) costs, as dp-accounting data.

A mechanism is described by ``dp_accounting.dp_event`` objects (Google's dp-accounting 0.6.0): a
tree of events that a tested accountant turns into epsilon. This module builds the events the
suite's mechanisms run and (de)serialises them as plain JSON.

Units: a noise multiplier here is what the *accountant* sees: the noise std divided by the
sensitivity of the released sum (``applied multiplier / sensitivity factor``).

One batch, one event. When one batch feeds several Gaussian releases (DP-FPL's local u, v release
and its global-prompt release), the joint release of the vector of all of them is ONE Gaussian
mechanism: the privacy loss of (x_1 + N(0, s_1^2), ..., x_k + N(0, s_k^2)) with each x_j moving by at
most its sensitivity is that of one Gaussian with multiplier s, s^-2 = sum_j s_j^-2 (the Mahalanobis
norm of the mean shift), so a Poisson-sampled batch costs
``PoissonSampledDpEvent(q, GaussianDpEvent(s))`` (:func:`joint_noise_multiplier`, :func:`batch_event`).
Counting the parts as independent Poisson-subsampled releases under-counts: each part would get the
amplification of its own sample, although all parts share one.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence, Union

import attr
import numpy as np
from dp_accounting import dp_event

from ..errors import ConfigError

__all__ = [
    "SAMPLINGS", "EventLike", "Composition", "make_event", "joint_noise_multiplier", "batch_event",
    "event_to_dict", "event_from_dict", "event_key", "as_composition",
]

#: ``poisson``: amplified by subsampling; ``none``/``shuffle``: plain Gaussian per release.
SAMPLINGS = ("poisson", "none", "shuffle")

EventLike = Union[dp_event.DpEvent, Mapping[str, Any], float, int, tuple]
Composition = Union[dp_event.DpEvent, Sequence[Union[dp_event.DpEvent, tuple]]]


# ------------------------------------------------------------------------------- validation
def check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def check_epsilon(eps: float, name: str = "epsilon") -> float:
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ConfigError(f"{name} must be a positive finite number, got {eps!r}")
    return float(eps)


def check_rate(q: float, name: str = "sampling rate") -> float:
    if not (isinstance(q, (int, float)) and 0 < q <= 1):
        raise ConfigError(f"{name} must be in (0, 1], got {q!r}")
    return float(q)


def check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    if not (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps >= 1):
        raise ConfigError(f"{name} must be an integer >= 1, got {steps!r}")
    return int(steps)


def check_noise(nm: float, name: str = "noise multiplier") -> float:
    if not (isinstance(nm, (int, float)) and not isinstance(nm, bool) and nm >= 0 and math.isfinite(nm)):
        raise ConfigError(f"{name} must be a finite number >= 0, got {nm!r}")
    return float(nm)


def check_accountant(accountant: str) -> str:
    if accountant not in ("rdp", "pld"):
        raise ConfigError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    return accountant


# ------------------------------------------------------------------------------- events
def make_event(noise_multiplier: float, sampling_rate: float = 1.0, sampling: str = "poisson") -> dp_event.DpEvent:
    """One Gaussian release of a sum of sensitivity 1 with noise std ``noise_multiplier``.

    ``poisson`` with q < 1: ``PoissonSampledDpEvent(q, GaussianDpEvent(nm))`` (amplified).
    q == 1, ``none`` or ``shuffle``: ``GaussianDpEvent(nm)``. nm == 0: ``NonPrivateDpEvent``
    (eps = inf in both accountants).
    """
    nm = check_noise(noise_multiplier)
    q = check_rate(sampling_rate)
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
    if nm == 0:
        return dp_event.NonPrivateDpEvent()
    if sampling == "poisson" and q < 1:
        return dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(nm))
    return dp_event.GaussianDpEvent(nm)


def joint_noise_multiplier(multipliers: Sequence[float]) -> float:
    """s with s^-2 = sum_j s_j^-2: the one Gaussian equivalent to releasing every part at once
    (each part's multiplier already relative to its own sensitivity). 0 if any part has no noise."""
    ms = [check_noise(m) for m in multipliers]
    if not ms:
        raise ConfigError("a joint release needs at least one part")
    if any(m == 0 for m in ms):
        return 0.0
    return 1.0 / math.sqrt(sum(1.0 / m ** 2 for m in ms))


def batch_event(multipliers: Sequence[float], sampling_rate: float, sampling: str) -> dp_event.DpEvent:
    """The ONE event of a batch whose releases have accountant multipliers ``multipliers``."""
    return make_event(joint_noise_multiplier(multipliers), sampling_rate, sampling)


def _as_event(e: EventLike) -> dp_event.DpEvent:
    if isinstance(e, dp_event.DpEvent):
        return e
    if isinstance(e, Mapping):
        if "type" in e:
            return event_from_dict(e)
        return make_event(e["noise_multiplier"], e.get("sampling_rate", 1.0), e.get("sampling", "poisson"))
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        return make_event(e)
    if isinstance(e, tuple) and 1 <= len(e) <= 3:
        return make_event(*e)
    raise TypeError(f"cannot read {e!r} as a DpEvent")


as_event = _as_event


def as_composition(events: Composition) -> list[tuple[dp_event.DpEvent, int]]:
    """Normalise ``event`` / ``[event, (event, count), ...]`` to ``[(event, count), ...]``."""
    if isinstance(events, dp_event.DpEvent):
        return [(events, 1)]
    out = []
    for item in events:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], dp_event.DpEvent):
            ev, n = item
        else:
            ev, n = _as_event(item), 1
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"event count must be an integer >= 0, got {n!r}")
        if n:
            out.append((ev, int(n)))
    return out


def event_to_dict(event: dp_event.DpEvent) -> dict[str, Any]:
    """Plain JSON-able form of a DpEvent: ``{'type': ClassName, field: value, ...}``."""
    def conv(v: Any) -> Any:
        if isinstance(v, dp_event.DpEvent):
            return event_to_dict(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v
    out: dict[str, Any] = {"type": type(event).__name__}
    for a in attr.fields(type(event)):
        out[a.name] = conv(getattr(event, a.name))
    return out


def event_from_dict(d: Mapping[str, Any]) -> dp_event.DpEvent:
    """Inverse of :func:`event_to_dict` (only classes of ``dp_accounting.dp_event``)."""
    cls = getattr(dp_event, str(d.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
        raise ConfigError(f"unknown DpEvent type {d.get('type')!r}")

    def conv(v: Any) -> Any:
        if isinstance(v, Mapping) and "type" in v:
            return event_from_dict(v)
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v
    return cls(**{k: conv(v) for k, v in d.items() if k != "type"})


def event_key(event: dp_event.DpEvent) -> str:
    return json.dumps(event_to_dict(event), sort_keys=True)


def group(comp: Sequence[tuple[dp_event.DpEvent, int]]) -> dict[str, tuple[dp_event.DpEvent, int]]:
    """Sum counts of identical events (composition is commutative)."""
    out: dict[str, tuple[dp_event.DpEvent, int]] = {}
    for ev, n in comp:
        k = event_key(ev)
        out[k] = (ev, out[k][1] + n) if k in out else (ev, n)
    return out
