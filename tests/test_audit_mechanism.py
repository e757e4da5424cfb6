"""Mechanism-level audit (audits.mechanism / audits.mechanism_run) and the replay check (audits.replay)."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from audits.bounds import gaussian_eps
from audits.mechanism import audit_mechanism, gaussian_mixture_llr, sum_statistic
from audits.mechanism_run import audit_batch_mechanism, audit_run_mechanisms, rebuild_privacy
from audits.replay import replay_privacy, seed_check
from dpfpl.errors import ConfigError
from dpfpl.registry import get_method, method_names
from dpfpl.privacy.dp import build_dp_privacy
from dpfpl.privacy.release import BatchMechanism, GaussianRelease


def gaussian_release(mu: float, T: int = 1):
    def release(neighbour, trials, rng):
        return rng.normal(size=(trials, T, 1)) + (mu / math.sqrt(T) if neighbour else 0.0)
    return release


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_is_sound_and_refutes_a_low_claim(seed):
    mu = 1.0  # exact eps at delta 1e-5 is gaussian_eps(1e-5, 1) = 4.38 (at mu = 2, eps 10, 5e4 trials cap the bound)
    true = gaussian_eps(1e-5, mu)
    score = gaussian_mixture_llr([mu / 2], [0.0], [1.0], 1.0)  # T=4 steps, shift mu/2 each
    r = audit_mechanism(gaussian_release(mu, 4), score, 1e-5, 50_000, claimed_eps=true, seed=seed)
    assert r.bound_sound and 0.5 * true < r.eps_lower_bound <= true
    assert r.verdict == "consistent" and r.trials == 50_000 and r.steps == 4
    assert r.eps_estimate is not None and abs(r.eps_estimate - true) < 0.3 * true  # the GDP estimate, labelled
    low = audit_mechanism(gaussian_release(mu, 4), score, 1e-5, 50_000, claimed_eps=0.5 * true, seed=seed)
    assert low.verdict == "claim refuted" and low.eps_lower_bound > 0.5 * true
    assert json.dumps(low.as_dict())


def test_llr_beats_the_plain_sum_under_poisson_sampling():
    mech = BatchMechanism((GaussianRelease("local", 1.0, 1.0, 1.0),), 0.1, "poisson")
    llr = audit_batch_mechanism(mech, 16, 1e-5, 20_000, seed=0, accountant="rdp")
    from audits.mechanism_run import dirac_release
    plain = audit_mechanism(dirac_release(mech, 16), sum_statistic, 1e-5, 20_000,
                            claimed_eps=llr.claimed_eps, seed=0)
    assert llr.eps_lower_bound > plain.eps_lower_bound
    assert llr.eps_lower_bound <= llr.claimed_eps  # a correct mechanism is never refuted


def test_release_shape_is_checked():
    with pytest.raises(ConfigError):
        audit_mechanism(lambda nb, n, rng: np.zeros((n + 1, 2)), sum_statistic, 1e-5, 10, claimed_eps=1.0)


def _engine(method: str, protocol: str, sizes=(12, 20)):
    m = get_method(method)
    clients = [SimpleNamespace(client_id=i, train_idx=range(n)) for i, n in enumerate(sizes)]
    return SimpleNamespace(method=m, protocol=protocol, clients_data=clients, local_steps=2)


def _configs(make_cfg):
    """Every method x protocol x dp level x clip unit x sampling the DP mode accepts."""
    for method, protocol, level, unit, sampling in itertools.product(
            [m for m in method_names() if m != "zeroshot"], ["grad", "fedavg"], ["example", "client"],
            ["example", "microbatch:2", "batch"], ["poisson", "shuffle"]):
        m = get_method(method)
        if protocol == "fedavg" and not m.uses_global or level == "client" and (protocol != "fedavg" or not m.uses_global):
            continue
        kw = {"privacy": "dp", "method": method, "protocol": protocol, "dp_level": level, "clip_unit": unit,
              "sampling": sampling, "accountant": "rdp", "clip_norm": 0.7}
        if m.uses_local:
            kw["noise_multiplier_local"] = 1.1
        if m.uses_global:
            kw["noise_multiplier_global"] = 1.7
        yield kw, make_cfg(**kw)


def test_replay_every_release_of_every_configuration(make_cfg):
    n = 0
    for kw, cfg in _configs(make_cfg):
        priv = build_dp_privacy(cfg, _engine(kw["method"], kw["protocol"]))
        rep = replay_privacy(priv, seed=n)
        assert rep["ok"], (kw, rep["violations"])
        for c in rep["clients"].values():
            for p in c["parts"]:
                assert p["measured_sensitivity"] <= p["declared_sensitivity"] * (1 + 1e-5)
                lo, hi = p["std_interval"]
                assert lo <= p["declared_std"] <= hi
        sc = seed_check(build_dp_privacy(cfg, _engine(kw["method"], kw["protocol"])), cfg.train.seed)
        assert sc["ok"] and not any(v["reproduced"] for v in sc["clients"].values()), kw
        n += 1
    assert n >= 40


def test_replay_sees_the_worst_case_of_group_clipping(make_cfg):
    """The crafted neighbours reach the declared 2C of group units and of replace-one exactly."""
    for unit, sampling in (("microbatch:2", "poisson"), ("batch", "poisson"), ("example", "shuffle")):
        cfg = make_cfg(privacy="dp", method="local", clip_unit=unit, sampling=sampling, accountant="rdp",
                       noise_multiplier_local=1.0)
        rep = replay_privacy(build_dp_privacy(cfg, _engine("local", "grad")))
        ms = [p["measured_sensitivity"] for c in rep["clients"].values() for p in c["parts"]]
        assert rep["ok"] and min(ms) == pytest.approx(2.0, rel=1e-4)


def test_run_dir_mechanism_and_replay(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    from dpfpl.train import train

    cfg = make_cfg(privacy="dp", method="dpfpl", noise_multiplier_local=1.0, noise_multiplier_global=1.5,
                   accountant="rdp")
    train(cfg, out=tmp_path / "run", clip=tiny_clip, dataset=tiny_dataset)
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    priv, mism = rebuild_privacy(cfg, ledger)
    assert not mism and set(priv.mechanisms) == {0, 1}
    rep = audit_run_mechanisms(tmp_path / "run", tmp_path / "aud", ["mechanism", "replay"], trials=5000)
    m = rep["attacks"]["mechanism"]
    assert m["bound_sound"] is True and m["trials"] == 5000 and m["statistic"].startswith("llr")
    assert 0 <= m["eps_lower_bound"] <= m["epsilon_accounted"] and m["verdict"] == "consistent"
    assert m["mechanism_matches_ledger"] and m["steps"] == cfg.train.rounds * priv.local_steps
    assert rep["attacks"]["replay"]["ok"], rep["attacks"]["replay"]["violations"]
    assert not rep["findings"]
    on_disk = json.loads((tmp_path / "aud" / "audit.json").read_text())
    assert on_disk["attacks"]["mechanism"]["eps_lower_bound"] == m["eps_lower_bound"]


def test_cli_mechanism_attack_on_reference_run(tiny_clip, tiny_dataset, make_cfg, tmp_path, capsys):
    """Reference mode's claim is refuted by a sound bound, through ``dpfpl audit --attack mechanism``."""
    from dpfpl.cli import main
    from dpfpl.train import train

    cfg = make_cfg(privacy="reference", epsilon=4.0, method="dpfpl")
    train(cfg, out=tmp_path / "ref", clip=tiny_clip, dataset=tiny_dataset)
    rc = main(["audit", str(tmp_path / "ref"), "--attack", "mechanism", "--trials", "1000",
               "--out", str(tmp_path / "aud")])
    rep = json.loads((tmp_path / "aud" / "audit.json").read_text())["attacks"]["mechanism"]
    assert rc == 1 and rep["verdict"] == "claim refuted" and rep["eps_lower_bound"] > rep["epsilon_claimed"]
    assert "claim refuted" in capsys.readouterr().out


