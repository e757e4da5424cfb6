"""Audit Opacus' ``PrivacyEngine.make_private`` (Poisson sampling, optionally ``BatchMemoryManager``).

What is run is Opacus itself: ``PrivacyEngine(accountant=...)``, ``make_private(...,
poisson_sampling=True)`` (DPDataLoader, GradSampleModule, DPOptimizer), a plain SGD step, and,
for the virtual-step setting, ``opacus.utils.batch_memory_manager.BatchMemoryManager``. Nothing of
Opacus is re-implemented.

Worst case (Nasr et al., USENIX Security 2023, Dirac canaries): the model is ``nn.Linear(K, 1,
bias=False)`` with zero weights and the loss is the batch mean of its output, so example i's
per-sample gradient is its input. In the canary world the dataset is K canaries, canary k =
``1000 C e_k`` (norm >> C: clipped to exactly ``C e_k``); in the other world it is K examples of
zero gradient (the canary removed; the dataset size and hence Opacus' sample rate
``1 / len(data_loader)`` are the same). Coordinate k of the weight only ever sees canary k, Opacus
samples every example by its own coin each step and draws i.i.d. noise per coordinate, so ONE run
of T logical steps gives K independent trials (one per coordinate).

Observation per logical step, in units of C: with SGD (lr 1, no momentum) and
``loss_reduction="mean"``, Opacus sets ``grad = (sum_i clip_C(g_i) + N(0, (sigma C)^2)) /
expected_batch_size`` (``DPOptimizer.scale_grad``), so ``y = -dW * expected_batch_size / C``:
``y_k = 1{canary k in the batch} + N(0, sigma^2)`` as the accountant assumes. With
``BatchMemoryManager`` a logical step is several physical ones; a physical step that Opacus skips
leaves the weights bit-identical, so a logical step is recognised by the weights changing. The
statistic is :func:`audits.mechanism.gaussian_mixture_llr` of the CLAIM (sigma, q).

Claim: ``PrivacyEngine.accountant.get_epsilon(delta)`` after the T steps (Opacus' own accountant,
default "prv"); beside it Opacus' RDP and dp-accounting's PLD of the same Poisson-subsampled
Gaussian. ``noise_scale`` plants a fault (the run draws ``noise_scale x`` the claimed noise).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from dpfpl.errors import ConfigError

from ..mechanism import ReleaseFn, accounted_epsilon, audit_mechanism, gaussian_mixture_llr
from . import ExternalAudit, row_from

__all__ = ["BIG", "opacus_run", "opacus_release", "opacus_epsilon", "calibrate_opacus", "audit_opacus"]

BIG = 1000.0  # canary norm / C


def _check(sample_rate: float, steps: int, coords: int) -> tuple[int, int]:
    per_epoch = round(1 / sample_rate)
    if abs(per_epoch * sample_rate - 1) > 1e-9 or steps % per_epoch or coords % per_epoch:
        raise ConfigError(f"opacus audit: 1/sample_rate ({1 / sample_rate:g}) must be an integer dividing "
                          f"steps ({steps}) and coords ({coords})")
    return per_epoch, coords // per_epoch


def opacus_run(neighbour: bool, noise_multiplier: float, sample_rate: float, steps: int, *, coords: int = 2048,
               max_grad_norm: float = 1.0, physical_batch: Optional[int] = None, accountant: str = "prv",
               seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """One Opacus training run of ``steps`` logical steps; returns (obs (coords, steps), checks).

    ``obs[k, t]`` is coordinate k's released value at logical step t in units of C (see the module
    docstring). ``checks``: Opacus' ``expected_batch_size``, its accountant's history, the number
    of physical and logical steps, and the number of canaries sampled per step (canary world)."""
    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    per_epoch, batch = _check(sample_rate, steps, coords)
    C = float(max_grad_norm)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off", full-backward-hook notices  # Opacus' Poisson sampler draws from torch's global RNG
        torch.manual_seed(seed)
        x = (torch.eye(coords, dtype=torch.float32) * (BIG * C) if neighbour
             else torch.zeros(coords, coords, dtype=torch.float32))  # (K, K): example k = row k
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch)
        model = nn.Linear(coords, 1, bias=False)
        nn.init.zeros_(model.weight)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        engine = PrivacyEngine(accountant=accountant)
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=C, poisson_sampling=True, noise_generator=torch.Generator().manual_seed(seed + 1))
        weight = model._module.weight  # (1, K)
        obs: list[np.ndarray] = []
        physical, sampled = 0, []

        def epoch(batches) -> None:
            nonlocal physical
            n_logical = 0
            for (xb,) in batches:
                w0 = weight.detach().clone()
                opt.zero_grad()
                model(xb).mean().backward()
                opt.step()
                physical += 1
                n_logical += int(xb.shape[0])
                if not torch.equal(w0, weight.detach()):  # a real (noised) step, not a skipped one
                    obs.append((-(weight.detach() - w0) * opt.expected_batch_size / C).reshape(-1).numpy())
                    sampled.append(n_logical)
                    n_logical = 0

        for _ in range(steps // per_epoch):
            if physical_batch is None:
                epoch(loader)
            else:
                with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical_batch,
                                        optimizer=opt) as mem:
                    epoch(mem)
    out = np.stack(obs, 1) if obs else np.zeros((coords, 0))  # (K, T)
    checks = {"expected_batch_size": opt.expected_batch_size, "logical_steps": out.shape[1],
              "physical_steps": physical, "accountant_history": [list(h) for h in engine.accountant.history],
              "mean_batch": float(np.mean(sampled)) if sampled else 0.0,
              "max_batch": int(max(sampled)) if sampled else 0}
    return out, checks


def opacus_release(noise_multiplier: float, sample_rate: float, steps: int, *, coords: int = 2048,
                   max_grad_norm: float = 1.0, physical_batch: Optional[int] = None, accountant: str = "prv",
                   record: Optional[list] = None) -> ReleaseFn:
    """Release function (trials, T=steps, P=1): ceil(trials / coords) independent :func:`opacus_run`
    runs per call, each seeded from ``rng``; each run's checks are appended to ``record``."""

    def release(neighbour: bool, trials: int, rng: np.random.Generator) -> np.ndarray:
        blocks = []
        for _ in range(math.ceil(trials / coords)):
            o, chk = opacus_run(neighbour, noise_multiplier, sample_rate, steps, coords=coords,
                                max_grad_norm=max_grad_norm, physical_batch=physical_batch, accountant=accountant,
                                seed=int(rng.integers(2 ** 31)))
            if o.shape[1] != steps:
                raise ConfigError(f"opacus run made {o.shape[1]} logical steps, expected {steps}")
            blocks.append(o)
            if record is not None:
                record.append({"neighbour": neighbour, **chk})
        return np.concatenate(blocks)[:trials, :, None]  # (trials, T, 1)

    return release


