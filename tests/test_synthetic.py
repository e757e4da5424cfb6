"""The procedural image world and the synthetic downstream task."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from dpfpl.data import synthetic as S
from dpfpl.data.base import ArraySplit, Dataset
from dpfpl.errors import ConfigError


@pytest.fixture(scope="module")
def default_ds() -> Dataset:
    return S.load_synthetic()


def test_shapes_dtypes_labels(default_ds):
    ds = default_ds
    assert ds.n_classes == 16 and ds.n_classes % 4 == 0
    for split, per in ((ds.train, 40), (ds.test, 25)):
        assert isinstance(split, ArraySplit)
        assert split.images.shape == (16 * per, 32, 32, 3) and split.images.dtype == np.uint8
        assert split.labels.dtype == np.int64
        assert np.array_equal(np.bincount(split.labels, minlength=16), np.full(16, per))
        img = split.load(0)
        assert img.mode == "RGB" and img.size == (32, 32)
    ds.validate()
    # images are not degenerate: the object differs from the background
    assert ds.train.images.reshape(len(ds.train), -1, 3).std(axis=1).mean() > 10


def test_class_names_unique_and_readable(default_ds):
    names = default_ds.classnames
    assert len(set(names)) == len(names)
    for name in names:
        colour, shape = name.split()
        assert colour in S.COLOURS and shape in S.SHAPES
    # neither attribute alone identifies a class
    assert all(sum(n.split()[0] == c for n in names) == 2 for c in {n.split()[0] for n in names})
    assert all(sum(n.split()[1] == s for n in names) == 2 for s in {n.split()[1] for n in names})
    for n in (8, 12, 20, 64):
        more = S.class_names(n)
        assert len(set(more)) == n and all(re.fullmatch(r"[a-z]+ [a-z]+", m) for m in more)
        assert more[:8] == names[:8]


def test_deterministic_per_seed_and_independent_of_global_rng():
    np.random.seed(1)
    torch.manual_seed(1)
    a = S.load_synthetic(seed=3, n_classes=8, train_per_class=5, test_per_class=4)
    np.random.seed(2)
    torch.manual_seed(2)
    np.random.random(10)
    b = S.load_synthetic(seed=3, n_classes=8, train_per_class=5, test_per_class=4, root="/ignored")
    for sa, sb in ((a.train, b.train), (a.test, b.test)):
        assert np.array_equal(sa.images, sb.images) and np.array_equal(sa.labels, sb.labels)
    c = S.load_synthetic(seed=4, n_classes=8, train_per_class=5, test_per_class=4)
    assert not np.array_equal(a.train.images, c.train.images)
    assert not np.array_equal(a.train.images, a.test.images[: len(a.train)])


def test_bad_options():
    with pytest.raises(ConfigError, match="n_classes"):
        S.load_synthetic(n_classes=0)
    with pytest.raises(ConfigError, match="n_classes"):
        S.load_synthetic(n_classes=65)
    with pytest.raises(ConfigError, match="unknown option"):
        S.load_synthetic(colour="red")
    with pytest.raises(ConfigError, match="train_per_class"):
        S.load_synthetic(train_per_class=0)


def test_tint_is_the_blue_light():
    plain = S.load_synthetic(n_classes=8, train_per_class=4, test_per_class=1, tint=0.0)
    blue = S.load_synthetic(n_classes=8, train_per_class=4, test_per_class=1, tint=1.0)
    assert np.array_equal(plain.train.labels, blue.train.labels)
    mean_p = plain.train.images.reshape(-1, 3).mean(0)
    mean_b = blue.train.images.reshape(-1, 3).mean(0)
    assert mean_b[0] < mean_p[0] and mean_b[2] > mean_p[2]


def test_captions():
    rng = np.random.default_rng(0)
    attrs = S.sample_attributes(rng, 50)
    words = S.describe(attrs, 0)
    canonical = S.caption(words)
    assert words["colour"] in canonical and words["shape"] in canonical and words["size"] in canonical
    assert canonical == S.caption(words)
    vocab = set(S.caption_words())
    varied = set()
    for i in range(50):
        w = S.describe(attrs, i)
        for _ in range(4):
            text = S.caption(w, rng)
            varied.add(text)
            assert w["colour"] in text and w["shape"] in text
            assert set(text.replace(".", " . ").split()) <= vocab, text
            assert not re.search(r"\ba [aeiou]", text) and not re.search(r"\ban [^aeiou]", text), text
    assert len(varied) > 150
    assert S.caption(dict(words, colour="orange", size="small")).startswith("a small orange")


def test_pretrain_stream_differs_from_downstream():
    images, captions = S.pretrain_batch(S.pretrain_rng(0), 16)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8 and len(captions) == 16
    again, captions2 = S.pretrain_batch(S.pretrain_rng(0), 16)
    assert np.array_equal(images, again) and captions == captions2
    other, _ = S.pretrain_batch(S.pretrain_rng(1), 16)
    assert not np.array_equal(images, other)
    with pytest.raises(ConfigError, match="seed"):
        S.load_synthetic(seed=S.PRETRAIN_SEED_OFFSET)
