"""Differentially private training: honest mechanisms, and the public code's rule as a labelled claim.

Neighbouring relation and units (stated in every run's ledger):

- Poisson sampling (default): add/remove one example of a client's training set. Each step every
  example of client i is in the batch independently with probability q_i = B / n_i, so each
  release is a Poisson-subsampled Gaussian (amplification is valid).
- Shuffled fixed-size batches: replace one example. An epoch's batches partition the client's data
  independently of its values, so by parallel composition one epoch costs one Gaussian release
  (no amplification); every step's draw is recorded, the first of each epoch as the Gaussian, the
  others as no-op events.

Clipping units: ``example`` (default; sensitivity C of a sum of clipped contributions under
add/remove), ``microbatch:M`` (fixed groups of M consecutive training indices, each group's
sum clipped at C: one example changes one group's clipped sum by up to 2C) and ``batch`` (the
batch sum clipped at C: sensitivity 2C). The noise std on a sum is always noise_multiplier x C;
the accountant gets noise_multiplier / (sensitivity / C), and calibration accounts for that.

Mechanisms (paper Sec. 4.2, example-level DP of each client's data):
- local: per step, the per-unit-clipped sum of the local carrier gradients (u and v clipped
  JOINTLY for dpfpl / dpfpl-nores / fedpgp; the full local gradient for fedotp / local) plus
  N(0, (nm_L C)^2), divided by the expected batch size. Subject ``client{i}/local``.
- global (grad protocol): clients send per-unit-clipped sums of global-prompt gradients; the
  server adds N(0, (nm_G C)^2) ONCE to the total and divides by the total expected batch size
  (trusted server). Subject ``client{i}/global`` with client i's own sampling rate.
- global (fedavg protocol, example level): each local step of the client's copy of p_G is a
  DP-SGD step with nm_G (subject ``client{i}/global``); client level (``dp_level=client``):
  DP-FedAvg, each client's update clipped at C, N(0, (nm_G C)^2) on the server's sum (subject
  ``server/client_level``; a client-level guarantee, reported separately).

Reference mode (``privacy=reference``) reproduces the public DP-FPL code's rule (digest Sec. 4):
batch-MEAN gradients clipped at C per tensor (u, v, global separately), noise std sigma C / B with
sigma = sqrt(rounds log(1/delta)) / eps on every minibatch, server std = that / N. Its eps is a
CLAIM (``epsilon_claimed``); ``epsilon_spent`` is what our accountant gives for the mechanism it
really runs (batch clipping: sensitivity 2C, noise multiplier sigma / (2B)).
"""

from __future__ import annotations

import math
import secrets
import sys
from typing import Any, Optional

import numpy as np
import torch
from dp_accounting import dp_event

from ..config import RunConfig
from ..errors import ConfigError
from ..federation import Contribution
from .accounting import (PrivacyLedger, calibrate_noise_multiplier, calibrate_split, make_event,
                         reference_claimed_epsilon, reference_noise_multiplier, reference_sigma)
from .mechanisms import Privacy

NOOP = dp_event.NoOpDpEvent()


def parse_clip_unit(unit: str) -> tuple[str, int]:
    """'example' -> ('example', 1); 'microbatch:M' -> ('microbatch', M); 'batch' -> ('batch', 0)."""
    if unit in ("example", "batch"):
        return unit, 1 if unit == "example" else 0
    if unit.startswith("microbatch:"):
        try:
            m = int(unit.split(":", 1)[1])
        except ValueError:
            m = 0
        if m >= 1:
            return ("example", 1) if m == 1 else ("microbatch", m)
    raise ConfigError(f"privacy.clip_unit={unit!r}: expected example, microbatch:M (M >= 1) or batch")


