"""Clients and server: explicit per-client state, nothing shared but what the server sends.

Each :class:`Client` owns its local prompt tensors, its own SGD optimiser (momentum buffers
included), its batch sampler and its random generator (batches and factorisation). The
:class:`Server` owns the global prompt p_G and its optimiser. Two aggregation protocols:

- ``grad`` (the DP-FPL paper's loop): every local step, each sampled client computes G on its batch,
  updates its local prompt, and sends its global-prompt gradient; the server averages the
  contributions (the global DP mechanism adds its noise there) and takes one optimiser step.
- ``fedavg``: each sampled client copies p_G, trains copy and local prompt for K steps with its own
  optimisers, and sends the copy; the server averages the copies.

Every release of a trained tensor passes through the ``privacy`` object (a
:class:`dpfpl.privacy.mechanisms.Privacy`): ``privacy.release`` (everything one batch releases, one event),
``privacy.aggregate`` (server). This is where mechanisms and the accountant act.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .data.partition import ClientData
from .features import FeatureStore
from .grads import batch_ctx_grad, per_example_ctx_grads
from .methods import LocalView, Method
from .sampling import BatchSampler
from .text import PromptTextEncoder


@dataclass
class Contribution:
    """What a client sends: a tensor (a gradient sum/mean, or a parameter copy) and its weight."""

    client_id: int
    tensor: torch.Tensor
    weight: float
    n_examples: int


@dataclass
class PendingStep:
    """A local step between :meth:`Client.prepare` and :meth:`Client.finish`: the batch, the local
    view and the context its gradient is taken at."""

    feats: torch.Tensor   # (B, E) image features of the batch
    labels: torch.Tensor  # (B,)
    view: LocalView
    ctx: torch.Tensor     # (n_ctx, D), detached

    @property
    def batch_size(self) -> int:
        return len(self.labels)


@dataclass
class FedAvgCopy:
    """A client's private copy of p_G during a fedavg round, with its own optimiser."""

    param: torch.Tensor   # (n_ctx, D), requires grad
    opt: torch.optim.Optimizer


@dataclass
class TrainSettings:
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    sampling: str
    n_ctx: int
    per_example_grads: str = "auto"  # vjp | jacobian | auto (dpfpl.grads.per_example_ctx_grads)


def sgd(params: list[torch.Tensor], s: TrainSettings, lr: Optional[float] = None) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=s.lr if lr is None else lr, momentum=s.momentum, weight_decay=s.weight_decay)


