"""Privacy accounting: events, accountants, a per-client ledger, and calibration.

Principle: privacy is counted where noise is added. Every Gaussian draw is a ``DpEvent`` of
``dp_accounting`` (Google, 0.6.0); every epsilon comes from an accountant (RDP, Mironov 2017 /
Mironov-Talwar-Zhang 2019, or PLD, Meiser-Mohammadi 2018 / Koskela et al. 2020, both in
``dp_accounting``); calibration searches over that same accountant. The only closed-form epsilon
in this module is the labelled *claim* of the public DP-FPL code (:func:`reference_sigma`).

Neighbouring relation: add/remove one example (``ADD_OR_REMOVE_ONE``), the relation for which the
Poisson-subsampled Gaussian bound holds.

Sampling. ``sampling="poisson"`` (each example joins a batch independently with probability q)
is accounted with amplification: ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``. Shuffled
fixed-size batches are NOT Poisson sampling and get no amplification here: ``sampling="shuffle"``
or ``"none"`` gives a plain ``GaussianDpEvent(sigma)``. The training mechanisms
(:mod:`dpfpl.privacy.dp`) record one such event per epoch under replace-one (parallel composition
over the epoch's disjoint batches) and no-op events for the epoch's other draws.

dp-accounting logs "_compute_log_a_frac failed to converge" for a few low RDP orders when q is
large and sigma small; it then drops those orders, so the epsilon is still a valid upper bound.
Those messages are silenced below (absl logger set to ERROR).
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import attr
import numpy as np
from dp_accounting import dp_event
import logging

logging.getLogger("absl").setLevel(logging.ERROR)
from dp_accounting import mechanism_calibration as mc
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, compute_epsilon

from ..errors import BudgetExhausted, ConfigError

__all__ = [
    "PLD_DISCRETIZATION", "SAMPLINGS", "EventLike", "Composition",
    "make_event", "epsilon", "rdp_epsilon", "pld_epsilon", "event_to_dict", "event_from_dict",
    "PrivacyLedger", "calibrate_noise_multiplier", "calibrate_split",
    "reference_sigma", "reference_claimed_epsilon", "reference_noise_multiplier",
    "reference_accounted_events", "reference_epsilons",
]

#: PLD value discretisation. 1e-4 matches the anchors to <2e-4 relative (0.3 s per call);
#: 1e-3 is 10x faster but is 4e-3 off at q=256/60000 (2.3905 vs 2.3817).
PLD_DISCRETIZATION = 1e-4
#: ``poisson``: amplified by subsampling; ``none``/``shuffle``: plain Gaussian per release.
SAMPLINGS = ("poisson", "none", "shuffle")
#: Largest noise multiplier calibration will search before declaring a target unreachable.
#: At 1e4 the noise is 10^4 x the clipping bound on every step: nothing useful is learnt beyond
#: it, and dp-accounting's RDP at far larger multipliers sits on its order-1024 floor (eps ~3.5e-3
#: at delta 1e-5) until it drops to 0 by the KL bound, which made the search crawl for unreachable
#: targets (CI timed out on eps=1e-9).
MAX_NOISE_MULTIPLIER = 1e4
#: Smallest noise multiplier calibration will search (below it the target is "no noise needed").
MIN_NOISE_MULTIPLIER = 1e-4
#: Relative float slack when comparing an accounted epsilon with a budget (summation order).
_BUDGET_SLACK = 1e-9

EventLike = Union[dp_event.DpEvent, Mapping[str, Any], float, int, tuple]
Composition = Union[dp_event.DpEvent, Sequence[Union[dp_event.DpEvent, tuple]]]


# ------------------------------------------------------------------------------- validation

def _check_delta(delta: float) -> float:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    return float(delta)


def _check_epsilon(eps: float, name: str = "epsilon") -> float:
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ConfigError(f"{name} must be a positive finite number, got {eps!r}")
    return float(eps)


def _check_rate(q: float, name: str = "sampling rate") -> float:
    if not (isinstance(q, (int, float)) and 0 < q <= 1):
        raise ConfigError(f"{name} must be in (0, 1], got {q!r}")
    return float(q)


def _check_steps(steps: int, name: str = "steps") -> int:
    if isinstance(steps, float) and steps.is_integer():
        steps = int(steps)
    if not (isinstance(steps, (int, np.integer)) and not isinstance(steps, bool) and steps >= 1):
        raise ConfigError(f"{name} must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_noise(nm: float, name: str = "noise multiplier") -> float:
    if not (isinstance(nm, (int, float)) and not isinstance(nm, bool) and nm >= 0
            and math.isfinite(nm)):
        raise ConfigError(f"{name} must be a finite number >= 0, got {nm!r}")
    return float(nm)


def _check_accountant(accountant: str) -> str:
    if accountant not in ("rdp", "pld"):
        raise ConfigError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
    return accountant


# ------------------------------------------------------------------------------- events

def make_event(noise_multiplier: float, sampling_rate: float = 1.0,
               sampling: str = "poisson") -> dp_event.DpEvent:
    """One Gaussian release of a sum of clipped contributions (sensitivity C, std = nm * C).

    ``poisson`` with q < 1: ``PoissonSampledDpEvent(q, GaussianDpEvent(nm))`` (amplified).
    q == 1, ``none`` or ``shuffle``: ``GaussianDpEvent(nm)`` (shuffled fixed-size batches get no
    amplification: the caller records one such event per step). nm == 0: ``NonPrivateDpEvent``
    (eps = inf in both accountants).
    """
    nm = _check_noise(noise_multiplier)
    q = _check_rate(sampling_rate)
    if sampling not in SAMPLINGS:
        raise ConfigError(f"sampling must be one of {list(SAMPLINGS)}, got {sampling!r}")
    if nm == 0:
        return dp_event.NonPrivateDpEvent()
    if sampling == "poisson" and q < 1:
        return dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(nm))
    return dp_event.GaussianDpEvent(nm)


def _as_event(e: EventLike) -> dp_event.DpEvent:
    """A DpEvent from a DpEvent, a ``{'noise_multiplier', 'sampling_rate', 'sampling'}`` or
    serialised-event mapping, a bare noise multiplier, or a ``(nm, q[, sampling])`` tuple."""
    if isinstance(e, dp_event.DpEvent):
        return e
    if isinstance(e, Mapping):
        if "type" in e:
            return event_from_dict(e)
        return make_event(e["noise_multiplier"], e.get("sampling_rate", 1.0),
                          e.get("sampling", "poisson"))
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        return make_event(e)
    if isinstance(e, tuple) and 1 <= len(e) <= 3:
        return make_event(*e)
    raise TypeError(f"cannot read {e!r} as a DpEvent")


def _as_composition(events: Composition) -> list[tuple[dp_event.DpEvent, int]]:
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


def _event_key(event: dp_event.DpEvent) -> str:
    return json.dumps(event_to_dict(event), sort_keys=True)


# ------------------------------------------------------------------------------- accountants

_RDP_CACHE: dict[str, np.ndarray] = {}
_RDP_ORDERS = np.array(DEFAULT_RDP_ORDERS, dtype=float)


def _rdp_curve(event: dp_event.DpEvent) -> np.ndarray:
    """RDP of one occurrence of ``event`` at dp_accounting's default orders (cached)."""
    key = _event_key(event)
    curve = _RDP_CACHE.get(key)
    if curve is None:
        acc = RdpAccountant()  # default orders (1.1 ... 1024), add/remove-one
        if not acc.supports(event):
            raise ConfigError(f"the RDP accountant does not support {event}")
        acc.compose(event)
        curve = acc.rdp
        if len(_RDP_CACHE) > 4096:
            _RDP_CACHE.clear()
        _RDP_CACHE[key] = curve
    return curve


