"""Vectorised clients (train.vectorize_clients) equal the client-by-client loop: same prompts,
accuracies, losses, ledger and noise draws, for DP and non-private runs, both protocols, the
per-example strategies, Poisson batches of unequal (and empty) size; the batched encoder and
gradients equal the single-client ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpfpl import vectorized
from dpfpl.config import RunConfig
from dpfpl.engine import Engine
from dpfpl.errors import ConfigError
from dpfpl.federation import PendingStep
from dpfpl.grads import batch_ctx_grad, per_example_ctx_grads
from dpfpl.text import PromptTextEncoder

from .conftest import CLASSNAMES

TOL = dict(atol=1e-5, rtol=1e-5)
# reproducible noise, explicit multipliers, RDP: no calibration search, the same draws in both runs
DP = {"privacy": "dp", "noise_seed": 7, "accountant": "rdp", "noise_multiplier_local": 1.0,
      "noise_multiplier_global": 1.0}


@pytest.fixture
def batch_sizes(monkeypatch):
    """Records the batch sizes B_k of every vectorised pass."""
    seen: list[list[int]] = []
    padded = vectorized._padded

    def spy(pendings):
        out = padded(pendings)
        seen.append(list(out[3]))
        return out

    monkeypatch.setattr(vectorized, "_padded", spy)
    return seen


def _run(make_cfg, clip, dataset, vectorize: bool, **ov) -> Engine:
    e = Engine(make_cfg(vectorize_clients=vectorize, **ov), clip=clip, dataset=dataset)
    assert e.vectorized is vectorize
    e.run()
    return e


def _assert_same(a: Engine, b: Engine) -> None:
    torch.testing.assert_close(a.server.p_G.detach(), b.server.p_G.detach(), **TOL)
    for ca, cb in zip(a.clients, b.clients):
        assert ca.local.keys() == cb.local.keys()
        for k in ca.local:
            torch.testing.assert_close(ca.local[k].detach(), cb.local[k].detach(), **TOL)
            torch.testing.assert_close(ca.personal_context(a.server.p_G), cb.personal_context(b.server.p_G), **TOL)
        assert ca.steps == cb.steps and torch.equal(ca.used, cb.used)  # the same batches
    assert len(a.history) == len(b.history) == a.cfg.train.rounds
    for ra, rb in zip(a.history, b.history):
        assert ra["clients"] == rb["clients"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], abs=1e-5, nan_ok=True)
        assert ra["local_acc_per_client"] == pytest.approx(rb["local_acc_per_client"], abs=1e-5)
        assert ra["neighbor_acc_per_client"] == pytest.approx(rb["neighbor_acc_per_client"], abs=1e-5)
        for k in ra:
            if k.startswith("epsilon"):
                assert ra[k] == pytest.approx(rb[k], rel=1e-12)
    if a.privacy.ledger is not None:
        assert a.privacy.ledger.state_dict() == b.privacy.ledger.state_dict()
        assert a.privacy.draws == b.privacy.draws > 0
        assert a.privacy.ledger_json()["mechanisms"] == b.privacy.ledger_json()["mechanisms"]


CASES = {
    # DP, Poisson batches (unequal sizes), the grad protocol, 3 of 4 clients sampled per round
    "dpfpl-dp-grad": dict(method="dpfpl", num_clients=4, client_fraction=0.75, **DP),
    "dpfpl-dp-fedavg": dict(method="dpfpl", protocol="fedavg", **DP),
    "fedpgp-dp-grad": dict(method="fedpgp", **DP),
    "local-dp": dict(method="local", noise_seed=7, privacy="dp", accountant="rdp", noise_multiplier_local=1.0),
    "dpfpl-dp-jacobian-shuffle": dict(method="dpfpl", per_example_grads="jacobian", sampling="shuffle", **DP),
    "dpfpl-nonprivate-grad": dict(method="dpfpl"),
    "fedprompt-nonprivate-fedavg": dict(method="fedprompt"),
    "fedotp-nonprivate": dict(method="fedotp"),
    "dpfpl-nores-nonprivate": dict(method="dpfpl-nores", num_clients=4),
    "promptfl-reference": dict(method="promptfl", privacy="reference", epsilon=5.0, noise_seed=7, accountant="rdp"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vectorized_equals_sequential(case, make_cfg, tiny_clip, tiny_dataset, batch_sizes):
    ov = CASES[case]
    seq = _run(make_cfg, tiny_clip, tiny_dataset, False, **ov)
    assert batch_sizes == []
    vec = _run(make_cfg, tiny_clip, tiny_dataset, True, **ov)
    K = max(1, round(vec.cfg.train.client_fraction * vec.cfg.data.num_clients))
    steps = vec.cfg.train.rounds * vec.local_steps
    assert len(batch_sizes) == steps and all(len(s) == K for s in batch_sizes)  # one pass per step
    _assert_same(seq, vec)
    if vec.cfg.batch_sampling == "poisson":
        assert any(len(set(s)) > 1 for s in batch_sizes)  # padding + masking was exercised


def test_empty_poisson_batches(make_cfg, tiny_clip, tiny_dataset, batch_sizes):
    """q = 1/20: some clients draw empty batches (B_k = 0) next to non-empty ones."""
    ov = dict(method="dpfpl", batch_size=1, num_clients=4, local_steps=4, rounds=1, **DP)
    seq = _run(make_cfg, tiny_clip, tiny_dataset, False, **ov)
    vec = _run(make_cfg, tiny_clip, tiny_dataset, True, **ov)
    assert any(0 in s and max(s) > 0 for s in batch_sizes)
    _assert_same(seq, vec)


def test_forward_stacked_equals_forward(tiny_clip):
    enc = PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(3, 4, enc.width, generator=g) * 0.02  # (K, n_ctx, D)
    out = enc.forward_stacked(ctx)  # (K, C, E)
    assert out.shape == (3, len(CLASSNAMES), 64)
    for k in range(3):
        torch.testing.assert_close(out[k], enc(ctx[k]), atol=1e-6, rtol=1e-5)
    per_class = ctx.unsqueeze(1).expand(3, len(CLASSNAMES), 4, enc.width)  # (K, C, n_ctx, D)
    torch.testing.assert_close(enc.forward_stacked(per_class), out, atol=1e-6, rtol=1e-5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b|| (0 for two empty or zero tensors)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("strategy", ["vjp", "jacobian"])
def test_stacked_per_example_grads_equal_single(tiny_clip, strategy):
    """Padded batches of sizes 8, 0, 7, 3 (vjp: groups {8, 7} padded to 8, and {3}): each client's
    per-example gradients and loss equal dpfpl.grads.per_example_ctx_grads on its own batch; the
    batch means equal batch_ctx_grad."""
    enc = PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4)
    g = torch.Generator().manual_seed(1)
    sizes = [8, 0, 7, 3]
    assert vectorized.size_groups(sizes) == [[0, 2], [3]]
    pend = [PendingStep(F.normalize(torch.randn(b, 64, generator=g), dim=-1), torch.randint(0, 8, (b,), generator=g),
                        None, torch.randn(4, enc.width, generator=g) * 0.02) for b in sizes]
    feats, labels, mask, got_sizes = vectorized._padded(pend)
    assert got_sizes == sizes and feats.shape == (4, 8, 64) and mask.sum() == 18
    ctx = torch.stack([p.ctx for p in pend])  # (K, n_ctx, D)
    per = vectorized._per_example_grads(enc, ctx, feats, labels, mask, sizes, 30.0, strategy, None)
    mean = vectorized._batch_mean_grads(enc, ctx, feats, labels, mask, sizes, 30.0)
    for p, (loss, G), (mloss, mG) in zip(pend, per, mean):
        ref_losses, ref_G = per_example_ctx_grads(enc, p.ctx, p.feats, p.labels, 30.0, strategy="vjp")
        assert G.shape == ref_G.shape == (p.batch_size, 4, enc.width)
        assert _rel(G, ref_G) < 1e-5
        ref_mloss, ref_mG = batch_ctx_grad(enc, p.ctx, p.feats, p.labels, 30.0)
        assert _rel(mG, ref_mG) < 1e-5
        assert mloss == pytest.approx(ref_mloss, rel=1e-6, abs=1e-6)
        if p.batch_size:
            assert loss == pytest.approx(float(ref_losses.mean()), rel=1e-6, abs=1e-6)
            assert G.abs().sum() > 0
        else:
            assert loss != loss and float(mG.abs().sum()) == 0.0  # nan loss, zero gradient


def test_size_groups_bound_padding():
    assert vectorized.size_groups([16, 15, 14, 13, 0, 20, 1]) == [[5], [0, 1, 2], [3], [6]]
    assert vectorized.size_groups([0, 0]) == []
    sizes = [12, 19, 16, 16, 22, 9, 17, 14, 18, 20]
    groups = vectorized.size_groups(sizes)
    assert sorted(k for gr in groups for k in gr) == list(range(len(sizes)))
    for gr in groups:  # padded pullbacks <= 1/7 of the real ones
        real = sum(sizes[k] for k in gr)
        assert len(gr) * max(sizes[k] for k in gr) - real <= real / 7


def test_option_and_fallback(make_cfg, tiny_clip, tiny_dataset):
    assert RunConfig().train.vectorize_clients is None  # auto: on in-process, off on Flower
    assert Engine(make_cfg(), clip=tiny_clip, dataset=tiny_dataset).vectorized
    assert RunConfig().update({"vectorize_clients": "none"}).validate().train.vectorize_clients is None
    assert RunConfig().update({"vectorize_clients": "true"}).validate().train.vectorize_clients is True
    assert RunConfig().update({"vectorize_clients": "false"}).validate().train.vectorize_clients is False
    with pytest.raises(ConfigError, match="vectorize_clients"):
        RunConfig().update({"vectorize_clients": "maybe"})
    cfg = RunConfig()
    cfg.train.vectorize_clients = 1
    with pytest.raises(ConfigError, match="vectorize_clients"):
        cfg.validate()
    e = Engine(make_cfg(method="zeroshot", vectorize_clients=True), clip=tiny_clip, dataset=tiny_dataset)
    assert not e.vectorized and "trains nothing" in e.sequential_reason
    off = Engine(make_cfg(vectorize_clients=False), clip=tiny_clip, dataset=tiny_dataset)
    assert off.sequential_reason == "train.vectorize_clients=false"


def test_flower_refuses_vectorize_true(make_cfg, tmp_path, capsys):
    """Flower runs one ClientApp per client: vectorize_clients=true cannot take effect there, so the
    CLI refuses it in one line with status 2 before the run directory exists; the config check that
    every run (new or resumed) passes refuses it too. Unset (the default) or false is fine."""
    pytest.importorskip("flwr")
    from dpfpl.cli import main
    from dpfpl.preflight import check_config

    out = tmp_path / "run"
    rc = main(["train", "--engine", "flower", "--vectorize-clients", "true", "--rounds", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not out.exists()
    assert err == ["dpfpl: error: train.vectorize_clients=true cannot take effect on the Flower engine (one "
                   "ClientApp per client steps one client); leave it unset or false"]
    with pytest.raises(ConfigError, match="vectorize_clients=true cannot take effect"):
        check_config(make_cfg(vectorize_clients=True), engine="flower")
    for ok in (None, False):
        check_config(make_cfg(vectorize_clients=ok), engine="flower")
    check_config(make_cfg(vectorize_clients=True))  # the in-process engine runs it
