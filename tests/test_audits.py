"""Membership-inference audits: attacks on toy targets, controls, the membership record, outputs,
bad input. Everything runs on the tiny fixtures (random tiny CLIP, tiny dataset) with tiny recipes.

Toy targets where membership is obvious: (1) constructed signals (members' logit-scaled confidence
shifted up in the target and in IN shadows); (2) real engine training on a world whose image features
are random unit vectors (pure memorisation: nothing generalises, so members stand out), with a
recipe that overfits. The tiny random CLIP's own image features are almost collinear, which is why
the end-to-end tests replace them.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audits.attacks import (evaluate_scores, lira_scores, loss_attack, rmia_scores, shokri_attack)
from audits.audit import AuditSettings, audit_run_dir, audit_train
from audits.canary import make_canaries
from audits.report import STABLE_KEYS
from audits.shadow import ShadowDesign, shared_store
from audits.target import Signals, World, load_run_dir, signals_from_logits
from dpfpl.data import partition
from dpfpl.data.base import ArraySplit, Dataset
from dpfpl.errors import ConfigError, DataError


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# constructed signals

def _sig(phi: np.ndarray) -> Signals:
    """Two-class signals with logit-scaled confidence phi on the true class 0."""
    lt = torch.as_tensor(np.c_[phi, np.zeros_like(phi)])
    return signals_from_logits(lt, torch.zeros(phi.size, dtype=torch.long))


def _toy(effect_target: float, n: int = 300, K: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    hard = rng.normal(0, 1.5, n)                  # per-example difficulty
    member = rng.random(n) < 0.5                  # coin-flip membership
    M = np.zeros((K, n), bool)
    for p in range(K // 2):
        m = rng.random(n) < 0.5
        M[2 * p], M[2 * p + 1] = m, ~m
    sh = [_sig(hard + 3.0 * M[k] + rng.normal(0, 0.3, n)) for k in range(K)]
    tgt = _sig(hard + effect_target * member + rng.normal(0, 0.3, n))
    z_h = rng.normal(0, 1.5, 200)
    tz = _sig(z_h + rng.normal(0, 0.3, 200))
    rz = np.stack([_sig(z_h + rng.normal(0, 0.3, 200)).conf for _ in range(K)])
    return tgt, sh, M, member, tz, rz


def _all_scores(tgt, sh, M, tz, rz):
    labels = np.zeros(M.shape[1], int)
    lr = lira_scores(tgt.logit_conf, np.stack([s.logit_conf for s in sh]), M)
    return {
        "loss": loss_attack(tgt),
        "shadow": shokri_attack(tgt, sh, M, labels),
        "lira": lr["online"],
        "lira-offline": lr["offline"],
        "rmia": rmia_scores(tgt.conf, np.stack([s.conf for s in sh]), M, tz.conf, rz)["scores"],
    }


def test_signals_are_consistent():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    s = signals_from_logits(logits, torch.tensor([0, 2]))
    p = torch.softmax(logits.double(), -1)
    py = np.array([p[0, 0], p[1, 2]])
    assert np.allclose(s.conf, py) and np.allclose(s.loss, -np.log(py))
    assert np.allclose(s.logit_conf, np.log(py / (1 - py)))


def test_attacks_separate_obvious_members():
    tgt, sh, M, member, tz, rz = _toy(effect_target=3.0)
    for name, sc in _all_scores(tgt, sh, M, tz, rz).items():
        r = evaluate_scores(sc, member, delta=1e-5, design="randomized")
        # loss and Shokri do not correct for per-example difficulty; LiRA and RMIA must be near-perfect
        assert r["auc"] > {"loss": 0.75, "shadow": 0.85}.get(name, 0.95), (name, r["auc"])
        assert r["eps_lower_bound"] > (0.2 if name == "loss" else 1.0), (name, r["eps_lower_bound"])
        assert r["bound_sound"] is True


def test_attacks_find_nothing_without_membership_signal():
    tgt, sh, M, member, tz, rz = _toy(effect_target=0.0, seed=1)
    for name, sc in _all_scores(tgt, sh, M, tz, rz).items():
        r = evaluate_scores(sc, member, delta=1e-5, design="randomized")
        assert abs(r["auc"] - 0.5) < 0.15, (name, r["auc"])
        assert r["eps_lower_bound"] < 0.2, (name, r["eps_lower_bound"])


def test_lira_variants_and_missing_in_or_out():
    tgt, sh, M, member, _, _ = _toy(effect_target=3.0, K=2)
    phi = np.stack([s.logit_conf for s in sh])
    a = lira_scores(tgt.logit_conf, phi, M, variance="fixed")
    b = lira_scores(tgt.logit_conf, phi, M, variance="per-example")
    assert a["variance"] == "fixed" and b["variance"] == "per-example"
    assert np.isfinite(a["online"]).all() and np.isfinite(b["online"]).all()
    # all shadows OUT for every example: IN means are extrapolated, scores stay finite
    c = lira_scores(tgt.logit_conf, phi, np.zeros_like(M))
    assert np.isfinite(c["online"]).all()
    with pytest.raises(ConfigError, match="2 shadow"):
        lira_scores(tgt.logit_conf, phi[:1], M[:1])


def test_rmia_offline_with_one_reference():
    tgt, sh, M, member, tz, rz = _toy(effect_target=3.0)
    r = rmia_scores(tgt.conf, sh[0].conf[None], M[:1], tz.conf, rz[:1])
    assert r["mode"] == "offline"
    assert evaluate_scores(r["scores"], member, 1e-5)["auc"] > 0.8


def test_evaluate_scores_designs():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    s = rng.normal(size=400) + 2.0 * y
    r = evaluate_scores(s, y, delta=1e-5, design="fixed")
    assert r["bound_sound"] is False and r["eps_lower_bound"] == r["eps_lower_bound_roc"]
    assert "eps_lower_bound_one_run" not in r
    r2 = evaluate_scores(s, y, delta=1e-5, design="randomized")
    assert r2["eps_lower_bound"] == r2["eps_lower_bound_one_run"]
    for k in ("auc", "balanced_accuracy", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "confidence", "delta"):
        assert k in r2


def test_shadow_design_complementary_pairs():
    pools = {0: np.arange(10, 60), 1: np.arange(100, 131)}
    sd = ShadowDesign(pools, {2: np.arange(5)}, {0: np.array([0]), 1: np.array([1]), 2: np.array([2])}, seed=3)
    for c in pools:
        M = sd.in_matrix(6, c)
        assert (M.sum(0) == 3).all()  # every candidate IN exactly half of the shadows
        assert not np.array_equal(M[0], M[2])
    sets = sd.train_sets(1)
    assert np.array_equal(sets[2], np.arange(5)) and set(sets[0]) <= set(pools[0])


# ------------------------------------------------------------------------------------------------
# engine-trained toy targets

def _cfg(make_cfg, **kw):
    return make_cfg(**{"dataset": "tiny", "rounds": 6, "local_steps": 4, "lr": 0.05, "momentum": 0.9,
                       "eval_every": 6, **kw})


def _random_world(cfg, clip, ds, seed=0) -> World:
    w = World.build(cfg, clip, ds)
    g = torch.Generator().manual_seed(seed)
    w.feats = F.normalize(torch.randn(w.feats.shape, generator=g), dim=-1)
    return w


def test_membership_record_matches_engine_reads(tiny_clip, tiny_dataset, make_cfg):
    """Every training example the engine fetched is recorded as used, and only those."""
    from dpfpl.engine import Engine

    cfg = make_cfg(dataset="tiny", rounds=2, local_steps=2, batch_size=4)
    w = World.build(cfg, tiny_clip, tiny_dataset)
    store = w.engine_store(False)
    seen: list[int] = []
    orig = store.get

    def spy(split, idx):
        if split == "train":
            seen.extend(int(i) for i in idx)
        return orig(split, idx)

    store.get = spy
    with shared_store(store) as extra:
        eng = Engine(cfg, clip=tiny_clip, dataset=tiny_dataset, **extra)
        eng.run()
    mem = eng.membership()
    used = set().union(*[set(c["used"]) for c in mem["clients"]])
    assert used == set(seen) and len(used) > 0
    for c in mem["clients"]:
        assert set(c["used"]) <= set(c["assigned"])
    # with Poisson batches of 4 out of 40 over 4 steps, some assigned examples stay unused
    assigned = set().union(*[set(c["assigned"]) for c in mem["clients"]])
    assert used < assigned


def test_positive_and_negative_controls_end_to_end(tiny_clip, tiny_dataset, make_cfg, tmp_path, monkeypatch):
    cfg = _cfg(make_cfg, rounds=14, shots=6)  # few shots, many steps: memorisation
    world = _random_world(cfg, tiny_clip, tiny_dataset)
    attacks = ["loss", "shadow", "lira", "rmia", "canary"]
    s = AuditSettings(attacks=attacks, shadows=4, client="all", canaries=20)
    pos = audit_train(cfg, tmp_path / "pos", s, world=world)
    for name in ("loss", "shadow", "lira", "lira-offline", "rmia"):
        assert pos["attacks"][name]["auc"] > 0.7, (name, pos["attacks"][name]["auc"])
    assert pos["attacks"]["canary"]["auc"] > 0.6  # 20 mislabelled canaries: AUC only, too few for a bound
    assert max(pos["attacks"][a]["eps_lower_bound"] for a in pos["attacks"]) > 0.3
    assert pos["design"]["kind"] == "randomized" and pos["epsilon_spent"] is None
    # negative control: same recipe, untrained target and shadows
    neg = audit_train(cfg, tmp_path / "neg", s, control="negative", world=world)
    for name, r in neg["attacks"].items():
        assert abs(r["auc"] - 0.5) <= 0.15, (name, r["auc"])
        assert r["eps_lower_bound"] < 0.1, (name, r["eps_lower_bound"])
    # outputs and stable keys
    out = tmp_path / "pos"
    rep = json.loads((out / "audit.json").read_text())
    for name, r in rep["attacks"].items():
        for k in STABLE_KEYS:
            assert k in r, (name, k)
    assert (out / "roc.png").stat().st_size > 0 and "Members:" in (out / "audit.md").read_text()
    held = rep["design"]["clients"]["0"]
    assert set(held["in"]).isdisjoint(held["out"])
    # a rerun reuses the cached target, shadows and canary run: nothing is trained again
    import audits.audit as A

    def boom(*a, **k):
        raise AssertionError("retrained a cached model")

    monkeypatch.setattr(A, "train_model", boom)
    again = audit_train(cfg, out, AuditSettings(attacks=["lira", "loss", "canary"], shadows=4, client="all",
                                                canaries=20), world=world)
    assert again["attacks"]["lira"]["auc"] == pytest.approx(pos["attacks"]["lira"]["auc"])


def test_invert_sgd_recovers_gradients():
    from audits.whitebox import invert_sgd

    g = torch.Generator().manual_seed(0)
    p = torch.randn(3, 5, generator=g).requires_grad_(True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    seq, grads = [p.detach().clone()], []
    for _ in range(6):
        grads.append(torch.randn(3, 5, generator=g))
        p.grad = grads[-1].clone()
        opt.step()
        seq.append(p.detach().clone())
    for a, b in zip(invert_sgd(seq, 0.1, 0.9, 0.01), grads):
        assert torch.allclose(a, b, atol=1e-4)


def test_gradient_canaries(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    """White-box canaries: found without noise; under DP their bound stays below the global eps."""
    cfg = _cfg(make_cfg, n_ctx=16)
    world = _random_world(cfg, tiny_clip, tiny_dataset)
    s = AuditSettings(attacks=["gradient-canary"], client="all", canaries=100)
    r = audit_train(cfg, tmp_path / "np", s, world=world)["attacks"]["gradient-canary"]
    assert r["auc"] > 0.75 and r["eps_lower_bound"] > 0.3 and r["epsilon_spent"] is None
    cfg_dp = _cfg(make_cfg, n_ctx=16, rounds=2, local_steps=3, privacy="dp", noise_multiplier_local=1.0,
                  noise_multiplier_global=1.0)
    r = audit_train(cfg_dp, tmp_path / "dp", s, world=world)["attacks"]["gradient-canary"]
    assert r["epsilon_spent"] > 0 and r["eps_lower_bound"] <= r["epsilon_spent"]
    assert not [f for f in r["flags"] if f["kind"] == "bug"]


def test_run_dir_audit_and_privacy_keys(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    from dpfpl.train import train

    cfg = _cfg(make_cfg, rounds=2)
    train(cfg, out=tmp_path / "run", clip=tiny_clip, dataset=tiny_dataset)
    rep = audit_run_dir(tmp_path / "run", tmp_path / "aud", AuditSettings(attacks=["loss", "rmia"], shadows=1),
                        clip=tiny_clip, dataset=tiny_dataset)
    r = rep["attacks"]["loss"]
    assert r["epsilon_spent"] is None and r["bound_sound"] is False
    assert rep["design"]["kind"] == "fixed"
    mem = json.loads((tmp_path / "run" / "membership.json").read_text())
    assert r["n_members"] == len(mem["clients"][0]["used"])
    assert "test-split" in rep["nonmembers"]["definition"]
    # private runs: the accountant's eps (and the reference mode's claim) sit beside every bound
    for mode, kw in (("dp", {"noise_multiplier_local": 1.0, "noise_multiplier_global": 1.0}),  # no calibration
                     ("reference", {"epsilon": 2.0})):
        cfg_p = _cfg(make_cfg, rounds=1, local_steps=1, privacy=mode, **kw)
        summ = train(cfg_p, out=tmp_path / mode, clip=tiny_clip, dataset=tiny_dataset)
        rep = audit_run_dir(tmp_path / mode, tmp_path / f"aud-{mode}", AuditSettings(attacks=["loss"]),
                            clip=tiny_clip, dataset=tiny_dataset)
        r = rep["attacks"]["loss"]
        assert r["epsilon_spent"] == pytest.approx(summ["epsilon_spent"]) and r["epsilon_spent"] > 0
        assert r["epsilon_claimed"] == (pytest.approx(summ["epsilon_claimed"]) if mode == "reference" else None)
        assert rep["privacy"]["mode"] == mode


def test_flags_bug_and_finding():
    from audits.report import flag_attack

    r = {"eps_lower_bound": 2.0, "epsilon_spent": 1.0, "epsilon_claimed": 0.5, "bound_sound": True,
         "confidence": 0.95}
    kinds = {f["kind"] for f in flag_attack(r)}
    assert kinds == {"bug", "finding"}
    assert flag_attack({**r, "eps_lower_bound": 0.7}) == [f for f in flag_attack({**r, "eps_lower_bound": 0.7})
                                                          if f["kind"] == "finding"]
    assert flag_attack({**r, "epsilon_spent": None, "epsilon_claimed": None}) == []


# ------------------------------------------------------------------------------------------------
# bad input

def test_bad_settings():
    with pytest.raises(ConfigError, match="2 shadow"):
        AuditSettings(attacks=["lira"], shadows=1).validate()
    with pytest.raises(ConfigError, match="reference model"):
        AuditSettings(attacks=["rmia"], shadows=0).validate()
    with pytest.raises(ConfigError, match="unknown"):
        AuditSettings(attacks=["nope"]).validate()
    with pytest.raises(ConfigError, match="--target"):
        AuditSettings(target="both").validate()


def test_bad_run_dirs(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    from dpfpl.train import train

    with pytest.raises(ConfigError, match="not found"):
        load_run_dir(tmp_path / "missing")
    cfg = make_cfg(dataset="tiny", rounds=1, local_steps=1)
    run = tmp_path / "run"
    train(cfg, out=run, clip=tiny_clip, dataset=tiny_dataset)
    # a different dataset (same name, fewer examples) is refused
    small = Dataset("tiny", tiny_dataset.classnames,
                    ArraySplit(tiny_dataset.train.images[:20], tiny_dataset.train.labels[:20], "small"),
                    tiny_dataset.test)
    with pytest.raises(DataError, match="mismatch"):
        load_run_dir(run, clip=tiny_clip, dataset=small)
    other = dataclasses.replace(tiny_dataset, name="other")
    with pytest.raises(DataError, match="mismatch"):
        load_run_dir(run, clip=tiny_clip, dataset=other)
    # prompts that do not reproduce the recorded accuracy (other weights, data or prompts) are refused
    summ = json.loads((run / "summary.json").read_text())
    good = dict(summ)
    summ["local_acc_per_client"] = [1.5 for _ in summ["local_acc_per_client"]]
    (run / "summary.json").write_text(json.dumps(summ))
    with pytest.raises(DataError, match="reproduce"):
        load_run_dir(run, clip=tiny_clip, dataset=tiny_dataset)
    (run / "summary.json").write_text(json.dumps(good))
    assert load_run_dir(run, clip=tiny_clip, dataset=tiny_dataset).cfg.data.dataset == "tiny"
    (run / "membership.json").unlink()
    with pytest.raises(ConfigError, match="membership"):
        load_run_dir(run, clip=tiny_clip, dataset=tiny_dataset)


def test_too_many_canaries(tiny_clip, tiny_dataset, make_cfg):
    cfg = make_cfg(dataset="tiny")
    w = World.build(cfg, tiny_clip, tiny_dataset)
    parts = partition(tiny_dataset, 2, "pathological", seed=0)
    classes = {p.client_id: p.classes for p in parts}
    with pytest.raises(ConfigError, match="test images"):
        make_canaries(w, [0], classes, 21, "mislabel", seed=0)  # client 0 has 4 classes x 5 test images
    cs = make_canaries(w, [0], classes, 20, "mislabel", seed=0)
    assert cs.ids.size == 20 and (w.label_of(cs.ids) != w.label_of(w.test_ids(cs.source))).all()
    assert np.isin(cs.labels, classes[0]).all()


def test_cli_errors_and_run(tmp_path, capsys):
    from dpfpl.cli import main

    assert main(["audit", "--attack", "loss"]) == 2
    assert "RUN_DIR" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--attack", "lira", "--shadows", "1"]) == 2
    assert "2 shadow" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--attack", "loss"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["audit", str(tmp_path), "--attack", "loss", "--rounds", "3"]) == 2
    assert "--train" in capsys.readouterr().err