def _rdp_eps_from_counts(counts: Mapping[str, tuple[dp_event.DpEvent, int]], delta: float) -> float:
    if not counts:
        return 0.0
    total = np.zeros_like(_RDP_ORDERS)
    for key in sorted(counts):  # fixed order: reproducible float sums
        ev, n = counts[key]
        total = total + n * _rdp_curve(ev)
    return float(compute_epsilon(_RDP_ORDERS, total, delta)[0])


def _group(comp: Iterable[tuple[dp_event.DpEvent, int]]) -> dict[str, tuple[dp_event.DpEvent, int]]:
    """Sum counts of identical events (composition is commutative)."""
    out: dict[str, tuple[dp_event.DpEvent, int]] = {}
    for ev, n in comp:
        k = _event_key(ev)
        out[k] = (ev, out[k][1] + n) if k in out else (ev, n)
    return out


def rdp_epsilon(events: Composition, delta: float) -> float:
    """Epsilon at ``delta`` of the composition, by dp_accounting's RDP accountant (default
    orders; RDP of k-fold self-composition is k x RDP; conversion of Canonne-Kamath-Steinke 2020
    as implemented in ``compute_epsilon``). 0.0 for an empty composition."""
    return _rdp_eps_from_counts(_group(_as_composition(events)), _check_delta(delta))