def opacus_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                   accountant: str = "prv") -> float:
    """Opacus' eps for T steps of (sigma, q): the accountant PrivacyEngine builds, given the
    history its optimizer hook records (``[(sigma, q, T)]``, checked against every audited run)."""
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off", "optimal order is the largest alpha"
        acc = PrivacyEngine(accountant=accountant).accountant
        acc.history = [(noise_multiplier, sample_rate, steps)]
        return float(acc.get_epsilon(delta))


def calibrate_opacus(eps: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """The noise multiplier ``make_private_with_epsilon`` would use (Opacus' ``get_noise_multiplier``)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                      accountant=accountant))


def audit_opacus(eps: float, trials: int, *, sample_rate: float = 0.25, steps: int = 16, delta: float = 1e-5,
                 coords: int = 2048, physical_batch: Optional[int] = None, accountant: str = "prv",
                 noise_scale: float = 1.0, confidence: float = 0.95, seed: int = 0,
                 command: str = "") -> ExternalAudit:
    """Audit Opacus calibrated (by Opacus) to ``eps`` against Opacus' own accountant's eps.

    ``physical_batch``: ``BatchMemoryManager``'s ``max_physical_batch_size`` (None: no virtual
    steps). ``noise_scale`` != 1 plants a fault: the run's noise multiplier is ``noise_scale x``
    the one the claim is for."""
    from dp_accounting import dp_event

    t0 = time.perf_counter()
    sigma = calibrate_opacus(eps, delta, sample_rate, steps, accountant)
    claimed = opacus_epsilon(sigma, sample_rate, steps, delta, accountant)
    record: list[dict[str, Any]] = []
    rel = opacus_release(sigma * noise_scale, sample_rate, steps, coords=coords, physical_batch=physical_batch,
                         accountant=accountant, record=record)
    score = gaussian_mixture_llr([1.0], [0.0], [sigma], sample_rate)
    res = audit_mechanism(rel, score, delta, trials, claimed_eps=claimed, confidence=confidence, seed=seed,
                          chunk=max(coords, (1 << 16) // coords * coords))
    ev = [(dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(sigma)), steps)]
    beside = {"opacus rdp": opacus_epsilon(sigma, sample_rate, steps, delta, "rdp"),
              "dp-accounting pld": accounted_epsilon(ev, delta, "pld"),
              "dp-accounting rdp": accounted_epsilon(ev, delta, "rdp")}
    hist = {tuple(tuple(h) for h in r["accountant_history"]) for r in record}
    checks = {"runs": len(record), "expected_batch_size": sorted({r["expected_batch_size"] for r in record}),
              "accountant_history_of_runs": [list(map(list, h)) for h in sorted(hist)],
              "accountant_history_matches_claim": hist == {((sigma * noise_scale, sample_rate, steps),)},
              "physical_steps_per_run": sorted({r["physical_steps"] for r in record}),
              "logical_steps_per_run": sorted({r["logical_steps"] for r in record}),
              "mean_logical_batch_canary_world": float(np.mean([r["mean_batch"] for r in record if r["neighbour"]])),
              "max_logical_batch": max(r["max_batch"] for r in record)}
    settings = {"noise_multiplier": sigma, "noise_multiplier_run": sigma * noise_scale, "sample_rate": sample_rate,
                "steps": steps, "max_grad_norm": 1.0, "coords_per_run": coords, "logical_batch": int(coords * sample_rate),
                "max_physical_batch_size": physical_batch, "accountant": accountant, "poisson_sampling": True,
                "loss_reduction": "mean", "optimizer": "SGD(lr=1)", "canary_norm": BIG, "seed": seed}
    name = "opacus" if physical_batch is None else "opacus-bmm"
    return row_from(name, eps, f"opacus {accountant} (PrivacyEngine.accountant)", res, eps_beside=beside,
                    settings=settings, checks=checks, seconds=time.perf_counter() - t0, command=command)
