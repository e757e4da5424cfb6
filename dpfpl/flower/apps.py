"""The Flower apps: a ClientApp holding one dpfpl Client per SuperNode, and a ServerApp whose Strategy
drives dpfpl rounds.

ClientApp (``client_app``). Each process builds, once and cached, the frozen model, the dataset,
the partition and the feature store from the run config carried by the message (it builds the
in-process :class:`~dpfpl.engine.Engine` and uses the Client of its ``partition-id``). The client's
own state (local prompt, SGD optimiser with momentum, batch and factorisation generator, sampler,
membership mask, local-noise generator, its cumulative client-side ledger) lives in
``context.state['dpfpl']`` (a serialised snapshot) between messages: every message rehydrates the
Client from it, runs the same :class:`~dpfpl.federation.Client` code, and stores the new snapshot.
A ClientApp that raises leaves the previous snapshot in place (Flower only commits the context of a
successful call), so a failed attempt releases nothing and a retry repeats it exactly.

Message types: ``query.hello`` (the client's split, zero-shot accuracies and the server's initial
state as the engine builds it), ``train.step`` (grad protocol: one local step at the sent p_G;
reply: the client's global-prompt contribution), ``train.fedavg`` (K local steps on a copy of p_G;
reply: the copy), ``evaluate`` (local and neighbour accuracy of the personalised prompt),
``query.state`` (the client's state snapshot, for the run directory) and ``query.restore``
(resume: the server sends the snapshot from the checkpoint).

ServerApp. :class:`DPFPLStrategy` holds p_G, the server optimiser and sampling generator (a
:class:`~dpfpl.federation.Server`), the server's privacy mechanism (global noise generator and
accountant ledger) and calls the same ``Server.apply_gradients`` / ``apply_parameters`` (hence
``privacy.aggregate``) as the in-process engine. Protocol mapping: ``grad`` = one Flower round per
local step (K per dpfpl round), ``fedavg`` = one Flower round per dpfpl round; then one evaluation
round on every ``eval_every``-th round. Fault policy: :class:`~dpfpl.flower.engine.FaultPolicy`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from ..config import RunConfig
from ..data.partition import ClientData
from ..errors import BudgetExhausted, ConfigError, DpfplError
from ..federation import Contribution
from ..rundir import RunDir, atomic_write_json
from ..serialize import pack, unpack
from .engine import Fault, FaultPolicy, FlowerEngine, Job

log = logging.getLogger("dpfpl.flower")


# ------------------------------------------------------------------------------------- codecs
def dumps(obj: Any) -> bytes:
    """Message blobs are safetensors + JSON (:mod:`dpfpl.serialize`): nothing received is unpickled."""
    return pack(obj)


def loads(data: bytes) -> Any:
    return unpack(data)


def tensors_record(**tensors: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def record_tensors(rec: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(rec.to_torch_state_dict())


# ================================================================================== client side
_CACHE: dict[str, tuple[Any, dict[int, bytes]]] = {}
# A seam for tests and embedding applications: when set, ``ENGINE_FACTORY(cfg)`` builds the ClientApp
# process's engine (e.g. from an in-memory model and dataset) instead of loading them from the config.
# Ray actors import this module afresh, so it only acts on ClientApps running in this process.
ENGINE_FACTORY: Optional[Callable[[RunConfig], Any]] = None


def _random_weights(cfg: RunConfig) -> bool:
    p = cfg.model.pretrained
    return p is None or str(p).lower() == "none"


def client_engine(cfg_json: str, model_init_seed: Optional[int], threads: int) -> tuple[Any, dict[int, bytes], float]:
    """This process's engine for ``cfg_json`` (built once; one config per process) and every client's
    pristine snapshot; returns (engine, pristine, seconds spent building now)."""
    key = f"{model_init_seed}|{id(ENGINE_FACTORY)}|{cfg_json}"
    hit = _CACHE.get(key)
    if hit is not None:
        return hit[0], hit[1], 0.0
    from ..clip import load_clip
    from ..engine import Engine

    t0 = time.perf_counter()
    _CACHE.clear()
    if threads > 0:
        torch.set_num_threads(threads)
    cfg = RunConfig.from_dict(json.loads(cfg_json)).validate()
    clip = None
    if ENGINE_FACTORY is not None:
        eng = ENGINE_FACTORY(cfg)
    elif model_init_seed is not None and _random_weights(cfg):  # every process builds the same weights
        clip = load_clip(cfg.model.model, None, cfg.model.device, init_seed=int(model_init_seed))
    if ENGINE_FACTORY is None:
        eng = Engine(cfg, clip=clip)
    if [c.id for c in eng.clients] != list(range(len(eng.clients))):
        raise DpfplError("client ids are not 0..N-1 in partition order; the flower engine maps partition-id to them")
    pristine = {c.id: dumps(snapshot(eng, c)) for c in eng.clients}
    _CACHE[key] = (eng, pristine)
    return eng, pristine, time.perf_counter() - t0


def snapshot(eng, client) -> dict[str, Any]:
    """What a client reports between messages (and the server stores in checkpoints): its public
    training state and its cumulative ledger. Never a noise or batch-selection generator state:
    those stay in the ClientApp (:func:`private_state`)."""
    priv = eng.privacy
    state = client.state_dict()
    state["sampler"] = {**state["sampler"], "gen": None}  # batch selection stays in the ClientApp
    return {"client": state,
            "ledger": priv.ledger.state_dict() if priv.ledger is not None else None,
            "draws": int(getattr(priv, "draws", 0))}


def private_state(eng, client) -> Optional[dict[str, Any]]:
    """Client-private generator states kept in the node's own ``context.state`` (never in a reply).
    Non-secret runs (non-private, or reproducible ``noise_seed``) need them: secret generators continue in the
    process, or start from fresh secret entropy in another one."""
    src = getattr(eng.privacy, "source", None)
    if src is not None and src.secret:
        return None
    return {"noise_gen": eng.privacy.client_gens[client.id].get_state() if src is not None else None,
            "batch_gen": client.batch_gen.get_state()}


def restore_private(eng, client, state: Optional[dict[str, Any]]) -> None:
    if state:
        if state.get("noise_gen") is not None:
            eng.privacy.client_gens[client.id].set_state(state["noise_gen"])
        client.batch_gen.set_state(state["batch_gen"])


def restore(eng, client, snap: dict[str, Any]) -> None:
    """Rehydrate ``client`` (and its share of the privacy mechanism) from a snapshot."""
    from ..privacy.ledger import PrivacyLedger

    priv = eng.privacy
    client.load_state_dict(snap["client"])
    if priv.ledger is not None:
        priv.ledger = PrivacyLedger.from_state_dict(snap["ledger"]) if snap.get("ledger") else PrivacyLedger()
    if hasattr(priv, "draws"):
        priv.draws = int(snap.get("draws", 0))


def _partition_id(context: Context, n: int) -> int:
    pid = context.node_config.get("partition-id")
    if pid is None:
        raise ConfigError("this SuperNode has no partition-id: start it with "
                          "--node-config 'partition-id=I num-partitions=N' (I = its client id)")
    pid = int(pid)
    if pid < 0:
        raise ConfigError(f"partition-id={pid} must be >= 0")
    return pid


def _reply(msg: Message, arrays: dict[str, torch.Tensor], metrics: dict[str, Any], config: dict[str, Any]) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "config": ConfigRecord(config)})
    if arrays:
        content["arrays"] = tensors_record(**arrays)
    return Message(content, reply_to=msg)


def _sampler_metrics(client) -> dict[str, Any]:
    s = client.sampler
    return {"pos": int(s.pos), "epochs": int(s.epochs), "has_perm": int(s.perm is not None),
            "batch_len": int(len(getattr(client, "last_local_idx", ())))}


def handle(op: str, msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    if conf.get("fault", "") == "raise":
        raise RuntimeError(f"injected fault: {op} round {conf.get('round')} step {conf.get('step')}")
    t0 = time.perf_counter()
    try:
        eng, pristine, build_s = client_engine(str(conf["cfg"]), None if int(conf["seed"]) < 0 else int(conf["seed"]),
                                               int(conf.get("threads", 0)))
        pid = _partition_id(context, len(eng.clients))
    except DpfplError as exc:  # a configuration problem: not transient, report it as such
        return Message(RecordDict({"error": ConfigRecord({"message": str(exc)})}), reply_to=msg)
    if pid >= len(eng.clients):  # more SuperNodes than clients: this one sits the run out
        return _reply(msg, {}, {"partition_id": pid, "unused": 1}, {})
    client = eng.clients[pid]
    if op == "restore":
        blob = bytes(conf["state"])
    elif "dpfpl" in context.state:
        blob = bytes(context.state["dpfpl"]["blob"])
    else:
        blob = pristine[pid]
    restore(eng, client, loads(blob))
    if op == "restore" and "private" in conf:  # reproducible noise resumed from a checkpoint that had it
        context.state["dpfpl-private"] = ConfigRecord({"blob": bytes(conf["private"])})
    if "dpfpl-private" in context.state:
        restore_private(eng, client, loads(bytes(context.state["dpfpl-private"]["blob"])))
    arrays: dict[str, torch.Tensor] = {}
    metrics: dict[str, Any] = {"partition_id": pid, "process": os.getpid(), "build_s": build_s}
    config: dict[str, Any] = {}
    changed = op in ("hello", "restore")
    device = eng.clip.device
    if op == "hello":
        cd = client.data
        arrays = {"train_idx": torch.as_tensor(cd.train_idx, dtype=torch.long),
                  "classes": torch.as_tensor(cd.classes, dtype=torch.long),
                  "local_test_idx": torch.as_tensor(cd.local_test_idx, dtype=torch.long),
                  "neighbor_test_idx": torch.as_tensor(cd.neighbor_test_idx, dtype=torch.long)}
        zs = eng.zeroshot
        metrics.update(local_steps=int(eng.local_steps), zs_local=float(zs["local_acc_per_client"][pid]))
        if zs["neighbor_acc_per_client"][pid] is not None:
            metrics["zs_neighbor"] = float(zs["neighbor_acc_per_client"][pid])
        config.update(dataset=eng.dataset.name, protocol=eng.protocol, server=dumps(eng.server.state_dict()))
    elif op == "step":
        p_G = record_tensors(msg.content["arrays"])["p_G"].to(device)
        contrib = client.step(p_G)
        metrics.update(loss=float(client.last_loss), **_sampler_metrics(client))
        if contrib is not None:
            arrays["contrib"] = contrib.tensor
            metrics.update(weight=float(contrib.weight), n_examples=int(contrib.n_examples))
        changed = True
    elif op == "fedavg":
        p_G = record_tensors(msg.content["arrays"])["p_G"].to(device)
        contrib = client.fedavg_round(p_G, int(conf["steps"]))
        arrays["contrib"] = contrib.tensor
        metrics.update(loss=float(client.last_loss), weight=float(contrib.weight),
                       n_examples=int(contrib.n_examples), **_sampler_metrics(client))
        changed = True
    elif op == "evaluate":
        p_G = record_tensors(msg.content["arrays"])["p_G"].to(device)
        with torch.no_grad():
            txt = eng.enc(client.personal_context(p_G))
        for key, idx in (("local_acc", client.data.local_test_idx), ("neighbor_acc", client.data.neighbor_test_idx)):
            acc = eng._acc(txt, idx)
            if acc is not None:
                metrics[key] = float(acc)
    if changed:
        blob = dumps(snapshot(eng, client))
        context.state["dpfpl"] = ConfigRecord({"blob": blob})
        priv_state = private_state(eng, client)
        if priv_state is not None:  # the node's own state: never part of a reply
            context.state["dpfpl-private"] = ConfigRecord({"blob": dumps(priv_state)})
    if eng.privacy.ledger is not None:
        config["ledger"] = json.dumps(eng.privacy.ledger.state_dict())
    metrics.update(draws=int(getattr(eng.privacy, "draws", 0)), steps=int(client.steps))
    if op in ("hello", "state", "restore", "evaluate") or bool(conf.get("want_state", False)):
        config["state"] = blob
    metrics["compute_s"] = time.perf_counter() - t0 - build_s
    return _reply(msg, arrays, metrics, config)


client_app = ClientApp()


def _register(kind: str, op: str, action: Optional[str] = None) -> None:
    """``client_app.<kind>(action)`` -> :func:`handle` of ``op`` (kind: query / train / evaluate)."""
    def fn(msg: Message, context: Context) -> Message:
        return handle(op, msg, context)

    fn.__name__ = f"_{kind}_{op}"
    decorator = getattr(client_app, kind)
    (decorator(action) if action else decorator())(fn)


for _kind, _op, _action in (("query", "hello", "hello"), ("query", "state", "state"), ("query", "restore", "restore"),
                            ("train", "step", "step"), ("train", "fedavg", "fedavg"), ("evaluate", "evaluate", None)):
    _register(_kind, _op, _action)


# ================================================================================== server side
class FaultStop(Exception):
    """Too few clients replied: training stops cleanly (the reason goes to stopped_reason)."""


class DPFPLStrategy(Strategy):
    """Drives dpfpl rounds over a Flower Grid (see the module docstring).

    ``configure_train`` / ``aggregate_train`` / ``configure_evaluate`` / ``aggregate_evaluate`` are
    Flower's strategy hooks; :meth:`start` replaces Flower's default loop (one train and one
    evaluate round per round) with dpfpl's: client sampling and the budget check per dpfpl round,
    K Flower rounds per dpfpl round under the grad protocol, retries and the fault policy.
    """

    def __init__(self, job: Job):
        self.job = job
        self.policy: FaultPolicy = job.policy
        self.cfg_json = json.dumps(job.cfg.to_dict(), sort_keys=True)
        self.engine: Optional[FlowerEngine] = None
        self.node_of: dict[int, int] = {}
        self.cid_of: dict[int, int] = {}
        self.flower_round = 0
        self._targets: list[int] = []
        self._faults_now: dict[int, str] = {}
        self._per_cid: Optional[Callable[[int], dict[str, Any]]] = None
        self._op = "step"
        self._last_losses: list[float] = []
        self._eval: dict[str, Any] = {}
        self.stale: set[int] = set()  # clients whose state changed since their last snapshot
        self.failures: list[dict[str, Any]] = []
        self.retries = 0
        self.messages = 0
        self.bytes_down = 0
        self.bytes_up = 0
        self.client_compute_s = 0.0
        self.processes: dict[int, float] = {}  # ClientApp process -> model/data build seconds

    # ------------------------------------------------------------------ Flower strategy hooks
    def summary(self) -> None:
        e = self.engine
        log.info("DPFPLStrategy: method=%s protocol=%s clients=%s rounds=%s local_steps=%s privacy=%s",
                 self.job.cfg.train.method, e.protocol if e else "?", self.job.cfg.data.num_clients,
                 self.job.cfg.train.rounds, e.local_steps if e else "?", self.job.cfg.privacy.privacy)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return [self._message(cid, f"train.{config['op']}", arrays, config, server_round) for cid in self._targets]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        """Absorb the replies (ledger reports, sampler positions, snapshots) and apply the method's
        aggregation through the server's privacy mechanism (global noise and its ledger events)."""
        e = self.engine
        contribs, losses = [], []
        for m in sorted(replies, key=self._cid):
            cid = self._cid(m)
            self._absorb(cid, m)
            met = m.content["metrics"]
            losses.append(float(met["loss"]))
            if "arrays" in m.content and "contrib" in m.content["arrays"]:
                t = record_tensors(m.content["arrays"])["contrib"]
                contribs.append(Contribution(cid, t, float(met["weight"]), int(met["n_examples"])))
        if contribs:
            if self._op == "step":
                e.server.apply_gradients(contribs)
            else:
                e.server.apply_parameters(contribs)
        self._last_losses = losses
        loss = float(np.nanmean(losses)) if losses and not all(math.isnan(x) for x in losses) else float("nan")
        return tensors_record(p_G=e.server.p_G), MetricRecord({"train_loss": loss, "replies": len(losses)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return [self._message(cid, "evaluate", arrays, config, server_round) for cid in self._targets]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        """Per-client local/neighbour accuracy; means as the in-process engine computes them."""
        e = self.engine
        n = len(e.clients)
        local: list[Optional[float]] = [None] * n
        neigh: list[Optional[float]] = [None] * n
        got = set()
        for m in replies:
            cid = self._cid(m)
            got.add(cid)
            self._absorb(cid, m)
            met = m.content["metrics"]
            local[cid] = float(met["local_acc"]) if "local_acc" in met else None
            neigh[cid] = float(met["neighbor_acc"]) if "neighbor_acc" in met else None
        loc = [a for a in local if a is not None]
        nv = [a for a in neigh if a is not None]
        row = {"local_acc": float(np.mean(loc)) if loc else None,
               "neighbor_acc": float(np.mean(nv)) if nv else None,
               "local_acc_per_client": local, "neighbor_acc_per_client": neigh}
        missing = sorted(set(range(n)) - got)
        if missing:
            row["eval_missing"] = missing
        self._eval = row
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, float)})

    # ------------------------------------------------------------------ messaging
    def _cid(self, m: Message) -> int:
        return int(m.content["metrics"]["partition_id"])

    def _message(self, cid: int, mtype: str, arrays: Optional[ArrayRecord], config: ConfigRecord,
                 server_round: int) -> Message:
        conf = dict(config)
        conf.update(cfg=self.cfg_json, threads=int(self.job.client_threads),
                    seed=-1 if self.job.model_init_seed is None else int(self.job.model_init_seed))
        if self._per_cid is not None:
            conf.update(self._per_cid(cid))
        if self._faults_now.get(cid) == "raise":
            conf["fault"] = "raise"
        content = RecordDict({"config": ConfigRecord(conf)})
        if arrays is not None:
            content["arrays"] = arrays
        return Message(content, self.node_of[cid], mtype, group_id=str(server_round))

    def _send_and_receive(self, grid: Grid, msgs: list[Message], timeout: float) -> dict[int, Message]:
        """Push messages and pull replies until all arrived, ``timeout`` passed or the run aborted
        (Flower's own send_and_receive polls every 0.1 s (simulation) / 3 s; we poll faster in memory)."""
        if not msgs:
            return {}
        ids = list(grid.push_messages(msgs))
        node_of_id = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        pending = set(ids)
        out: dict[int, Message] = {}
        interval = 0.005 if type(grid).__name__ == "InMemoryGrid" else 0.5
        deadline = time.monotonic() + timeout
        self.messages += len(msgs)
        self.bytes_down += sum(_nbytes(m) for m in msgs)
        while pending:
            if self.job.abort.is_set():
                raise DpfplError("the Flower simulation stopped before the run finished")
            for r in grid.pull_messages(pending):
                mid = r.metadata.reply_to_message_id
                pending.discard(mid)
                out[node_of_id[mid]] = r
                if not r.has_error():
                    self.bytes_up += _nbytes(r)
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(interval)
        return out

    def _exchange(self, grid: Grid, kind: str, op: str, cids: list[int], round_: int, step: Optional[int],
                  arrays: Optional[ArrayRecord], extra: dict[str, Any],
                  per_cid: Optional[Callable[[int], dict[str, Any]]] = None) -> tuple[dict[int, Message], dict[int, str]]:
        """Send one request to each client, retrying failures ``policy.retries`` times.
        Returns (replies by client, failure reason by client)."""
        e = self.engine
        pending, got, failed = list(cids), {}, {}
        steps = {"step": 1, "fedavg": e.local_steps}.get(op, 0)
        fault_op = {"step": "train", "fedavg": "train"}.get(op, op)
        for attempt in range(self.policy.retries + 1):
            if not pending:
                break
            if attempt:
                self.retries += len(pending)
            self.flower_round += 1
            self._faults_now = {}
            for cid in pending:
                for f in self.job.faults:
                    if f.matches(fault_op, cid, round_, step, attempt):
                        self._faults_now[cid] = f.kind
            config = ConfigRecord({"op": op, "round": round_, "step": -1 if step is None else step,
                                   "attempt": attempt, **extra})
            self._targets, self._per_cid = list(pending), per_cid
            if kind == "train":
                msgs = list(self.configure_train(self.flower_round, arrays, config, grid))
            elif kind == "evaluate":
                msgs = list(self.configure_evaluate(self.flower_round, arrays, config, grid))
            else:
                msgs = [self._message(cid, f"query.{op}", arrays, config, self.flower_round) for cid in pending]
            self._per_cid = None
            by_node = self._send_and_receive(grid, msgs, self.policy.timeout)
            for cid in pending:
                m = by_node.get(self.node_of[cid])
                if m is None or self._faults_now.get(cid) == "drop":
                    failed[cid] = ("reply lost (injected)" if m is not None else
                                   f"no reply within {self.policy.timeout:g} s")
                    if steps:  # it may have trained: its releases are confirmed by its next report
                        e.lost_steps[cid] += steps
                        self.stale.add(cid)
                elif m.has_error():
                    failed[cid] = f"ClientApp error: {m.error.reason}"
                elif "error" in m.content:
                    raise DpfplError(f"client {cid}: {m.content['error']['message']}")
                else:
                    got[cid] = m
                    failed.pop(cid, None)
            pending = [c for c in pending if c not in got]
        for cid, why in failed.items():
            self.failures.append({"round": round_, "step": step, "op": op, "client": cid, "reason": why[:300]})
        return got, failed

    def _absorb(self, cid: int, m: Message) -> None:
        """Ledger report, sampler position and (when sent) the state snapshot of one reply."""
        e = self.engine
        conf, met = m.content["config"], m.content["metrics"]
        self.client_compute_s += float(met.get("compute_s", 0.0))
        self._note_process(met)
        if "pos" in met:
            e.clients[cid].observe(int(met["pos"]), int(met["epochs"]), bool(met["has_perm"]), int(met["batch_len"]))
            self.stale.add(cid)
        if "ledger" in conf:
            e.report_ledger(cid, json.loads(conf["ledger"]), int(met["draws"]), int(met["steps"]))
        if "state" in conf:
            e.set_snapshot(cid, loads(conf["state"]))
            self.stale.discard(cid)

    def _note_process(self, met: MetricRecord) -> None:
        p = int(met.get("process", 0))
        self.processes[p] = max(self.processes.get(p, 0.0), float(met.get("build_s", 0.0)))

    # ------------------------------------------------------------------ start-up
    def _wait_for_nodes(self, grid: Grid) -> list[int]:
        n = self.job.cfg.data.num_clients
        deadline = time.monotonic() + self.policy.node_timeout
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= n:
                return nodes
            if self.job.abort.is_set():
                raise DpfplError("the Flower simulation stopped before the SuperNodes connected")
            if time.monotonic() > deadline:
                raise DpfplError(f"only {len(nodes)} of {n} SuperNodes connected within {self.policy.node_timeout:g} s: "
                                 "start one SuperNode per client (--node-config 'partition-id=I num-partitions=N')")
            time.sleep(0.05)

    def _hello(self, grid: Grid) -> None:
        """Map nodes to clients, learn the splits and the initial server state, build the mirror."""
        job, n = self.job, self.job.cfg.data.num_clients
        job.status(f"building the model, data and features in the ClientApp processes ({n} clients)")
        t0 = time.perf_counter()
        pending = self._wait_for_nodes(grid)
        replies: dict[int, Message] = {}
        errors: dict[int, str] = {}
        unused: list[int] = []
        for attempt in range(self.policy.retries + 1):
            if not pending:
                break
            self.flower_round += 1
            conf = ConfigRecord({"op": "hello", "round": 0, "step": -1, "attempt": attempt, "cfg": self.cfg_json,
                                 "threads": int(job.client_threads),
                                 "seed": -1 if job.model_init_seed is None else int(job.model_init_seed)})
            msgs = [Message(RecordDict({"config": conf}), node, "query.hello", group_id="hello") for node in pending]
            got = self._send_and_receive(grid, msgs, self.policy.timeout)
            for node in pending:
                m = got.get(node)
                if m is None:
                    errors[node] = f"no reply within {self.policy.timeout:g} s"
                elif m.has_error():
                    errors[node] = m.error.reason
                elif "error" in m.content:
                    raise DpfplError(m.content["error"]["message"])
                else:
                    errors.pop(node, None)
                    if "unused" not in m.content["metrics"]:
                        replies[node] = m
                    else:
                        unused.append(node)
            pending = [nd for nd in pending if nd not in replies and nd not in unused]
        if unused:
            job.status(f"{len(unused)} SuperNode(s) with partition-id >= num_clients={n} sit this run out")
        if errors:
            raise DpfplError(f"{len(errors)} SuperNode(s) could not start the dpfpl ClientApp: "
                             + "; ".join(sorted(set(v[:300] for v in errors.values()))))
        by_cid: dict[int, Message] = {}
        for node, m in replies.items():
            cid = self._cid(m)
            if cid in by_cid:
                raise DpfplError(f"two SuperNodes have partition-id={cid}: give each a distinct id")
            by_cid[cid] = m
            self.node_of[cid], self.cid_of[node] = node, cid
        missing = sorted(set(range(n)) - set(by_cid))
        if missing:
            raise DpfplError(f"no SuperNode has partition-id {missing}: start one per client id 0..{n - 1}")
        first = by_cid[0]
        server_state = loads(first.content["config"]["server"])
        data, zl, zn = [], [], []
        for cid in range(n):
            m = by_cid[cid]
            self._note_process(m.content["metrics"])
            other = loads(m.content["config"]["server"])
            if not torch.equal(other["p_G"], server_state["p_G"]) or other["rng"] != server_state["rng"]:
                raise DpfplError(f"client {cid} built a different initial global prompt than client 0: the "
                                 "ClientApps run different dpfpl versions, weights or data")
            a = record_tensors(m.content["arrays"])
            data.append(ClientData(cid, a["train_idx"].numpy(), a["classes"].numpy(),
                                   a["local_test_idx"].numpy(), a["neighbor_test_idx"].numpy()))
            met = m.content["metrics"]
            zl.append(float(met["zs_local"]))
            zn.append(float(met["zs_neighbor"]) if "zs_neighbor" in met else None)
        nv = [a for a in zn if a is not None]
        zeroshot = {"local_acc": float(np.mean(zl)), "neighbor_acc": float(np.mean(nv)) if nv else None,
                    "local_acc_per_client": zl, "neighbor_acc_per_client": zn}
        conf0, met0 = first.content["config"], first.content["metrics"]
        self.engine = FlowerEngine(job.cfg, data, str(conf0["dataset"]), str(conf0["protocol"]),
                                   int(met0["local_steps"]), server_state, zeroshot)
        for cid in range(n):
            self._absorb(cid, by_cid[cid])
        job.engine = self.engine
        job.stats["hello_s"] = time.perf_counter() - t0

    def _resume(self, grid: Grid) -> None:
        """Load the checkpoint into the mirror and send every client its snapshot."""
        e = self.engine
        e.load_state_dict(self.job.checkpoint)
        n = len(e.clients)
        got, failed = self._exchange(grid, "query", "restore", list(range(n)), e.round, None, None, {},
                                     per_cid=lambda cid: {"state": dumps(e.clients[cid].snapshot),
                                                          **({"private": dumps(e.restore_private[cid])}
                                                             if cid in e.restore_private else {})})
        if failed:
            raise DpfplError(f"cannot resume: clients {sorted(failed)} did not take their checkpointed state")
        for cid, m in got.items():
            self._absorb(cid, m)
        e.sync_privacy()
        if e.round < e.total_rounds:
            reason = e.privacy.check_round(list(range(n)), e.local_steps)
            if reason is not None:
                raise BudgetExhausted(f"cannot resume {self.job.resume}: {reason}; nothing was trained")

    # ------------------------------------------------------------------ rounds
    def _require(self, got: dict[int, Message], failed: dict[int, str], sampled: list[int], round_: int,
                 step: Optional[int]) -> None:
        need = self.policy.minimum(len(sampled))
        if len(got) < need:
            where = f"round {round_}" + (f" step {step + 1}/{self.engine.local_steps}" if step is not None else "")
            why = "; ".join(f"client {c}: {r[:120]}" for c, r in sorted(failed.items()))
            raise FaultStop(f"faults: {where}: {len(got)} of {len(sampled)} sampled clients replied, the fault "
                            f"policy needs {need} (min_fraction={self.policy.min_fraction:g}, "
                            f"retries={self.policy.retries}); {why}")

    def train_round(self, grid: Grid) -> Optional[dict[str, Any]]:
        """One dpfpl round (the in-process ``Engine.train_round`` over Flower)."""
        e, job = self.engine, self.job
        t0 = time.perf_counter()
        rng_state = e.server.rng.bit_generator.state
        sampled = e.server.sample_clients()
        e.sync_privacy()
        reason = e.privacy.check_round(sampled, e.local_steps)
        if reason is not None:
            e.server.rng.bit_generator.state = rng_state
            e.stopped_reason = reason
            return None
        r = e.round + 1
        losses: list[float] = []
        dropped: dict[int, str] = {}
        try:
            if e.protocol == "grad":
                active = list(sampled)
                self._op = "step"
                for s in range(e.local_steps):
                    got, failed = self._exchange(grid, "train", "step", active, r, s, tensors_record(p_G=e.server.p_G),
                                                 {"want_state": s == e.local_steps - 1})
                    dropped.update(failed)
                    self._require(got, dropped, sampled, r, s)
                    active = [c for c in active if c in got]
                    _, met = self.aggregate_train(self.flower_round, [got[c] for c in sorted(got)])
                    losses.append(float(met["train_loss"]))
                    if job.on_step:
                        job.on_step(s + 1, e.local_steps)
            else:
                self._op = "fedavg"
                got, failed = self._exchange(grid, "train", "fedavg", list(sampled), r, None,
                                             tensors_record(p_G=e.server.p_G), {"steps": e.local_steps, "want_state": True})
                dropped.update(failed)
                self._require(got, dropped, sampled, r, None)
                self.aggregate_train(self.flower_round, [got[c] for c in sorted(got)])
                losses = list(self._last_losses)
                if job.on_step:
                    job.on_step(len(sampled), len(sampled))
        except FaultStop as stop:
            e.stopped_reason = str(stop)
            return None
        e.round += 1
        row: dict[str, Any] = {"round": e.round, "clients": sampled,
                               "train_loss": float(np.nanmean(losses)) if losses else float("nan"),
                               "train_s": time.perf_counter() - t0}
        evaluate = e.round % job.cfg.train.eval_every == 0 or e.round == e.total_rounds
        metrics = self.evaluate(grid, e.round) if evaluate else None
        self.collect(grid, e.round)
        e.sync_privacy()
        row.update(e.privacy.end_round(e.round))
        if metrics is not None:
            row.update(metrics)
        if dropped:
            row["failed_clients"] = sorted(dropped)
        e.history.append(row)
        return row

    def evaluate(self, grid: Grid, round_: int) -> dict[str, Any]:
        e = self.engine
        got, _ = self._exchange(grid, "evaluate", "evaluate", list(range(len(e.clients))), round_, None,
                                tensors_record(p_G=e.server.p_G), {"want_state": True})
        self.aggregate_evaluate(self.flower_round, list(got.values()))
        return dict(self._eval)

    def collect(self, grid: Grid, round_: int) -> None:
        """Fetch the snapshots (and exact ledgers) of clients whose state changed without one."""
        if self.stale:
            got, _ = self._exchange(grid, "query", "state", sorted(self.stale), round_, None, None, {})
            for cid, m in got.items():
                self._absorb(cid, m)

    def start(self, grid: Grid, initial_arrays: Optional[ArrayRecord] = None, num_rounds: Optional[int] = None,
              timeout: float = 3600, train_config: Optional[ConfigRecord] = None,
              evaluate_config: Optional[ConfigRecord] = None, evaluate_fn: Any = None) -> Result:
        job = self.job
        self._hello(grid)
        e = self.engine
        self.summary()
        if job.checkpoint is not None:
            self._resume(grid)
        if not e.method.trainable and not e.history:
            row = {"round": 0, **e.zeroshot}
            e.history.append(row)
            for cb in job.callbacks:
                cb.on_round_end(e, row)
        result = Result()
        while e.round < e.total_rounds and e.stopped_reason is None:
            row = self.train_round(grid)
            if row is None:
                break
            result.train_metrics_clientapp[e.round] = MetricRecord(
                {k: v for k, v in row.items() if isinstance(v, float) and math.isfinite(v)})
            for cb in job.callbacks:
                cb.on_round_end(e, row)
        self.collect(grid, e.round)
        e.sync_privacy()
        result.arrays = tensors_record(p_G=e.server.p_G)
        return result

    def report(self) -> dict[str, Any]:
        """Flower-side facts for summary.json (``flower`` key)."""
        s = dict(self.job.stats)
        s.update(flower_rounds=self.flower_round, messages=self.messages, bytes_down=self.bytes_down,
                 bytes_up=self.bytes_up, retries=self.retries, failures=self.failures,
                 unconfirmed_clients=self.engine.unconfirmed() if self.engine else [],
                 clientapp_processes=len(self.processes),
                 clientapp_build_s=max(self.processes.values()) if self.processes else None,
                 client_compute_s=self.client_compute_s,
                 min_fraction=self.policy.min_fraction, policy_retries=self.policy.retries)
        return s


