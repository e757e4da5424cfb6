"""The mechanism audit applied to DP-FPL's own release objects (``dpfpl audit RUN_DIR --attack mechanism``).

:func:`rebuild_privacy` rebuilds a run's :class:`~dpfpl.privacy.dp.DPPrivacy` (the same classes
training used) from config.json + ledger.json and checks every client's mechanism against the
ledger's recorded description. :func:`dirac_release` / :func:`reference_release` turn one
:class:`~dpfpl.privacy.release.BatchMechanism` into a release function for
:func:`audits.mechanism.audit_mechanism`, calling the real ``mech(...)`` (clip, sum, noise) and,
for a server-noised part, the real :meth:`GaussianRelease.noise` on the sum.

Worst cases (Nasr et al. 2023):

- per-example clipping, Poisson (add/remove-one): every other example has zero gradient; the
  canary's gradient is a Dirac vector of norm 1000 C on its own coordinate in every noised part
  (clipping gives exactly C); the canary enters each step with the run's own rate q (one coin per
  step for all parts: one shared batch). Vectorised: one call of the mechanism serves k
  independent (trial, step) pairs, each the Dirac canary on its own coordinate (rows of the batch
  = the included pairs' canaries; the clipped sum's coordinate j is pair j's release).
- shuffled batches (replace-one): one exposure per epoch; the canary (+1000 C e_j) is replaced by
  an example pointing the other way (-1000 C e_j): the clipped sum moves by 2C.
- reference mode (batch-mean clipping per tensor): the client's data is one batch, so the canary
  is in every batch, and the rest of the batch points the other way, so the clipped mean moves by
  2C (+C e vs -C e). Each trial is its own named tensor (the mechanism clips per tensor).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Union

import numpy as np
import torch

from dpfpl.config import RunConfig
from dpfpl.errors import ConfigError
from dpfpl.privacy.randomness import NoiseSource
from dpfpl.privacy.release import BatchMechanism, ReferenceBatchMechanism

from .mechanism import GaussianMixtureClaim, ReleaseFn, ScoreFn, accounted_epsilon, audit_mechanism

__all__ = ["BIG", "rebuild_privacy", "dirac_release", "reference_release", "llr_for", "audit_batch_mechanism",
           "mechanism_audit_run_dir", "load_run"]

BIG = 1000.0  # canary norm / C


PRESENT_PER_CALL = 512      # Dirac canaries per call when every row is a canary: (k+1, k) dense rows
ABSENT_PER_CALL = 1 << 17   # coordinates per call of a batch without the canary (one zero-gradient row)


def dirac_release(mech: BatchMechanism, steps: int, source: Optional[NoiseSource] = None) -> ReleaseFn:
    """Release function (trials, T=steps, P=parts) of ``mech`` on the Dirac-canary worst case.

    Observations: each noised part's released coordinate of the canary, in units of C (normaliser 1).
    Poisson: canary world = canary in with prob. q each step, other world = no canary. Shuffle: one
    step per epoch, canary world +canary, other world the replacing example -canary.

    Every (trial, step) pair is one coordinate of one real call of the mechanism. The pairs whose
    batch holds the canary go to calls whose rows are those canaries (orthogonal Diracs, so each
    coordinate is its own pair's release: per-example clipping and the noise are coordinate-wise
    independent) plus the zero-gradient example; the pairs without the canary go to calls on a batch
    of one zero-gradient example over many coordinates (linear cost). The inclusion coin of each pair
    is drawn before the calls, i.i.d. Bernoulli(q), as Poisson sampling draws it."""
    if mech.clip_unit != "example":
        raise ConfigError(f"the mechanism audit's Dirac worst case needs per-example clipping, not {mech.clip_unit!r} "
                          "(the replay check covers group units)")
    src = source or NoiseSource()
    gen, server_gen = src.generator(1, 0), src.generator(0)
    poisson = mech.sampling == "poisson"
    q = mech.sampling_rate if poisson else 1.0

    inputs: dict[tuple[int, int, float], dict] = {}  # (rows, k, sign) -> grads; a release never writes its inputs

    def grads_of(rows: int, k: int, sign: float) -> dict:
        key = (rows, k, sign)
        if key not in inputs:
            if len(inputs) > 8:
                inputs.clear()
            canary = (torch.cat([torch.eye(k) * (sign * BIG), torch.zeros(1, k)]) if rows > 1
                      else torch.zeros(1, k))  # (k+1, k): k Dirac canaries + the zero example, or (1, k) zeros
            inputs[key] = {r.part: {"c": canary * r.clip_norm, "z": torch.zeros(rows, 2)} for r in mech.releases}
        return inputs[key]

    @torch.inference_mode()
    def call(rows: int, k: int, sign: float = 1.0) -> np.ndarray:  # -> (k, P) released coordinates / C
        grads = grads_of(rows, k, sign)
        out = mech(grads, 1.0, src, gen, positions=torch.arange(rows), first_of_epoch=True)
        obs = np.empty((k, len(mech.releases)))
        for j, r in enumerate(mech.releases):
            v = out.values[r.part]
            if r.noise_at == "server":  # the server's one draw on the sum (this client alone)
                z = r.noise(v, src, server_gen)
                v = {n: v[n] + z[n] for n in v}
            obs[:, j] = v["c"].numpy()
            obs[:, j] /= r.clip_norm
        return obs  # (k, P)

    def with_canaries(n: int, sign: float) -> np.ndarray:  # n pairs whose batch holds the canary
        out = []
        for a in range(0, n, PRESENT_PER_CALL):
            k = min(PRESENT_PER_CALL, n - a)
            out.append(call(k + 1, k, sign))
        return np.concatenate(out) if out else np.zeros((0, len(mech.releases)))

    def without_canary(n: int) -> np.ndarray:  # n pairs whose batch is the zero-gradient example alone
        out = [call(1, min(ABSENT_PER_CALL, n - a)) for a in range(0, n, ABSENT_PER_CALL)]
        return np.concatenate(out) if out else np.zeros((0, len(mech.releases)))

    def release(neighbour: bool, trials: int, rng: np.random.Generator) -> np.ndarray:
        K = trials * steps
        if not poisson:  # replace-one: the canary or its opposite in every pair's batch
            return with_canaries(K, 1.0 if neighbour else -1.0).reshape(trials, steps, -1)
        present = (rng.random(K) < q) if neighbour else np.zeros(K, dtype=bool)
        obs = np.empty((K, len(mech.releases)))
        obs[present] = with_canaries(int(present.sum()), 1.0)
        obs[~present] = without_canary(int((~present).sum()))
        return obs.reshape(trials, steps, -1)

    return release


def reference_release(mech: ReferenceBatchMechanism, steps: int, source: Optional[NoiseSource] = None) -> ReleaseFn:
    """Release function (trials, T=steps, P=noised tensors) of the public code's batch-mean release
    on its worst case: the batch mean is +1000 C e (canary world) or -1000 C e (other world)."""
    src = source or NoiseSource()
    gen, server_gen = src.generator(1, 0), src.generator(0)

    def release(neighbour: bool, trials: int, rng: np.random.Generator) -> np.ndarray:
        sign = BIG if neighbour else -BIG
        names = {r.part: [[f"{r.part}{i}/{j}" for j in range(trials)] for i in range(r.tensors)]
                 for r in mech.releases}
        # the same inputs every step (a release never writes its inputs): each trial its own named tensor
        grads = {r.part: {n: torch.full((1,), sign * r.clip_norm) for row in names[r.part] for n in row}
                 for r in mech.releases}
        obs = np.zeros((trials, steps, sum(r.tensors for r in mech.releases)))
        with torch.inference_mode():
            for t in range(steps):
                out = mech(grads, 1.0, src, gen, first_of_epoch=True)
                p = 0
                for r in mech.releases:
                    v = out.values[r.part]
                    if r.noise_at == "server":
                        z = r.noise(v, src, server_gen)
                        v = {n: v[n] + z[n] for n in v}
                    for row in names[r.part]:
                        obs[:, t, p] = torch.cat([v[n] for n in row]).double().numpy() / r.clip_norm
                        p += 1
        return obs

    return release


def llr_for(mech: BatchMechanism, per_part: bool = True) -> dict[str, ScoreFn]:
    """Likelihood-ratio statistics of the mechanism's CLAIMED parameters (worst case above): the
    joint one over every observed projection (first: the audit plans its threshold from this claim),
    and (``per_part``, when there are several) one per projection, which a fault confined to one
    part (e.g. one release without noise) cannot hide from behind the others' noise.
    :func:`audit_mechanism` corrects for the choice among them."""
    stds = [r.noise_multiplier for r in mech.releases for _ in range(r.tensors)]
    names = [f"{r.part}{i if r.tensors > 1 else ''}" for r in mech.releases for i in range(r.tensors)]
    pm = isinstance(mech, ReferenceBatchMechanism) or mech.sampling != "poisson"
    q = 1.0 if pm else mech.sampling_rate
    claim = GaussianMixtureClaim((1.0,) * len(stds), (-1.0 if pm else 0.0,) * len(stds), tuple(stds), q)
    out = {f"llr joint (q={q:.4g})": claim.llr()}
    if per_part and len(stds) > 1:
        out.update({f"llr {n} (q={q:.4g})": claim.llr([i]) for i, n in enumerate(names)})
    return out


OTHER_WORLD_FACTOR = 4  # trials of the canary-absent world per canary-world trial (Poisson Dirac case)


def audit_batch_mechanism(mech: BatchMechanism, steps: int, delta: float, trials: int, *,
                          claimed_eps: Optional[float] = None, accountant: str = "pld", confidence: float = 0.95,
                          method: str = "bonferroni", seed: int = 0, source: Optional[NoiseSource] = None,
                          trials_other: Optional[int] = None):
    """Audit ``steps`` releases of ``mech`` against ``claimed_eps`` (default: the accountant's eps of
    ``steps`` x ``mech.joint_event``, the mechanism as accounted).

    ``trials``: runs of the canary world. ``trials_other``: runs of the other world; default
    ``OTHER_WORLD_FACTOR x trials`` under Poisson sampling (a batch without the canary is one
    zero-gradient row over many coordinates: ~1/5 of a canary-world trial's cost, and the bound's
    precision is set by the false positives counted there), else ``trials``."""
    ref = isinstance(mech, ReferenceBatchMechanism)
    rel = (reference_release if ref else dirac_release)(mech, steps, source)
    events = [(mech.joint_event, steps)]
    if trials_other is None:
        trials_other = trials * OTHER_WORLD_FACTOR if not ref and mech.sampling == "poisson" else trials
    res = audit_mechanism(rel, llr_for(mech), delta, trials, claimed_eps=claimed_eps,
                          events=None if claimed_eps is not None else events, accountant=accountant,
                          confidence=confidence, method=method, seed=seed, trials_other=trials_other,
                          chunk=512 if ref else max(1, (1 << 20) // steps))
    res.details["epsilon_accounted"] = (res.claimed_eps if claimed_eps is None  # already the accountant's eps
                                        else accounted_epsilon(events, delta, accountant))
    res.details["worst_case"] = ("reference: one-batch client, canary in every batch, the rest of the batch "
                                 "opposite (clipped mean moves by 2C)" if ref else
                                 ("Dirac canary of norm 1000C, others zero, Poisson rate q per step" if
                                  mech.sampling == "poisson" else
                                  "Dirac canary replaced by its opposite, one exposure per epoch"))
    return res


# ---------------------------------------------------------------------------------------------- run dirs

def load_run(run_dir: Union[str, Path]) -> tuple[RunConfig, dict[str, Any], dict[str, Any]]:
    """(config, ledger.json, summary.json) of a run directory."""
    p = Path(run_dir)
    for f in ("config.json", "ledger.json"):
        if not (p / f).is_file():
            raise ConfigError(f"{p}: no {f}: the mechanism audit needs a DP or reference run directory")
    d = json.loads((p / "config.json").read_text())
    d.pop("dpfpl_version", None)
    cfg = RunConfig.from_dict(d, source=str(p / "config.json"))
    summary = json.loads((p / "summary.json").read_text()) if (p / "summary.json").is_file() else {}
    return cfg, json.loads((p / "ledger.json").read_text()), summary


def rebuild_privacy(cfg: RunConfig, ledger: dict[str, Any]):
    """The run's privacy object, built by :func:`dpfpl.privacy.dp.build_dp_privacy` with a stand-in
    engine (method, protocol, client sizes from the recorded sampling rates, local steps), the
    recorded multipliers, and the check that each rebuilt mechanism describes itself as recorded.
    Returns (privacy, mismatches)."""
    from dpfpl.plan import plan_engine
    from dpfpl.privacy.dp import build_dp_privacy

    if cfg.privacy.privacy not in ("dp", "reference"):
        raise ConfigError(f"privacy={cfg.privacy.privacy!r}: nothing to audit at the mechanism level")
    cfg = RunConfig.from_dict(cfg.to_dict())
    t = cfg.train
    mechs = ledger.get("mechanisms", {})
    clients = []
    for key, m in sorted(mechs.items(), key=lambda kv: int(kv[0].removeprefix("client"))):
        q = float(m["sampling_rate"])
        n = t.batch_size if q >= 1 else int(round(t.batch_size / q))
        clients.append(SimpleNamespace(client_id=int(key.removeprefix("client")), train_idx=range(n)))
    if not clients:
        raise ConfigError("ledger.json records no mechanisms")
    engine = plan_engine(cfg, clients)
    method = engine.method
    if cfg.privacy.privacy == "dp":
        if method.uses_local:
            cfg.privacy.noise_multiplier_local = ledger["noise_multiplier_local"]
        if method.uses_global:
            cfg.privacy.noise_multiplier_global = ledger["noise_multiplier_global"]
        cfg.privacy.epsilon = None  # the recorded multipliers are what ran; no calibration, no budget refusal
    priv = build_dp_privacy(cfg, engine)
    mismatches = []
    for i, mech in priv.mechanisms.items():
        got = json.loads(json.dumps(mech.describe()))
        if got != mechs.get(f"client{i}"):
            mismatches.append({"client": i, "rebuilt": got, "recorded": mechs.get(f"client{i}")})
    return priv, mismatches


def mechanism_audit_run_dir(run_dir: Union[str, Path], trials: int = 100_000, confidence: float = 0.95,
                            seed: int = 0, delta: Optional[float] = None, method: str = "bonferroni",
                            source: Optional[NoiseSource] = None) -> dict[str, Any]:
    """``attacks.mechanism`` of audit.json for a run: the client whose mechanism spends most
    (largest sampling rate), audited over the run's steps against the accountant's eps of the same
    mechanism (DP mode) or against the public code's claim (reference mode).

    ``source``: the noise of the audited releases; default secret (a fresh ``NoiseSource()``), as
    in training. A seeded ``NoiseSource(noise_seed=N)`` makes the audit reproducible (tests);
    ``audit_noise`` in the result says which it was."""
    t0 = time.perf_counter()
    cfg, ledger, summary = load_run(run_dir)
    priv, mism = rebuild_privacy(cfg, ledger)
    if mism:
        raise ConfigError(f"{run_dir}: the rebuilt mechanisms differ from ledger.json: {mism[:1]}")
    cid = max(priv.mechanisms, key=lambda i: (priv.mechanisms[i].sampling_rate, -i))
    mech = priv.mechanisms[cid]
    steps_run = cfg.train.rounds * priv.local_steps
    steps = steps_run if mech.sampling == "poisson" else priv._epochs(cid, steps_run)
    d = float(delta if delta is not None else cfg.privacy.delta)
    ref = cfg.privacy.privacy == "reference"
    claimed = summary.get("epsilon_claimed", getattr(priv, "claimed", None)) if ref else None
    if ref:  # the reference worst case: the client's data is one batch, the canary in every batch
        steps = steps_run
    res = audit_batch_mechanism(mech, steps, d, trials if not ref else min(trials, 2000), claimed_eps=claimed,
                                accountant=cfg.privacy.accountant, confidence=confidence, method=method, seed=seed,
                                source=source)
    out = res.as_dict()
    out.update({"client": cid, "mechanism": mech.describe(), "epsilon_accounted": res.details["epsilon_accounted"],
                "epsilon_spent_run": summary.get("epsilon_spent"), "epsilon_claimed": claimed,
                "mechanism_matches_ledger": True, "seconds_total": time.perf_counter() - t0,
                "audit_noise": (source or NoiseSource()).describe(),
                "statistic_note": "per-step log-likelihood ratio of the claimed output distribution "
                                  "(Poisson-subsampled Gaussian), summed over steps",
                "estimate_note": "eps_estimate is an indicative Gaussian-DP fit (Nasr et al. 2023), not a bound"})
    return out


MECHANISM_ATTACKS = ("mechanism", "replay")


def audit_run_mechanisms(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None,
                         attacks=MECHANISM_ATTACKS, trials: int = 100_000, confidence: float = 0.95,
                         seed: int = 0, source: Optional[NoiseSource] = None) -> dict[str, Any]:
    """Mechanism-level audits of a run directory (no model is trained): ``mechanism`` (sound bound
    vs the accounted / claimed eps) and ``replay`` (sensitivity, std, ledger events, and the noise
    regenerated from the public seed). Writes ``OUT/audit.json`` (default ``RUN_DIR/audit``)."""
    from .replay import replay_privacy, seed_check

    cfg, ledger, summary = load_run(run_dir)
    report: dict[str, Any] = {"version": 1, "source": str(run_dir), "mode": cfg.privacy.privacy,
                              "kind": "mechanism-level", "attacks": {}, "findings": []}
    if "mechanism" in attacks:
        r = mechanism_audit_run_dir(run_dir, trials=trials, confidence=confidence, seed=seed, source=source)
        report["attacks"]["mechanism"] = r
        if r["verdict"] == "claim refuted":
            what = "claimed" if r["epsilon_claimed"] is not None else "accounted"
            report["findings"].append({"attack": "mechanism", "kind": "violation",
                                       "message": f"sound lower bound {r['eps_lower_bound']:.3f} exceeds the {what} "
                                                  f"eps {r['claimed_eps']:.3f}"})
    if "replay" in attacks:
        t0 = time.perf_counter()
        priv, mism = rebuild_privacy(cfg, ledger)
        rep = replay_privacy(priv, seed=seed)
        priv2, _ = rebuild_privacy(cfg, ledger)  # fresh generators, as at the start of training
        sc = seed_check(priv2, cfg.train.seed)
        viol = ([f"rebuilt mechanism differs from ledger.json: client {m['client']}" for m in mism]
                + rep["violations"] + sc["violations"])
        report["attacks"]["replay"] = {"ok": not viol, "violations": viol, "mechanism_matches_ledger": not mism,
                                       "replay": rep, "seed_check": sc, "seconds": time.perf_counter() - t0,
                                       "method": "Re:cord-play (Cebere et al., PETS 2026): neighbouring inputs, "
                                                 "identical randomness, every noise call"}
        report["findings"] += [{"attack": "replay", "kind": "violation", "message": v} for v in viol]
    out_p = Path(out) if out is not None else Path(run_dir) / "audit"
    out_p.mkdir(parents=True, exist_ok=True)
    (out_p / "audit.json").write_text(json.dumps(report, indent=2, default=str))
    return report
