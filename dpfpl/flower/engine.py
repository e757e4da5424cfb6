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
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import RunConfig
from ..data.partition import ClientData
from ..engine import EngineRecord, build_privacy
from ..errors import ConfigError, DpfplError
from ..federation import Client, Server, TrainSettings
from ..methods import get_method
from ..rundir import RunDir
from ..train import finished_noop, open_run
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


# ------------------------------------------------------------------------------- resources
def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _model_bytes(cfg: RunConfig) -> int:
    """Rough size of the frozen model's weights (for the memory check)."""
    p = cfg.model.pretrained
    try:
        if p == "builtin":
            from ..pretrain import ASSET_DIR

            f = Path(ASSET_DIR) / f"{cfg.model.model}.safetensors"
            if f.is_file():
                return f.stat().st_size
        elif p and Path(p).is_file():
            return Path(p).stat().st_size
        from ..clip import _open_clip

        mc = _open_clip().get_model_config(cfg.model.model) or {}
        n = 0
        for key in ("vision_cfg", "text_cfg"):
            c = mc.get(key, {})
            w, layers = int(c.get("width", 512)), int(c.get("layers", 12))
            n += 12 * layers * w * w + int(c.get("vocab_size", 0)) * w
        return 4 * n
    except Exception:  # noqa: BLE001 - an estimate only
        return 0


ACTOR_BASE_BYTES = 900 * 2**20  # a Ray worker with torch, open_clip and flwr imported (measured ~0.7 GiB)