def clip_and_sum(grads: dict[str, torch.Tensor], units: torch.Tensor, n_units: int, C: float) -> dict[str, torch.Tensor]:
    """Sum per clipping unit, clip each unit's joint norm (over all tensors) to C, sum the units.

    grads: name -> (B, *shape); units: (B,) unit id of each example in [0, n_units).
    Returns name -> (*shape).
    """
    if not grads:
        return {}
    sums = {k: torch.zeros(n_units, *g.shape[1:], dtype=g.dtype, device=g.device).index_add_(0, units, g)
            for k, g in grads.items()}  # (U, *shape)
    sq = sum(s.flatten(1).pow(2).sum(1) for s in sums.values())  # (U,)
    factor = (C / (sq.sqrt() + 1e-12)).clamp(max=1.0)  # (U,)
    return {k: (s * factor.view(-1, *[1] * (s.dim() - 1))).sum(0) for k, s in sums.items()}


class DPPrivacy(Privacy):
    """Example-level DP with per-unit clipping, Gaussian noise and a dp-accounting ledger."""

    mode = "dp"
    per_example = True

    def __init__(self, cfg: RunConfig, engine):
        p, t = cfg.privacy, cfg.train
        self.cfg = cfg
        self.C = p.clip_norm
        self.delta = p.delta
        self.sampling = cfg.batch_sampling
        self.unit, self.micro = parse_clip_unit(p.clip_unit)
        self.sens = 1.0 if self.unit == "example" else 2.0  # sensitivity / C of a clipped sum
        self.relation = "add/remove-one example" if self.sampling == "poisson" else "replace-one example"
        if self.sampling == "shuffle" and self.unit == "example":
            self.sens = 2.0  # replace-one: a clipped contribution can move by 2C
        self.method = engine.method
        self.protocol = engine.protocol
        self.client_level = p.dp_level == "client"
        if self.client_level and self.protocol != "fedavg":
            raise ConfigError("privacy.dp_level=client needs the fedavg protocol (--protocol fedavg)")
        self.batch_size = t.batch_size
        self.n = {c.client_id: len(c.train_idx) for c in engine.clients_data}
        self.q = {i: min(1.0, t.batch_size / n) for i, n in self.n.items()}
        min_n = min(self.n.values())
        if self.delta >= 1.0 / min_n:
            print(f"dpfpl: warning: privacy.delta={self.delta} is not below 1/n = 1/{min_n} "
                  "(the smallest client's training set): the guarantee is weak", file=sys.stderr)
        self.epsilon_target = p.epsilon
        self.ledger = PrivacyLedger()
        # noise generators, apart from data/init randomness: the server's (global noise) and one per
        # client (local noise, drawn where the client runs)
        seed = p.noise_seed
        if seed is None:
            seed = int(np.random.SeedSequence([t.seed, 0x5EED]).generate_state(1)[0])
        elif seed == -1:
            seed = secrets.randbits(63)
        self.noise_seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.client_gens = {i: torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
                            for i in self.n}
        self.draws = 0  # noise draws made (tests compare with the ledger)
        self.rounds = t.rounds
        self.local_steps = engine.local_steps
        self.nm_local, self.nm_global = self._noise_multipliers(p)

    # ------------------------------------------------------------------ calibration
    def _planned_events(self, client: int) -> tuple[float, int]:
        """(sampling rate, number of accounted releases) a client's mechanism makes in the plan."""
        steps = self.rounds * self.local_steps
        if self.sampling == "poisson":
            return self.q[client], steps
        epochs = math.ceil(steps * self.batch_size / self.n[client])
        return 1.0, epochs

    def _noise_multipliers(self, p) -> tuple[Optional[float], Optional[float]]:
        uses_local, uses_global = self.method.uses_local, self.method.uses_global
        nm_l, nm_g = p.noise_multiplier_local, p.noise_multiplier_global
        need_l = uses_local and nm_l is None
        need_g = uses_global and nm_g is None
        if (need_l or need_g) and p.epsilon is None:
            raise ConfigError("privacy=dp needs --epsilon (to calibrate) or explicit "
                              "--noise-multiplier-local/--noise-multiplier-global")
        if not (need_l or need_g):
            return (nm_l if uses_local else None), (nm_g if uses_global else None)
        q, steps = self._planned_events(min(self.n, key=self.n.get))  # smallest client spends most
        sampling = "poisson" if self.sampling == "poisson" else "none"
        try:
            if self.client_level:
                # local: example level on the client's data; global: client level, separately
                l = calibrate_noise_multiplier(p.epsilon, p.delta, q, steps, sampling) if need_l else nm_l
                g = calibrate_noise_multiplier(p.epsilon, p.delta, 1.0, self.rounds, "none") if need_g else nm_g
            elif need_l and need_g:
                l, g = calibrate_split(p.epsilon, p.delta, local_sampling_rate=q, local_steps=steps,
                                       global_sampling_rate=q, global_steps=steps, budget_split=p.budget_split,
                                       sampling=sampling)
            elif need_l:
                l, g = calibrate_noise_multiplier(p.epsilon, p.delta, q, steps, sampling), nm_g
            else:
                l, g = nm_l, calibrate_noise_multiplier(p.epsilon, p.delta, q, steps, sampling)
        except ConfigError as exc:
            raise ConfigError(f"cannot calibrate noise for epsilon={p.epsilon}, delta={p.delta} over "
                              f"{self.rounds} rounds x {self.local_steps} steps: {exc}") from None
        # the accountant's multiplier is applied / (sensitivity / C): scale the applied noise up
        if l is not None and need_l:
            l *= self.sens
        if g is not None and need_g and not self.client_level:
            g *= self.sens
        return (l if uses_local else None), (g if uses_global else None)

    # ------------------------------------------------------------------ helpers
    def _units(self, client, B: int) -> tuple[torch.Tensor, int]:
        if self.unit == "example":
            return torch.arange(B), B
        if self.unit == "batch":
            return torch.zeros(B, dtype=torch.long), 1
        groups = client.last_local_idx // self.micro  # fixed groups of M training indices
        uniq, inv = torch.unique(groups, return_inverse=True)
        return inv, len(uniq)

    def _noise_like(self, t: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
        """One Gaussian draw N(0, std^2 I) shaped like t."""
        return self._joint_noise({"t": t}, std, gen)["t"]

    def _joint_noise(self, tensors: dict[str, torch.Tensor], std: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """ONE Gaussian draw on the concatenation of ``tensors`` (e.g. u and v jointly)."""
        self.draws += 1
        return {k: (torch.randn(t.shape, generator=gen, dtype=t.dtype) * std).to(t.device)
                for k, t in tensors.items()}

    def _norm(self, client) -> float:
        """Divide noised sums by the expected batch size (Poisson) or the batch's size (shuffle)."""
        return float(self.batch_size) if self.sampling == "poisson" else float(max(len(client.last_local_idx), 1))

    def _record(self, subject: str, nm: float, client, round_: Optional[int] = None) -> None:
        """Record one noise draw's event (nm is the applied multiplier; the accountant gets nm / sens)."""
        eff = nm / self.sens
        if self.sampling == "poisson":
            self.ledger.record(subject, make_event(eff, self.q[client.id], "poisson"), round=round_)
        elif client.sampler.pos <= len(client.last_local_idx):  # first batch of an epoch
            self.ledger.record(subject, make_event(eff, 1.0, "none"), round=round_)
        else:
            self.ledger.record(subject, NOOP, round=round_)

    def _clipped_sum(self, client, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B = next(iter(grads.values())).shape[0]
        units, n_units = self._units(client, B)
        return clip_and_sum(grads, units, n_units, self.C)

    # ------------------------------------------------------------------ releases
    def local(self, client, grads):
        summed = self._clipped_sum(client, grads)
        noise = self._joint_noise(summed, self.nm_local * self.C, self.client_gens[client.id])  # u, v jointly
        out = {k: (s + noise[k]) / self._norm(client) for k, s in summed.items()}
        self._record(f"client{client.id}/local", self.nm_local, client)
        return out

    def contribution(self, client, G):
        summed = self._clipped_sum(client, {"G": G})["G"]
        return Contribution(client.id, summed, self._norm(client), client.n_train)

    def aggregate(self, contribs):
        total = sum(c.tensor for c in contribs)
        noisy = total + self._noise_like(total, self.nm_global * self.C, self.gen)
        for c in contribs:
            self._record(f"client{c.client_id}/global", self.nm_global, self._clients[c.client_id])
        return noisy / sum(c.weight for c in contribs)

    def local_global(self, client, G):
        if self.client_level:
            return G.mean(0) if len(G) else torch.zeros(G.shape[1:], dtype=G.dtype)
        s = self._clipped_sum(client, {"G": G})["G"]
        out = (s + self._noise_like(s, self.nm_global * self.C, self.client_gens[client.id])) / self._norm(client)
        self._record(f"client{client.id}/global", self.nm_global, client)
        return out

    def fedavg_contribution(self, client, p_G, copy):
        if not self.client_level:
            return Contribution(client.id, copy, 1.0, client.n_train)
        delta = copy - p_G
        delta = delta * min(1.0, self.C / (float(delta.norm()) + 1e-12))
        return Contribution(client.id, delta, 1.0, client.n_train)

    def aggregate_parameters(self, p_G, contribs):
        if not self.client_level:
            return self.aggregate_plain(contribs)
        total = sum(c.tensor for c in contribs)
        noisy = total + self._noise_like(total, self.nm_global * self.C, self.gen)
        self.ledger.record("server/client_level", make_event(self.nm_global, 1.0, "none"))
        return p_G + noisy / len(contribs)

    def aggregate_plain(self, contribs):
        return sum(c.tensor for c in contribs) / len(contribs)

    # ------------------------------------------------------------------ budget, reporting, state
    def check_round(self, sampled: list[int], steps: int) -> Optional[str]:
        """A reason to stop before a round whose releases would exceed the budget, else None."""
        if self.epsilon_target is None:
            return None
        for i in sampled:
            subjects = [f"client{i}/local", f"client{i}/global"]
            extra = []
            sampling = "poisson" if self.sampling == "poisson" else "none"
            q = self.q[i] if self.sampling == "poisson" else 1.0
            n_ev = steps if self.sampling == "poisson" else self._clients[i].sampler.epochs_started_by(steps)
            if self.method.uses_local and self.nm_local is not None:
                extra.append((make_event(self.nm_local / self.sens, q, sampling), n_ev))
            if self.method.uses_global and self.nm_global is not None and not self.client_level:
                extra.append((make_event(self.nm_global / self.sens, q, sampling), n_ev))
            if extra and self.ledger.would_exceed(subjects, extra, self.epsilon_target, self.delta):
                return (f"privacy budget: another round would exceed epsilon={self.epsilon_target} "
                        f"(delta={self.delta}) for client {i}")
        return None

    def spent(self) -> dict[str, Any]:
        views = self.ledger.epsilon_views(self.delta)
        pers = [v for k, v in views.items() if k.endswith("/personalized")]
        loc = [v for k, v in views.items() if k.endswith("/local")]
        glob = views.get("global", views.get("server/client_level"))
        return {"epsilon_spent": max(pers + ([glob] if glob is not None else [])) if (pers or glob is not None) else 0.0,
                "epsilon_global": glob,
                "epsilon_local": max(loc) if loc else None}

    def end_round(self, round_):
        self.ledger.close_round(round_, self.delta)
        return self.spent()

    def extra_summary(self) -> dict[str, Any]:
        return {}

    def summary(self, pld: bool = True):
        s = {"privacy": self.mode, "epsilon_target": self.epsilon_target, "delta": self.delta,
             **self.spent(), "noise_multiplier_local": self.nm_local, "noise_multiplier_global": self.nm_global,
             "clip_norm": self.C, "clip_unit": self.cfg.privacy.clip_unit, "sampling": self.sampling,
             "neighbouring_relation": self.relation, "dp_level": self.cfg.privacy.dp_level,
             "noise_draws": self.draws, "ledger_events": self.ledger.count()}
        if pld and self.ledger.client_subjects():
            s["epsilon_pld"] = max(self.ledger.pld_epsilon(subs, self.delta)
                                   for subs in self.ledger.client_subjects().values())
        s.update(self.extra_summary())
        return s

    def ledger_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "delta": self.delta, "neighbouring_relation": self.relation,
                "clip_norm": self.C, "clip_unit": self.cfg.privacy.clip_unit, "sampling": self.sampling,
                "noise_multiplier_local": self.nm_local, "noise_multiplier_global": self.nm_global,
                "accountant_multiplier_divisor": self.sens, "noise_draws": self.draws,
                "ledger": self.ledger.state_dict()}

    def state_dict(self):
        return {"ledger": self.ledger.state_dict(), "gen": self.gen.get_state(), "draws": self.draws,
                "client_gens": {i: g.get_state() for i, g in self.client_gens.items()}}

    def load_state_dict(self, s):
        self.ledger.load_state_dict(s["ledger"])
        self.gen.set_state(s["gen"])
        for i, st in s["client_gens"].items():
            self.client_gens[int(i)].set_state(st)
        self.draws = s["draws"]


class ReferencePrivacy(DPPrivacy):
    """The public DP-FPL code's calibration and batch-mean clipping (a claim to audit)."""

    mode = "reference"
    per_example = False

    def __init__(self, cfg: RunConfig, engine):
        if cfg.privacy.epsilon is None:
            raise ConfigError("privacy=reference needs --epsilon (the nominal eps the public rule claims)")
        super().__init__(cfg, engine)
        self.sens = 2.0  # batch-mean clipping: one example can move the clipped mean by 2C

    def _noise_multipliers(self, p):
        self.sigma = reference_sigma(p.epsilon, self.rounds, p.delta)
        self.claimed = reference_claimed_epsilon(self.sigma, self.rounds, p.delta)
        # applied std on the batch MEAN is sigma C / B; on our "sum" scale that is a multiplier
        # sigma / B relative to C on the mean; the accountant divides by 2 (sensitivity 2C).
        nm = reference_noise_multiplier(self.sigma, self.batch_size, sensitivity_factor=1.0)
        return (nm if self.method.uses_local else None), (nm if self.method.uses_global else None)

    def _clip_mean(self, g: torch.Tensor) -> torch.Tensor:
        return g * min(1.0, self.C / (float(g.detach().norm()) + 1e-12))

    def local(self, client, grads):
        out = {}
        for k, g in grads.items():  # u and v clipped and noised separately, as the public code does
            out[k] = self._clip_mean(g) + self._noise_like(g, self.nm_local * self.C, self.client_gens[client.id])
            self._record(f"client{client.id}/local", self.nm_local, client)
        return out

    def contribution(self, client, G):
        return Contribution(client.id, self._clip_mean(G), 1.0, client.n_train)

    def aggregate(self, contribs):
        mean = sum(c.tensor for c in contribs) / len(contribs)
        std = self.nm_global * self.C / len(contribs)  # server std = local std / N
        for c in contribs:
            # each client's clipped mean moves the average by up to 2C / N: same multiplier
            self._record(f"client{c.client_id}/global", self.nm_global, self._clients[c.client_id])
        return mean + self._noise_like(mean, std, self.gen)

    def local_global(self, client, G):
        out = self._clip_mean(G) + self._noise_like(G, self.nm_global * self.C, self.client_gens[client.id])
        self._record(f"client{client.id}/global", self.nm_global, client)
        return out

    def check_round(self, sampled, steps):
        return None  # the public code has no budget check: it runs the planned rounds

    def extra_summary(self):
        return {"epsilon_claimed": self.claimed, "reference_sigma": self.sigma, "clip_unit": "batch-mean (reference)",
                "neighbouring_relation": "replace-one example (shuffled batches, one exposure per epoch by "
                                         "parallel composition; batch-mean clipping: sensitivity 2C)"}


def build_dp_privacy(cfg: RunConfig, engine) -> DPPrivacy:
    cls = ReferencePrivacy if cfg.privacy.privacy == "reference" else DPPrivacy
    return cls(cfg, engine)
