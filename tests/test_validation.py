"""The validation split for tuning (data.val_fraction): carved from each client's training
examples, deterministic, disjoint from training, never the test split; evaluated like the test."""

from __future__ import annotations

import numpy as np
import pytest

from dpfpl.data.partition import partition
from dpfpl.errors import ConfigError


def test_validation_split_is_carved_from_training_only(tiny_dataset):
    plain = partition(tiny_dataset, 2, "pathological", seed=3)
    parts = partition(tiny_dataset, 2, "pathological", seed=3, val_fraction=0.3)
    again = partition(tiny_dataset, 2, "pathological", seed=3, val_fraction=0.3)
    labels = np.asarray(tiny_dataset.train.labels)
    for p0, p, q in zip(plain, parts, again):
        assert np.array_equal(p.val_idx, q.val_idx) and np.array_equal(p.train_idx, q.train_idx)  # deterministic
        assert len(p0.val_idx) == 0
        assert not set(p.val_idx) & set(p.train_idx)
        assert np.array_equal(np.sort(np.concatenate([p.train_idx, p.val_idx])), p0.train_idx)
        for c in p.classes:  # per class: round(0.3 * 10) = 3 of the client's 10 examples
            assert int(np.sum(labels[p.val_idx] == c)) == 3
        assert np.array_equal(p.local_test_idx, p0.local_test_idx)  # the test split is untouched
    with pytest.raises(ConfigError, match="val_fraction"):
        partition(tiny_dataset, 2, "pathological", seed=3, val_fraction=1.0)


def test_engine_reports_validation_accuracy(make_cfg, tiny_clip, tiny_dataset):
    from dpfpl.engine import Engine
    from dpfpl.train import summarize

    eng = Engine(make_cfg(val_fraction=0.2, rounds=1), clip=tiny_clip, dataset=tiny_dataset)
    eng.run()
    s = summarize(eng, 0.0, pld=False)
    # the mean over clients of the accuracy on their own held-out training images
    per = [eng._acc(eng.enc(c.personal_context(eng.server.p_G)), c.data.val_idx, split="train") for c in eng.clients]
    assert s["val_local_acc"] == pytest.approx(float(np.mean(per)))
    assert all(len(c.data.val_idx) == 2 * len(c.data.classes) for c in eng.clients)  # round(0.2 * 10) per class
    assert "val_local_acc" not in summarize(Engine(make_cfg(rounds=1), clip=tiny_clip, dataset=tiny_dataset), 0.0,
                                            pld=False)