def plan_resources(cfg: RunConfig, n_images: int, client_cpus: float, num_cpus: Optional[int],
                   client_gpus: float) -> tuple[int, int, str]:
    """(Ray CPUs, actors, note). Raises ConfigError when the resources cannot hold one client."""
    if not client_cpus > 0:
        raise ConfigError(f"client_cpus must be positive, got {client_cpus!r}")
    cpus = int(num_cpus or os.cpu_count() or 1)
    if client_cpus > cpus:
        raise ConfigError(f"the Ray resources cannot hold one client: each ClientApp asks for {client_cpus} CPUs "
                          f"but this machine gives Ray {cpus}; lower the client CPUs (e.g. client_cpus=1)")
    if client_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"each ClientApp asks for {client_gpus} GPUs but no CUDA GPU is visible; "
                          "use client_gpus=0 (CPU) or run on a machine with a GPU")
    n = cfg.data.num_clients
    actors = max(1, min(int(cpus // client_cpus), n))  # more actors than clients would only load models
    note = ""
    mem = _mem_available()
    if mem is not None:
        per_actor = ACTOR_BASE_BYTES + 2 * _model_bytes(cfg) + n_images * 1024 * 4
        per_client = 64 * 1024 + 3 * cfg.train.n_ctx * 1024 * 4  # context state held by the simulation
        budget = int(0.85 * mem) - n * per_client - 2**30  # the driver process
        fit = budget // per_actor if budget > 0 else 0
        if fit < 1:
            raise ConfigError(
                f"{n} clients do not fit in memory: each ClientApp process needs ~{per_actor / 2**30:.1f} GiB "
                f"(model, features) and the simulation ~{n * per_client / 2**30:.2f} GiB of client state, "
                f"but only {mem / 2**30:.1f} GiB is available; use fewer clients or a smaller model, "
                "or run SuperNodes on several machines (see dpfpl/flower/README.md)")
        if fit < actors:
            note = f"memory holds {fit} ClientApp processes (of {actors} the CPUs allow)"
            actors = int(fit)
    return max(1, int(math.ceil(actors * client_cpus))), actors, note


def _short_dir(target: Path) -> tuple[str, Optional[Path]]:
    """A path to ``target`` short enough for Ray's AF_UNIX sockets (a symlink in the temp dir)."""
    target = target.resolve()
    if len(str(target)) <= 40:
        return str(target), None
    link = Path(tempfile.gettempdir()) / f"dpfpl-ray-{secrets.token_hex(4)}"
    try:
        os.symlink(target, link)
    except OSError:
        return str(target), None
    return str(link), link


def start_ray(ray_dir: Path, cpus: int, gpus: float, client_threads: int, verbose: bool) -> Optional[Path]:
    """Start a private local Ray instance on loopback; returns the symlink to remove afterwards."""
    import logging

    import ray

    if ray.is_initialized():
        raise DpfplError("Ray is already initialised in this process; the flower engine starts its own "
                         "local instance (call ray.shutdown() first)")
    ray_dir.mkdir(parents=True, exist_ok=True)
    temp, link = _short_dir(ray_dir)
    pythonpath = os.pathsep.join(p for p in ([os.getcwd()] + [p for p in sys.path if p]) if p)
    env = {"PYTHONPATH": pythonpath, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": str(client_threads)}
    os.environ["PYTHONPATH"] = pythonpath
    try:
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, _temp_dir=temp,
                 _node_ip_address="127.0.0.1", logging_level=logging.INFO if verbose else logging.ERROR,
                 log_to_driver=verbose, runtime_env={"env_vars": env}, configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - reported with the remedies
        if ray.is_initialized():
            ray.shutdown()
        if link is not None:
            link.unlink(missing_ok=True)
        raise DpfplError(
            f"Ray could not start ({type(exc).__name__}: {str(exc)[:300]}). Check that the loopback "
            f"interface is up (Ray binds 127.0.0.1), that {ray_dir} is writable with free space, and that "
            "no firewall blocks local ports; Ray's logs are under that folder") from None
    return link


# ---------------------------------------------------------------------------------- entry point
def _preflight(cfg: RunConfig) -> int:
    """Cheap checks with the in-process engine's messages before Ray starts; returns #images."""
    from ..clip import _open_clip
    from ..data import load_run_dataset, partition

    t, d = cfg.train, cfg.data
    get_method(t.method)
    if cfg.model.model not in _open_clip().list_models():
        from ..clip import load_clip

        load_clip(cfg.model.model, "none", "cpu")  # raises the engine's ConfigError
    p = cfg.model.pretrained
    if p and p not in ("builtin", "none") and (os.path.sep in p or Path(p).suffix) and not Path(p).is_file():
        raise ConfigError(f"model.pretrained: checkpoint file not found: {p}")
    ds = load_run_dataset(cfg)
    partition(ds, d.num_clients, d.partition, seed=t.seed, beta=d.dirichlet_beta, shots=d.shots)
    return len(ds.train) + len(ds.test)


def run_flower(cfg: Optional[RunConfig] = None, out: Optional[str | Path] = None,
               resume: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None,
               callbacks: tuple = (), on_status: Optional[Callable[[str], None]] = None,
               on_step: Optional[Callable[[int, int], None]] = None, *,
               policy: Optional[FaultPolicy] = None, faults: tuple = (), client_cpus: float = 1.0,
               num_cpus: Optional[int] = None, client_gpus: float = 0.0, model_init_seed: Optional[int] = 0,
               keep_ray_dir: bool = False, verbose: bool = False, **engine_kwargs: Any) -> dict[str, Any]:
    """Like :func:`dpfpl.train.train`, through Flower's simulation engine.

    ``policy``: the fault policy; ``faults``: injected :class:`Fault` s (tests); ``client_cpus`` /
    ``client_gpus``: Ray resources per ClientApp process (``num_cpus``: Ray's CPUs, default all);
    ``model_init_seed``: torch seed for a randomly initialised model (``pretrained='none'``), so
    that every ClientApp process builds the same weights; ``keep_ray_dir``: keep ``RUN_DIR/.ray``.
    Returns the summary; its ``_engine`` key holds the :class:`FlowerEngine`.
    """
    if engine_kwargs:
        raise ConfigError(f"the flower engine builds the model and data inside each ClientApp from the config; "
                          f"{sorted(engine_kwargs)} cannot be passed (use the in-process engine)")
    require_flwr()
    t0 = time.perf_counter()
    cfg, rd, checkpoint = open_run(cfg, out, resume, overrides)
    if rd is not None and resume is not None and rd.finished_summary(cfg) is not None:
        rd.release()
        return finished_noop(rd, rd.finished_summary(cfg))
    try:
        return _run_flower(cfg, rd, checkpoint, resume, t0, callbacks, on_status, on_step, policy, faults,
                           client_cpus, num_cpus, client_gpus, model_init_seed, keep_ray_dir, verbose)
    finally:
        if rd is not None:
            rd.release()


def _run_flower(cfg, rd, checkpoint, resume, t0, callbacks, on_status, on_step, policy, faults, client_cpus,
                num_cpus, client_gpus, model_init_seed, keep_ray_dir, verbose) -> dict[str, Any]:
    """:func:`run_flower` once the run directory is open (and locked)."""
    policy = policy or FaultPolicy()
    n_images = _preflight(cfg)
    cpus, actors, note = plan_resources(cfg, n_images, client_cpus, num_cpus, client_gpus)
    threads = max(1, int(client_cpus))
    cbs = ((rd,) if rd is not None else ()) + tuple(callbacks)
    job = Job(cfg, rd, checkpoint, str(resume) if resume is not None else None, cbs, on_status,
              on_step, policy, tuple(faults), model_init_seed, threads, t0)
    if note:
        job.status(note)
    own_tmp = rd is None
    ray_dir = (rd.path / ".ray") if rd is not None else Path(tempfile.mkdtemp(prefix="dpfpl-ray-"))
    from . import apps  # imports flwr

    job.status(f"starting Ray ({actors} ClientApp process{'es' if actors > 1 else ''}, temp files in {ray_dir})")
    t_ray = time.perf_counter()
    pythonpath = os.environ.get("PYTHONPATH")
    link, ok, started = None, False, False
    try:
        link = start_ray(ray_dir, cpus, client_gpus * actors, threads, verbose)
        started = True
        from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

        resources = {"num_cpus": float(client_cpus), "num_gpus": float(client_gpus)}
        try:
            pool_size_from_resources(resources)
        except ValueError:
            raise ConfigError(f"the Ray resources cannot hold one client (each ClientApp asks for {resources}); "
                              "lower client_cpus/client_gpus") from None
        job.stats["ray_start_s"] = time.perf_counter() - t_ray
        job.stats["actors"] = actors
        try:
            apps.run_simulation_job(job, apps.client_app, resources, verbose)
        except RuntimeError as exc:
            if job.summary is not None or "simulation" not in str(exc).lower():
                raise
            raise DpfplError(f"the Flower simulation engine failed ({exc}; cause: {exc.__cause__!r}); "
                             f"Ray's logs are kept in {ray_dir}") from exc
        if job.summary is None:
            raise DpfplError("the Flower simulation ended without a result (see the log above); "
                             f"Ray's logs are in {ray_dir}")
        ok = True
    except KeyboardInterrupt:
        job.abort.set()
        raise
    finally:
        job.abort.set()
        import ray

        if started and ray.is_initialized():
            ray.shutdown()
        if link is not None:
            link.unlink(missing_ok=True)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
        if (ok and not keep_ray_dir) or own_tmp:
            shutil.rmtree(ray_dir, ignore_errors=True)
    summary = dict(job.summary)
    summary["_engine"] = job.engine
    return summary
