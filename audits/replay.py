"""Replay check: sensitivity, noise and accounting as declared (Re:cord-play, Cebere et al., PETS 2026).

Every release is run on neighbouring inputs with IDENTICAL randomness (the generator state is saved
and restored between the two runs), so the difference of the two outputs is the difference of the
noised quantity's deterministic part: its norm must not exceed the sensitivity the mechanism
declares (``GaussianRelease.sensitivity x C``). Neighbours are the run's relation (add/remove one
example under Poisson sampling, replace one under shuffled batches) on crafted worst cases
(another example of the canary's clipping unit pointing the other way) and random inputs. The
applied noise std is measured on a zero input (n = 20000 coordinates) and must lie in the
chi-square interval (level 1e-6) around the declared ``noise_multiplier x C``. The event a batch
returns must equal the ONE event implied by the releases (one shared Poisson batch,
s^-2 = sum (nm / max(declared, measured) sensitivity)^-2); a different event that spends less
(e.g. the parts accounted as independent releases, or no event) is a violation.

:func:`replay_privacy` does the same through a run's privacy object (``DPPrivacy.release`` and the
server's ``aggregate`` / ``aggregate_parameters``) and checks that each batch records exactly one
ledger event, the mechanism's.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch
from dp_accounting import dp_event
from scipy import stats

from dpfpl.privacy.events import batch_event
from dpfpl.privacy.randomness import NoiseSource
from dpfpl.privacy.release import BatchMechanism, GaussianRelease, ReferenceBatchMechanism

__all__ = ["replay_batch_mechanism", "replay_privacy", "std_interval", "TOL"]

TOL = 1e-5       # relative slack on sensitivities (float32 sums)
STD_N = 20000    # coordinates of the std measurement
STD_LEVEL = 1e-6  # two-sided level of the std interval


def std_interval(z: torch.Tensor, level: float = STD_LEVEL) -> tuple[float, float, float]:
    """(estimate, lo, hi) of the std of i.i.d. N(0, s^2) values ``z`` (chi-square interval)."""
    v = z.double().flatten()
    n = v.numel()
    ss = float((v ** 2).sum())
    return math.sqrt(ss / n), math.sqrt(ss / stats.chi2.ppf(1 - level / 2, n)), math.sqrt(ss / stats.chi2.ppf(level / 2, n))


def _scenarios(mech: BatchMechanism, C: float, rng: np.random.Generator) -> list[tuple[dict, dict, torch.Tensor, torch.Tensor]]:
    """(grads_D, grads_D', positions_D, positions_D') pairs of neighbouring batches, per part tensors
    {"a": (B, 5), "b": (B, 3)}. The canary is example 1 (training position 1)."""
    out = []
    poisson = mech.sampling == "poisson" and not isinstance(mech, ReferenceBatchMechanism)
    for kind in ("adversarial", "random", "random-small"):
        B = 6
        base = {n: torch.from_numpy(rng.normal(size=(B, d)) * (3 * C if kind == "random" else 0.1 * C)).float()
                for n, d in (("a", 5), ("b", 3))}
        canary = {n: torch.from_numpy(rng.normal(size=(d,)) * 5 * C).float() for n, d in (("a", 5), ("b", 3))}
        if kind == "adversarial":  # example 0 (same microbatch / batch as the canary) points the other way
            e = torch.zeros(5)
            e[0] = 1000 * C
            base = {"a": torch.zeros(B, 5), "b": torch.zeros(B, 3)}
            base["a"][0] = -e
            canary = {"a": 2 * e, "b": torch.zeros(3)}
        other = {n: (-c if kind == "adversarial" else torch.from_numpy(rng.normal(size=c.shape) * 5 * C).float())
                 for n, c in canary.items()}
        rows_d = {n: torch.cat([base[n][:1], canary[n][None], base[n][1:]]) for n in base}  # (B+1, d)
        pos_d = torch.arange(B + 1)
        if poisson:  # add/remove: D' lacks the canary; the others keep their positions
            rows_n = base
            pos_n = torch.cat([pos_d[:1], pos_d[2:]])
        else:  # replace-one
            rows_n = {n: torch.cat([base[n][:1], other[n][None], base[n][1:]]) for n in base}
            pos_n = pos_d
        out.append((rows_d, rows_n, pos_d, pos_n))
    return out


def _call(mech: BatchMechanism, rows: dict, pos: torch.Tensor, source, gen, normaliser: float):
    grads = {r.part: dict(rows) for r in mech.releases}
    if isinstance(mech, ReferenceBatchMechanism):  # batch means (*shape), as many tensors as declared
        names = list(rows)
        grads = {r.part: {n: rows[n].mean(0) for n in names[:r.tensors]} for r in mech.releases}
        normaliser = 1.0
    rel = mech(grads, normaliser, source, gen, positions=pos, first_of_epoch=True)
    return rel, normaliser


def replay_batch_mechanism(mech: BatchMechanism, seed: int = 0, normaliser: float = 4.0,
                           source: Optional[NoiseSource] = None) -> dict[str, Any]:
    """Replay ``mech`` (see the module docstring). Returns {"ok", "violations", "parts": [...], "event"}."""
    rng = np.random.default_rng(seed)
    src = source or NoiseSource(noise_seed=seed)  # a replayable generator: the check saves its state
    gen = src.generator(7, seed)
    violations: list[str] = []
    parts = []
    measured_sens = {r.part: 0.0 for r in mech.releases}
    rel = None
    for rows_d, rows_n, pos_d, pos_n in _scenarios(mech, mech.releases[0].clip_norm, rng):
        state = gen.get_state()
        rel, norm = _call(mech, rows_d, pos_d, src, gen, normaliser)
        after = gen.get_state()
        gen.set_state(state)
        rel_n, _ = _call(mech, rows_n, pos_n, src, gen, normaliser)
        if not torch.equal(after, gen.get_state()):
            violations.append("the neighbouring runs consumed different randomness (noise depends on the data)")
        for r in mech.releases:
            scale = 1.0 if r.noise_at == "server" else norm  # a server-noised part comes back as the sum
            sq = [float(((rel.values[r.part][k] - rel_n.values[r.part][k]).double() * scale).pow(2).sum())
                  for k in rel.values[r.part]]
            # one release per part (jointly clipped), or per tensor (reference mode: each its own draw)
            diff = max(sq) if isinstance(mech, ReferenceBatchMechanism) else sum(sq)
            measured_sens[r.part] = max(measured_sens[r.part], math.sqrt(diff) / r.clip_norm)
    implied = []
    for r in mech.releases:
        declared = r.sensitivity
        meas = measured_sens[r.part]
        if meas > declared * (1 + TOL):
            violations.append(f"{r.part}: measured sensitivity {meas:.4g} C exceeds the declared {declared:g} C")
        # applied std: zero input, every tensor of the part (one draw per release, or per tensor)
        zero = {"a": torch.zeros(1, STD_N)}
        if isinstance(mech, ReferenceBatchMechanism):
            out = mech({q.part: {f"t{i}": torch.zeros(STD_N // q.tensors) for i in range(q.tensors)}
                        for q in mech.releases}, 1.0, src, gen, first_of_epoch=True)
            vals, nrm = out.values[r.part], 1.0
        else:
            out = mech({q.part: zero for q in mech.releases}, normaliser, src, gen, positions=torch.arange(1))
            vals, nrm = out.values[r.part], normaliser
        z = torch.cat([v.flatten() for v in vals.values()]) * nrm
        if r.noise_at == "server":  # the server's draw on the (zero) sum
            z = torch.cat([v.flatten() for v in r.noise(vals, src, gen).values()])
        s_hat, lo, hi = std_interval(z)
        if not lo <= r.std <= hi:
            violations.append(f"{r.part}: applied noise std {s_hat:.4g} (interval [{lo:.4g}, {hi:.4g}]) is not the "
                              f"declared noise_multiplier x C = {r.std:.4g}")
        used = declared if meas <= declared * (1 + TOL) else meas  # float32 noise within TOL
        implied += [r.noise_multiplier / used] * r.tensors  # std checked above
        parts.append({"part": r.part, "noise_at": r.noise_at, "declared_sensitivity": declared,
                      "measured_sensitivity": meas, "declared_std": r.std, "measured_std": s_hat,
                      "std_interval": [lo, hi]})
    sampling = "poisson" if mech.sampling == "poisson" else "none"
    want = batch_event([max(m, 1e-12) for m in implied], mech.sampling_rate, sampling)
    got = rel.event
    ok_event = got == want or _spends_at_least(got, want)
    if not ok_event:
        violations.append(f"the batch's event {got} spends less than the one its releases imply {want}")
    return {"ok": not violations, "violations": violations, "parts": parts, "event": str(got),
            "implied_event": str(want)}


def _spends_at_least(got: dp_event.DpEvent, want: dp_event.DpEvent, steps: int = 64, delta: float = 1e-5) -> bool:
    """Whether ``steps`` x ``got`` costs at least ``steps`` x ``want`` (RDP)."""
    from dpfpl.privacy.accountants import epsilon

    if isinstance(got, dp_event.NoOpDpEvent):
        return False
    return epsilon([(got, steps)], delta, "rdp") >= epsilon([(want, steps)], delta, "rdp") * (1 - 1e-9)


def replay_privacy(priv, seed: int = 0) -> dict[str, Any]:
    """Replay every client's mechanism of a privacy object (:func:`replay_batch_mechanism`), each batch
    through ``priv.release`` (exactly one ledger event, the mechanism's), and the server's releases."""
    per_client, violations = {}, []
    for i, mech in sorted(priv.mechanisms.items()):
        if not mech.releases:
            continue
        r = replay_batch_mechanism(mech, seed=seed + i)
        per_client[f"client{i}"] = r
        violations += [f"client {i}: {v}" for v in r["violations"]]
        # through the privacy object: one batch, one ledger event
        B, D = 4, 6
        client = SimpleNamespace(id=i, last_local_idx=torch.arange(B), n_train=priv.n[i],
                                 sampler=SimpleNamespace(last_started_epoch=True))
        local = {"u": torch.randn(B, 3, D), "v": torch.randn(B, 2)} if mech.part("local") is not None else {}
        glob = torch.randn(B, 2, D) if priv.method.uses_global else None
        before = priv.ledger.count(f"client{i}/batch")
        draws = priv.draws
        priv.release(client, local, glob, priv.protocol)
        recorded = priv.ledger.entries(f"client{i}/batch")
        if priv.ledger.count(f"client{i}/batch") != before + 1:
            violations.append(f"client {i}: a batch recorded {priv.ledger.count(f'client{i}/batch') - before} "
                              "ledger events (expected 1)")
        elif recorded[-1][0] != mech.event(True):
            violations.append(f"client {i}: the ledger recorded {recorded[-1][0]}, the mechanism returns {mech.event(True)}")
        n_client_draws = sum(1 for r_ in mech.releases if r_.noise_at == "client") * (
            max(r_.tensors for r_ in mech.releases) if isinstance(mech, ReferenceBatchMechanism) else 1)
        if priv.draws - draws < min(1, n_client_draws):
            violations.append(f"client {i}: a batch made no noise draw")
    server = {}
    if getattr(priv, "client_level", False):
        server = _replay_client_level(priv)
        violations += server["violations"]
    return {"ok": not violations, "violations": violations, "clients": per_client, "server": server}


def _replay_client_level(priv) -> dict[str, Any]:
    """Client-level DP-FedAvg: clipped update sensitivity (<= 2C for one example, <= C for one client)
    and the server's std nm_G x C, with the ledger's two events."""
    from dpfpl.federation import Contribution

    v = []
    C, D = priv.C, 6
    p_G = torch.zeros(2, D)
    cl = SimpleNamespace(id=0, n_train=priv.n[min(priv.n)])
    a = priv.fedavg_contribution(cl, p_G, p_G + 100.0)
    b = priv.fedavg_contribution(cl, p_G, p_G - 100.0)
    ex = float((a.tensor - b.tensor).norm()) / C  # one example can move its client's update anywhere
    if ex > 2 * (1 + TOL):
        v.append(f"client-level: one client's clipped update moves by {ex:.4g} C > 2C")
    if float(a.tensor.norm()) / C > 1 + TOL:
        v.append("client-level: a clipped update exceeds C (client-level sensitivity)")
    zeros = [Contribution(0, torch.zeros(1, STD_N), 1.0, 1)]
    before = priv.ledger.count("server/client_level")
    out = priv.aggregate_parameters(torch.zeros(1, STD_N), zeros)
    s_hat, lo, hi = std_interval(out)
    if not lo <= priv.nm_global * C <= hi:
        v.append(f"client-level: server std {s_hat:.4g} is not nm_G x C = {priv.nm_global * C:.4g}")
    if priv.ledger.count("server/client_level") != before + 1:
        v.append("client-level: the server round recorded no client-level event")
    ev = priv.ledger.entries("client0/server")[-1][0] if priv.ledger.count("client0/server") else None
    if ev != dp_event.GaussianDpEvent(priv.nm_global / 2.0):
        v.append(f"client-level: example-level server event {ev} is not Gaussian(nm_G / 2)")
    return {"violations": v, "example_sensitivity": ex, "measured_std": s_hat}


def public_seed_candidates(seed: int, client_ids) -> list[tuple[str, torch.Generator]]:
    """Generators anyone could build from a run's PUBLIC seed (config.json's train.seed): torch's
    ``manual_seed(seed [+ i])`` and the project's own derivation ``SeedSequence([seed, *key])``."""
    out = []
    for s in {seed, *[seed + i for i in client_ids]}:
        out.append((f"torch.manual_seed({s})", torch.Generator().manual_seed(s)))
    src = NoiseSource(noise_seed=seed)
    for key in [(0,)] + [k for i in client_ids for k in ((1, i), (2, i, 0))]:
        out.append((f"SeedSequence([{seed}, {', '.join(map(str, key))}])", src.generator(*key)))
    return out


