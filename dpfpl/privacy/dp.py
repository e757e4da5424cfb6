"""Differentially private training: honest mechanisms, and the public code's rule as a labelled claim.

Neighbouring relation and units (stated in every run's ledger):

- Poisson sampling (default): add/remove one example of a client's training set. Each step every
  example of client i is in the batch independently with probability q_i = min(1, B / n_i), so a
  step is a Poisson-subsampled release (amplification is valid while the coin flips stay secret:
  :mod:`dpfpl.privacy.randomness`).
- Shuffled fixed-size batches: replace one example. An epoch's batches partition the client's data
  independently of its values, so by parallel composition one epoch costs one release (no
  amplification); the first batch of each epoch carries the event, the others no-op events.

Clipping units: ``example`` (default; a clipped contribution moves the sum by C under add/remove,
2C under replace), ``microbatch:M`` (fixed groups of M consecutive training positions, each
group's sum clipped at C: one example changes one group's clipped sum by up to 2C; the groups are
positions, so this holds under replace-one, and under add/remove-one only with the convention that
an example's group is part of the example, nobody else moving) and ``batch`` (the batch sum
clipped at C: 2C). Noise std on a sum is noise_multiplier x C; the accountant gets
noise_multiplier / sensitivity.

One batch, one event (paper Sec. 4.2, example-level DP of each client's data): a client's step
releases its local carrier gradients (u and v clipped JOINTLY for dpfpl / dpfpl-nores / fedpgp; the
full local gradient for fedotp / local) with N(0, (nm_L C)^2) and its global-prompt gradient with
N(0, (nm_G C)^2) (added by the server on the sum over clients under the ``grad`` protocol, by the
client under example-level ``fedavg``), both from ONE batch: the step's event is
``PoissonSampled(q_i, Gaussian(s))`` with s^-2 = (nm_L/sens)^-2 + (nm_G/sens)^-2, recorded once
under ``client{i}/batch`` (:class:`~dpfpl.privacy.release.BatchMechanism`).

Client-level DP-FedAvg (``dp_level=client``, fedavg protocol): the local release stays example-level
per step; each round the server adds N(0, (nm_G C)^2) to the sum of the sampled clients' updates,
each clipped at C. That is client-level DP of the global prompt (``server/client_level``,
Gaussian(nm_G) under add/remove-one-client), and, since one example moves its client's clipped
update by at most 2C, an example-level release ``client{i}/server`` = Gaussian(nm_G / 2) that the
personalised guarantee composes with the local one.

What each reported epsilon covers (summary.json ``epsilon_covers``):
- ``epsilon_spent``: max over clients i of the example-level eps of EVERY release that depends on
  client i's data (personalised prompt, global prompt and everything sent), by the run's accountant;
- ``epsilon_global``: example-level eps of the released global prompt p_G. Under example-level DP
  that is ``epsilon_spent`` (p_G's gradients are taken at p_G + p_L(i), and p_L(i) depends on client
  i's data, so no smaller bound holds); under client-level DP the server's releases alone bound it
  (for fixed internal randomness only client i's clipped update moves, by 2C);
- ``epsilon_client_level``: client-level eps of p_G (client-level DP only).

Calibration (target eps -> noise) runs :func:`dpfpl.privacy.calibration.calibrate` on the planned
events of the client that spends most (the smallest training set), built by the same code that
builds the mechanisms the steps call. A fixed multiplier leaves the rest of the budget to the free
one; nothing left, or explicit multipliers above the target, is an error before any work.

Reference mode (``privacy=reference``) reproduces the public DP-FPL code's rule (digest Sec. 4):
batch-MEAN gradients clipped at C per tensor (u, v, global separately), noise std sigma C / B with
sigma = sqrt(rounds log(1/delta)) / eps on every minibatch, server std = that / N. Its eps is a
CLAIM (``epsilon_claimed``); ``epsilon_spent`` is what our accountant gives for the mechanism it
really runs (batch-mean clipping: sensitivity 2C; every tensor a release of the same batch).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional

import torch
from dp_accounting import dp_event

from ..config import RunConfig
from ..errors import BudgetExhausted, ConfigError
from ..federation import Contribution
from ..sampling import BatchSampler
from .accountants import epsilon, pld_skipped
from .calibration import calibrate
from .events import group, make_event
from .ledger import BUDGET_SLACK, PrivacyLedger
from .mechanisms import BatchOutput, Privacy
from .randomness import NoiseSource
from .reference import reference_claimed_epsilon, reference_noise_multiplier, reference_sigma
from .release import BatchMechanism, GaussianRelease, ReferenceBatchMechanism, clip_and_sum, parse_clip_unit

__all__ = ["DPPrivacy", "ReferencePrivacy", "build_dp_privacy", "clip_and_sum", "parse_clip_unit"]

Plan = list[tuple[dp_event.DpEvent, int]]

EPSILON_COVERS = {
    "epsilon_spent": "example-level, max over clients of every release that depends on the client's data "
                     "(personalised prompt, global prompt, everything sent)",
    "epsilon_global": "example-level, the released global prompt",
    "epsilon_client_level": "client-level (add/remove one client), the released global prompt",
}


class DPPrivacy(Privacy):
    """Example-level DP with per-unit clipping, one event per batch, secret noise, a dp-accounting ledger."""

    mode = "dp"
    per_example = True
    batch_mechanism = BatchMechanism

    def __init__(self, cfg: RunConfig, engine):
        p, t = cfg.privacy, cfg.train
        self.cfg = cfg
        self.C = p.clip_norm
        self.delta = p.delta
        self.accountant = p.accountant
        self.sampling = cfg.batch_sampling
        self.unit, self.micro = parse_clip_unit(p.clip_unit)
        self.method = engine.method
        self.protocol = engine.protocol
        if not self.method.trainable:
            raise ConfigError(f"privacy={p.privacy} cannot take effect: method {self.method.name} trains nothing "
                              "(run it with privacy=none)")
        self.client_level = p.dp_level == "client"
        if self.client_level and self.protocol != "fedavg":
            raise ConfigError("privacy.dp_level=client needs the fedavg protocol (--protocol fedavg)")
        if self.client_level and not self.method.uses_global:
            raise ConfigError(f"privacy.dp_level=client protects the global prompt; method {self.method.name} has none")
        self.sens = self._sensitivity()
        self.relation = self._relation()
        self.batch_size = t.batch_size
        self.n = {c.client_id: len(c.train_idx) for c in engine.clients_data}
        self.q = {i: min(1.0, t.batch_size / n) for i, n in self.n.items()}
        min_n = min(self.n.values())
        if self.delta >= 1.0 / min_n:
            print(f"dpfpl: warning: privacy.delta={self.delta} is not below 1/n = 1/{min_n} "
                  "(the smallest client's training set): the guarantee is weak", file=sys.stderr)
        self.epsilon_target = p.epsilon
        self.ledger = PrivacyLedger()
        self.source = NoiseSource(p.noise_seed, p.secure_noise)
        self.gen = self.source.generator(0)  # the server's global noise
        self.client_gens = {i: self.source.generator(1, i) for i in self.n}  # local noise, where the client runs
        self.draws = 0  # noise draws made (tests compare with the ledger)
        self.rounds = t.rounds
        self.local_steps = engine.local_steps
        self.multiplier_history: list[dict[str, Any]] = []
        self.owns_client_generators = True  # False on a Flower server (the ClientApps own them)
        nm_l, nm_g = self._noise_multipliers(p)
        self._use_multipliers(nm_l, nm_g, from_round=0)

    # ------------------------------------------------------------------ structure
    def _sensitivity(self) -> float:
        """Sensitivity / C of one clipped sum under the run's relation."""
        if self.unit == "example" and self.sampling == "poisson":
            return 1.0
        return 2.0  # replace-one (shuffle), or a group (microbatch, batch) that one example changes

    def _relation(self) -> str:
        rel = "add/remove-one example" if self.sampling == "poisson" else "replace-one example"
        if self.unit == "microbatch" and self.sampling == "poisson":
            rel += " (microbatch groups are fixed training positions // M: an added example joins one group)"
        return rel

    @property
    def has_local(self) -> bool:
        return self.method.uses_local

    @property
    def has_global_batch(self) -> bool:
        """The global prompt's gradient is released per batch (example level)."""
        return self.method.uses_global and not self.client_level

    def batch_generator(self, client_id: int, seed: int, key: int = 0) -> torch.Generator:
        return self.source.generator(2, client_id, key)

    @property
    def batch_source(self):
        return self.source if self.source.secure else None

    def _parts(self, nm_l: Optional[float], nm_g: Optional[float]) -> tuple[GaussianRelease, ...]:
        parts = []
        if self.has_local:
            parts.append(GaussianRelease("local", nm_l, self.C, self.sens, tensors=self._local_tensors()))
        if self.has_global_batch:
            parts.append(GaussianRelease("global", nm_g, self.C, self.sens,
                                         noise_at="server" if self.protocol == "grad" else "client"))
        return tuple(parts)

    def _local_tensors(self) -> int:
        """Separately noised tensors of the local release (1: u and v clipped and noised jointly)."""
        return 1

    def mechanism_for(self, client_id: int, nm_l: Optional[float] = None, nm_g: Optional[float] = None) -> BatchMechanism:
        """The :class:`BatchMechanism` client ``client_id``'s steps call (current multipliers by default)."""
        nm_l = self.nm_local if nm_l is None else nm_l
        nm_g = self.nm_global if nm_g is None else nm_g
        return self._mechanism(client_id, self._parts(nm_l, nm_g))

    def _mechanism(self, client_id: int, parts: tuple[GaussianRelease, ...]) -> BatchMechanism:
        return self.batch_mechanism(parts, self.q[client_id], "poisson" if self.sampling == "poisson" else "shuffle",
                                    self.unit, self.micro)

    @staticmethod
    def _grads_by_part(mech: BatchMechanism, local: dict[str, torch.Tensor],
                       global_: Optional[torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """The release's input: ``local`` and ``{"G": global_}`` for the parts ``mech`` has."""
        grads: dict[str, dict[str, torch.Tensor]] = {}
        if mech.part("local") is not None:
            grads["local"] = local
        if mech.part("global") is not None:
            grads["global"] = {"G": global_}
        return grads

    def _server_events(self, nm_g: float) -> tuple[dp_event.DpEvent, dp_event.DpEvent]:
        """(example-level event for one contributing client, client-level event) of one client-level round."""
        return make_event(nm_g / 2.0, 1.0, "none"), make_event(nm_g, 1.0, "none")

    def _epochs(self, client_id: int, steps: int) -> int:
        return BatchSampler(self.n[client_id], self.batch_size, "shuffle", torch.Generator()).epochs_started_by(steps)

    def plan(self, client_id: int, nm_l: Optional[float], nm_g: Optional[float],
             rounds: Optional[int] = None) -> Plan:
        """Every event client ``client_id`` will have recorded after ``rounds`` rounds (all rounds
        participating) with these multipliers; ``math.inf`` = that part costs nothing."""
        rounds = self.rounds if rounds is None else rounds
        steps = rounds * self.local_steps
        out: Plan = []
        parts = tuple(r for r in self._parts(nm_l, nm_g) if not math.isinf(r.noise_multiplier))
        if parts and steps:
            mech = self._mechanism(client_id, parts)
            count = steps if self.sampling == "poisson" else self._epochs(client_id, steps)
            out.append((mech.joint_event, count))
        if self.client_level and rounds and nm_g is not None and not math.isinf(nm_g):
            out.append((self._server_events(nm_g)[0], rounds))
        return out

    # ------------------------------------------------------------------ calibration
    def _worst_client(self) -> int:
        return min(self.n, key=lambda i: (self.n[i], i))  # smallest set: largest q, most epochs

    def _noise_multipliers(self, p) -> tuple[Optional[float], Optional[float]]:
        uses_local, uses_global = self.method.uses_local, self.method.uses_global
        nm_l, nm_g = p.noise_multiplier_local, p.noise_multiplier_global
        if nm_l is not None and not uses_local:
            raise ConfigError(f"privacy.noise_multiplier_local={nm_l} has no effect: method {self.method.name} "
                              "has no local prompt")
        if nm_g is not None and not uses_global:
            raise ConfigError(f"privacy.noise_multiplier_global={nm_g} has no effect: method {self.method.name} "
                              "has no global prompt")
        need_l = uses_local and nm_l is None
        need_g = uses_global and nm_g is None
        if (need_l or need_g) and p.epsilon is None:
            raise ConfigError("privacy=dp needs --epsilon (to calibrate) or explicit "
                              "--noise-multiplier-local/--noise-multiplier-global")
        if not (need_l or need_g):
            return nm_l, nm_g
        w, target, acc = self._worst_client(), p.epsilon, self.accountant
        split = p.budget_split
        both = need_l and need_g
        if both and not 0 < split < 1:
            raise ConfigError(f"privacy.budget_split={split!r} must be strictly between 0 and 1 when both the "
                              "local and the global noise are calibrated")

        def cal(parts, tgt=target):
            return calibrate(parts, tgt, self.delta, acc)

        def reachable(plan: Plan, what: str) -> None:
            if plan and epsilon(plan, self.delta, acc) > target * (1 + BUDGET_SLACK):
                raise ConfigError(f"privacy: the fixed {what} alone spends more than epsilon={target} over "
                                  f"{self.rounds} rounds x {self.local_steps} steps; lower it or raise epsilon")
        try:
            if self.client_level:
                if both:  # the server's share first, then the local noise for what it leaves
                    nm_g = cal(lambda x: [(self._server_events(x)[0], self.rounds)], (1 - split) * target)
                    nm_l = cal(lambda x: self.plan(w, x, nm_g))
                elif need_l:
                    reachable(self.plan(w, math.inf, nm_g), f"global noise multiplier {nm_g}")
                    nm_l = cal(lambda x: self.plan(w, x, nm_g))
                else:
                    reachable(self.plan(w, nm_l, math.inf), f"local noise multiplier {nm_l}")
                    nm_g = cal(lambda x: self.plan(w, nm_l, x))
            elif both:
                # precision shares of the batch's joint Gaussian: 1/s_L^2 = split/s^2, 1/s_G^2 = (1-split)/s^2
                s = cal(lambda x: self.plan(w, x / math.sqrt(split), x / math.sqrt(1 - split)))
                nm_l, nm_g = s / math.sqrt(split), s / math.sqrt(1 - split)
            elif need_l:
                if uses_global:
                    reachable(self.plan(w, math.inf, nm_g), f"global noise multiplier {nm_g}")
                nm_l = cal(lambda x: self.plan(w, x, nm_g))
            else:
                if uses_local:
                    reachable(self.plan(w, nm_l, math.inf), f"local noise multiplier {nm_l}")
                nm_g = cal(lambda x: self.plan(w, nm_l, x))
        except ConfigError as exc:
            raise ConfigError(f"cannot calibrate noise for epsilon={target}, delta={self.delta} over "
                              f"{self.rounds} rounds x {self.local_steps} steps: {exc}") from None
        return nm_l, nm_g

    def _use_multipliers(self, nm_l: Optional[float], nm_g: Optional[float], from_round: int) -> None:
        """Set the applied multipliers, rebuild every client's mechanism and plan, and refuse (before
        any release) a plan whose eps exceeds the target."""
        self.nm_local, self.nm_global = nm_l, nm_g
        self.mechanisms = {i: self.mechanism_for(i) for i in self.n}
        self.plans = {i: self.plan(i, nm_l, nm_g) for i in self.n}
        self._plan_counts = {i: {k: n for k, (_, n) in group(pl).items()} for i, pl in self.plans.items()}
        if self.epsilon_target is not None:
            w = self._worst_client()
            planned = epsilon(self.plans[w], self.delta, self.accountant)
            if planned > self.epsilon_target * (1 + BUDGET_SLACK):
                raise BudgetExhausted(
                    f"privacy: noise multipliers local={nm_l}, global={nm_g} spend epsilon={planned:.4g} over "
                    f"{self.rounds} rounds x {self.local_steps} steps, above the target epsilon={self.epsilon_target} "
                    f"(delta={self.delta}); nothing was trained")
        entry = {"from_round": from_round, "noise_multiplier_local": nm_l, "noise_multiplier_global": nm_g}
        if not self.multiplier_history or self.multiplier_history[-1] != entry:
            self.multiplier_history.append(entry)

    # ------------------------------------------------------------------ releases
    def _normaliser(self, client) -> float:
        """Expected batch size q n (Poisson; = B unless n < B), or the realised size (shuffle)."""
        if self.sampling == "poisson":
            return self.q[client.id] * self.n[client.id]
        return float(max(len(client.last_local_idx), 1))

    def release(self, client, local, global_, protocol):
        mech = self.mechanisms[client.id]
        grads = self._grads_by_part(mech, local, global_)
        norm = self._normaliser(client)
        out_local: dict[str, torch.Tensor] = {}
        if mech.releases:  # (client-level DP of a global-only method releases nothing per batch)
            rel = mech(grads, norm, self.source, self.client_gens[client.id], positions=client.last_local_idx,
                       first_of_epoch=client.sampler.last_started_epoch)
            self.draws += rel.draws
            self.ledger.record(f"client{client.id}/batch", rel.event)
            out_local = rel.values.get("local", {})
        g = mech.part("global")
        if g is None:  # client level: the copy's gradient is not released (its update is clipped per round)
            if global_ is None:
                return BatchOutput(out_local, None, 1.0)
            mean = global_.mean(0) if len(global_) else torch.zeros(global_.shape[1:], dtype=global_.dtype)
            return BatchOutput(out_local, mean, 1.0)
        weight = norm if g.noise_at == "server" else 1.0
        return BatchOutput(out_local, rel.values["global"]["G"], weight)

    def global_release(self) -> GaussianRelease:
        """The global part every client's mechanism declares (the server noises with this object)."""
        parts = {self.mechanisms[i].part("global") for i in self.mechanisms}
        if len(parts) != 1 or None in parts:
            raise RuntimeError(f"clients declare different global releases: {parts}")
        return parts.pop()

    def aggregate(self, contribs):
        rel = self.global_release()
        total = sum(c.tensor for c in contribs)
        noisy = total + rel.noise({"G": total}, self.source, self.gen)["G"]
        self.draws += 1
        return noisy / sum(c.weight for c in contribs)

    def fedavg_contribution(self, client, p_G, copy):
        if not self.client_level:
            return Contribution(client.id, copy, 1.0, client.n_train)
        delta = copy - p_G
        delta = delta * min(1.0, self.C / (float(delta.norm()) + 1e-12))
        return Contribution(client.id, delta, 1.0, client.n_train)

    def aggregate_parameters(self, p_G, contribs):
        if not self.client_level:
            return sum(c.tensor for c in contribs) / len(contribs)
        rel = GaussianRelease("global", self.nm_global, self.C, 1.0, noise_at="server")
        total = sum(c.tensor for c in contribs)
        noisy = total + rel.noise({"G": total}, self.source, self.gen)["G"]
        self.draws += 1
        example_ev, client_ev = self._server_events(self.nm_global)
        self.ledger.record("server/client_level", client_ev)
        for c in contribs:
            self.ledger.record(f"client{c.client_id}/server", example_ev)
        return p_G + noisy / len(contribs)

    # ------------------------------------------------------------------ budget
    def subjects(self, client_id: int) -> list[str]:
        return [f"client{client_id}/batch", f"client{client_id}/server"]

    def round_events(self, client, steps: int) -> Plan:
        """The events client ``client`` records in a round of ``steps`` steps."""
        out: Plan = []
        mech = self.mechanisms[client.id]
        if mech.releases:
            n = steps if self.sampling == "poisson" else client.sampler.epochs_started_by(steps)
            out.append((mech.joint_event, n))
        if self.client_level:
            out.append((self._server_events(self.nm_global)[0], 1))
        return [(e, n) for e, n in out if n]

    def _within_plan(self, client_id: int, comp: Plan) -> bool:
        plan = self._plan_counts[client_id]
        for k, (ev, n) in group(comp).items():
            if isinstance(ev, dp_event.NoOpDpEvent):
                continue
            if n > plan.get(k, 0):
                return False
        return True

    def check_round(self, sampled: list[int], steps: int) -> Optional[str]:
        """A reason to stop before a round whose releases would exceed the budget, else None. A
        composition within the verified plan needs no accountant call."""
        if self.epsilon_target is None:
            return None
        for i in sampled:
            comp = self.ledger.composition(self.subjects(i)) + self.round_events(self._clients[i], steps)
            if self._within_plan(i, comp):
                continue
            if epsilon(comp, self.delta, self.accountant) > self.epsilon_target * (1 + BUDGET_SLACK):
                return (f"privacy budget: another round would exceed epsilon={self.epsilon_target} "
                        f"(delta={self.delta}) for client {i}")
        return None

    # ------------------------------------------------------------------ reporting
    def _eps_by_client(self, accountant: str) -> dict[int, float]:
        cache: dict[str, float] = {}
        out = {}
        for i in sorted(self.n):
            comp = self.ledger.composition(self.subjects(i))
            key = repr(sorted((k, n) for k, (_, n) in group(comp).items()))
            if key not in cache:
                cache[key] = epsilon(comp, self.delta, accountant)
            out[i] = cache[key]
        return out

    def spent(self, accountant: str = "rdp") -> dict[str, Any]:
        per = self._eps_by_client(accountant)
        spent = max(per.values()) if per else 0.0
        out: dict[str, Any] = {"epsilon_spent": spent, "epsilon_global": spent}
        if self.client_level:
            server = [epsilon(self.ledger.composition(f"client{i}/server"), self.delta, accountant) for i in self.n]
            out["epsilon_global"] = max(server) if server else 0.0
            out["epsilon_client_level"] = epsilon(self.ledger.composition("server/client_level"), self.delta, accountant)
        return out

    def end_round(self, round_):
        self.ledger.close_round(round_, self.delta, "rdp")
        s = self.spent("rdp")
        return {f"{k}_rdp": v for k, v in s.items()}

    def extra_summary(self) -> dict[str, Any]:
        return {}

    def summary(self, pld: bool = True):
        rdp = self.spent("rdp")
        s = {"privacy": self.mode, "epsilon_target": self.epsilon_target, "delta": self.delta,
             "accountant": self.accountant if pld else "rdp", **rdp, "epsilon_rdp": rdp["epsilon_spent"]}
        if pld:
            tight = self.spent("pld")
            s["epsilon_pld"] = tight["epsilon_spent"]
            s["epsilon_pld_skipped"] = any(pld_skipped(self.ledger.composition(self.subjects(i)), self.delta)
                                           for i in self.n)
            if self.accountant == "pld":
                s.update(tight)
        s.update({"epsilon_covers": {k: v for k, v in EPSILON_COVERS.items() if k in s},
                  "noise_multiplier_local": self.nm_local, "noise_multiplier_global": self.nm_global,
                  "noise_multipliers_used": self.multiplier_history,
                  "clip_norm": self.C, "clip_unit": self.cfg.privacy.clip_unit, "sampling": self.sampling,
                  "neighbouring_relation": self.relation, "dp_level": self.cfg.privacy.dp_level,
                  "noise_draws": self.draws, "ledger_events": self.ledger.count(), **self.source.describe()})
        s.update(self.extra_summary())
        return s

    def ledger_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "delta": self.delta, "neighbouring_relation": self.relation,
                "clip_norm": self.C, "clip_unit": self.cfg.privacy.clip_unit, "sampling": self.sampling,
                "noise_multiplier_local": self.nm_local, "noise_multiplier_global": self.nm_global,
                "noise_multipliers_used": self.multiplier_history, "accountant": self.accountant,
                "mechanisms": {f"client{i}": m.describe() for i, m in self.mechanisms.items()},
                "accountant_multiplier_divisor": self.sens, "noise_draws": self.draws,
                **self.source.describe(), "ledger": self.ledger.state_dict()}

    # ------------------------------------------------------------------ state (checkpoint)
    def state_dict(self):
        """Ledger, multipliers, draws; generator states only for reproducible (non-secret) noise."""
        s: dict[str, Any] = {"ledger": self.ledger.state_dict(), "draws": self.draws,
                             "noise_multiplier_local": self.nm_local, "noise_multiplier_global": self.nm_global,
                             "multiplier_history": self.multiplier_history, "noise_secret": self.source.secret}
        if not self.source.secret:
            s["gen"] = self.gen.get_state()
            if self.owns_client_generators:
                s["client_gens"] = {i: g.get_state() for i, g in self.client_gens.items()}
        return s

    def load_state_dict(self, s):
        """Resume rule: the run keeps the multipliers it was trained with (recorded in the checkpoint),
        and a plan that they cannot pay for within the target is refused here, before any work."""
        self.ledger.load_state_dict(s["ledger"])
        self.draws = s["draws"]
        self.multiplier_history = list(s.get("multiplier_history", []))
        if "noise_multiplier_local" in s:
            self._use_multipliers(s["noise_multiplier_local"], s["noise_multiplier_global"],
                                  from_round=self.multiplier_history[-1]["from_round"] if self.multiplier_history else 0)
        if self.source.secret:
            return  # fresh secret generators: nothing was saved, nothing to restore
        if s.get("gen") is not None:
            self.gen.set_state(s["gen"])
        saved = s.get("client_gens") or {}
        for i in self.client_gens:
            st = saved.get(i, saved.get(str(i)))
            if st is not None:
                self.client_gens[i].set_state(st)
            else:  # a new stream keyed by the resume point: never a replay of noise already used
                self.client_gens[i] = self.source.generator(1, i, 1 + self.ledger.count())


class ReferencePrivacy(DPPrivacy):
    """The public DP-FPL code's calibration and batch-mean clipping (a claim to audit)."""

    mode = "reference"
    per_example = False
    batch_mechanism = ReferenceBatchMechanism

    def __init__(self, cfg: RunConfig, engine):
        if cfg.privacy.epsilon is None:
            raise ConfigError("privacy=reference needs --epsilon (the nominal eps the public rule claims)")
        super().__init__(cfg, engine)

    def _sensitivity(self) -> float:
        return 2.0  # batch-mean clipping: one example can move the clipped mean by 2C

    def _relation(self) -> str:
        return ("replace-one example (shuffled batches, one exposure per epoch by parallel composition; "
                "batch-mean clipping: sensitivity 2C)")

    def _local_tensors(self) -> int:
        return 2 if self.method.low_rank else 1  # the public code clips and noises u and v on their own

    def _noise_multipliers(self, p):
        self.sigma = reference_sigma(p.epsilon, self.rounds, p.delta)
        self.claimed = reference_claimed_epsilon(self.sigma, self.rounds, p.delta)
        # applied std on the batch MEAN is sigma C / B: multiplier sigma / B relative to C; the
        # accountant divides by 2 (sensitivity 2C). The server's std on the mean of N clipped means
        # is that / N, on a release of sensitivity 2C / N: the same multiplier.
        nm = reference_noise_multiplier(self.sigma, self.batch_size, sensitivity_factor=1.0)
        return (nm if self.method.uses_local else None), (nm if self.method.uses_global else None)

    def _use_multipliers(self, nm_l, nm_g, from_round):
        target, self.epsilon_target = self.epsilon_target, None  # the public code has no budget check
        try:
            super()._use_multipliers(nm_l, nm_g, from_round)
        finally:
            self.epsilon_target = target

    def release(self, client, local, global_, protocol):
        mech = self.mechanisms[client.id]
        rel = mech(self._grads_by_part(mech, local, global_), 1.0, self.source, self.client_gens[client.id],
                   first_of_epoch=client.sampler.last_started_epoch)
        self.draws += rel.draws
        self.ledger.record(f"client{client.id}/batch", rel.event)
        g = rel.values.get("global", {}).get("G")
        return BatchOutput(rel.values.get("local", {}), g, 1.0)

    def aggregate(self, contribs):
        rel = self.global_release()
        mean = sum(c.tensor for c in contribs) / len(contribs)
        std_rel = GaussianRelease("global", rel.noise_multiplier / len(contribs), self.C, rel.sensitivity, "server")
        self.draws += 1
        return mean + std_rel.noise({"G": mean}, self.source, self.gen)["G"]

    def check_round(self, sampled, steps):
        return None  # the public code has no budget check: it runs the planned rounds

    def extra_summary(self):
        return {"epsilon_claimed": self.claimed, "reference_sigma": self.sigma, "clip_unit": "batch-mean (reference)",
                "sampling": "shuffle"}


def build_dp_privacy(cfg: RunConfig, engine) -> DPPrivacy:
    cls = ReferencePrivacy if cfg.privacy.privacy == "reference" else DPPrivacy
    return cls(cfg, engine)