def pld_epsilon(events: Composition, delta: float,
                value_discretization_interval: Optional[float] = None) -> float:
    """Epsilon at ``delta`` by dp_accounting's PLD accountant (pessimistic discretisation).

    Plain Gaussian events (q = 1) are first merged into ONE Gaussian with
    1/sigma^2 = sum_i n_i / sigma_i^2 (the exact composition of Gaussian mechanisms, which is
    what the accountant does for ``count``). Interval: :data:`PLD_DISCRETIZATION` (1e-4) when
    subsampled events are present; for a single Gaussian (one discretisation, no composition
    error) 1e-5 x its RDP eps, clamped to [1e-4, 1e-2]: < 1e-5 relative error, fast at large eps.
    """
    delta = _check_delta(delta)
    groups = _group(_as_composition(events))
    if not groups:
        return 0.0
    inv_var, others = 0.0, []
    for key in sorted(groups):
        ev, n = groups[key]
        if isinstance(ev, dp_event.GaussianDpEvent) and ev.noise_multiplier > 0:
            inv_var += n / ev.noise_multiplier ** 2
        else:
            others.append((ev, n))
    if inv_var > 0:
        others.append((dp_event.GaussianDpEvent(1 / math.sqrt(inv_var)), 1))
    if value_discretization_interval is None:
        only_gaussian = len(others) == 1 and isinstance(others[0][0], dp_event.GaussianDpEvent)
        value_discretization_interval = PLD_DISCRETIZATION
        if only_gaussian:  # one PLD, no composition error: scale the grid with eps (RDP bound)
            value_discretization_interval = min(max(1e-5 * rdp_epsilon(others, delta), 1e-4), 1e-2)
    acc = PLDAccountant(value_discretization_interval=value_discretization_interval)
    for ev, n in others:
        if not acc.supports(ev):
            raise ConfigError(f"the PLD accountant does not support {ev}")
        acc.compose(ev, n)
    return float(acc.get_epsilon(delta))


