"""Micro-benchmarks (pytest-benchmark). Not part of the default test run; run them with

    make microbench        # = python -m pytest bench --benchmark-only --benchmark-enable -q

Covered: one training step per method, private and not; a 16-client round, sequential vs vectorised; per-example vs batch gradients; the
power-iteration factorisation; the accountant (RDP, PLD, calibration); the text encoder with and
without the end-of-text cut; minibatch features with the image-feature cache on and off.

Setup: the shipped tiny architecture (random weights: timings do not depend on them) and the
synthetic task's 16 class names. Each benchmark warms up, then reports pytest-benchmark's
statistics (use the median); on CUDA every call ends with a synchronisation. Every result carries
the device name and torch thread count in ``extra_info``. ``DPFPL_BENCH_THREADS`` sets the torch
threads (default 1: the tiny model gains nothing from more, and loses a lot on shared cores);
``DPFPL_BENCH_DEVICE`` the device (default: cuda if available, else cpu).
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.timing import device_name, synchronize

pytest.importorskip("pytest_benchmark")

DEVICE = os.environ.get("DPFPL_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
THREADS = int(os.environ.get("DPFPL_BENCH_THREADS", "1"))
TRAINABLE = ["local", "promptfl", "fedprompt", "fedotp", "fedpgp", "dpfpl-nores", "dpfpl"]
BASE = {"pretrained": "none", "device": DEVICE, "num_clients": 4, "rounds": 1, "local_steps": 1,
        "batch_size": 32, "n_ctx": 16, "rank": 8, "lr": 0.1}


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def clip():
    from dpfpl.clip import load_clip

    torch.manual_seed(0)
    return load_clip("dpfpl-tiny", None, DEVICE)


@pytest.fixture(scope="module")
def dataset():
    from dpfpl.data import load_dataset

    return load_dataset("synthetic", None, seed=0, n_classes=16, train_per_class=40, test_per_class=5)


def _info(benchmark, **kw):
    benchmark.extra_info.update({"device": device_name(DEVICE), "torch_threads": torch.get_num_threads(), **kw})


def _synced(fn):
    def run():
        out = fn()
        synchronize(DEVICE)
        return out
    return run


_ENGINES: dict = {}


def _engine(method: str, private: bool, clip, dataset):
    from dpfpl.config import RunConfig
    from dpfpl.engine import Engine

    key = (method, private)
    if key not in _ENGINES:
        ov = dict(BASE, method=method)
        if private:
            # explicit noise multipliers (for the parts the method has: another is an error): the step's cost,
            # without the calibration search
            from dpfpl.registry import get_method

            m = get_method(method)
            ov.update(privacy="dp", **({"noise_multiplier_local": 1.0} if m.uses_local else {}),
                      **({"noise_multiplier_global": 1.0} if m.uses_global else {}))
        _ENGINES[key] = Engine(RunConfig().update(ov), clip=clip, dataset=dataset)
    return _ENGINES[key]


@pytest.mark.parametrize("private", [False, True], ids=["nonprivate", "dp"])
@pytest.mark.parametrize("method", TRAINABLE)
def test_train_step(benchmark, method, private, clip, dataset):
    """One client's local step (batch 32, 16 context vectors) and the server update it feeds."""
    eng = _engine(method, private, clip, dataset)
    client, server = eng.clients[0], eng.server
    if eng.protocol == "fedavg":
        def step():
            server.apply_parameters([client.fedavg_round(server.p_G, 1)])
    else:
        def step():
            c = client.step(server.p_G)
            if c is not None:
                server.apply_gradients([c])
    _info(benchmark, method=method, private=private, batch_size=BASE["batch_size"], n_ctx=BASE["n_ctx"],
          protocol=eng.protocol)
    benchmark.pedantic(_synced(step), rounds=12 if private else 30, warmup_rounds=2, iterations=1)


@pytest.fixture(scope="module")
def encoder(clip, dataset):
    from dpfpl.text import PromptTextEncoder

    return PromptTextEncoder(clip, dataset.classnames, BASE["n_ctx"], cut=True)


def _batch(B: int, enc, n_classes: int):
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(B, enc.tower.text_projection.shape[1], generator=g), dim=-1)
    labels = torch.randint(0, n_classes, (B,), generator=g)
    ctx = torch.randn(BASE["n_ctx"], enc.width, generator=g) * 0.02
    dev = enc.prefix.device
    return ctx.to(dev), feats.to(dev), labels.to(dev)


