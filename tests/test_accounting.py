"""Accounting: anchors (shared/reference/anchors.md), calibration, ledger, reference mode, CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from dp_accounting import dp_event

from dpfpl.errors import BudgetExhausted, ConfigError
from dpfpl.privacy import (PrivacyLedger, calibrate_noise_multiplier, epsilon, gaussian_epsilon,
                           event_from_dict, event_to_dict, make_event, pld_epsilon, rdp_epsilon,
                           reference_accounted_events, reference_claimed_epsilon,
                           reference_epsilons, reference_noise_multiplier, reference_sigma)
from dpfpl.privacy import account_cli

DELTA = 1e-5

# (q, sigma, T, RDP eps, PLD eps or None)
ANCHORS = [
    (0.01, 1.1, 1000, 1.7118, 1.5154),
    (0.04, 1.5, 2250, 7.329, 6.77),
    (256 / 60000, 1.1, 14062, 2.597, 2.382),
    (1.0, 339.3, 100, 0.100, None),
]


# ------------------------------------------------------------------------------- anchors

@pytest.mark.parametrize("q,sigma,steps,rdp,pld", ANCHORS)
def test_rdp_anchor(q, sigma, steps, rdp, pld):
    # 0.100 is given to 3 decimals (dp-accounting: 0.10020): half a unit of its last digit
    tol = dict(abs=5e-4) if rdp == 0.100 else dict(rel=1e-3)
    assert rdp_epsilon([(make_event(sigma, q), steps)], DELTA) == pytest.approx(rdp, **tol)


@pytest.mark.parametrize("q,sigma,steps,rdp,pld", [a for a in ANCHORS if a[4] is not None])
def test_pld_anchor(q, sigma, steps, rdp, pld):
    rel = 1e-2 if pld == 6.77 else 1e-3  # 6.77 is pinned to 3 digits only
    assert pld_epsilon([(make_event(sigma, q), steps)], DELTA) == pytest.approx(pld, rel=rel)


def test_events_and_validation():
    assert make_event(1.0, 0.1) == dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0))
    assert make_event(1.0, 1.0) == dp_event.GaussianDpEvent(1.0)
    assert make_event(1.0, 0.1, "shuffle") == dp_event.GaussianDpEvent(1.0)  # no amplification
    assert math.isinf(rdp_epsilon([(make_event(0.0), 1)], DELTA))
    assert epsilon([], DELTA) == 0.0
    for bad in [dict(noise_multiplier=-1), dict(noise_multiplier=1, sampling_rate=0),
                dict(noise_multiplier=1, sampling_rate=1.5), dict(noise_multiplier=1, sampling="x")]:
        with pytest.raises(ConfigError):
            make_event(**bad)
    with pytest.raises(ConfigError):
        rdp_epsilon([(make_event(1.0), 1)], 1.0)
    ev = make_event(1.3, 0.02)
    assert event_from_dict(json.loads(json.dumps(event_to_dict(ev)))) == ev


# ------------------------------------------------------------------------------- calibration

@pytest.mark.parametrize("eps,q,steps", [(1.0, 0.01, 1000), (0.1, 1.0, 100), (8.0, 256 / 60000, 14062)])
def test_calibration_round_trip_rdp(eps, q, steps):
    sigma = calibrate_noise_multiplier(eps, DELTA, q, steps, accountant="rdp")
    got = rdp_epsilon([(make_event(sigma, q), steps)], DELTA)
    assert 0.99 * eps <= got <= eps


def test_calibration_round_trip_pld():
    sigma = calibrate_noise_multiplier(1.0, DELTA, 0.01, 1000, accountant="pld")
    got = pld_epsilon([(make_event(sigma, 0.01), 1000)], DELTA)
    assert 0.99 <= got <= 1.0
    assert sigma < calibrate_noise_multiplier(1.0, DELTA, 0.01, 1000, accountant="rdp")  # PLD is tighter


@pytest.mark.parametrize("kw", [dict(target_epsilon=0), dict(target_epsilon=-1), dict(delta=0),
                                dict(delta=1), dict(steps=0), dict(sampling_rate=0),
                                dict(sampling_rate=1.2), dict(target_epsilon=1e12),
                                # RDP's eps floor at delta=1e-300 is ~0.67: unreachable
                                dict(target_epsilon=0.1, delta=1e-300)])
def test_calibration_errors(kw):
    args = dict(target_epsilon=1.0, delta=DELTA, sampling_rate=1.0, steps=1) | kw
    with pytest.raises(ConfigError):
        calibrate_noise_multiplier(**args)


def test_exact_gaussian_matches_pld_and_handles_huge_eps():
    """Plain Gaussians: the closed form (Balle & Wang 2018) equals dp-accounting's PLD; at eps ~1e4
    (a reference-mode run) it is instant where the PLD grid took > 24 GB."""
    from dp_accounting.pld import PLDAccountant

    for sigma in (0.5, 1.0, 4.0):
        acc = PLDAccountant(value_discretization_interval=1e-4)
        acc.compose(dp_event.GaussianDpEvent(sigma))
        assert gaussian_epsilon(sigma, DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-5, abs=1e-5)
    huge = epsilon([(make_event(0.01), 100)], DELTA, "pld")
    assert 1e4 < huge <= rdp_epsilon([(make_event(0.01), 100)], DELTA)


def test_pld_is_skipped_above_its_cap_and_rdp_stands():
    from dpfpl.privacy import PLD_MAX_EPSILON
    from dpfpl.privacy.accountants import pld_skipped

    big = [(make_event(0.05, 0.5), 100)]  # Poisson-sampled, RDP eps far above the cap
    assert rdp_epsilon(big, DELTA) > PLD_MAX_EPSILON and pld_skipped(big, DELTA)
    assert epsilon(big, DELTA, "pld") == rdp_epsilon(big, DELTA)


def test_pld_accountant_is_min_of_valid_bounds():
    comp = [(make_event(1.1, 0.01), 1000), (make_event(30.0), 3)]
    assert epsilon(comp, DELTA, "pld") == pytest.approx(min(rdp_epsilon(comp, DELTA), pld_epsilon(comp, DELTA)))


# ------------------------------------------------------------------------------- ledger

def test_ledger_merging_and_counting():
    led = PrivacyLedger()
    ev = make_event(1.1, 0.01)
    for step in range(1000):
        led.record("client0/local", ev, round=step // 100)
    assert len(led.entries("client0/local")) == 1 and led.count("client0/local") == 1000
    led.record("client0/local", {"noise_multiplier": 2.0, "sampling_rate": 0.01}, count=5)
    led.record("client0/local", ev, count=10)
    assert len(led.entries("client0/local")) == 3 and led.count() == 1015
    led.record("client0/local", ev, count=0)
    assert led.count() == 1015
    led2 = PrivacyLedger()
    led2.record("client0/local", ev, count=1000)
    assert led2.rdp_epsilon("client0/local", DELTA) == pytest.approx(1.7118, rel=1e-3)
    with pytest.raises(ConfigError):
        led.record("client0/personalized", ev)
    with pytest.raises(ConfigError):
        led.record("client0/local", ev, count=-1)


def _demo_ledger() -> PrivacyLedger:
    led = PrivacyLedger()
    for r in range(3):
        for i in range(3):
            led.record(f"client{i}/batch", make_event(1.0 + i, 0.02), count=2 * 10, round=r)
            led.record(f"client{i}/server", make_event(1.5, 0.02 * (i + 1)), count=10, round=r)
        led.close_round(r, DELTA)
    return led


def test_views_and_history():
    led = _demo_ledger()
    row = led.history[-1]["epsilon"]
    for i in range(3):
        pers = row[f"client{i}/personalized"]
        assert pers >= row[f"client{i}/batch"] and pers >= row[f"client{i}/server"]
        assert pers <= row[f"client{i}/batch"] + row[f"client{i}/server"]
        assert pers == pytest.approx(led.rdp_epsilon([f"client{i}/batch", f"client{i}/server"], DELTA))
    curve = [h["epsilon"]["client0/personalized"] for h in led.history]
    assert curve == sorted(curve) and len(set(curve)) == 3


def test_state_dict_round_trip():
    led = _demo_ledger()
    text = led.to_json()
    back = PrivacyLedger.from_json(text)
    assert back.count() == led.count() and back.history == led.history
    for s in led.subjects:
        assert back.rdp_epsilon(s, DELTA) == led.rdp_epsilon(s, DELTA)
        assert back.entries(s) == led.entries(s)
    back.record("client0/batch", make_event(1.0, 0.02), count=20)  # resumed run keeps spending
    assert back.rdp_epsilon("client0/batch", DELTA) > led.rdp_epsilon("client0/batch", DELTA)
    assert len(back.entries("client0/batch")) == 1  # merged with the restored run


def test_would_exceed():
    steps, q, eps = 200, 0.05, 1.0
    sigma = calibrate_noise_multiplier(eps, DELTA, q, steps, accountant="rdp")
    led = PrivacyLedger()
    ev = make_event(sigma, q)
    for _ in range(steps - 1):
        led.record("client0/local", ev)
    assert not led.would_exceed("client0/local", [(ev, 1)], eps, DELTA)
    led.record("client0/local", ev)
    assert led.would_exceed("client0/local", ev, eps, DELTA)
    assert led.would_exceed(["client0/local", "client0/global"], [(make_event(5.0), 1)], eps, DELTA)
    with pytest.raises(BudgetExhausted):
        led.check_budget("client0/local", ev, eps, DELTA)


# ------------------------------------------------------------------------------- reference mode

PAPER = dict(rounds=100, delta=DELTA, batch_size=32, steps_per_round=10, n_clients=10)


def test_reference_claim_is_public_formula():
    for eps in (0.4, 0.2, 0.1, 0.05, 0.01):
        sigma = reference_sigma(eps, 100, DELTA)
        assert sigma == pytest.approx(math.sqrt(100 * math.log(1 / DELTA)) / eps)
        assert reference_claimed_epsilon(sigma, 100, DELTA) == pytest.approx(eps)
    assert reference_noise_multiplier(64.0, 32) == pytest.approx(1.0)  # sigma / (2B)
    ev = reference_accounted_events(10.0, **{k: PAPER[k] for k in
                                             ("batch_size", "steps_per_round", "rounds", "n_clients")})
    assert sum(n for _, n in ev["local"]) == 2 * 100 * 10  # u and v, every step of every round
    assert sum(n for _, n in ev["global"]) == 100 * 10


@pytest.mark.parametrize("eps", [0.4, 0.2, 0.1, 0.05, 0.01])
def test_reference_accounted_exceeds_claim(eps):
    claimed, accounted = reference_epsilons(eps, **PAPER)
    assert claimed == pytest.approx(eps)
    assert accounted > 10 * claimed
    # even with the optimistic sensitivity C, only the global view
    _, glob = reference_epsilons(eps, view="global", sensitivity_factor=1.0, **PAPER)
    assert glob > claimed


def test_reference_pld_also_exceeds():
    claimed, accounted = reference_epsilons(0.1, accountant="pld", **PAPER)
    assert accounted > claimed and accounted <= reference_epsilons(0.1, **PAPER)[1]


# ------------------------------------------------------------------------------- CLI

def _cli(argv, capsys):
    parser = argparse.ArgumentParser(prog="dpfpl")
    account_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["account", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json(capsys):
    rc, out, _ = _cli(["--noise-multiplier", "1.1", "--sampling-rate", "0.01", "--steps", "1000",
                       "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["steps"] == 1000 and d["noise_multiplier"] == 1.1
    assert d["rdp_epsilon"] == pytest.approx(1.7118, rel=1e-3)
    assert d["pld_epsilon"] == pytest.approx(1.5154, rel=1e-3)


def test_cli_calibrate_and_per_round(capsys):
    rc, out, _ = _cli(["--calibrate", "--epsilon", "0.5", "--steps-per-round", "10", "--rounds", "5",
                       "--per-round", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["steps"] == 50 and 0.49 <= d["pld_epsilon"] <= 0.5 < d["rdp_epsilon"]  # PLD by default
    assert len(d["per_round"]) == 5 and d["per_round"][-1]["rdp_epsilon"] == d["rdp_epsilon"]


def test_cli_reference(capsys):
    rc, out, _ = _cli(["--reference", "--epsilon", "0.4", "--rounds", "100", "--batch-size", "32",
                       "--steps-per-round", "10", "--clients", "10", "--json"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["claimed_epsilon"] == pytest.approx(0.4)
    assert d["accounted_epsilon"] > d["claimed_epsilon"]
    # one pass over 320 examples per round: 100 epochs, one exposure per mechanism each (replace-one)
    rc, out, _ = _cli(["--reference", "--epsilon", "0.4", "--rounds", "100", "--batch-size", "32",
                       "--steps-per-round", "10", "--clients", "10", "--dataset-size", "320", "--json"], capsys)
    e = json.loads(out)
    assert rc == 0 and e["epochs"] == 100
    assert 100 * 0.4 < e["accounted_epsilon"] < d["accounted_epsilon"]


@pytest.mark.parametrize("argv", [
    ["--calibrate", "--epsilon", "0", "--steps", "5"],
    ["--noise-multiplier", "1", "--steps", "5", "--delta", "1"],
    ["--noise-multiplier", "1", "--steps", "0"],
    ["--noise-multiplier", "1", "--steps", "5", "--sampling-rate", "1.5"],
    ["--noise-multiplier", "-1", "--steps", "5"],
    ["--steps", "5"],
])
def test_cli_bad_input(argv, capsys):
    rc, out, err = _cli(argv, capsys)
    assert rc != 0 and out == "" and "error: " in err and err.count("\n") == 1


def test_cli_delta_warning(capsys):
    rc, out, err = _cli(["--noise-multiplier", "1", "--steps", "1", "--delta", "0.01",
                         "--dataset-size", "1000", "--json"], capsys)
    assert rc == 0 and "warning" in err and json.loads(out)["delta"] == 0.01
