"""Run a dpfpl training run through Flower's simulation engine (``dpfpl train --engine flower``).

:func:`run_flower` takes the same arguments as :func:`dpfpl.train.train` and writes the same run
directory and ``summary.json``. It starts Ray on loopback with its temporary files inside the run
directory (``RUN_DIR/.ray``, reached through a short symbolic link because Ray's socket paths must
stay under 107 bytes; removed after a successful run unless ``keep_ray_dir``), then runs
:data:`dpfpl.flower.apps.client_app` on ``num_clients`` virtual SuperNodes and a ServerApp whose
:class:`~dpfpl.flower.apps.DPFPLStrategy` drives the rounds.

The server never sees data or the model: it holds p_G, its optimiser and sampling generator (a
:class:`dpfpl.federation.Server`), the server-side privacy mechanism (global noise generator,
accountant ledger), and a :class:`ClientRecord` per client: the client's split (ids only, for the
run directory's membership file), its last reported state snapshot (for the checkpoint and
prompts) and its sampler position (for the accountant). :class:`FlowerEngine` bundles them with
the attributes :class:`~dpfpl.rundir.RunDir` and :func:`~dpfpl.train.summarize` read, so both
engines share the run-directory code.

Ledger: events recorded where the noise is drawn. Client-side subjects (``client{i}/local``, and
``client{i}/global`` under the fedavg protocol) are reported by each client as its cumulative
ledger with every reply; server-side subjects (``client{i}/global`` under the grad protocol,
``server/client_level``) are recorded by the server's mechanism. :meth:`FlowerEngine.sync_privacy`
assembles the two before every budget check, round end and summary.
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..config import RunConfig
from ..data.partition import ClientData
from ..engine import EngineRecord, build_privacy
from ..errors import ConfigError, DpfplError
from ..federation import Client, Server, TrainSettings
from ..registry import get_method
from ..rundir import RunDir
from ..sampling import BatchSampler

FLOWER_HINT = "pip install 'dpfpl[flower]'"
_SUBJECT = re.compile(r"^client(\d+)/(batch|server)$")


# ---------------------------------------------------------------------------------------- setup
def flwr_available() -> bool:
    return importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray") is not None


def require_flwr() -> None:
    """Raise a DpfplError with the install command when Flower or Ray is missing."""
    for mod in ("flwr", "ray"):
        if importlib.util.find_spec(mod) is None:
            raise DpfplError(f"--engine flower needs Flower with its simulation extra ({mod} is not "
                             f"installed): {FLOWER_HINT}")


@dataclass(frozen=True)
class Fault:
    """An injected fault (tests and drills).

    Client ``client`` fails operation ``op`` ('train', 'evaluate' or 'state') in dpfpl round
    ``round`` (1-based) at local step ``step`` (0-based, grad protocol; None: any) on
    its first ``attempts`` attempts. ``kind='raise'``: the ClientApp raises before doing anything
    (Flower then keeps the node's previous context state: nothing was released); ``kind='drop'``:
    the ClientApp runs and commits its state, but the server discards the reply (a lost reply:
    the client's releases happened and are counted when it next reports).
    """

    client: int
    round: int
    step: Optional[int] = None
    op: str = "train"
    kind: str = "raise"
    attempts: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("raise", "drop"):
            raise ConfigError(f"Fault.kind={self.kind!r}: expected 'raise' or 'drop'")
        if self.op not in ("train", "evaluate", "state"):
            raise ConfigError(f"Fault.op={self.op!r}: expected train, evaluate or state")

    def matches(self, op: str, client: int, round_: int, step: Optional[int], attempt: int) -> bool:
        return (op == self.op and client == self.client and round_ == self.round and attempt < self.attempts
                and (self.step is None or step is None or step == self.step))


@dataclass
class FaultPolicy:
    """What the server does when clients fail or drop.

    Every request (a local step, a FedAvg round, an evaluation) that fails or gets no reply within
    ``timeout`` seconds is retried ``retries`` times. A sampled client that still fails is dropped
    for the rest of the round (asked again when next sampled). A step proceeds with the replies
    received when they are at least ``min_fraction`` of the clients sampled for the round (at least
    one); otherwise training stops cleanly with ``stopped_reason`` saying which clients failed.
    """

    min_fraction: float = 0.5
    retries: int = 1
    timeout: float = 3600.0
    node_timeout: float = 300.0  # waiting for the SuperNodes to connect

    def __post_init__(self) -> None:
        if not 0 < self.min_fraction <= 1:
            raise ConfigError(f"min_fraction must be in (0, 1], got {self.min_fraction!r}")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries!r}")
        if not self.timeout > 0:
            raise ConfigError(f"timeout must be positive, got {self.timeout!r}")

    def minimum(self, sampled: int) -> int:
        return max(1, math.ceil(self.min_fraction * sampled - 1e-9))


# -------------------------------------------------------------------------------- server mirror
class ClientRecord:
    """The server's record of one remote client (duck-types the parts of
    :class:`dpfpl.federation.Client` that the run directory, the summary and the privacy mechanism
    read): its split, its last reported state snapshot and its sampler position."""

    personal_context = Client.personal_context

    def __init__(self, data: ClientData, method, settings: TrainSettings):
        self.id = int(data.client_id)
        self.data, self.method = data, method
        self.train_idx = torch.as_tensor(data.train_idx, dtype=torch.long)
        self.sampler = BatchSampler(max(len(self.train_idx), 1), settings.batch_size, settings.sampling,
                                    torch.Generator())
        self.last_local_idx = torch.zeros(0, dtype=torch.long)
        self.snapshot: dict[str, Any] = {}

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def local(self) -> dict[str, torch.Tensor]:
        return self.snapshot["client"]["local"]

    @property
    def used(self) -> torch.Tensor:
        return self.snapshot["client"]["used"]

    @property
    def steps(self) -> int:
        return int(self.snapshot["client"]["steps"])

    def state_dict(self) -> dict[str, Any]:
        return self.snapshot["client"]

    def observe(self, pos: int, epochs: int, has_perm: bool, batch_len: int) -> None:
        """Sampler position after the client's last step (shuffle-mode accounting, budget checks)."""
        self.sampler.pos, self.sampler.epochs = int(pos), int(epochs)
        if has_perm and self.sampler.perm is None:
            self.sampler.perm = torch.zeros(0, dtype=torch.long)  # only "started an epoch" matters here
        elif not has_perm:
            self.sampler.perm = None
        self.last_local_idx = torch.zeros(int(batch_len), dtype=torch.long)


class FlowerEngine(EngineRecord):
    """The federation as the server sees it; duck-types :class:`dpfpl.engine.Engine` for
    :class:`~dpfpl.rundir.RunDir`, :func:`~dpfpl.train.summarize` and progress callbacks.

    Built from the clients' hello replies: each client's split, the dataset name, the protocol,
    local steps and zero-shot accuracies, and the server's initial state (p_G, optimiser, sampling
    generator) as every client's copy of the in-process engine builds it (the clients must agree).
    """

    engine_name = "flower"

    def __init__(self, cfg: RunConfig, clients_data: list[ClientData], dataset_name: str, protocol: str,
                 local_steps: int, server_state: dict[str, Any], zeroshot: dict[str, Any]):
        t, d = cfg.train, cfg.data
        self.cfg = cfg
        self.method = get_method(t.method)(rank=t.rank, ctx_init_std=t.ctx_init_std)
        self.protocol, self.local_steps = protocol, int(local_steps)
        self.clients_data = clients_data
        self.dataset_name = dataset_name
        sampling = cfg.batch_sampling
        self.settings = TrainSettings(t.lr, t.momentum, t.weight_decay, t.batch_size, sampling, t.n_ctx)
        self.privacy = build_privacy(cfg, self)
        self.server = Server(server_state["p_G"], self.settings, t.global_lr or t.lr, d.num_clients,
                             t.client_fraction, self.privacy, seed=0)
        self.server.load_state_dict(server_state)
        self.clients = [ClientRecord(cd, self.method, self.settings) for cd in clients_data]
        self.privacy.attach(self.clients)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.stopped_reason: Optional[str] = None
        self._zeroshot = zeroshot
        self.restore_private: dict[int, dict[str, Any]] = {}
        self.privacy.owns_client_generators = False  # the clients' generators live in the ClientApps
        # accounting of client-side releases
        self.reports: dict[int, dict[str, Any]] = {}  # cid -> {"entries", "draws", "steps"}
        self.lost_steps: dict[int, int] = defaultdict(int)  # steps whose reply never came, unconfirmed
        self._injected_draws = 0

    # ------------------------------------------------------------------ Engine interface
    @property
    def total_rounds(self) -> int:
        return self.cfg.train.rounds if self.method.trainable else 0

    @property
    def zeroshot(self) -> dict[str, Any]:
        return self._zeroshot

    def state_dict(self) -> dict[str, Any]:
        self.sync_privacy()
        return super().state_dict()

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """Load a checkpoint (of either engine); client snapshots then go back to the clients."""
        self.round = s["round"]
        self.server.load_state_dict(s["server"])
        self.privacy.load_state_dict(s["privacy"])
        self.history = list(s["history"])
        self.stopped_reason = s.get("stopped_reason")
        ledger = self.privacy.ledger.state_dict() if self.privacy.ledger is not None else None
        # reproducible noise from an in-process checkpoint: hand each client back its own generators
        gens = s["privacy"].get("client_gens") if isinstance(s.get("privacy"), dict) else None
        self.restore_private = {c.id: {"noise_gen": gens[c.id] if c.id in gens else gens[str(c.id)],
                                       "batch_gen": cs["sampler"].get("gen")}
                                for c, cs in zip(self.clients, s["clients"])
                                if gens and cs["sampler"].get("gen") is not None}
        for c, cs in zip(self.clients, s["clients"]):
            snap = {"client": cs, "draws": 0,
                    "ledger": None if ledger is None else {
                        "version": ledger["version"], "history": [],
                        "entries": {k: v for k, v in ledger["entries"].items() if self._client_subject(k) == c.id}}}
            self.set_snapshot(c.id, snap)
        # the restored draws are the server's own from now on (clients restart their counters at 0)
        self._injected_draws = 0

    def membership(self) -> dict[str, Any]:
        return {"dataset": self.dataset_name, "split": "train", "clients": [
            {"client_id": c.id, "assigned": [int(i) for i in c.train_idx],
             "used": [int(i) for i in c.train_idx[c.used]], "classes": [int(k) for k in c.data.classes]}
            for c in self.clients]}

    # ------------------------------------------------------------------ client reports
    def set_snapshot(self, cid: int, snap: dict[str, Any]) -> None:
        """A client's full state snapshot (checkpoint, prompts, membership, noise generator)."""
        rec = self.clients[cid]
        rec.snapshot = snap
        rec.sampler.load_state_dict(snap["client"]["sampler"])
        if snap.get("ledger") is not None:
            self.report_ledger(cid, snap["ledger"], int(snap.get("draws", 0)), rec.steps)

    def report_ledger(self, cid: int, ledger: dict[str, Any], draws: int, steps: int) -> None:
        """A client's cumulative client-side ledger (exact: it supersedes unconfirmed steps)."""
        prev = self.reports.get(cid)
        if prev is None or steps >= prev["steps"]:
            self.reports[cid] = {"entries": ledger.get("entries", {}), "draws": int(draws), "steps": int(steps)}
            self.lost_steps[cid] = 0

    def _client_subject(self, subject: str) -> Optional[int]:
        """The client id if ``subject`` is recorded where that client runs, else None."""
        m = _SUBJECT.match(subject)
        if not m:
            return None
        if m.group(2) == "batch":  # a batch's event is recorded by the client that drew the batch
            return int(m.group(1))
        return None

    def _planned_entries(self, cid: int, steps: int) -> dict[str, list[dict[str, Any]]]:
        """Upper bound on the client-side events of ``steps`` unconfirmed steps (a reply that never
        came and no later report): the client's own batch mechanism's event for every step (each
        step counted as starting an epoch under shuffled batches)."""
        from ..privacy.events import event_to_dict

        p = self.privacy
        if steps <= 0 or p.ledger is None or not hasattr(p, "mechanisms") or not p.mechanisms[cid].releases:
            return {}
        ev = p.mechanisms[cid].joint_event
        return {f"client{cid}/batch": [{"event": event_to_dict(ev), "count": steps, "first_round": None,
                                         "last_round": None}]}

    def unconfirmed(self) -> list[int]:
        return sorted(c for c, n in self.lost_steps.items() if n > 0)

    def sync_privacy(self) -> None:
        """Assemble the ledger: the server's own subjects + every client's last cumulative report
        (+ an upper bound for steps whose reply never came); draws and client noise generators."""
        p = self.privacy
        if p.ledger is None:
            return
        st = p.ledger.state_dict()
        server_side = {s: es for s, es in st["entries"].items() if self._client_subject(s) is None}
        entries: dict[str, list[dict[str, Any]]] = {}  # client-side subjects first, as the in-process order
        pending_draws = 0
        for cid in sorted(set(self.reports) | set(self.unconfirmed())):
            rep = self.reports.get(cid, {"entries": {}})
            for s, es in rep["entries"].items():
                if self._client_subject(s) == cid:
                    entries[s] = list(es)
            for s, es in self._planned_entries(cid, self.lost_steps.get(cid, 0)).items():
                entries[s] = entries.get(s, []) + es
                pending_draws += sum(e["count"] for e in es)
        entries.update(server_side)
        st["entries"] = entries
        p.ledger.load_state_dict(st)
        own = p.draws - self._injected_draws
        self._injected_draws = sum(r["draws"] for r in self.reports.values()) + pending_draws
        p.draws = own + self._injected_draws


# ------------------------------------------------------------------------------------ the job
@dataclass
class Job:
    """Everything the ServerApp needs for one run (shared between the caller and the server thread)."""

    cfg: RunConfig
    rd: Optional[RunDir] = None
    checkpoint: Optional[dict[str, Any]] = None
    resume: Optional[str] = None
    callbacks: tuple = ()
    on_status: Optional[Callable[[str], None]] = None
    on_step: Optional[Callable[[int, int], None]] = None
    policy: FaultPolicy = field(default_factory=FaultPolicy)
    faults: tuple = ()
    model_init_seed: Optional[int] = 0
    client_threads: int = 1
    t0: float = field(default_factory=time.perf_counter)
    abort: threading.Event = field(default_factory=threading.Event)
    stats: dict[str, Any] = field(default_factory=dict)
    engine: Optional[FlowerEngine] = None
    summary: Optional[dict[str, Any]] = None

    def status(self, msg: str) -> None:
        if self.on_status:
            self.on_status(msg)