@pytest.mark.parametrize("B", [8, 32, 256])
@pytest.mark.parametrize("kind", ["batch", "per_example", "per_example_jacobian"])
def test_context_gradients(benchmark, kind, B, encoder, dataset):
    """G = dLoss/dctx: one batch-mean gradient vs B per-example gradients, by vjp + vmap
    ("per_example") and by the text Jacobian once plus one product ("per_example_jacobian");
    ``python -m bench.per_example`` sweeps B further and measures memory."""
    from dpfpl.grads import batch_ctx_grad, per_example_ctx_grads

    ctx, feats, labels = _batch(B, encoder, len(dataset.classnames))
    strategy = "jacobian" if kind == "per_example_jacobian" else "vjp"
    fn = (lambda: batch_ctx_grad(encoder, ctx, feats, labels, 100.0)) if kind == "batch" else \
        (lambda: per_example_ctx_grads(encoder, ctx, feats, labels, 100.0, strategy=strategy))
    _info(benchmark, kind=kind, batch_size=B, n_classes=len(dataset.classnames), seq_len=encoder.length)
    benchmark.pedantic(_synced(fn), rounds=20, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("shape", [(16, 64), (16, 512)], ids=["tiny-16x64", "vitb-16x512"])
def test_factorisation(benchmark, shape):
    """One power iteration p_L = u v^T + r at rank 8 (done every local step by DP-FPL)."""
    from dpfpl.lowrank import power_factorize

    g = torch.Generator().manual_seed(0)
    p = torch.randn(*shape, generator=g).to(DEVICE)
    _info(benchmark, shape=list(shape), rank=8)
    benchmark.pedantic(_synced(lambda: power_factorize(p, 8, g)), rounds=50, warmup_rounds=5, iterations=5)


@pytest.mark.parametrize("what", ["rdp", "pld", "calibrate"])
def test_accountant(benchmark, what):
    """eps of T = 1000 Poisson-subsampled Gaussian steps (q 0.01, sigma 1.1) by RDP and PLD, and the
    noise-multiplier search for eps 2 over 144 steps at q 0.02."""
    from dpfpl.privacy import calibrate_noise_multiplier, make_event, pld_epsilon, rdp_epsilon

    ev = [(make_event(1.1, 0.01), 1000)]
    fns = {"rdp": lambda: rdp_epsilon(ev, 1e-5), "pld": lambda: pld_epsilon(ev, 1e-5),
           "calibrate": lambda: calibrate_noise_multiplier(2.0, 1e-5, 0.02, 144)}
    _info(benchmark, what=what)
    benchmark.pedantic(fns[what], rounds=3 if what != "rdp" else 10, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("cut", [True, False], ids=["cut", "full77"])
def test_text_encoder(benchmark, cut, clip, dataset):
    """Forward + backward of the prompt text encoder (16 classes), with the exact end-of-text cut
    (sequence ~22 tokens) and without (77)."""
    from dpfpl.text import PromptTextEncoder

    enc = PromptTextEncoder(clip, dataset.classnames, BASE["n_ctx"], cut=cut)
    ctx = (torch.randn(BASE["n_ctx"], enc.width) * 0.02).to(clip.device).requires_grad_(True)

    def fwd_bwd():
        enc(ctx).sum().backward()
        ctx.grad = None

    _info(benchmark, cut=cut, seq_len=enc.length)
    benchmark.pedantic(_synced(fwd_bwd), rounds=20, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("cache", [True, False], ids=["cache", "nocache"])
def test_feature_store(benchmark, cache, clip, dataset):
    """Image features of a 32-example minibatch: from the cache vs encoding the images again."""
    from dpfpl.features import FeatureStore

    store = FeatureStore(clip, {"train": dataset.train}, cache=cache)
    idx = torch.arange(32)
    _info(benchmark, cache=cache, batch_size=32)
    benchmark.pedantic(_synced(lambda: store.get("train", idx)), rounds=20, warmup_rounds=2, iterations=1)


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorized"])
@pytest.mark.parametrize("private", [False, True], ids=["nonprivate", "dp"])
def test_round_clients(benchmark, private, vectorize, clip):
    """One training round of 16 clients (dpfpl, batch 16 Poisson, 1 local step), the clients one
    after another vs in one batched pass (train.vectorize_clients); ``python -m bench.vectorize``
    sweeps the client count and writes the speedup table."""
    from bench.vectorize import _dataset, _engines

    K = 16
    eng = _engines(K, private, clip, _dataset(K))[vectorize]
    eng.train_round()
    _info(benchmark, clients=K, private=private, vectorize=vectorize)
    benchmark.pedantic(_synced(eng.train_round), rounds=3 if private else 10, warmup_rounds=0, iterations=1)
