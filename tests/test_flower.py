"""The Flower engine (issue 6): same results, run directory and ledger as the in-process engine; faults
handled by the policy and accounted exactly; clear errors for bad setups.

Most tests drive the real ClientApp / ServerApp / Strategy over :class:`LocalGrid`, Flower's Grid
contract served in this process (each message runs the ClientApp on its node's pickled Context,
committed only on success, as Flower's simulation does): fast and bit-exact. The tests marked slow
run Flower's simulation engine on Ray (~45 s each on a loaded 2-core machine, mostly Ray start-up
and the per-process model build).
"""

from __future__ import annotations

import json
import pickle
from uuid import uuid4

import pytest
import torch

pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from dpfpl.errors import ConfigError, DpfplError  # noqa: E402
from dpfpl.flower import Fault, FaultPolicy, apps  # noqa: E402
from dpfpl.flower.engine import Job, require_flwr  # noqa: E402
from dpfpl.flower.run import plan_resources, start_ray  # noqa: E402
from dpfpl.rundir import RunDir  # noqa: E402
from dpfpl.train import train  # noqa: E402

# reproducible noise (noise_seed): the equivalence tests compare the engines draw for draw
DP = {"privacy": "dp", "noise_multiplier_local": 1.0, "noise_multiplier_global": 1.0, "noise_seed": 11}


class LocalGrid(Grid):
    """Flower's Grid served in-process: a pushed message runs the ClientApp at once on a pickled
    copy of its node's Context; the context is committed only when the app returns (an exception
    becomes an error reply), as in Flower's simulation engine."""

    def __init__(self, n: int, app=None):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID  # as run_simulation
        self.app = app or apps.client_app
        self.nodes = {1000 + i: Context(run_id=1, node_id=1000 + i, node_config={"partition-id": i, "num-partitions": n},
                                        state=RecordDict(), run_config={}) for i in range(n)}
        self.replies: dict[str, Message] = {}

    def set_run(self, run):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            node = msg.metadata.dst_node_id
            ctx = pickle.loads(pickle.dumps(self.nodes[node]))
            m_in = pickle.loads(pickle.dumps(msg))
            try:
                out = self.app(m_in, ctx)
                self.nodes[node] = ctx
            except Exception as exc:  # noqa: BLE001 - as the simulation engine's worker does
                out = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=m_in)
            self.replies[mid] = pickle.loads(pickle.dumps(out))
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def make_cfg(make_cfg):
    """Configs with train.vectorize_clients=false: Flower's ClientApps step the clients one by one,
    and the in-process runs these tests compare bit for bit with them must sum in the same order
    (the vectorised pass equals the loop to float rounding only: tests/test_vectorize.py)."""
    return lambda **ov: make_cfg(**{"vectorize_clients": False, **ov})


@pytest.fixture(autouse=True)
def local_clients(monkeypatch, tiny_clip, tiny_dataset):
    """ClientApps running in this process build their engine from the in-memory tiny model and data
    (the in-process runs below use the same); Ray actors do not see this and load from the config."""
    from dpfpl.engine import Engine

    monkeypatch.setattr(apps, "ENGINE_FACTORY", lambda cfg: Engine(cfg, clip=tiny_clip, dataset=tiny_dataset))
    apps._CACHE.clear()
    yield
    apps._CACHE.clear()


def inprocess(cfg, tiny_clip, tiny_dataset, out=None):
    """The in-process engine's run (with a run directory and summary when ``out`` is given)."""
    if out is not None:
        return train(cfg, out=out, clip=tiny_clip, dataset=tiny_dataset)["_engine"]
    from dpfpl.engine import Engine

    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if key not in _REFERENCE:  # reference runs are shared by the tests (never mutated)
        e = Engine(cfg, clip=tiny_clip, dataset=tiny_dataset)
        e.run()
        _REFERENCE[key] = e
    return _REFERENCE[key]


_REFERENCE: dict = {}


def run_local(cfg, out=None, faults=(), policy=None, checkpoint=None):
    """The Flower apps over LocalGrid: (flower report, engine); with ``out``, the full ServerApp work
    (run directory, summary.json: the summary's PLD epsilon costs seconds, so only then)."""
    rd = RunDir(out) if out is not None else None
    if rd is not None and checkpoint is None:
        rd.start(cfg)
    job = Job(cfg, rd, checkpoint, str(out) if checkpoint is not None else None,
              callbacks=(rd,) if rd is not None else (), policy=policy or FaultPolicy(), faults=tuple(faults),
              model_init_seed=0, client_threads=0)
    if out is not None:
        summary = apps.serve(LocalGrid(cfg.data.num_clients), job)
        return {**summary["flower"], "summary": summary}, job.engine
    strategy = apps.DPFPLStrategy(job)
    strategy.start(LocalGrid(cfg.data.num_clients))
    return strategy.report(), strategy.engine