def _nbytes(m: Message) -> int:
    try:
        return sum(r.count_bytes() for r in m.content.values())
    except Exception:  # noqa: BLE001 - statistics only
        return 0


def serve(grid: Grid, job: Job) -> dict[str, Any]:
    """The ServerApp's work: run the strategy, then write the summary (and run directory)."""
    from ..train import summarize

    strategy = DPFPLStrategy(job)
    strategy.start(grid)
    e = strategy.engine
    summary = summarize(e, time.perf_counter() - job.t0)
    summary["flower"] = strategy.report()
    if job.rd is not None:
        job.rd.finish(e, summary)
        if e.privacy.ledger is not None:  # the releases of a round stopped part-way count too
            atomic_write_json(job.rd.file("ledger.json"), e.privacy.ledger_json())
    job.summary = summary
    return summary


@contextmanager
def _quiet_flower(verbose: bool):
    logger = logging.getLogger("flwr")
    level = logger.level
    if not verbose:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_simulation_job(job: Job, app: ClientApp, resources: dict[str, float], verbose: bool) -> None:
    """Run ``job`` on Flower's simulation engine (Ray must already be initialised)."""
    from flwr.simulation import run_simulation

    sapp = ServerApp()

    @sapp.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, job)

    with _quiet_flower(verbose):
        run_simulation(server_app=sapp, client_app=app, num_supernodes=job.cfg.data.num_clients,
                       backend_config={"client_resources": dict(resources)}, verbose_logging=verbose)