@pytest.mark.parametrize("claim", [4.0, 1.0, 0.25])
def test_reference_claim_refuted_at_every_claim(make_cfg, claim):
    cfg = make_cfg(privacy="reference", epsilon=claim, method="dpfpl", rounds=10, local_steps=1)
    priv = build_dp_privacy(cfg, _engine("dpfpl", "grad", sizes=(8, 8)))
    r = audit_batch_mechanism(priv.mechanisms[0], 10, cfg.privacy.delta, 1000, claimed_eps=priv.claimed)
    assert r.verdict == "claim refuted" and r.eps_lower_bound > claim


def test_bench_hook_runs_mechanism_attacks_and_the_report_shows_them(tiny_clip, tiny_dataset, make_cfg, tmp_path):
    """The bench audit hook runs `mechanism`/`replay` on private cells (headline `mechanism`,
    `replay_ok`, an `attacks.mechanism` row), skips them on non-private ones, and the report's
    privacy table gains the sound mechanism bound."""
    import pandas as pd

    from bench.audit_hook import MECHANISM_ATTACKS, run_audit
    from bench.tables import privacy_table
    from audits.mechanism_run import MECHANISM_ATTACKS as AUDITS_MECH
    from dpfpl.train import train

    assert tuple(MECHANISM_ATTACKS) == tuple(AUDITS_MECH)
    cfg = make_cfg(privacy="dp", method="dpfpl", noise_multiplier_local=1.0, noise_multiplier_global=1.5,
                   accountant="rdp")
    train(cfg, out=tmp_path / "dp", clip=tiny_clip, dataset=tiny_dataset)
    head = run_audit(None, tmp_path / "dp", None, None, ["mechanism", "replay"], {"mechanism_trials": 3000})
    m = head["mechanism"]
    assert m["trials"] == 3000 and m["verdict"] == "consistent" and 0 <= m["eps_lower_bound"] <= m["claimed_eps"]
    assert head["replay_ok"] is True and head["attacks"]["mechanism"]["bound_sound"] is True
    assert json.loads((tmp_path / "dp" / "audit.json").read_text())["mechanism"]["eps_lower_bound"] == m["eps_lower_bound"]
    assert (tmp_path / "dp" / "audit_mechanism" / "audit.json").is_file()
    train(make_cfg(privacy="none", method="dpfpl"), out=tmp_path / "np", clip=tiny_clip, dataset=tiny_dataset)
    assert "skipped" in run_audit(None, tmp_path / "np", None, None, ["mechanism"], {})["mechanism"]
    df = pd.DataFrame({"dataset": ["d"], "series": ["dpfpl"], "level": ["4"], "epsilon_rdp": [4.0],
                       "epsilon_pld": [3.9], "mechanism_eps_lower_bound": [m["eps_lower_bound"]]})
    t = privacy_table(df)
    assert "mechanism audit eps (sound lower bound)" in t.body.columns


