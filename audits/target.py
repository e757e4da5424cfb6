"""Audit targets: a run directory (or an Engine) turned into features, labels and released contexts,
and the per-example membership signals of a target model.

Ids. Every example an audit talks about has one integer id in a *universe*: the dataset's training
split first (ids ``0 .. n_train-1``, the same ids as the run's membership record), then its test
split (``n_train + j`` for test example j), then any extra examples the audit adds (canaries).
:class:`World` holds the frozen image features and labels of the whole universe, computed once;
shadow models and scorers reuse them (nothing is encoded twice).

Signals of a target model (a context tensor ``ctx`` (n_ctx, D), the released personalised context
of a client or the global prompt alone) on an example x with label y, with
``logits = s * f(x) @ T(ctx)^T`` over ALL the dataset's classes (as the engine evaluates):

- ``loss``: cross-entropy ``-log p_y``;
- ``conf``: ``p_y`` (softmax probability of the true class);
- ``logit_conf``: ``log(p_y / (1 - p_y)) = logit_y - logsumexp_{c != y} logit_c`` (computed
  stably; LiRA's logit scaling, Carlini et al. 2022);
- ``logprobs``: the full log-softmax vector (the Shokri attack's input).

:func:`load_run_dir` checks the run directory (config, finished summary, membership record,
released prompts), rebuilds dataset and model from its config and verifies that they reproduce the
run's recorded accuracy (a wrong ``--root``, dataset or weights fails loudly instead of auditing
garbage).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from dpfpl.clip import FrozenClip, load_clip
from dpfpl.config import RunConfig
from dpfpl.data import load_run_dataset
from dpfpl.data.base import Dataset, ImageSplit
from dpfpl.errors import ConfigError, DataError
from dpfpl.features import FeatureStore, encode_split
from dpfpl.text import PromptTextEncoder, logit_scale

__all__ = ["Signals", "signals_from_logits", "World", "RunTarget", "load_run_dir", "seeded_clip",
           "UniverseSplit", "make_store"]

# torch's default CPU generator seed in a fresh process: a random-init ("none") model built by a
# fresh `dpfpl train` process draws its weights from it.
TORCH_DEFAULT_SEED = 67280421310721


# ------------------------------------------------------------------------------------------------
# signals

@dataclass
class Signals:
    """Per-example signals of one model (numpy, float64); see the module docstring."""

    loss: np.ndarray
    conf: np.ndarray
    logit_conf: np.ndarray
    logprobs: np.ndarray  # (n, C)

    def __len__(self) -> int:
        return int(self.loss.size)


def signals_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> Signals:
    """Signals from logits (n, C) and integer labels (n,)."""
    logits = logits.detach().double()
    labels = labels.long()
    logp = torch.log_softmax(logits, dim=-1)
    lp_y = logp.gather(1, labels[:, None]).squeeze(1)
    if logits.shape[1] > 1:
        others = logits.scatter(1, labels[:, None], float("-inf"))
        lc = logits.gather(1, labels[:, None]).squeeze(1) - torch.logsumexp(others, dim=-1)
    else:  # one class: p_y = 1
        lc = torch.full_like(lp_y, float("inf"))
    lc = torch.clamp(lc, -1e4, 1e4)
    return Signals(loss=(-lp_y).numpy(), conf=lp_y.exp().numpy(), logit_conf=lc.numpy(), logprobs=logp.numpy())


# ------------------------------------------------------------------------------------------------
# the universe of examples

class UniverseSplit(ImageSplit):
    """Concatenation of image splits (and relabelled views): train, test, then extras."""

    def __init__(self, parts: Sequence[tuple[ImageSplit, np.ndarray, np.ndarray]]):
        # parts: (split, indices into it, labels to report)
        self.parts = list(parts)
        self.labels = np.concatenate([np.asarray(lab, np.int64) for _, _, lab in self.parts]) \
            if self.parts else np.zeros(0, np.int64)
        self._offsets = np.cumsum([0] + [len(ix) for _, ix, _ in self.parts])

    def _locate(self, i: int) -> tuple[ImageSplit, int]:
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        split, ix, _ = self.parts[k]
        return split, int(ix[i - self._offsets[k]])

    def _load(self, i: int):
        split, j = self._locate(i)
        return split.load(j)

    def describe(self, i: int) -> str:
        split, j = self._locate(i)
        return split.describe(j)


def make_store(clip: FrozenClip, splits: dict[str, ImageSplit], feats: dict[str, torch.Tensor]) -> FeatureStore:
    """A :class:`FeatureStore` serving precomputed features (no encoding)."""
    store = FeatureStore.__new__(FeatureStore)
    store.clip, store.splits, store.cache = clip, splits, True
    store.labels = {k: torch.as_tensor(s.labels, dtype=torch.long, device=clip.device) for k, s in splits.items()}
    store._feats = {k: v.to(clip.device) for k, v in feats.items()}
    return store


@dataclass
class World:
    """Frozen features and labels of every example an audit uses, plus the text encoder."""

    cfg: RunConfig
    clip: FrozenClip
    dataset: Dataset
    enc: PromptTextEncoder
    scale: float
    feats: torch.Tensor           # (N, E) L2-normalised image features of the universe
    labels: torch.Tensor          # (N,) int64
    n_train: int
    n_test: int
    extras: list[tuple[ImageSplit, np.ndarray, np.ndarray]] = field(default_factory=list)
    extra_tags: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(cls, cfg: RunConfig, clip: FrozenClip, dataset: Dataset,
              store: Optional[FeatureStore] = None, enc: Optional[PromptTextEncoder] = None) -> "World":
        enc = enc or PromptTextEncoder(clip, dataset.classnames, cfg.train.n_ctx, cut=cfg.train.cut_text)
        if store is not None:
            tr, ytr = store.get("train", torch.arange(len(dataset.train)))
            te, yte = store.get("test", torch.arange(len(dataset.test)))
        else:
            tr = encode_split(clip, dataset.train)
            te = encode_split(clip, dataset.test)
            ytr = torch.as_tensor(dataset.train.labels, dtype=torch.long)
            yte = torch.as_tensor(dataset.test.labels, dtype=torch.long)
        feats = torch.cat([tr.float().cpu(), te.float().cpu()])
        labels = torch.cat([ytr.cpu(), yte.cpu()]).long()
        return cls(cfg, clip, dataset, enc, logit_scale(clip), feats, labels, len(dataset.train), len(dataset.test))

    @classmethod
    def from_engine(cls, engine) -> "World":
        return cls.build(engine.cfg, engine.clip, engine.dataset, store=engine.store, enc=engine.enc)

    # ---------------------------------------------------------------- ids
    @property
    def size(self) -> int:
        return int(self.labels.numel())

    def test_ids(self, idx: Any) -> np.ndarray:
        return self.n_train + np.asarray(idx, dtype=np.int64)

    def is_test(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return (ids >= self.n_train) & (ids < self.n_train + self.n_test)

    def label_of(self, ids: Any) -> np.ndarray:
        return self.labels.numpy()[np.asarray(ids, dtype=np.int64)]

    def add_examples(self, split: ImageSplit, src_idx: np.ndarray, labels: np.ndarray,
                     feats: torch.Tensor, tag: str) -> np.ndarray:
        """Append examples (e.g. canaries) with their features; returns their new ids."""
        start = self.size
        self.feats = torch.cat([self.feats, feats.float().cpu()])
        self.labels = torch.cat([self.labels, torch.as_tensor(labels, dtype=torch.long)])
        self.extras.append((split, np.asarray(src_idx, np.int64), np.asarray(labels, np.int64)))
        self.extra_tags.append(tag)
        return np.arange(start, self.size, dtype=np.int64)

    def fingerprint(self) -> str:
        """Identifies dataset, labels, extras and model weights (for shadow caches)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.dataset.name, self.n_train, self.n_test, self.clip.fingerprint,
                             self.extra_tags]).encode())
        h.update(self.labels.numpy().tobytes())
        h.update(np.round(self.feats[:: max(1, self.size // 64)].numpy(), 4).tobytes())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------------- engine views
    def engine_dataset(self, universe: bool) -> Dataset:
        """The dataset to give an Engine: the original one, or one whose training split is the whole
        universe (so that test examples and canaries can be trained on)."""
        if not universe:
            return self.dataset
        parts = [(self.dataset.train, np.arange(self.n_train), self.dataset.train.labels),
                 (self.dataset.test, np.arange(self.n_test), self.dataset.test.labels)] + list(self.extras)
        return Dataset(self.dataset.name, list(self.dataset.classnames), UniverseSplit(parts), self.dataset.test)

    def engine_store(self, universe: bool) -> FeatureStore:
        ds = self.engine_dataset(universe)
        train_feats = self.feats if universe else self.feats[: self.n_train]
        test_feats = self.feats[self.n_train: self.n_train + self.n_test]
        return make_store(self.clip, {"train": ds.train, "test": ds.test}, {"train": train_feats, "test": test_feats})

    # ---------------------------------------------------------------- scoring
    @torch.no_grad()
    def text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        return self.enc(ctx.to(self.clip.device)).float().cpu()

    @torch.no_grad()
    def signals(self, ctx: torch.Tensor, ids: Any, labels: Any = None,
                text: Optional[torch.Tensor] = None) -> Signals:
        """Signals of the model with context ``ctx`` on universe ``ids`` (labels: the world's, or given)."""
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        txt = self.text_features(ctx) if text is None else text
        logits = self.scale * self.feats[ids_t] @ txt.T
        lab = self.labels[ids_t] if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.long)
        return signals_from_logits(logits, lab)

    @torch.no_grad()
    def accuracy(self, ctx: torch.Tensor, ids: Any) -> Optional[float]:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return None
        t = torch.as_tensor(ids)
        pred = (self.feats[t] @ self.text_features(ctx).T).argmax(-1)
        return float((pred == self.labels[t]).float().mean())


# ------------------------------------------------------------------------------------------------
# run directories

def seeded_clip(model: str, pretrained: Optional[str], device: str = "cpu", seed: int = 0) -> FrozenClip:
    """``load_clip`` with random-init weights drawn from ``seed`` (reproducible)."""
    return load_clip(model, pretrained, device, init_seed=seed)


def _is_random_init(pretrained: Optional[str]) -> bool:
    return pretrained is None or str(pretrained).lower() == "none"


@dataclass
class RunTarget:
    """A finished run directory, loaded for auditing."""

    path: Path
    cfg: RunConfig
    summary: dict[str, Any]
    membership: dict[str, Any]
    p_G: torch.Tensor
    contexts: dict[int, torch.Tensor]   # client id -> released personalised context
    world: World
    clip_seed: Optional[int] = None     # the seed that reproduced random-init weights (if any)

    @property
    def clients(self) -> list[dict[str, Any]]:
        return list(self.membership["clients"])

    def client(self, i: int) -> dict[str, Any]:
        for c in self.membership["clients"]:
            if int(c["client_id"]) == int(i):
                return c
        raise ConfigError(f"--client {i}: the run has clients {[c['client_id'] for c in self.clients]}")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: cannot parse the {what} ({exc})") from None


def _check_membership(mem: Any, path: Path, dataset: Dataset, cfg: RunConfig) -> None:
    if not isinstance(mem, dict) or not isinstance(mem.get("clients"), list):
        raise DataError(f"{path}: malformed membership record (expected {{'dataset', 'clients': [...]}})")
    name = mem.get("dataset")
    if name != cfg.data.dataset:
        raise DataError(f"{path}: membership record is for dataset {name!r} but config.json says "
                        f"{cfg.data.dataset!r}")
    if name != dataset.name:
        raise DataError(f"dataset mismatch: the run was trained on {name!r} but the audit was given "
                        f"dataset {dataset.name!r}")
    n = len(dataset.train)
    labels = np.asarray(dataset.train.labels)
    for c in mem["clients"]:
        for key in ("client_id", "assigned", "used", "classes"):
            if key not in c:
                raise DataError(f"{path}: membership record of a client lacks {key!r}")
        ids = np.asarray(c["assigned"], dtype=np.int64)
        used = np.asarray(c["used"], dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise DataError(f"dataset mismatch: client {c['client_id']} was assigned training ids up to "
                            f"{int(ids.max())} but dataset {dataset.name!r} has {n} training examples "
                            f"(another --root or dataset version?)")
        if not np.isin(used, ids).all():
            raise DataError(f"{path}: client {c['client_id']} used examples it was not assigned")
        if ids.size and not np.isin(labels[ids], np.asarray(c["classes"])).all():
            raise DataError(f"dataset mismatch: client {c['client_id']}'s assigned examples have labels "
                            f"outside its recorded classes in dataset {dataset.name!r} "
                            f"(another --root or dataset version?)")


def _accuracy_mismatch(world: World, summary: dict[str, Any], contexts: dict[int, torch.Tensor],
                       membership: dict[str, Any]) -> Optional[str]:
    """None if the released contexts reproduce the summary's per-client local accuracy."""
    recorded = summary.get("local_acc_per_client")
    if not recorded:
        return None
    classes_all = np.asarray(world.dataset.test.labels)
    for c, acc in zip(membership["clients"], recorded):
        if acc is None:
            continue
        i = int(c["client_id"])
        test_local = world.test_ids(np.flatnonzero(np.isin(classes_all, np.asarray(c["classes"]))))
        got = world.accuracy(contexts[i], test_local)
        tol = 0.5 / max(1, test_local.size) + 1e-6
        if got is None or abs(got - float(acc)) > tol:
            return (f"client {i}: local accuracy recomputed from the released prompt is {got} but the run "
                    f"recorded {acc}")
    return None


def load_run_dir(path: str | Path, clip: Optional[FrozenClip] = None, dataset: Optional[Dataset] = None,
                 verify: bool = True) -> RunTarget:
    """Load a finished run directory for auditing (see the module docstring for the checks).

    ``clip``/``dataset`` skip loading them (tests); they are checked against the run like loaded ones.
    Raises ConfigError (missing files, unfinished run) or DataError (dataset/model mismatch).
    """
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"run directory not found: {p}")
    for name, what in (("config.json", "not a dpfpl run directory"),
                       ("membership.json", "it has no membership record, so members cannot be told from "
                        "non-members; audit a run written by `dpfpl train`, or use `dpfpl audit --train`"),
                       ("summary.json", "the run is not finished (finish it with `dpfpl train --resume`)"),
                       ("prompts.safetensors", "the released prompts are missing")):
        if not (p / name).is_file():
            raise ConfigError(f"{p}: no {name}: {what}")
    d = _read_json(p / "config.json", "config")
    d.pop("dpfpl_version", None)
    cfg = RunConfig.from_dict(d, source=str(p / "config.json"))
    summary = _read_json(p / "summary.json", "summary")
    membership = _read_json(p / "membership.json", "membership record")
    if dataset is None:
        dataset = load_run_dataset(cfg)
    _check_membership(membership, p / "membership.json", dataset, cfg)

    from safetensors.torch import load_file

    tensors = load_file(str(p / "prompts.safetensors"))
    if "global/p_G" not in tensors:
        raise DataError(f"{p / 'prompts.safetensors'}: no global/p_G tensor")
    contexts = {}
    for c in membership["clients"]:
        key = f"client{int(c['client_id'])}/context"
        if key not in tensors:
            raise DataError(f"{p / 'prompts.safetensors'}: no {key} tensor (the released personalised context)")
        contexts[int(c["client_id"])] = tensors[key].float()

    device = "cpu"
    candidates: list[tuple[Optional[int], Optional[FrozenClip]]]
    if clip is not None:
        candidates = [(None, clip)]
    elif _is_random_init(cfg.model.pretrained):
        candidates = [(0, None), (TORCH_DEFAULT_SEED, None)]
    else:
        candidates = [(None, None)]
    last_err = None
    for seed, cl in candidates:
        if cl is None:
            cl = seeded_clip(cfg.model.model, cfg.model.pretrained, device, seed if seed is not None else 0)
        if cl.model.logit_scale is None:
            raise DataError("the model has no logit scale")
        world = World.build(cfg, cl, dataset)
        n_ctx = next(iter(contexts.values())).shape[0]
        if n_ctx != cfg.train.n_ctx or tensors["global/p_G"].shape[-1] != world.enc.width:
            raise DataError(f"{p}: released prompts have shape {tuple(tensors['global/p_G'].shape)} but the "
                            f"config/model give ({cfg.train.n_ctx}, {world.enc.width})")
        err = _accuracy_mismatch(world, summary, contexts, membership) if verify else None
        if err is None:
            return RunTarget(p, cfg, summary, membership, tensors["global/p_G"].float(), contexts, world,
                             clip_seed=seed)
        last_err = err
    raise DataError(f"{p}: the dataset/model rebuilt from config.json do not reproduce the run ({last_err}); "
                    "pass the run's --root, and for random-init ('none') weights note that they cannot be "
                    "rebuilt unless the training process seeded them")
