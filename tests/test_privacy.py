"""DP mechanisms in the engine: clipping, noise scale, ledger = draws, calibration, budget, resume,
reference mode (claimed vs accounted)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpfpl.engine import Engine
from dpfpl.errors import BudgetExhausted, ConfigError
from dpfpl.privacy import reference_sigma
from dpfpl.privacy.dp import clip_and_sum, parse_clip_unit

from .conftest import StopAfter
from dpfpl.train import train


def dp_cfg(make_cfg, **kw):
    base = dict(privacy="dp", epsilon=2.0, clip_norm=1.0, batch_size=8, rounds=2, local_steps=2)
    base.update(kw)
    return make_cfg(**base)


def test_clip_and_sum_bounds_every_unit():
    torch.manual_seed(0)
    g = {"u": torch.randn(6, 4, 2) * 5, "v": torch.randn(6, 8, 2) * 5}
    units = torch.tensor([0, 0, 1, 2, 2, 2])
    C = 1.0
    # each unit's joint clipped norm <= C, so the sum of 3 units has norm <= 3C
    out = clip_and_sum(g, units, 3, C)
    total = math.sqrt(sum(float(t.pow(2).sum()) for t in out.values()))
    assert total <= 3 * C + 1e-5
    # a unit already inside the ball is untouched
    small = {"u": torch.full((1, 2), 0.1)}
    assert torch.allclose(clip_and_sum(small, torch.tensor([0]), 1, C)["u"], small["u"][0])
    # per unit: clip of each unit individually
    for k in range(3):
        sub = {n: t[units == k] for n, t in g.items()}
        c = clip_and_sum(sub, torch.zeros(int((units == k).sum()), dtype=torch.long), 1, C)
        assert math.sqrt(sum(float(t.pow(2).sum()) for t in c.values())) <= C + 1e-5


@pytest.mark.parametrize("unit, expected", [("example", ("example", 1)), ("batch", ("batch", 0)),
                                            ("microbatch:4", ("microbatch", 4)), ("microbatch:1", ("example", 1))])
def test_parse_clip_unit(unit, expected):
    assert parse_clip_unit(unit) == expected


@pytest.mark.parametrize("bad", ["microbatch:0", "micro", "microbatch:x"])
def test_parse_clip_unit_rejects(bad):
    with pytest.raises(ConfigError, match="clip_unit"):
        parse_clip_unit(bad)


@pytest.mark.parametrize("sampling, divisor", [("poisson", 8), ("shuffle", 5)])
def test_local_noise_std_matches_formula(tiny_clip, tiny_dataset, make_cfg, sampling, divisor):
    """With zero gradients the released local gradient is pure noise of std nm C / norm, where norm
    is the EXPECTED batch size B=8 under Poisson sampling and the realised batch's size (here 5,
    unequal to B so the two rules give different stds) under shuffling."""
    e = Engine(dp_cfg(make_cfg, method="fedotp", noise_multiplier_local=2.0, noise_multiplier_global=1.0,
                      epsilon=None, sampling=sampling), clip=tiny_clip, dataset=tiny_dataset)
    c = e.clients[0]
    c.last_local_idx = torch.arange(5)  # a realised batch of 5 examples, expected size 8
    zeros = {"p_L": torch.zeros(5, 4, 64)}
    draws = torch.stack([e.privacy.local(c, zeros)["p_L"] for _ in range(200)])  # (200, 4, 64)
    expected = 2.0 * 1.0 / divisor
    assert abs(draws.std().item() - expected) / expected < 0.02
    assert abs(draws.mean().item()) < 0.01
    assert e.privacy.draws == 200 and e.privacy.ledger.count("client0/local") == 200


@pytest.mark.parametrize("kw", [dict(method="dpfpl"), dict(method="fedotp", sampling="shuffle"),
                                dict(method="dpfpl-nores", clip_unit="microbatch:3"),
                                dict(method="fedprompt"), dict(method="fedpgp", privacy="reference", epsilon=0.5)])
def test_ledger_events_equal_noise_draws(tiny_clip, tiny_dataset, make_cfg, kw):
    """Every noise draw is in the ledger: a client's local draws under client{i}/local; a global
    draw under client{i}/global of every client whose data it covers (one server draw covers
    all participating clients under the grad protocol)."""
    calls = []
    e = Engine(dp_cfg(make_cfg, **kw), clip=tiny_clip, dataset=tiny_dataset)
    orig = e.privacy._joint_noise

    def counting(tensors, std, gen):
        calls.append(std)
        return orig(tensors, std, gen)

    e.privacy._joint_noise = counting
    e.run()
    led = e.privacy.ledger
    steps = e.cfg.train.rounds * e.local_steps
    n = len(e.clients)
    assert len(calls) == e.privacy.draws
    local_per_step = 0 if not e.method.uses_local else (2 if kw.get("privacy") == "reference" else 1)
    for c in e.clients:
        assert led.count(f"client{c.id}/local") == steps * local_per_step
        assert led.count(f"client{c.id}/global") == steps
    server_draws = steps if e.protocol == "grad" else n * steps  # fedavg: each client's DP-SGD step
    assert len(calls) == n * steps * local_per_step + server_draws


def test_calibrated_run_meets_target(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    s = train(dp_cfg(make_cfg, method="dpfpl", epsilon=1.5), out=tmp_path / "r", clip=tiny_clip, dataset=tiny_dataset)
    assert s["epsilon_target"] == 1.5
    assert 0.98 * 1.5 <= s["epsilon_spent"] <= 1.5
    assert s["epsilon_pld"] <= s["epsilon_spent"]  # PLD is tighter than RDP
    assert s["stopped_reason"] is None and s["rounds"] == 2
    ledger = json.loads((tmp_path / "r" / "ledger.json").read_text())
    assert ledger["neighbouring_relation"] == "add/remove-one example"
    assert sum(e["count"] for es in ledger["ledger"]["entries"].values() for e in es) == s["ledger_events"]
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["epsilon_spent"] < rows[1]["epsilon_spent"]  # eps per round, growing


def test_budget_stops_cleanly_and_keeps_results(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    """Noise fixed by hand, a budget that allows only some rounds: training stops before the
    release that would exceed it, records why, and keeps everything."""
    cfg = dp_cfg(make_cfg, method="promptfl", epsilon=1.0, noise_multiplier_global=3.0, rounds=50)
    s = train(cfg, out=tmp_path / "r", clip=tiny_clip, dataset=tiny_dataset)
    assert 0 < s["rounds"] < 50
    assert "privacy budget" in s["stopped_reason"]
    assert s["epsilon_spent"] <= 1.0
    assert (tmp_path / "r" / "summary.json").exists() and (tmp_path / "r" / "prompts.safetensors").exists()
    # resuming a run whose budget is spent is refused before any training
    with pytest.raises(BudgetExhausted, match="nothing was trained"):
        train(resume=tmp_path / "r", clip=tiny_clip, dataset=tiny_dataset)


def test_resume_keeps_ledger(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    cfg = dp_cfg(make_cfg, method="dpfpl", rounds=3)
    full = train(cfg, out=tmp_path / "full", clip=tiny_clip, dataset=tiny_dataset)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "part", clip=tiny_clip, dataset=tiny_dataset, callbacks=(StopAfter(1),))
    res = train(resume=tmp_path / "part", clip=tiny_clip, dataset=tiny_dataset)
    assert res["noise_draws"] == full["noise_draws"] and res["ledger_events"] == full["ledger_events"]
    assert res["epsilon_spent"] == pytest.approx(full["epsilon_spent"], rel=1e-12)
    assert res["local_acc"] == full["local_acc"]
    assert torch.equal(res["_engine"].server.p_G, full["_engine"].server.p_G)


def test_reference_mode_claim_vs_accounted(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    s = train(make_cfg(method="dpfpl", privacy="reference", epsilon=0.4, rounds=2, batch_size=8),
              out=tmp_path / "r", clip=tiny_clip, dataset=tiny_dataset)
    assert s["epsilon_claimed"] == pytest.approx(0.4)
    assert s["reference_sigma"] == pytest.approx(math.sqrt(2 * math.log(1e5)) / 0.4)
    assert s["reference_sigma"] == pytest.approx(reference_sigma(0.4, 2, 1e-5))
    assert s["epsilon_spent"] > 10 * s["epsilon_claimed"]
    assert s["privacy"] == "reference"
    # the config asked for Poisson sampling (the default) and per-example clipping: the reference
    # rule runs shuffled batches and batch-mean clipping instead, and the summary says so
    assert make_cfg().privacy.sampling == "poisson"
    assert s["sampling"] == "shuffle" and s["clip_unit"] == "batch-mean (reference)"


def test_reference_mode_counts_one_exposure_per_epoch(tiny_clip, tiny_dataset, make_cfg):
    """Shuffled batches partition an epoch (replace-one): each mechanism exposes an example once per
    epoch; the other draws are no-ops, and the run's eps equals the closed event count's."""
    from dp_accounting import dp_event

    from dpfpl.privacy.accounting import reference_accounted_events, rdp_epsilon

    e = Engine(make_cfg(method="dpfpl", privacy="reference", epsilon=0.5, rounds=3, batch_size=8),
               clip=tiny_clip, dataset=tiny_dataset)
    e.run()
    led, steps = e.privacy.ledger, e.cfg.train.rounds * e.local_steps
    for c in e.clients:
        epochs = c.sampler.epochs
        assert epochs == -(-steps * 8 // c.n_train)  # ceil(steps B / n): batches never straddle epochs here
        real = lambda subj: sum(n for ev, n in led.entries(subj) if not isinstance(ev, dp_event.NoOpDpEvent))
        assert real(f"client{c.id}/local") == 2 * epochs and real(f"client{c.id}/global") == epochs
        assert led.count(f"client{c.id}/local") == 2 * steps  # every draw is still recorded
    assert 1 < epochs < steps
    ev = reference_accounted_events(e.privacy.sigma, 8, e.local_steps, 3, len(e.clients), epochs=epochs)
    assert sum(n for _, n in ev["local"]) == 2 * epochs and sum(n for _, n in ev["global"]) == epochs
    every_step = reference_accounted_events(e.privacy.sigma, 8, e.local_steps, 3, len(e.clients))
    assert rdp_epsilon(ev["personalized"], 1e-5) < rdp_epsilon(every_step["personalized"], 1e-5)


@pytest.mark.parametrize("kw, needle", [
    (dict(epsilon=0.0), "privacy.epsilon must be positive"),
    (dict(epsilon=-1.0), "privacy.epsilon must be positive"),
    (dict(delta=0.0), "privacy.delta must be in (0, 1)"),
    (dict(delta=1.5), "privacy.delta must be in (0, 1)"),
    (dict(clip_norm=0.0), "privacy.clip_norm must be positive"),
    (dict(epsilon=None), "needs --epsilon"),
    (dict(privacy="reference", epsilon=None), "needs --epsilon"),
    (dict(clip_unit="microbatch:0"), "clip_unit"),
    (dict(dp_level="client"), "fedavg"),
    (dict(epsilon=1e-9, rounds=1), "cannot calibrate"),
])
def test_bad_privacy_input(tiny_clip, tiny_dataset, make_cfg, kw, needle):
    with pytest.raises(ConfigError) as err:
        Engine(dp_cfg(make_cfg, **kw), clip=tiny_clip, dataset=tiny_dataset)
    assert needle in str(err.value)


def test_delta_not_below_one_over_n_warns(tiny_clip, tiny_dataset, make_cfg, capsys):
    Engine(dp_cfg(make_cfg, delta=0.1), clip=tiny_clip, dataset=tiny_dataset)
    assert "not below 1/n" in capsys.readouterr().err


def test_client_level_dp_fedavg(tiny_clip, tiny_dataset, make_cfg):
    e = Engine(dp_cfg(make_cfg, method="fedprompt", dp_level="client", epsilon=3.0, rounds=2),
               clip=tiny_clip, dataset=tiny_dataset)
    e.run()
    s = e.privacy.summary()
    assert e.privacy.ledger.count("server/client_level") == 2
    assert 0.97 * 3.0 <= s["epsilon_spent"] <= 3.0