def strip(rows):
    """Metrics rows without what differs between two runs of one recipe (timing, run id)."""
    return [{k: v for k, v in r.items() if k not in ("train_s", "run_id")} for r in rows]


def no_id(d):
    return {k: v for k, v in d.items() if k != "run_id"}


def assert_same_run(fl, ip, exact=True):
    close = (lambda a, b: torch.equal(a, b)) if exact else (lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-4))
    assert close(fl.server.p_G.detach(), ip.server.p_G.detach())
    for a, b in zip(fl.clients, ip.clients):
        assert a.steps == b.steps and torch.equal(a.used, b.used)
        for k in b.local:
            assert close(a.local[k], b.local[k]), k
    if exact:
        assert strip(fl.history) == strip(ip.history)
    else:
        for x, y in zip(strip(fl.history), strip(ip.history)):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], float):
                    assert x[k] == pytest.approx(y[k], abs=1e-6), k
                elif k not in ("local_acc_per_client", "neighbor_acc_per_client"):
                    assert x[k] == y[k], k
    if ip.privacy.ledger is not None:
        assert fl.privacy.ledger.state_dict() == ip.privacy.ledger.state_dict()
        assert fl.privacy.draws == ip.privacy.draws
    assert fl.stopped_reason == ip.stopped_reason


def counts(engine):
    led = engine.privacy.ledger
    return {s: led.count(s) for s in led.subjects}


@pytest.mark.parametrize("extra", [
    {},
    DP,
    {**DP, "protocol": "fedavg"},
    {**DP, "num_clients": 3, "client_fraction": 0.67, "sampling": "shuffle"},
], ids=["none", "dp", "dp-fedavg", "dp-sampled-shuffle"])
def test_flower_apps_equal_inprocess(tmp_path, tiny_clip, tiny_dataset, make_cfg, extra):
    cfg = make_cfg(**extra)
    run_dir = extra in ({}, DP)  # summary.json and the run directory: compared for these two
    ip = inprocess(cfg, tiny_clip, tiny_dataset, out=tmp_path / "ip" if run_dir else None)
    _, fl_engine = run_local(make_cfg(**extra), out=tmp_path / "fl" if run_dir else None)
    assert_same_run(fl_engine, ip)
    if not run_dir:
        return
    for name in ("metrics.jsonl", "membership.json", "config.json", "ledger.json"):
        a, b = tmp_path / "fl" / name, tmp_path / "ip" / name
        assert a.exists() == b.exists(), name
        if name == "metrics.jsonl" and a.exists():
            assert strip(map(json.loads, a.read_text().splitlines())) == strip(map(json.loads, b.read_text().splitlines()))
        elif a.exists():
            assert no_id(json.loads(a.read_text())) == no_id(json.loads(b.read_text())), name
    sf, si = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("fl", "ip"))
    assert (sf.pop("engine"), si.pop("engine")) == ("flower", "inprocess") and "flower" in sf
    sf.pop("flower")
    for k in ("wall_s", "train_s", "run_id", "sessions"):
        sf.pop(k), si.pop(k)
    assert sf == si
    ck_f, ck_i = (RunDir(tmp_path / d).load_checkpoint() for d in ("fl", "ip"))
    assert torch.equal(ck_f["server"]["p_G"], ck_i["server"]["p_G"]) and ck_f["round"] == ck_i["round"]
    # the Flower server never holds the clients' noise generators (they stay in the ClientApps)
    assert ck_f["privacy"].keys() == ck_i["privacy"].keys() - ({"client_gens"} if "client_gens" in ck_i["privacy"] else set())
    assert sorted(p.name for p in (tmp_path / "fl").iterdir()) == sorted(p.name for p in (tmp_path / "ip").iterdir())


@pytest.mark.parametrize("method", ["dpfpl-nores", "fedotp", "fedpgp", "fedprompt", "local", "promptfl", "zeroshot"])
def test_every_method_matches(tiny_clip, tiny_dataset, make_cfg, method):
    from dpfpl.registry import get_method

    m = get_method(method)
    extra = {**DP, "method": method, "rounds": 1}
    if not m.uses_local or not m.trainable:
        extra.pop("noise_multiplier_local")
    if not m.uses_global:
        extra.pop("noise_multiplier_global")
    if not m.trainable:
        extra = {"method": method, "rounds": 1}
    assert_same_run(run_local(make_cfg(**extra))[1], inprocess(make_cfg(**extra), tiny_clip, tiny_dataset))