def epsilon(events: Composition, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a list of ``(DpEvent, count)`` compositions, by ``rdp`` or ``pld``."""
    if _check_accountant(accountant) == "rdp":
        return rdp_epsilon(events, delta)
    return pld_epsilon(events, delta)


# ------------------------------------------------------------------------------- ledger

_CLIENT_SUBJECT = re.compile(r"^(client\d+)/(.+)$")
_VIEW_NAMES = ("personalized",)


@dataclass
class _Entry:
    event: dp_event.DpEvent
    count: int
    first_round: Optional[int] = None
    last_round: Optional[int] = None
    key: str = field(default="", repr=False)


class PrivacyLedger:
    """Every noise draw of a run, as run-length ``(event, count)`` entries per subject.

    Subjects are ``"client{i}/local"`` (client i's local prompt noise), ``"client{i}/global"``
    (the global release as it affects client i's data, with client i's sampling rate) and,
    for client-level DP-FedAvg, ``"server/client_level"``. Views (never recorded directly):
    ``global`` = max_i eps(client{i}/global); ``client{i}/personalized`` = composition of all of
    client i's subjects (global + local: the personalised prompt depends on both).
    """

    def __init__(self) -> None:
        self._entries: dict[str, list[_Entry]] = defaultdict(list)
        self.history: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- recording
    def record(self, subject: str, event_or_params: EventLike, count: int = 1,
               round: Optional[int] = None) -> None:
        """Record ``count`` draws of one event under ``subject``; merges with the previous entry
        of that subject when the event is identical."""
        if not isinstance(subject, str) or not subject:
            raise ConfigError(f"subject must be a non-empty string, got {subject!r}")
        m = _CLIENT_SUBJECT.match(subject)
        if subject == "global" or (m and m.group(2) in _VIEW_NAMES):
            raise ConfigError(f"{subject!r} is a composed view; record its parts instead")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ConfigError(f"count must be an integer >= 0, got {count!r}")
        if count == 0:
            return
        event = _as_event(event_or_params)
        _rdp_curve(event)  # validates support (and warms the cache)
        key = _event_key(event)
        entries = self._entries[subject]
        if entries and entries[-1].key == key:
            last = entries[-1]
            last.count += int(count)
            if round is not None:
                last.first_round = round if last.first_round is None else last.first_round
                last.last_round = round
        else:
            entries.append(_Entry(event, int(count), round, round, key))

    # ---------------------------------------------------------------- queries
    @property
    def subjects(self) -> list[str]:
        return sorted(s for s, e in self._entries.items() if e)

    def entries(self, subject: str) -> list[tuple[dp_event.DpEvent, int]]:
        return [(e.event, e.count) for e in self._entries.get(subject, [])]

    def count(self, subject: Optional[str] = None) -> int:
        """Number of recorded noise draws (of one subject, or of all)."""
        subs = self.subjects if subject is None else [subject]
        return sum(e.count for s in subs for e in self._entries.get(s, []))

    def _composition(self, subjects: Union[str, Sequence[str]]) -> list[tuple[dp_event.DpEvent, int]]:
        subs = [subjects] if isinstance(subjects, str) else list(subjects)
        return [(e.event, e.count) for s in subs for e in self._entries.get(s, [])]

    def rdp_epsilon(self, subjects: Union[str, Sequence[str]], delta: float) -> float:
        """RDP epsilon of the composition of all events of ``subjects``."""
        return rdp_epsilon(self._composition(subjects), delta)

    def pld_epsilon(self, subjects: Union[str, Sequence[str]], delta: float) -> float:
        """PLD epsilon of the composition of all events of ``subjects`` (slower, tighter)."""
        return pld_epsilon(self._composition(subjects), delta)

    def epsilon(self, subjects: Union[str, Sequence[str]], delta: float,
                accountant: str = "rdp") -> float:
        return epsilon(self._composition(subjects), delta, accountant)

    def client_subjects(self) -> dict[str, list[str]]:
        """``{'client3': ['client3/global', 'client3/local'], ...}``."""
        out: dict[str, list[str]] = defaultdict(list)
        for s in self.subjects:
            m = _CLIENT_SUBJECT.match(s)
            if m:
                out[m.group(1)].append(s)
        return dict(out)

    def epsilon_views(self, delta: float, accountant: str = "rdp") -> dict[str, float]:
        """Epsilon of every subject, of ``client{i}/personalized`` and of ``global`` (max over
        clients of ``client{i}/global``)."""
        eps = {s: self.epsilon(s, delta, accountant) for s in self.subjects}
        for client, subs in self.client_subjects().items():
            eps[f"{client}/personalized"] = self.epsilon(subs, delta, accountant)
        glob = [v for s, v in eps.items() if s.startswith("client") and s.endswith("/global")]
        if glob:
            eps["global"] = max(glob)
        return eps

    def close_round(self, round: int, delta: float, accountant: str = "rdp") -> dict[str, Any]:
        """Snapshot every subject's and view's epsilon into :attr:`history`; return the row."""
        row = {"round": round, "delta": delta, "accountant": accountant,
               "draws": self.count(), "epsilon": self.epsilon_views(delta, accountant)}
        self.history.append(row)
        return row

    def would_exceed(self, subject_or_subjects: Union[str, Sequence[str]], extra_events: Composition,
                     epsilon_budget: float, delta: float, accountant: str = "rdp") -> bool:
        """True iff composing ``extra_events`` with the subjects' spent budget gives eps above
        ``epsilon_budget`` (relative float slack 1e-9). Call before a release."""
        budget = _check_epsilon(epsilon_budget, "epsilon budget")
        comp = self._composition(subject_or_subjects) + _as_composition(extra_events)
        return epsilon(comp, delta, accountant) > budget * (1 + _BUDGET_SLACK)

    def check_budget(self, subject_or_subjects: Union[str, Sequence[str]], extra_events: Composition,
                     epsilon_budget: float, delta: float, accountant: str = "rdp") -> None:
        """Raise :class:`BudgetExhausted` when :meth:`would_exceed` is true."""
        if self.would_exceed(subject_or_subjects, extra_events, epsilon_budget, delta, accountant):
            raise BudgetExhausted(
                f"releasing more for {subject_or_subjects} would exceed epsilon={epsilon_budget} "
                f"at delta={delta}")

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: events as parameters; a resumed run keeps its spent budget."""
        return {
            "version": 1,
            "entries": {s: [{"event": event_to_dict(e.event), "count": e.count,
                             "first_round": e.first_round, "last_round": e.last_round}
                            for e in es] for s, es in self._entries.items() if es},
            "history": json.loads(json.dumps(self.history)),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != 1:
            raise ConfigError(f"unsupported privacy ledger version {state.get('version')!r}")
        entries: dict[str, list[_Entry]] = defaultdict(list)
        for s, es in state["entries"].items():
            for e in es:
                ev = event_from_dict(e["event"])
                entries[s].append(_Entry(ev, int(e["count"]), e.get("first_round"),
                                         e.get("last_round"), _event_key(ev)))
        self._entries = entries
        self.history = [dict(r) for r in state.get("history", [])]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "PrivacyLedger":
        led = cls()
        led.load_state_dict(state)
        return led

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.state_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        return cls.from_state_dict(json.loads(text))

    def __repr__(self) -> str:
        return f"PrivacyLedger(subjects={len(self.subjects)}, draws={self.count()})"


# ------------------------------------------------------------------------------- calibration

def _composed(parts: Sequence[tuple[dp_event.DpEvent, int]]) -> dp_event.DpEvent:
    return dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(e, n) for e, n in parts])


def _fresh(accountant: str) -> Callable[[], Any]:
    if accountant == "rdp":
        return RdpAccountant
    return lambda: PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def _solve_noise(make_parts: Callable[[float], list[tuple[dp_event.DpEvent, int]]],
                 target: float, delta: float, accountant: str, guess: float = 1.0,
                 rel_tol: float = 1e-4) -> float:
    """Smallest noise multiplier x whose composition ``make_parts(x)`` has eps <= target.

    Brackets by doubling/halving from ``guess`` (eps decreases in x), then
    ``dp_accounting.mechanism_calibration.calibrate_dp_mechanism`` (Brent's method, result
    guaranteed on the private side)."""
    def eps_at(x: float) -> float:
        return epsilon(make_parts(x), delta, accountant)

    x = min(max(guess, MIN_NOISE_MULTIPLIER), MAX_NOISE_MULTIPLIER)
    if eps_at(x) <= target:
        hi, lo = x, x / 2
        while eps_at(lo) <= target:
            hi, lo = lo, lo / 2
            if lo < MIN_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"epsilon={target} is met with noise multiplier below {MIN_NOISE_MULTIPLIER}"
                    ": the target is too loose to calibrate; set the noise multiplier explicitly")
    else:
        lo, hi = x, 2 * x
        while eps_at(hi) > target:
            lo, hi = hi, 2 * hi
            if hi > MAX_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"epsilon={target} at delta={delta} cannot be met with a noise multiplier "
                    f"<= {MAX_NOISE_MULTIPLIER:g}; raise epsilon or delta, or release less")
    return float(mc.calibrate_dp_mechanism(
        _fresh(accountant), lambda v: _composed(make_parts(v)), target, delta,
        mc.ExplicitBracketInterval(lo, hi), tol=rel_tol * lo))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sampling_rate: float,
                               steps: int, sampling: str = "poisson", accountant: str = "rdp",
                               tol: float = 1e-4) -> float:
    """Noise multiplier sigma such that ``steps`` releases of :func:`make_event` (sigma, q)
    have eps(delta) <= target and within 1% of it (``tol``: relative tolerance on sigma).
    PLD calibration is bracketed by the RDP solution (PLD eps <= RDP eps)."""
    target = _check_epsilon(target_epsilon)
    delta = _check_delta(delta)
    q = _check_rate(sampling_rate)
    steps = _check_steps(steps)
    _check_accountant(accountant)
    make_event(1.0, q, sampling)  # validates sampling

    def parts(x: float) -> list[tuple[dp_event.DpEvent, int]]:
        return [(make_event(x, q, sampling), steps)]

    sigma = _solve_noise(parts, target, delta, "rdp", rel_tol=tol)
    if accountant == "pld":
        sigma = _solve_noise(parts, target, delta, "pld", guess=sigma, rel_tol=tol)
    return sigma