# ============================================================================ `flwr run` entry
server_app = ServerApp()


@server_app.main()
def _flwr_run_main(grid: Grid, context: Context) -> None:
    """``flwr run .``: the run config ([tool.flwr.app.config] and --run-config) says what to run:
    ``dpfpl-config`` (a TOML/JSON RunConfig file, '' = defaults), ``dpfpl-overrides`` (a JSON object
    of options, e.g. '{"rounds": 2, "num_clients": 4}'), ``run-dir`` (absolute path; '' = none),
    ``resume`` (a run directory), ``min-fraction``, ``retries``, ``timeout``, ``model-init-seed``."""
    rc = dict(context.run_config)
    resume = str(rc.get("resume", "") or "") or None
    overrides = json.loads(str(rc.get("dpfpl-overrides", "") or "{}"))
    checkpoint = None
    if resume:
        rd: Optional[RunDir] = RunDir(resume)
        cfg = rd.load_config()
        cfg.update({k: v for k, v in overrides.items() if k == "rounds"})
        checkpoint = rd.load_checkpoint()
    else:
        path = str(rc.get("dpfpl-config", "") or "")
        cfg = RunConfig.from_file(path) if path else RunConfig()
        cfg.update(overrides).validate()
        out = str(rc.get("run-dir", "") or "")
        rd = RunDir(out) if out else None
        if rd is not None:
            rd.start(cfg)
    seed = int(rc.get("model-init-seed", 0))
    policy = FaultPolicy(min_fraction=float(rc.get("min-fraction", 0.5)), retries=int(rc.get("retries", 1)),
                         timeout=float(rc.get("timeout", 3600.0)))
    job = Job(cfg, rd, checkpoint, resume, callbacks=(rd,) if rd is not None else (), policy=policy, model_init_seed=None if seed < 0 else seed,
              client_threads=0, on_status=lambda msg: log.warning("dpfpl: %s", msg))
    summary = serve(grid, job)
    log.warning("dpfpl: finished: local_acc=%s neighbor_acc=%s run_dir=%s", summary.get("local_acc"),
                summary.get("neighbor_acc"), rd.path if rd else None)


__all__ = ["DPFPLStrategy", "Fault", "FaultPolicy", "client_app", "handle", "serve", "server_app"]