class Client:
    def __init__(self, data: ClientData, method: Method, enc: PromptTextEncoder, store: FeatureStore,
                 scale: float, settings: TrainSettings, privacy, seed: int):
        self.id = data.client_id
        self.data, self.method, self.enc, self.store = data, method, enc, store
        self.scale, self.s, self.privacy = scale, settings, privacy
        self.gen = torch.Generator().manual_seed(seed)  # factorisation (public randomness)
        init_gen = torch.Generator().manual_seed(seed + 1)
        # batch selection: the privacy mechanism's (secret under DP), the run's seed otherwise
        self._seed = seed
        self.batch_gen = privacy.batch_generator(self.id, seed)
        self.batch_gen_secret = bool(getattr(getattr(privacy, "source", None), "secret", False))
        self.local = {k: v.to(store.clip.device).requires_grad_(True)
                      for k, v in method.init_local(settings.n_ctx, enc.width, init_gen).items()}
        self.opt = sgd(list(self.local.values()), settings) if self.local else None
        self.train_idx = torch.as_tensor(data.train_idx, dtype=torch.long)
        self.sampler = BatchSampler(len(self.train_idx), settings.batch_size, settings.sampling, self.batch_gen,
                                    source=privacy.batch_source)
        self.used = torch.zeros(len(self.train_idx), dtype=torch.bool)  # membership record
        self.steps = 0
        self.last_loss = float("nan")

    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    # ------------------------------------------------------------------ training
    def _batch(self):
        local_idx = self.sampler.next()
        self.last_local_idx = local_idx  # (b,) positions in this client's training set
        self.used[local_idx] = True
        return self.store.get("train", self.train_idx[local_idx])

    def prepare(self, base: torch.Tensor) -> "PendingStep":
        """The first half of a local step: draw the batch (this client's sampler), build the local
        view (this client's factorisation generator) and the context at ``base`` (p_G, or the
        fedavg copy). Sequential and vectorised steps call it in the same per-client order."""
        feats, labels = self._batch()
        view = self.method.local_view(self.local, self.gen, base)
        ctx = (base.detach() if self.method.uses_global else 0) + view.context()  # (n_ctx, D)
        return PendingStep(feats, labels, view, ctx)

    def grad(self, pending: "PendingStep") -> torch.Tensor:
        """G (n_ctx, D) batch mean, or (B, n_ctx, D) per example when the privacy mode needs it;
        sets ``last_loss``."""
        if self.privacy.per_example:
            losses, G = per_example_ctx_grads(self.enc, pending.ctx, pending.feats, pending.labels, self.scale,
                                              strategy=self.s.per_example_grads)
            self.last_loss = float(losses.mean()) if len(losses) else float("nan")
            return G
        self.last_loss, G = batch_ctx_grad(self.enc, pending.ctx, pending.feats, pending.labels, self.scale)
        return G

    def finish(self, pending: "PendingStep", G: torch.Tensor, protocol: str):
        """The second half of a local step: everything this batch releases, through the privacy
        mechanism in ONE call (one event): the local carrier gradients and the global-prompt
        gradient. Applies the local update; returns the release's :class:`BatchOutput`."""
        view = pending.view
        carriers = view.carrier_grads(G) if self.method.uses_local else {}
        out = self.privacy.release(self, carriers, G if self.method.uses_global else None, protocol)
        if self.method.uses_local:
            for name, g in view.param_grads(out.local).items():
                self.local[name].grad = g
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return out

    def contribution(self, out) -> Optional[Contribution]:
        """The global contribution of a grad-protocol step's release (None without a global prompt)."""
        if self.method.uses_global:
            return Contribution(self.id, out.global_, out.weight, self.n_train)
        return None

    def step(self, p_G: torch.Tensor) -> Optional[Contribution]:
        """One local step at the current global prompt; returns the global contribution (grad protocol)."""
        pending = self.prepare(p_G)
        return self.contribution(self.finish(pending, self.grad(pending), "grad"))

    def fedavg_start(self, p_G: torch.Tensor) -> "FedAvgCopy":
        """A private copy of p_G with a fresh optimiser, for one fedavg round."""
        copy = p_G.detach().clone().requires_grad_(True)
        return FedAvgCopy(copy, sgd([copy], self.s))

    def fedavg_apply(self, run: "FedAvgCopy", out) -> None:
        """Step the copy with a fedavg step's released global gradient."""
        run.param.grad = out.global_
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)

    def fedavg_end(self, run: "FedAvgCopy", p_G: torch.Tensor) -> Contribution:
        return self.privacy.fedavg_contribution(self, p_G.detach(), run.param.detach())

    def fedavg_round(self, p_G: torch.Tensor, steps: int) -> Contribution:
        """K local steps on a private copy of p_G (fresh optimiser each round); returns the copy."""
        run = self.fedavg_start(p_G)
        for _ in range(steps):
            pending = self.prepare(run.param)
            self.fedavg_apply(run, self.finish(pending, self.grad(pending), "fedavg"))
        return self.fedavg_end(run, p_G)

    # ------------------------------------------------------------------ evaluation / state
    def personal_context(self, p_G: torch.Tensor) -> torch.Tensor:
        """The personalised context used at test time and released to the client's user (n_ctx, D)."""
        with torch.no_grad():
            base = p_G.detach() if self.method.uses_global else torch.zeros_like(p_G)
            return base + self.method.local_context(self.local) if self.method.uses_local else base

    def state_dict(self) -> dict:
        return {
            "local": {k: v.detach().clone() for k, v in self.local.items()},
            "opt": self.opt.state_dict() if self.opt else None,
            "gen": self.gen.get_state(),
            "sampler": self.sampler.state_dict(with_generator=not self.batch_gen_secret),
            "used": self.used.clone(),
            "steps": self.steps,
        }

    def load_state_dict(self, s: dict) -> None:
        with torch.no_grad():
            for k, v in s["local"].items():
                self.local[k].copy_(v)
        if self.opt:
            self.opt.load_state_dict(s["opt"])
        self.gen.set_state(s["gen"])
        if s["sampler"].get("gen") is None and not self.batch_gen_secret:
            # no saved state: a new stream keyed by the resume point, never a replay of used batches
            steps = int(s["steps"])
            self.batch_gen = self.privacy.batch_generator(self.id, self._seed, key=0 if steps == 0 else 1 + steps)
            self.sampler.gen = self.batch_gen
        self.sampler.load_state_dict(s["sampler"])
        self.used = s["used"].clone()
        self.steps = s["steps"]


class Server:
    """Holds the global prompt; samples clients; applies aggregated updates."""

    def __init__(self, p_G: torch.Tensor, settings: TrainSettings, global_lr: float, n_clients: int,
                 client_fraction: float, privacy, seed: int):
        self.p_G = p_G.clone().requires_grad_(True)
        self.opt = sgd([self.p_G], settings, lr=global_lr)
        self.n_clients, self.fraction, self.privacy = n_clients, client_fraction, privacy
        self.rng = np.random.default_rng(seed)

    def sample_clients(self) -> list[int]:
        m = max(1, int(round(self.fraction * self.n_clients)))
        if m >= self.n_clients:
            return list(range(self.n_clients))
        return sorted(int(i) for i in self.rng.choice(self.n_clients, size=m, replace=False))

    def apply_gradients(self, contribs: list[Contribution]) -> None:
        self.p_G.grad = self.privacy.aggregate(contribs)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def apply_parameters(self, contribs: list[Contribution]) -> None:
        with torch.no_grad():
            self.p_G.copy_(self.privacy.aggregate_parameters(self.p_G.detach(), contribs))

    def state_dict(self) -> dict:
        return {"p_G": self.p_G.detach().clone(), "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, s: dict) -> None:
        with torch.no_grad():
            self.p_G.copy_(s["p_G"])
        self.opt.load_state_dict(s["opt"])
        self.rng.bit_generator.state = s["rng"]