def calibrate_split(target_epsilon: float, delta: float, *, local_sampling_rate: float,
                    local_steps: int, global_sampling_rate: float, global_steps: int,
                    budget_split: float = 0.5, sampling: str = "poisson",
                    accountant: str = "rdp", local_releases_per_step: int = 1,
                    tol: float = 0.005) -> tuple[Optional[float], Optional[float]]:
    """(local, global) noise multipliers for a client's personalised prompt.

    Split "in the epsilon sense": sigma_L(t), sigma_G(t) are calibrated alone to eps
    ``split * t`` and ``(1 - split) * t``; the scale t is then searched so that the
    composition (local events + global events, by the accountant) has eps in
    [(1 - tol) * target, target]. Composition is cheaper than the sum, so t > target.
    A side with 0 steps gets ``None`` and the other side the whole target.
    ``local_releases_per_step``: e.g. 2 when u and v are noised separately.
    """
    target = _check_epsilon(target_epsilon)
    delta = _check_delta(delta)
    _check_accountant(accountant)
    if not (isinstance(budget_split, (int, float)) and 0 <= budget_split <= 1):
        raise ConfigError(f"budget_split must be in [0, 1], got {budget_split!r}")
    n_loc = 0 if local_steps == 0 else _check_steps(local_steps, "local steps") * int(local_releases_per_step)
    n_glob = 0 if global_steps == 0 else _check_steps(global_steps, "global steps")
    if n_loc == 0 and n_glob == 0:
        raise ConfigError("calibrate_split: both local and global steps are 0")
    q_l = _check_rate(local_sampling_rate, "local sampling rate")
    q_g = _check_rate(global_sampling_rate, "global sampling rate")
    if n_loc == 0:
        return None, calibrate_noise_multiplier(target, delta, q_g, n_glob, sampling, accountant)
    if n_glob == 0:
        return calibrate_noise_multiplier(target, delta, q_l, n_loc, sampling, accountant), None
    if not 0 < budget_split < 1:
        raise ConfigError(f"budget_split must be strictly between 0 and 1 when both local and "
                          f"global mechanisms release, got {budget_split!r}")

    cache: dict[float, tuple[float, float, float]] = {}
    guesses = [1.0, 1.0]

    def at(t: float) -> tuple[float, float, float]:
        if t not in cache:
            sl = _solve_noise(lambda x: [(make_event(x, q_l, sampling), n_loc)],
                              budget_split * t, delta, "rdp", guesses[0])
            sg = _solve_noise(lambda x: [(make_event(x, q_g, sampling), n_glob)],
                              (1 - budget_split) * t, delta, "rdp", guesses[1])
            guesses[:] = [sl, sg]
            comp = [(make_event(sl, q_l, sampling), n_loc), (make_event(sg, q_g, sampling), n_glob)]
            cache[t] = (sl, sg, epsilon(comp, delta, accountant))
        return cache[t]

    # bracket t: eps(t_lo) <= target < eps(t_hi); eps increases with t
    t = target
    if at(t)[2] <= target:
        t_lo, t_hi = t, None
        while t_hi is None:
            t_new = t_lo * min(max(target / max(at(t_lo)[2], 1e-300), 1.05), 4.0)
            if at(t_new)[2] <= target:
                t_lo = t_new
                if at(t_lo)[2] >= (1 - tol) * target:
                    return at(t_lo)[0], at(t_lo)[1]
            else:
                t_hi = t_new
    else:
        t_hi, t_lo = t, None
        while t_lo is None:
            t_new = t_hi / 1.5
            if at(t_new)[2] <= target:
                t_lo = t_new
            else:
                t_hi = t_new
    for _ in range(60):  # bisection in log t (regula falsi could stall on PLD steps)
        if at(t_lo)[2] >= (1 - tol) * target:
            break
        t_mid = math.sqrt(t_lo * t_hi)
        if at(t_mid)[2] <= target:
            t_lo = t_mid
        else:
            t_hi = t_mid
    sl, sg, e = at(t_lo)
    assert e <= target
    return sl, sg


