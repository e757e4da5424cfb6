"""Black-box input canaries for the one-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023).

m canaries are made for the audited client(s); each is included in that client's training data
independently with probability 1/2 (seeded coin flips, recorded); the recipe is trained ONCE on the
client's usual data plus the included canaries; the auditor scores every canary with the released
model (personalised context, or the global prompt) and guesses with abstention
(:func:`audits.bounds.one_run_audit_search`). The adversary modelled is a user of the released model
who knows the candidate canaries (not which were included): black-box, final model only.

Canary kinds:

- ``mislabel``: test-split images of the client's own classes (never trained on by anyone) with a
  wrong label drawn among the client's other classes (among all classes if it has only one);
- ``ood``: uniform-noise images (the dataset's image size) labelled with one of the client's classes.

Score of canary c: ``phi_run(c) - phi_ref(c)``, the logit-scaled confidence of its canary label
under the canary run minus that under a reference model trained on the same data without any canary
(the audit's target model): the reference is independent of the coin flips, so subtracting it only
removes per-canary difficulty and keeps the audit valid. Scores are then standardised per client
(median and inter-quartile range over all of that client's canaries, in and out alike), which also
depends only on the released model and the public canary set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dpfpl.data.base import ArraySplit
from dpfpl.errors import ConfigError
from dpfpl.features import encode_split

from .target import World

__all__ = ["CANARY_KINDS", "CanarySet", "make_canaries", "MAX_OOD_CANARIES"]

CANARY_KINDS = ("mislabel", "ood")
MAX_OOD_CANARIES = 100_000


@dataclass
class CanarySet:
    ids: np.ndarray          # universe ids
    labels: np.ndarray       # canary labels
    client: np.ndarray       # client each canary belongs to
    included: np.ndarray     # bool: inserted in the training data (coin flip)
    kind: str
    source: np.ndarray       # test-split index (mislabel) or -1 (ood)

    def for_client(self, i: int) -> np.ndarray:
        return np.flatnonzero(self.client == i)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "n": int(self.ids.size), "n_included": int(self.included.sum()),
                "per_client": {int(i): int((self.client == i).sum()) for i in np.unique(self.client)}}


def make_canaries(world: World, clients: list[int], classes: dict[int, np.ndarray], m: int, kind: str,
                  seed: int) -> CanarySet:
    """Create ``m`` canaries spread evenly over ``clients``, add them to the world, flip their coins.

    Raises ConfigError when m < 1, the kind is unknown, or (mislabel) a client has fewer test
    images of its classes than it would get canaries.
    """
    if kind not in CANARY_KINDS:
        raise ConfigError(f"--canary-kind {kind!r}: expected one of {list(CANARY_KINDS)}")
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ConfigError(f"--canaries must be a positive integer, got {m!r}")
    m = int(m)
    if kind == "ood" and m > MAX_OOD_CANARIES:
        raise ConfigError(f"--canaries {m}: at most {MAX_OOD_CANARIES} out-of-distribution canaries")
    rng = np.random.default_rng([seed, 0xCA7])
    per = np.array_split(np.arange(m), len(clients))
    test_labels = np.asarray(world.dataset.test.labels)
    n_classes = len(world.dataset.classnames)
    ids, labels, owner, source = [], [], [], []
    if kind == "mislabel":
        for i, chunk in zip(clients, per):
            avail = np.flatnonzero(np.isin(test_labels, classes[i]))
            if chunk.size > avail.size:
                raise ConfigError(
                    f"--canaries {m}: client {i} would get {chunk.size} mislabelled canaries but has only "
                    f"{avail.size} test images of its classes to make them from (at most "
                    f"{avail.size * len(clients)} in all); lower --canaries or use --canary-kind ood")
            src = np.sort(rng.choice(avail, size=chunk.size, replace=False))
            own = np.asarray(classes[i])
            new = np.empty(src.size, np.int64)
            for j, t in enumerate(src):
                true = test_labels[t]
                pool = own[own != true] if own.size > 1 else np.setdiff1d(np.arange(n_classes), [true])
                new[j] = rng.choice(pool)
            cid = world.add_examples(world.dataset.test, src, new, world.feats[world.test_ids(src)],
                                     tag=f"mislabel:{i}:{seed}:{chunk.size}")
            ids.append(cid), labels.append(new), owner.append(np.full(src.size, i)), source.append(src)
    else:
        img = np.asarray(world.dataset.train.load(0))
        h, w = img.shape[:2]
        for i, chunk in zip(clients, per):
            if chunk.size == 0:
                continue
            images = rng.integers(0, 256, size=(chunk.size, h, w, 3), dtype=np.uint8)
            lab = rng.choice(np.asarray(classes[i]), size=chunk.size)
            split = ArraySplit(images, lab, f"ood-canaries(client {i})")
            feats = encode_split(world.clip, split).float().cpu()
            cid = world.add_examples(split, np.arange(chunk.size), lab, feats, tag=f"ood:{i}:{seed}:{chunk.size}")
            ids.append(cid), labels.append(lab), owner.append(np.full(chunk.size, i))
            source.append(np.full(chunk.size, -1))
    ids_a = np.concatenate(ids)
    included = np.random.default_rng([seed, 0xC01]).random(ids_a.size) < 0.5
    return CanarySet(ids_a, np.concatenate(labels), np.concatenate(owner), included, kind, np.concatenate(source))