def reproduce_noise(noise: torch.Tensor, candidates: list[tuple[str, torch.Generator]],
                    threshold: float = 0.5) -> dict[str, Any]:
    """Whether a released noise draw ``noise`` (n values of N(0, s^2)) is the first draw of one of
    ``candidates``: the correlation of noise with the candidate's first n standard normals (a secret
    draw gives |corr| ~ N(0, 1/n); n >= 1000 puts 0.5 beyond 15 standard deviations)."""
    z = noise.double().flatten()
    best = ("", 0.0)
    for name, g in candidates:
        c = torch.randn(z.numel(), generator=g, dtype=torch.float32).double()
        r = float((z * c).sum() / (z.norm() * c.norm() + 1e-300))
        if abs(r) > abs(best[1]):
            best = (name, r)
    return {"reproduced": abs(best[1]) > threshold, "best_candidate": best[0], "correlation": best[1],
            "n": z.numel()}


def seed_check(priv, public_seed: int, n: int = 4000) -> dict[str, Any]:
    """Regenerate each client's first local noise draw (and the server's) from the public seed.
    A reproduced draw is a violation unless the run says so (``noise_secret: false``)."""
    cands = public_seed_candidates(public_seed, sorted(priv.n))
    out, violations = {}, []
    for i, mech in sorted(priv.mechanisms.items()):
        client_parts = [r for r in mech.releases if r.noise_at == "client"]
        if not client_parts:
            continue
        zero = {r.part: {"a": torch.zeros(1, n)} for r in mech.releases}
        if isinstance(mech, ReferenceBatchMechanism):
            zero = {r.part: {f"t{j}": torch.zeros(n) for j in range(r.tensors)} for r in mech.releases}
        rel = mech(zero, 1.0, priv.source, priv.client_gens[i], positions=torch.arange(1))
        r0 = client_parts[0]
        noise = next(iter(rel.values[r0.part].values())).flatten()
        res = reproduce_noise(noise, [(nm, torch.Generator().set_state(g.get_state())) for nm, g in cands])
        out[f"client{i}"] = res
        if res["reproduced"] and priv.source.secret:
            violations.append(f"client {i}: noise reproduced from the public seed ({res['best_candidate']}, "
                              f"corr {res['correlation']:.3f}) while the run claims secret noise")
    return {"ok": not violations, "violations": violations, "noise_secret_claimed": priv.source.secret,
            "clients": out}
