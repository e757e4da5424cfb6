"""Few-shot selection and federated partitioning of a dataset's training split.

Contract of :func:`partition`: every selected training example (all of them, or ``shots`` per class)
is assigned to exactly one client; the result depends only on (dataset labels, arguments), so the
same seed gives an identical partition. Schemes:

* ``pathological``: classes are shuffled and divided among clients as evenly as possible, without
  overlap; each client gets every selected training example of its classes.
* ``dirichlet``: per class, proportions ~ Dir(beta) over clients; a client's classes are those it
  holds at least one example of. Draws are repeated (bounded, seeded) until no client is empty.
* ``iid``: examples shuffled and split evenly; every client lists all classes, so
  ``neighbor_test_idx`` is empty.

Validation (``val_fraction`` > 0, for hyperparameter tuning): from each client's examples of each
of its classes, ``round(val_fraction * n)`` (at most n - 1) are moved from ``train_idx`` to
``val_idx``, chosen by a generator seeded with (seed, client id); the test split is never touched,
and the same arguments give the same split. ``val_fraction = 0`` (default) leaves ``val_idx`` empty
and the partition unchanged.

Test indices: ``local_test_idx`` are the test examples of the client's classes and
``neighbor_test_idx`` those of classes held by other clients but not by this one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError
from .base import Dataset

SCHEMES = ("pathological", "dirichlet", "iid")
MAX_DIRICHLET_DRAWS = 100


@dataclass
class ClientData:
    client_id: int
    train_idx: np.ndarray          # int64 indices into dataset.train (sorted)
    classes: np.ndarray            # sorted class ids this client holds
    local_test_idx: np.ndarray     # indices into dataset.test whose label is in `classes`
    neighbor_test_idx: np.ndarray  # indices into dataset.test of classes held by other clients only
    val_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # held-out dataset.train indices


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"train.seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def few_shot(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted int64 indices of ``shots`` examples per class (all of a class if it has fewer), seeded."""
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ConfigError(f"data.shots must be a positive integer, got {shots!r}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng([_check_seed(seed), 1])
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(idx if len(idx) <= shots else rng.choice(idx, size=int(shots), replace=False))
    return np.sort(np.concatenate(picked)).astype(np.int64) if picked else np.zeros(0, np.int64)


def _pathological(labels: np.ndarray, pool: np.ndarray, k: int, rng: np.random.Generator,
                  name: str) -> list[np.ndarray]:
    classes = np.unique(labels[pool])
    if k > len(classes):
        raise ConfigError(f"data.num_clients={k} > {len(classes)} classes in dataset {name} "
                          f"for a pathological split")
    groups = np.array_split(rng.permutation(classes), k)
    return [pool[np.isin(labels[pool], g)] for g in groups]


def _dirichlet(labels: np.ndarray, pool: np.ndarray, k: int, beta: float,
               rng: np.random.Generator) -> list[np.ndarray]:
    if k > len(pool):
        raise ConfigError(f"data.num_clients={k} > {len(pool)} training examples: a dirichlet split "
                          f"cannot give every client an example")
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for c in np.unique(labels[pool]):
            idx = rng.permutation(pool[labels[pool] == c])
            cuts = (np.cumsum(rng.dirichlet(np.full(k, beta))) * len(idx)).astype(int)[:-1]
            for j, chunk in enumerate(np.split(idx, cuts)):
                parts[j].append(chunk)
        out = [np.concatenate(p) for p in parts]
        if all(len(o) for o in out):
            return out
    raise ConfigError(f"data.dirichlet_beta={beta} with data.num_clients={k}: some client got no training "
                      f"example in {MAX_DIRICHLET_DRAWS} draws; raise the beta or lower the number of clients")


def split_validation(idx: np.ndarray, labels: np.ndarray, fraction: float, seed: int,
                     client_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sorted int64 indices: per class, ``round(fraction * n)`` (at most n - 1) of
    ``idx`` go to val, picked by a generator seeded with (seed, 3, client_id)."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {fraction!r}")
    idx = np.sort(np.asarray(idx, dtype=np.int64))
    if fraction == 0 or len(idx) == 0:
        return idx, np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 3, int(client_id)])
    val = []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        k = min(int(round(fraction * len(members))), len(members) - 1)
        if k > 0:
            val.append(rng.choice(members, size=k, replace=False))
    v = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)
    return np.setdiff1d(idx, v).astype(np.int64), v


def partition(dataset: Dataset, num_clients: int, scheme: str, seed: int, beta: float = 0.3,
              shots: int | None = None, val_fraction: float = 0.0) -> list[ClientData]:
    """Split ``dataset.train`` (after optional few-shot selection) among ``num_clients`` clients,
    holding ``val_fraction`` of each client's examples out as its validation split."""
    if scheme not in SCHEMES:
        raise ConfigError(f"data.partition={scheme!r} is unknown; valid: {', '.join(SCHEMES)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"data.num_clients must be an integer >= 1, got {num_clients!r}")
    if not beta > 0:
        raise ConfigError(f"data.dirichlet_beta must be positive, got {beta!r}")
    seed, k = _check_seed(seed), int(num_clients)
    labels = np.asarray(dataset.train.labels, dtype=np.int64)
    pool = np.arange(len(labels), dtype=np.int64) if shots is None else few_shot(labels, shots, seed)
    rng = np.random.default_rng([seed, 2])

    if scheme == "pathological":
        parts = _pathological(labels, pool, k, rng, dataset.name)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, pool, k, float(beta), rng)
    else:
        if k > len(pool):
            raise ConfigError(f"data.num_clients={k} > {len(pool)} training examples for an iid split")
        parts = np.array_split(rng.permutation(pool), k)

    all_classes = np.unique(labels[pool])
    client_classes = [all_classes if scheme == "iid" else np.unique(labels[p]) for p in parts]
    test_labels = np.asarray(dataset.test.labels, dtype=np.int64)
    out = []
    for i, (p, cls) in enumerate(zip(parts, client_classes)):
        others = [c for j, c in enumerate(client_classes) if j != i]
        neigh = np.setdiff1d(np.unique(np.concatenate(others)) if others else np.zeros(0, np.int64), cls)
        train_idx, val_idx = split_validation(p, labels, float(val_fraction), seed, i)
        out.append(ClientData(
            client_id=i,
            train_idx=train_idx,
            val_idx=val_idx,
            classes=cls.astype(np.int64),
            local_test_idx=np.flatnonzero(np.isin(test_labels, cls)).astype(np.int64),
            neighbor_test_idx=np.flatnonzero(np.isin(test_labels, neigh)).astype(np.int64),
        ))
    return out
