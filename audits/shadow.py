"""Training models of a recipe on chosen data: audit targets, shadow/reference models, canary runs.

A *recipe* is a :class:`RunConfig` (method, rounds, lr, privacy...). :func:`train_model` trains
it with the engine on explicit per-client training sets (universe ids of a :class:`World`),
reusing the world's frozen features, and returns what the audit needs: the global prompt, every
client's released personalised context and the ids each client actually used. ``untrained=True``
returns the contexts at initialisation instead (the negative control).

:class:`ModelCache` stores such results on disk, keyed by a hash of everything that determines
them (recipe, world fingerprint, data, seed), so a rerun with more attacks reuses them.

Shadow design (:class:`ShadowDesign`): for every audited client, its candidate *pool* is split at
random in halves; shadow ``2p`` trains on one half and shadow ``2p+1`` on the complement (each
candidate is IN exactly half of an even number of shadows). Non-audited clients keep fixed training
sets. Each shadow uses its own training seed (initialisation, batches, noise).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from dpfpl.config import RunConfig
from dpfpl.data.partition import ClientData
from dpfpl.errors import ConfigError

from .target import World

__all__ = ["TrainedModel", "train_model", "ModelCache", "ShadowDesign", "build_clients", "recipe_dict",
           "derive_seed", "shared_store"]


def derive_seed(*parts: int) -> int:
    """A 31-bit seed derived from integers (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def recipe_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config fields that determine a trained model (evaluation cadence and device excluded)."""
    d = cfg.to_dict()
    d["train"].pop("eval_every", None)
    d["model"].pop("device", None)
    return d


def build_clients(world: World, train_sets: dict[int, np.ndarray], classes: dict[int, np.ndarray]) -> list[ClientData]:
    """ClientData (ids = universe ids) for clients ``0..N-1``; test sets from their classes."""
    test_labels = np.asarray(world.dataset.test.labels)
    n = len(train_sets)
    if sorted(train_sets) != list(range(n)):
        raise ConfigError(f"clients must be numbered 0..{n - 1}, got {sorted(train_sets)}")
    out = []
    for i in range(n):
        cls = np.asarray(classes[i], dtype=np.int64)
        others = [np.asarray(classes[j]) for j in range(n) if j != i]
        neigh = np.setdiff1d(np.unique(np.concatenate(others)) if others else np.zeros(0, np.int64), cls)
        ids = np.sort(np.asarray(train_sets[i], dtype=np.int64))
        if ids.size == 0:
            raise ConfigError(f"client {i} would have no training example")
        out.append(ClientData(client_id=i, train_idx=ids, classes=cls,
                              local_test_idx=np.flatnonzero(np.isin(test_labels, cls)).astype(np.int64),
                              neighbor_test_idx=np.flatnonzero(np.isin(test_labels, neigh)).astype(np.int64)))
    return out


@contextmanager
def shared_store(store) -> Iterator[dict[str, Any]]:
    """Make the Engine use a prebuilt FeatureStore: through its ``store=`` argument if it has one,
    else by substituting ``dpfpl.engine.FeatureStore`` for the duration (single-threaded use)."""
    import dpfpl.engine as eng

    if "store" in inspect.signature(eng.Engine.__init__).parameters:
        yield {"store": store}
        return
    orig = eng.FeatureStore
    eng.FeatureStore = lambda *a, **k: store  # type: ignore[assignment]
    try:
        yield {}
    finally:
        eng.FeatureStore = orig  # type: ignore[assignment]


@dataclass
class TrainedModel:
    p_G: torch.Tensor
    contexts: dict[int, torch.Tensor]
    used: dict[int, np.ndarray]          # universe ids each client actually trained on
    summary: dict[str, Any]

    def to_state(self) -> dict[str, Any]:
        return {"p_G": self.p_G, "contexts": self.contexts,
                "used": {k: torch.as_tensor(v) for k, v in self.used.items()}, "summary": json.dumps(self.summary)}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "TrainedModel":
        return cls(s["p_G"], {int(k): v for k, v in s["contexts"].items()},
                   {int(k): np.asarray(v) for k, v in s["used"].items()}, json.loads(s["summary"]))


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in summary.items():
        if k.startswith("_"):
            continue
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = str(v)
    return out


def train_model(cfg: RunConfig, world: World, clients: list[ClientData], universe: bool,
                untrained: bool = False, on_step: Optional[Callable[[int, int], None]] = None,
                out: Optional[Path] = None) -> TrainedModel:
    """Train ``cfg`` on ``clients`` (universe ids) with the world's features.

    ``universe=False``: the ids are training-split ids and the Engine sees the original dataset
    (then ``out`` may name a run directory to write, via :func:`dpfpl.train.train`).
    ``untrained=True``: no training step; the contexts at initialisation (negative control).
    """
    from dpfpl.engine import Engine
    from dpfpl.train import summarize, train

    cfg = copy.deepcopy(cfg)
    if out is None:
        cfg.train.eval_every = cfg.train.rounds  # evaluation does not change training; skip it
    ds = world.engine_dataset(universe)
    store = world.engine_store(universe)
    with torch.random.fork_rng(devices=[]), shared_store(store) as extra:
        if out is not None and not untrained:
            if universe:
                raise ConfigError("a run directory can only be written for training-split ids")
            summary = train(cfg, out=out, clip=world.clip, dataset=ds, clients_data=clients,
                            on_step=on_step, **extra)
            engine = summary.pop("_engine")
        else:
            engine = Engine(cfg, clip=world.clip, dataset=ds, clients_data=clients, **extra)
            if not untrained:
                engine.run((), on_step=on_step)
            summary = summarize(engine, 0.0, pld=False)
    with torch.no_grad():
        p_G = engine.server.p_G.detach().float().cpu().clone()
        contexts = {c.id: c.personal_context(engine.server.p_G).float().cpu().clone() for c in engine.clients}
        used = {c.id: c.train_idx[c.used].numpy().copy() for c in engine.clients}
    summary = _jsonable(summary)
    if untrained:
        summary["untrained"] = True
    return TrainedModel(p_G, contexts, used, summary)


class ModelCache:
    """Trained models on disk: ``root/<key>.pt``; ``key`` from :meth:`key`."""

    def __init__(self, root: Optional[Path]):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(kind: str, **parts: Any) -> str:
        def norm(v: Any) -> Any:
            if isinstance(v, np.ndarray):
                return hashlib.sha256(np.ascontiguousarray(v.astype(np.int64)).tobytes()).hexdigest()[:16]
            if isinstance(v, dict):
                return {str(k): norm(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
            if isinstance(v, (list, tuple)):
                return [norm(x) for x in v]
            if isinstance(v, (np.integer,)):
                return int(v)
            return v

        blob = json.dumps({"kind": kind, **{k: norm(v) for k, v in parts.items()}}, sort_keys=True, default=str)
        return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"

    def get(self, key: str, make: Callable[[], TrainedModel]) -> TrainedModel:
        if self.root is not None:
            f = self.root / f"{key}.pt"
            if f.is_file():
                try:
                    m = TrainedModel.from_state(torch.load(f, weights_only=True))
                    self.hits += 1
                    return m
                except Exception:  # a corrupt cache entry is retrained
                    pass
        m = make()
        self.misses += 1
        if self.root is not None:
            from dpfpl.rundir import atomic_torch_save

            atomic_torch_save(self.root / f"{key}.pt", m.to_state())
        return m


@dataclass
class ShadowDesign:
    """Which data each shadow model trains on (see the module docstring)."""

    pools: dict[int, np.ndarray]     # audited client -> candidate universe ids
    fixed: dict[int, np.ndarray]     # other clients -> their fixed training ids
    classes: dict[int, np.ndarray]
    seed: int

    def mask(self, k: int, client: int) -> np.ndarray:
        """Bool mask over ``pools[client]``: candidates IN shadow k (complementary pairs)."""
        pool = self.pools[client]
        rng = np.random.default_rng([self.seed, 0x5AD0, k // 2, client])
        m = rng.random(pool.size) < 0.5
        if pool.size >= 2 and (m.all() or not m.any()):  # both halves non-empty
            m[int(rng.integers(pool.size))] ^= True
        return m if k % 2 == 0 else ~m

    def train_sets(self, k: int) -> dict[int, np.ndarray]:
        sets = {i: ids.copy() for i, ids in self.fixed.items()}
        for i, pool in self.pools.items():
            sets[i] = pool[self.mask(k, i)]
        return sets

    def in_matrix(self, K: int, client: int) -> np.ndarray:
        """(K, n_pool) bool: IN masks of shadows 0..K-1."""
        return np.stack([self.mask(k, client) for k in range(K)]) if K else np.zeros((0, self.pools[client].size), bool)