def test_reference_mode_matches(tiny_clip, tiny_dataset, make_cfg):
    extra = {"privacy": "reference", "epsilon": 5.0, "rounds": 1, "noise_seed": 11}
    assert_same_run(run_local(make_cfg(**extra))[1], inprocess(make_cfg(**extra), tiny_clip, tiny_dataset))


@pytest.fixture
def flower_run(tiny_clip, make_cfg):
    """run_local with the engine: returns (summary, engine)."""
    def _run(faults=(), policy=None, **extra):
        return run_local(make_cfg(**{**DP, **extra}), faults=faults, policy=policy)
    return _run


def test_retried_fault_is_invisible(tiny_clip, tiny_dataset, make_cfg, flower_run):
    """A client that raises once is retried; its failed attempt committed nothing: same run."""
    ref = inprocess(make_cfg(**DP), tiny_clip, tiny_dataset)
    s, e = flower_run(faults=[Fault(client=1, round=1, step=1, kind="raise", attempts=1)])
    assert_same_run(e, ref)
    assert s["retries"] == 1 and s["failures"] == []


def test_dropped_client_accounting(flower_run):
    """Client 1 fails both attempts of round 1's second step: the step goes on with client 0; client
    1's step released nothing (its state was not committed) and it is not in that global release."""
    s, e = flower_run(faults=[Fault(client=1, round=1, step=1, kind="raise", attempts=2)])
    assert counts(e) == {"client0/batch": 4, "client1/batch": 3}
    assert e.history[0]["failed_clients"] == [1] and "failed_clients" not in e.history[1]
    assert [c.steps for c in e.clients] == [4, 3]
    assert e.round == 2 and e.stopped_reason is None
    assert [f["client"] for f in s["failures"]] == [1]


def test_lost_reply_still_counts_local_release(flower_run):
    """A lost reply (client trained, reply discarded): its batch's event counts (the global release
    did not include it: counting it is conservative). The retry trains once more (also counted)."""
    s, e = flower_run(faults=[Fault(client=1, round=1, step=1, kind="drop", attempts=2)])
    assert counts(e) == {"client0/batch": 4, "client1/batch": 5}
    assert [c.steps for c in e.clients] == [4, 5]
    assert s["unconfirmed_clients"] == []
    s1, e1 = flower_run(faults=[Fault(client=1, round=1, step=1, kind="drop", attempts=1)])
    assert counts(e1) == {"client0/batch": 4, "client1/batch": 5}


def test_unreachable_client_is_bounded_then_exact(flower_run):
    """When a client's replies are lost and it cannot be reached at the round's end either, the
    accountant counts an upper bound for its unconfirmed steps; its next report makes it exact."""
    faults = [Fault(client=1, round=1, step=1, kind="drop", attempts=2),
              Fault(client=1, round=1, op="evaluate", kind="raise", attempts=2),
              Fault(client=1, round=1, op="state", kind="raise", attempts=2)]
    s, e = flower_run(faults=faults)
    # round 1 end: client 0's 2 batches; client 1 confirmed 1 step, 2 unconfirmed -> bounded by 2 events
    assert e.privacy.ledger.history[0]["draws"] == 2 + 1 + 2
    assert e.history[0]["eval_missing"] == [1]
    assert counts(e)["client1/batch"] == 5 and s["unconfirmed_clients"] == []


def test_too_few_replies_stop_cleanly(tmp_path, make_cfg, tiny_clip):
    cfg = make_cfg(**DP)
    r, e = run_local(cfg, out=tmp_path / "r", policy=FaultPolicy(min_fraction=1.0),
                     faults=[Fault(client=1, round=1, step=1, kind="raise", attempts=2)])
    s = r["summary"]
    assert s["stopped_reason"].startswith("faults: round 1 step 2/2: 1 of 2 sampled clients replied")
    assert s["rounds"] == 0 and (tmp_path / "r" / "summary.json").exists()
    # batches that released: both clients' step 1, client 0's step 2 (one event each)
    assert counts(e) == {"client0/batch": 2, "client1/batch": 1}
    led = json.loads((tmp_path / "r" / "ledger.json").read_text())
    assert sum(x["count"] for es in led["ledger"]["entries"].values() for x in es) == 3


