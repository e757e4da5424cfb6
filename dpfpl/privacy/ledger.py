"""The privacy ledger: every noise draw of a run as run-length ``(DpEvent, count)`` entries.

Subjects (what a guarantee is about):

- ``client{i}/batch``: one event per step of client i, covering everything that step's batch
  released (local and global parts jointly: :func:`dpfpl.privacy.events.batch_event`), with
  client i's own sampling rate; example-level, the neighbouring relation of the run.
- ``client{i}/server``: the server's client-level DP-FedAvg release as it bears on one example of
  client i (one example can move client i's clipped update by 2C).
- ``server/client_level``: the same releases under add/remove-one-client (sensitivity C): a
  client-level guarantee of the global prompt, reported separately.

View (never recorded): ``client{i}/personalized`` = the composition of all ``client{i}/*`` subjects,
the example-level guarantee of everything released that depends on client i's data.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
from dp_accounting import dp_event

from ..errors import BudgetExhausted, ConfigError
from .accountants import check_supported, epsilon, pld_epsilon, rdp_epsilon
from .events import Composition, EventLike, as_composition, as_event, check_epsilon, event_from_dict, event_key, event_to_dict

__all__ = ["PrivacyLedger"]

#: Relative float slack when comparing an accounted epsilon with a budget (summation order).
BUDGET_SLACK = 1e-9

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

    Subjects and the ``client{i}/personalized`` view: see the module docstring. Recording an
    identical event merges it into the subject's last entry.
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
        if m and m.group(2) in _VIEW_NAMES:
            raise ConfigError(f"{subject!r} is a composed view; record its parts instead")
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ConfigError(f"count must be an integer >= 0, got {count!r}")
        if count == 0:
            return
        event = as_event(event_or_params)
        check_supported(event)  # validates support (warms the RDP cache)
        key = event_key(event)
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

    def composition(self, subjects: Union[str, Sequence[str]]) -> list[tuple[dp_event.DpEvent, int]]:
        """Every ``(event, count)`` recorded under ``subjects`` (a name or a list of names)."""
        subs = [subjects] if isinstance(subjects, str) else list(subjects)
        return [(e.event, e.count) for s in subs for e in self._entries.get(s, [])]

    def rdp_epsilon(self, subjects: Union[str, Sequence[str]], delta: float) -> float:
        """RDP epsilon of the composition of all events of ``subjects``."""
        return rdp_epsilon(self.composition(subjects), delta)

    def pld_epsilon(self, subjects: Union[str, Sequence[str]], delta: float) -> float:
        """PLD epsilon of the composition of all events of ``subjects`` (slower, tighter)."""
        return pld_epsilon(self.composition(subjects), delta)

    def epsilon(self, subjects: Union[str, Sequence[str]], delta: float,
                accountant: str = "rdp") -> float:
        return epsilon(self.composition(subjects), delta, accountant)

    def client_subjects(self) -> dict[str, list[str]]:
        """``{'client3': ['client3/batch', 'client3/server'], ...}``."""
        out: dict[str, list[str]] = defaultdict(list)
        for s in self.subjects:
            m = _CLIENT_SUBJECT.match(s)
            if m:
                out[m.group(1)].append(s)
        return dict(out)

    def epsilon_views(self, delta: float, accountant: str = "rdp") -> dict[str, float]:
        """Epsilon of every subject and of every ``client{i}/personalized`` view."""
        eps = {s: self.epsilon(s, delta, accountant) for s in self.subjects}
        for client, subs in self.client_subjects().items():
            eps[f"{client}/personalized"] = self.epsilon(subs, delta, accountant)
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
        budget = check_epsilon(epsilon_budget, "epsilon budget")
        comp = self.composition(subject_or_subjects) + as_composition(extra_events)
        return epsilon(comp, delta, accountant) > budget * (1 + BUDGET_SLACK)

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
                                         e.get("last_round"), event_key(ev)))
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


