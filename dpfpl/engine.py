"""The in-process federated engine: builds everything from a :class:`RunConfig` and runs rounds.

Rounds: the server samples clients; under the ``grad`` protocol each of the K local steps has every
sampled client take one step at the same p_G, then the server applies the aggregated global
gradient; under ``fedavg`` each sampled client trains K steps on its own copy and the server
averages the copies. With ``train.vectorize_clients`` (default) the sampled clients' step runs as
one batched pass (:mod:`dpfpl.vectorized`; each client's release, noise and update unchanged),
else client by client. After every ``eval_every`` rounds (and the last) each client is evaluated on
its local test set (its own classes) and neighbour test set (the other clients' classes); both
classify among ALL the dataset's classes. Callbacks (run directory writer, progress display) are
kept out of the engine: ``on_round_end(engine, row)``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from . import vectorized
from .clip import FrozenClip, load_clip
from .config import RunConfig
from .data import load_run_dataset, partition
from .data.base import Dataset
from .data.partition import ClientData
from .errors import ConfigError
from .features import FeatureStore
from .federation import Client, Server, TrainSettings
from .methods import Method
from .plan import plan_engine
from .registry import get_method
from .text import PromptTextEncoder, logit_scale, template_features


class Callback(Protocol):
    def on_round_end(self, engine: "Engine", row: dict[str, Any]) -> None: ...


def build_privacy(cfg: RunConfig, engine: "Engine"):
    """The privacy mechanism for ``cfg.privacy.privacy`` (see :mod:`dpfpl.privacy`)."""
    if cfg.privacy.privacy == "none":
        from .privacy.mechanisms import Privacy

        return Privacy()
    from .privacy.dp import build_dp_privacy  # issue 3: honest DP and the reference mode

    return build_dp_privacy(cfg, engine)


class EngineRecord:
    """What every engine (in-process, Flower) keeps the same way: the round history, the final
    metrics and the checkpoint layout (``round``, ``server``, ``clients``, ``privacy``, ``history``,
    ``stopped_reason``), so that a checkpoint of one engine resumes on the other."""

    engine_name = "inprocess"  # summary.json "engine"
    round: int
    history: list[dict[str, Any]]
    stopped_reason: Optional[str]

    def final_metrics(self) -> dict[str, Any]:
        evaluated = [r for r in self.history if "local_acc" in r]
        return evaluated[-1] if evaluated else {}

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "server": self.server.state_dict(),
                "clients": [c.state_dict() for c in self.clients], "privacy": self.privacy.state_dict(),
                "history": self.history, "stopped_reason": self.stopped_reason}


class Engine(EngineRecord):
    def __init__(self, cfg: RunConfig, clip: Optional[FrozenClip] = None, dataset: Optional[Dataset] = None,
                 on_status: Optional[Callable[[str], None]] = None,
                 clients_data: Optional[list[ClientData]] = None, on_ready: Optional[Callable[[], None]] = None):
        """``clip``/``dataset`` skip loading (tests, audits reuse them); ``clients_data`` replaces
        the configured partition (audits train shadow models on chosen subsets).

        Order: dataset, partition, local steps, privacy mechanism (its calibration fails here for an
        unreachable epsilon), then ``on_ready()`` (e.g. create the run directory), and only then the
        model is loaded and the images encoded (the expensive part)."""
        self.cfg = cfg.validate()
        t, d = cfg.train, cfg.data
        status = on_status or (lambda msg: None)
        self.method: Method = get_method(t.method)(rank=t.rank, ctx_init_std=t.ctx_init_std)
        status("loading dataset")
        self.dataset = dataset if dataset is not None else load_run_dataset(cfg)
        if clients_data is None:
            clients_data = partition(self.dataset, d.num_clients, d.partition, seed=t.seed,
                                     beta=d.dirichlet_beta, shots=d.shots, val_fraction=d.val_fraction)
        elif len(clients_data) != d.num_clients:
            raise ConfigError(f"data.num_clients={d.num_clients} but {len(clients_data)} client partitions were given")
        plan = plan_engine(cfg, clients_data, self.method)
        self.protocol, self.clients_data, self.local_steps = plan.protocol, plan.clients_data, plan.local_steps
        # reads cfg, method, protocol, clients_data and local_steps only: before the expensive part
        self.privacy = build_privacy(cfg, self)
        if on_ready is not None:
            on_ready()
        status("loading model")
        self.clip = clip if clip is not None else load_clip(cfg.model.model, cfg.model.pretrained, cfg.model.device)
        self.enc = PromptTextEncoder(self.clip, self.dataset.classnames, t.n_ctx, cut=t.cut_text)
        self.method.check(t.n_ctx, self.enc.width)
        self.scale = logit_scale(self.clip)
        status("encoding images")
        self.store = FeatureStore(self.clip, {"train": self.dataset.train, "test": self.dataset.test},
                                  cache=t.cache_features, cache_dir=t.feature_cache_dir)
        sampling = cfg.batch_sampling
        self.settings = TrainSettings(t.lr, t.momentum, t.weight_decay, t.batch_size, sampling, t.n_ctx,
                                      t.per_example_grads)
        seeds = np.random.SeedSequence(t.seed).generate_state(4 + 2 * d.num_clients)
        init_gen = torch.Generator().manual_seed(int(seeds[0]))
        p_G = torch.randn(t.n_ctx, self.enc.width, generator=init_gen) * t.ctx_init_std
        self.server = Server(p_G.to(self.clip.device), self.settings, t.global_lr or t.lr, d.num_clients,
                             t.client_fraction, self.privacy, seed=int(seeds[1]))
        self.clients = [Client(cd, self.method, self.enc, self.store, self.scale, self.settings, self.privacy,
                               seed=int(seeds[4 + i])) for i, cd in enumerate(self.clients_data)]
        self.privacy.attach(self.clients)
        # None: the sampled clients' steps run as one batched pass (dpfpl.vectorized)
        self.sequential_reason = vectorized.fallback_reason(self.method, t.vectorize_clients is not False)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.stopped_reason: Optional[str] = None
        self._zeroshot = self._evaluate_features(lambda c: template_features(self.clip, self.dataset.classnames))

    # ------------------------------------------------------------------ training
    @property
    def vectorized(self) -> bool:
        """Do the sampled clients step in one batched pass (else why not: ``sequential_reason``)."""
        return self.sequential_reason is None

    @property
    def total_rounds(self) -> int:
        return self.cfg.train.rounds if self.method.trainable else 0

    def train_round(self, on_step: Optional[Callable[[int, int], None]] = None) -> Optional[dict[str, Any]]:
        """Run one round; returns its metrics row, or None when the privacy budget stops training
        (``stopped_reason`` says why; nothing of the round is released)."""
        t0 = time.perf_counter()
        rng_state = self.server.rng.bit_generator.state
        sampled = self.server.sample_clients()
        reason = self.privacy.check_round(sampled, self.local_steps)
        if reason is not None:
            self.server.rng.bit_generator.state = rng_state
            self.stopped_reason = reason
            return None
        losses = []
        clients = [self.clients[i] for i in sampled]
        vec = self.vectorized
        if self.protocol == "grad":
            for s in range(self.local_steps):
                if vec:
                    contribs = vectorized.grad_step(clients, self.server.p_G)
                else:
                    contribs = [c for c in (cl.step(self.server.p_G) for cl in clients) if c is not None]
                if contribs:
                    self.server.apply_gradients(contribs)
                losses.append(np.nanmean([c.last_loss for c in clients]))
                if on_step:
                    on_step(s + 1, self.local_steps)
        elif vec:
            contribs = vectorized.fedavg_round(clients, self.server.p_G, self.local_steps, on_step)
            losses = [c.last_loss for c in clients]
            self.server.apply_parameters(contribs)
        else:
            contribs = []
            for k, c in enumerate(clients):
                contribs.append(c.fedavg_round(self.server.p_G, self.local_steps))
                losses.append(c.last_loss)
                if on_step:
                    on_step(k + 1, len(clients))
            self.server.apply_parameters(contribs)
        self.round += 1
        row: dict[str, Any] = {"round": self.round, "clients": sampled,
                               "train_loss": float(np.nanmean(losses)) if losses else float("nan"),
                               "train_s": time.perf_counter() - t0}
        row.update(self.privacy.end_round(self.round))
        if self.round % self.cfg.train.eval_every == 0 or self.round == self.total_rounds:
            row.update(self.evaluate())
        self.history.append(row)
        return row

    # ------------------------------------------------------------------ evaluation
    def _evaluate_features(self, text_features_for: Callable[[Client], torch.Tensor]) -> dict[str, Any]:
        """Local / neighbour test accuracy per client and their means; with a validation split
        (data.val_fraction > 0) also ``val_local_acc``: the same on each client's held-out
        training images."""
        local, neigh, val = [], [], []
        for c in self.clients:
            txt = text_features_for(c)  # (C, E)
            local.append(self._acc(txt, c.data.local_test_idx))
            neigh.append(self._acc(txt, c.data.neighbor_test_idx))
            val.append(self._acc(txt, c.data.val_idx, split="train"))
        neigh_valid = [a for a in neigh if a is not None]
        out = {"local_acc": float(np.mean(local)), "neighbor_acc": float(np.mean(neigh_valid)) if neigh_valid else None,
               "local_acc_per_client": local, "neighbor_acc_per_client": neigh}
        if any(a is not None for a in val):
            out.update(val_local_acc=float(np.mean([a for a in val if a is not None])), val_local_acc_per_client=val)
        return out

    @torch.no_grad()
    def _acc(self, txt: torch.Tensor, idx, split: str = "test") -> Optional[float]:
        if len(idx) == 0:
            return None
        feats, labels = self.store.get(split, torch.as_tensor(idx, dtype=torch.long))
        pred = (feats @ txt.T).argmax(-1)
        return float((pred == labels).float().mean())

    def evaluate(self) -> dict[str, Any]:
        if not self.method.trainable:
            return dict(self._zeroshot)
        with torch.no_grad():
            return self._evaluate_features(lambda c: self.enc(c.personal_context(self.server.p_G)))

    @property
    def zeroshot(self) -> dict[str, Any]:
        return self._zeroshot

    def run(self, callbacks: tuple = (), on_step: Optional[Callable[[int, int], None]] = None) -> dict[str, Any]:
        """Train the remaining rounds (all, or those left after a resume); returns the last row."""
        if not self.method.trainable and not self.history:
            row = {"round": 0, **self.evaluate()}
            self.history.append(row)
            for cb in callbacks:
                cb.on_round_end(self, row)
        while self.round < self.total_rounds and self.stopped_reason is None:
            row = self.train_round(on_step)
            if row is None:
                break
            for cb in callbacks:
                cb.on_round_end(self, row)
        return self.final_metrics()

    # ------------------------------------------------------------------ state
    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.round = s["round"]
        self.server.load_state_dict(s["server"])
        for c, cs in zip(self.clients, s["clients"]):
            c.load_state_dict(cs)
        self.privacy.load_state_dict(s["privacy"])
        self.history = list(s["history"])
        self.stopped_reason = s.get("stopped_reason")

    def membership(self) -> dict[str, Any]:
        """Which training examples each client holds and actually trained on (ids = dataset.train indices)."""
        return {"dataset": self.dataset.name, "split": "train", "clients": [
            {"client_id": c.id, "assigned": [int(i) for i in c.train_idx],
             "used": [int(i) for i in c.train_idx[c.used]], "classes": [int(k) for k in c.data.classes]}
            for c in self.clients]}