# ------------------------------------------------------------------------------- reference mode
# The public DP-FPL code's calibration (paper digest, section 4). Its epsilon is a CLAIM.

def reference_sigma(epsilon: float, rounds: int, delta: float) -> float:
    """Public DP-FPL code's rule: sigma = q * sqrt(T log(1/delta)) / eps with q = 1, T = rounds.
    (A closed form, labelled as the code's claim; it is not an accounted epsilon.)"""
    eps = _check_epsilon(epsilon)
    return math.sqrt(_check_steps(rounds, "rounds") * math.log(1 / _check_delta(delta))) / eps


def reference_claimed_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """Inverse of :func:`reference_sigma`: the eps the public code CLAIMS for its sigma."""
    s = _check_noise(sigma, "sigma")
    if s == 0:
        return math.inf
    return math.sqrt(_check_steps(rounds, "rounds") * math.log(1 / _check_delta(delta))) / s


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
    s = _check_noise(sigma, "sigma")
    b = _check_steps(batch_size, "batch size")
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
    r = _check_steps(rounds, "rounds")
    s = _check_steps(steps_per_round, "steps per round")
    n = _check_steps(n_clients, "clients")
    nm_local = reference_noise_multiplier(sigma, batch_size, sensitivity_factor)
    # server: std = (sigma C / B) / N on the mean of N clipped means (sensitivity 2C/N)
    nm_global = (sigma / batch_size / n) / (sensitivity_factor / n)
    g = s if global_releases_per_round is None else int(global_releases_per_round)
    if epochs is None:
        n_local, n_glob = r * s * int(local_releases_per_step), r * g
    else:
        e = min(_check_steps(epochs, "epochs"), r * s)
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
    return claimed, epsilon_fn(events[view], delta, accountant)


epsilon_fn = epsilon  # alias: ``reference_epsilons`` shadows ``epsilon`` with its argument