def test_resume_inprocess_checkpoint_on_flower(tmp_path, tiny_clip, tiny_dataset, make_cfg):
    """Checkpoints are interchangeable: a run started in-process continues on the Flower apps."""
    full = inprocess(make_cfg(**DP), tiny_clip, tiny_dataset)  # 2 rounds
    inprocess(make_cfg(**DP, rounds=1), tiny_clip, tiny_dataset, out=tmp_path / "r")
    rd = RunDir(tmp_path / "r")
    cfg = rd.load_config()
    cfg.update({"rounds": 2})
    _, e = run_local(cfg, checkpoint=rd.load_checkpoint())
    assert_same_run(e, full)


def test_bad_setups_have_remedies(monkeypatch, make_cfg, tmp_path):
    import importlib.util

    from dpfpl.flower import run as fe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    with pytest.raises(DpfplError, match=r"pip install 'dpfpl\[flower\]'"):
        require_flwr()
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="cannot hold one client"):
        plan_resources(make_cfg(), 100, client_cpus=64, num_cpus=2, client_gpus=0)
    monkeypatch.setattr(fe, "_mem_available", lambda: 2**30)
    with pytest.raises(ConfigError, match="do not fit in memory"):
        plan_resources(make_cfg(num_clients=2), 100, client_cpus=1, num_cpus=2, client_gpus=0)
    monkeypatch.undo()

    import ray

    def boom(*a, **k):
        raise RuntimeError("cannot bind")

    monkeypatch.setattr(ray, "init", boom)
    with pytest.raises(DpfplError, match="Ray could not start.*loopback"):
        start_ray(tmp_path / ("x" * 60) / ".ray", 1, 0, 1, False)
    assert not list(tmp_path.glob("dpfpl-ray-*"))


def test_cli_engine_flag_without_flower(monkeypatch, tmp_path, capsys):
    import importlib.util

    from dpfpl.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    rc = main(["train", "--engine", "flower", "--pretrained", "none", "--rounds", "1", "--out", str(tmp_path / "r")])
    assert rc == 2 and "pip install 'dpfpl[flower]'" in capsys.readouterr().err


# ------------------------------------------------------------------------- Flower's simulation engine
@pytest.mark.slow
def test_simulation_engine_equals_inprocess(tmp_path, tiny_clip, make_cfg):
    """The real thing: Flower's simulation engine on Ray, 3 clients, DP."""
    from dpfpl.flower import run_flower

    cfg = make_cfg(**DP, num_clients=3)
    fl = run_flower(cfg, out=tmp_path / "fl", faults=[Fault(client=2, round=2, step=0, kind="raise")])
    ip = train(make_cfg(**DP, num_clients=3), out=tmp_path / "ip", clip=tiny_clip)
    # Ray actors run torch on 1 thread, this process on 2: float-close, not bit-equal
    assert_same_run(fl["_engine"], ip["_engine"], exact=False)
    assert fl["flower"]["retries"] == 1 and fl["flower"]["clientapp_processes"] >= 1
    assert not (tmp_path / "fl" / ".ray").exists()
    assert sorted(p.name for p in (tmp_path / "fl").iterdir()) == sorted(p.name for p in (tmp_path / "ip").iterdir())


@pytest.mark.slow
def test_cli_train_engine_flower(tmp_path):
    from dpfpl.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--engine", "flower", "--pretrained", "none", "--rounds", "1", "--local-steps", "1",
               "--n-ctx", "4", "--rank", "2", "--num-clients", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["engine"] == "flower" and s["rounds"] == 1 and 0 <= s["local_acc"] <= 1


def test_no_pickle_and_no_generator_state_leaves_a_client(tiny_clip, tiny_dataset, make_cfg, monkeypatch):
    """Every blob a ClientApp sends is safetensors + JSON (never unpickled), and no reply carries a
    noise or batch-selection generator state (secret or reproducible noise alike)."""
    import pickle as pickle_mod

    from dpfpl.flower import apps
    from dpfpl.serialize import unpack

    def refuse(*a, **k):
        raise AssertionError("pickle/torch.load used on a message")

    monkeypatch.setattr(apps.torch, "load", refuse)
    orig = apps._reply
    for extra in (DP, {k: v for k, v in DP.items() if k != "noise_seed"}):
        seen = []

        def spy(msg, arrays, metrics, config, seen=seen):
            seen.append(dict(config))
            return orig(msg, arrays, metrics, config)

        monkeypatch.setattr(apps, "_reply", spy)
        run_local(make_cfg(**extra))
        blobs = [c["state"] for c in seen if "state" in c]
        assert blobs
        for b in blobs:
            snap = unpack(b)
            assert set(snap) == {"client", "ledger", "draws"}
            assert snap["client"]["sampler"]["gen"] is None
        assert not any("noise_gen" in json.dumps(list(c)) for c in seen)
    assert "pickle" not in open(apps.__file__).read().replace("unpickled", "")
    assert pickle_mod is not None