def test_tightness_table_audits_each_distinct_mechanism_once(tmp_path, capsys):
    """`python -m audits.tightness`: one row per method x eps, methods whose release objects are equal share
    one audit (and say so), the other world gets 4x the trials, and a correct mechanism is never refuted."""
    from audits.tightness import main

    assert main(["--methods", "dpfpl", "fedpgp", "promptfl", "--eps", "4", "--trials", "3000", "--workers", "1",
                 "--out", str(tmp_path)]) == 0
    rows = [json.loads(ln) for ln in (tmp_path / "tightness.jsonl").read_text().splitlines()]
    assert [(r["method"], r["eps_target"]) for r in rows] == [("dpfpl", 4.0), ("fedpgp", 4.0), ("promptfl", 4.0)]
    by = {r["method"]: r for r in rows}
    assert by["fedpgp"]["audited_as"] == "dpfpl" and by["dpfpl"]["audited_as"] is None
    assert by["fedpgp"]["eps_lower_bound"] == by["dpfpl"]["eps_lower_bound"]
    assert by["promptfl"]["audited_as"] is None and set(by["promptfl"]["noise_multipliers"]) == {"global"}
    assert all(r["trials"] == 3000 and r["trials_other"] == 12000 and r["verdict"] == "consistent"
               and 0 < r["eps_lower_bound"] <= r["eps_accounted"] for r in rows)
    table = (tmp_path / "table_tightness.md").read_text()
    assert "(as dpfpl)" in table and "python -m audits.tightness --methods dpfpl" in table
    with pytest.raises(ConfigError, match="zeroshot"):
        main(["--methods", "zeroshot", "--out", str(tmp_path)])
