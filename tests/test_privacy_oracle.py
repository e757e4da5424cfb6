"""An accounting oracle that never reads the suite's ledger.

It watches what the mechanism DID: which client drew which batch (and whether that batch opened an
epoch), and every Gaussian noise draw with its std and its generator (a client's own, or the
server's). From that alone it attributes each draw to the batches it protects (a client draw to
that client's latest batch; a server draw to the latest batch, or the whole round, of every client
that contributed since the last server draw), takes the sensitivity the clip unit and neighbouring
relation really have, composes each batch's draws into one Gaussian, and composes the run with
dp-accounting's own RDP accountant. Then: reported eps >= oracle eps (nothing under-counted) and,
for calibrated runs, oracle eps <= target.
"""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from dpfpl.engine import Engine
from dpfpl.federation import Client
from dpfpl.privacy.randomness import NoiseSource

DELTA = 1e-5


class Tracer:
    def __init__(self, monkeypatch):
        self.log: list[tuple] = []
        orig_batch, orig_gauss = Client._batch, NoiseSource.gaussian
        tracer = self

        def batch(client):
            out = orig_batch(client)
            tracer.log.append(("batch", client.id, bool(client.sampler.last_started_epoch), client.sampler.sampling_rate))
            return out

        def gauss(src, shape, std, gen, dtype, device):
            tracer.log.append(("noise", float(std), id(gen)))
            return orig_gauss(src, shape, std, gen, dtype, device)

        monkeypatch.setattr(Client, "_batch", batch)
        monkeypatch.setattr(NoiseSource, "gaussian", gauss)


def oracle_epsilon(engine: Engine, log: list[tuple], cfg) -> float:
    """max over clients of the RDP eps of what was released about one of its examples."""
    p = cfg.privacy
    C = p.clip_norm
    unit = p.clip_unit
    reference = p.privacy == "reference"
    poisson = cfg.batch_sampling == "poisson" and not reference
    sens_example = 1.0 if (unit == "example" and poisson and not reference) else 2.0  # replace-one or a group
    priv = engine.privacy
    client_of_gen = {id(g): i for i, g in priv.client_gens.items()}
    server_gen = id(priv.gen)
    client_level = p.dp_level == "client"
    batches: dict[int, list[dict]] = {i: [] for i in priv.client_gens}
    since_server: dict[int, list[dict]] = {}
    for entry in log:
        if entry[0] == "batch":
            _, cid, first, q = entry
            b = {"first": first, "q": q, "precision": 0.0}
            batches[cid].append(b)
            since_server.setdefault(cid, []).append(b)
        elif entry[2] in client_of_gen:
            cid = client_of_gen[entry[2]]
            std = entry[1]
            batches[cid][-1]["precision"] += (sens_example * C / std) ** 2 if std > 0 else math.inf
        else:
            assert entry[2] == server_gen
            std, contributors = entry[1], since_server
            for cid, bs in contributors.items():
                if client_level:  # one example moves its client's clipped update by 2C: the whole round
                    bs[-1].setdefault("round_precision", 0.0)
                    bs[-1]["round_precision"] += (2 * C / std) ** 2 if std > 0 else math.inf
                elif reference:  # mean of N clipped means: one example moves it by 2C / N
                    bs[-1]["precision"] += (2 * C / len(contributors) / std) ** 2
                else:  # sum of clipped sums
                    bs[-1]["precision"] += (sens_example * C / std) ** 2 if std > 0 else math.inf
            since_server = {}
    worst = 0.0
    for cid, bs in batches.items():
        acc = RdpAccountant()
        if poisson:
            for b in bs:
                if b["precision"] > 0:
                    acc.compose(dp_event.PoissonSampledDpEvent(b["q"], dp_event.GaussianDpEvent(b["precision"] ** -0.5))
                                if b["q"] < 1 else dp_event.GaussianDpEvent(b["precision"] ** -0.5))
        else:  # parallel composition within an epoch: the worst batch of the epoch
            epoch_prec = []
            for b in bs:
                if b["first"]:
                    epoch_prec.append(0.0)
                epoch_prec[-1] = max(epoch_prec[-1], b["precision"])
            for prec in epoch_prec:
                if prec > 0:
                    acc.compose(dp_event.GaussianDpEvent(prec ** -0.5))
        for b in bs:
            if b.get("round_precision"):
                acc.compose(dp_event.GaussianDpEvent(b["round_precision"] ** -0.5))
        worst = max(worst, acc.get_epsilon(DELTA))
    return worst


COMBOS = [
    dict(method="dpfpl"),
    dict(method="dpfpl", sampling="shuffle"),
    dict(method="dpfpl", protocol="fedavg"),
    dict(method="dpfpl", protocol="fedavg", dp_level="client"),
    dict(method="dpfpl", clip_unit="microbatch:2"),
    dict(method="dpfpl", clip_unit="batch", sampling="shuffle"),
    dict(method="dpfpl-nores", budget_split=0.8),
    dict(method="fedotp", clip_unit="batch"),
    dict(method="fedpgp", protocol="fedavg", sampling="shuffle"),
    dict(method="promptfl"),
    dict(method="fedprompt"),
    dict(method="fedprompt", dp_level="client"),
    dict(method="local"),
    dict(method="dpfpl", noise_multiplier_global=3.0),
    dict(method="dpfpl", batch_size=64),  # n < B: q = 1
]


def traced_run(make_cfg, tiny_clip, tiny_dataset, monkeypatch, **kw) -> tuple[dict, float]:
    """(the run's privacy summary, the oracle's eps) of a tiny run with ``kw``."""
    cfg = make_cfg(**{"batch_size": 8, "rounds": 2, "local_steps": 2, "accountant": "rdp", **kw})
    tr = Tracer(monkeypatch)
    e = Engine(cfg, clip=tiny_clip, dataset=tiny_dataset)
    e.run()
    return e.privacy.summary(pld=False), oracle_epsilon(e, tr.log, cfg)


@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_reported_eps_bounds_the_oracle_and_meets_target(tiny_clip, tiny_dataset, make_cfg, monkeypatch, kw):
    s, oracle = traced_run(make_cfg, tiny_clip, tiny_dataset, monkeypatch, privacy="dp", epsilon=2.0, **kw)
    assert oracle > 0.3  # the run did release something
    assert s["epsilon_spent"] >= oracle * (1 - 1e-9), (s["epsilon_spent"], oracle)
    assert oracle <= 2.0 * (1 + 1e-9)
    assert s["epsilon_spent"] <= 2.0 * (1 + 1e-9)


@pytest.mark.parametrize("kw", [dict(method="dpfpl"), dict(method="fedotp", protocol="fedavg")])
def test_reference_mode_reports_at_least_the_oracle(tiny_clip, tiny_dataset, make_cfg, monkeypatch, kw):
    s, oracle = traced_run(make_cfg, tiny_clip, tiny_dataset, monkeypatch, privacy="reference", epsilon=1.0, **kw)
    assert s["epsilon_spent"] >= oracle * (1 - 1e-9) > s["epsilon_claimed"]
