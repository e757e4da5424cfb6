"""The persistent image-feature cache: hit / miss / rebuild, keys, atomic and locked writes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dpfpl import features
from dpfpl.config import RunConfig
from dpfpl.data.base import ArraySplit
from dpfpl.engine import Engine
from dpfpl.features import DiskCache, FeatureStore, entry_fields, entry_key, resolve_cache_dir


@pytest.fixture
def counted(monkeypatch):
    """Counts the images encoded by FeatureStore (through features.encode_split)."""
    calls: list[int] = []
    real = features.encode_split

    def encode(clip, split, *a, **k):
        calls.append(len(split))
        return real(clip, split, *a, **k)

    monkeypatch.setattr(features, "encode_split", encode)
    return calls


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))


def test_miss_then_hit_serves_identical_features(tiny_clip, tiny_dataset, tmp_path, counted):
    splits = {"train": tiny_dataset.train, "test": tiny_dataset.test}
    cold = FeatureStore(tiny_clip, splits, cache_dir=tmp_path)
    assert cold.events == {"train": "miss", "test": "miss"} and len(counted) == 2
    assert len(_entries(tmp_path)) == 4  # KEY.safetensors + KEY.json per split, no temp files
    warm = FeatureStore(tiny_clip, splits, cache_dir=tmp_path)
    assert warm.events == {"train": "hit", "test": "hit"} and len(counted) == 2 and warm.encode_s == {}
    for s in splits:
        assert torch.equal(warm._feats[s], cold._feats[s])
    key = entry_key(entry_fields(tiny_clip, tiny_dataset.train))
    meta = json.loads((tmp_path / f"{key}.json").read_text())
    assert meta["n"] == len(tiny_dataset.train) and meta["dim"] == 64 and meta["split_name"] == "train"


def test_corrupt_or_mismatched_entries_are_rebuilt(tiny_clip, tiny_dataset, tmp_path, counted):
    split = {"train": tiny_dataset.train}
    ref = FeatureStore(tiny_clip, split, cache_dir=tmp_path)._feats["train"]
    key = entry_key(entry_fields(tiny_clip, tiny_dataset.train))
    data, manifest, _ = DiskCache(tmp_path).paths(key)
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF  # one flipped byte inside the feature values
    data.write_bytes(bytes(raw))
    store = FeatureStore(tiny_clip, split, cache_dir=tmp_path)
    assert store.events["train"].startswith("rebuilt: content hash differs") and torch.equal(store._feats["train"], ref)
    data.write_bytes(data.read_bytes()[:100])  # truncated
    assert FeatureStore(tiny_clip, split, cache_dir=tmp_path).events["train"].startswith("rebuilt: unreadable")
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "model": "0" * 64}))
    assert "does not match" in FeatureStore(tiny_clip, split, cache_dir=tmp_path).events["train"]
    assert FeatureStore(tiny_clip, split, cache_dir=tmp_path).events["train"] == "hit"
    assert len(counted) == 4


def test_key_separates_model_and_dataset(tiny_clip, tiny_dataset, tmp_path):
    from dpfpl.clip import load_clip

    other_clip = load_clip("dpfpl-tiny", None, init_seed=1)
    images = tiny_dataset.train.images.copy()
    images[0, 0, 0, 0] ^= 1  # one pixel differs
    other_split = ArraySplit(images, tiny_dataset.train.labels)
    keys = {entry_key(entry_fields(c, s)) for c, s in
            [(tiny_clip, tiny_dataset.train), (other_clip, tiny_dataset.train), (tiny_clip, other_split),
             (tiny_clip, tiny_dataset.test)]}
    assert len(keys) == 4
    FeatureStore(tiny_clip, {"train": tiny_dataset.train}, cache_dir=tmp_path)
    assert FeatureStore(other_clip, {"train": tiny_dataset.train}, cache_dir=tmp_path).events["train"] == "miss"
    assert FeatureStore(tiny_clip, {"train": other_split}, cache_dir=tmp_path).events["train"] == "miss"
    # the key is a pure function of content: an equal copy of the split hits
    same = ArraySplit(tiny_dataset.train.images.copy(), tiny_dataset.train.labels.copy())
    assert FeatureStore(tiny_clip, {"train": same}, cache_dir=tmp_path).events["train"] == "hit"


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DPFPL_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == tmp_path / "env" / "features"
    assert resolve_cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert resolve_cache_dir("off") is None and resolve_cache_dir("OFF") is None
    monkeypatch.delenv("DPFPL_CACHE_DIR")
    assert resolve_cache_dir(None) == Path.home() / ".cache" / "dpfpl" / "features"
    assert RunConfig().update({"feature_cache_dir": "off"}).train.feature_cache_dir == "off"
    assert RunConfig().train.feature_cache_dir is None


def test_off_keeps_features_in_memory(tiny_clip, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("DPFPL_CACHE_DIR", str(tmp_path))
    store = FeatureStore(tiny_clip, {"test": tiny_dataset.test}, cache_dir="off")
    assert store.events == {"test": "memory"} and not any(tmp_path.iterdir())
    assert FeatureStore(tiny_clip, {"test": tiny_dataset.test}, cache=False).events == {"test": "uncached"}


def test_concurrent_writers_encode_once(tmp_path):
    """Two writers of one entry: the lock makes the second wait and read the first's entry."""
    fields = {"format": 1, "model": "m", "preprocess": "p", "split": "s", "n": 3, "device_type": "cpu"}
    builds, events = [], []
    started = threading.Event()

    def build():
        builds.append(1)
        started.set()
        threading.Event().wait(0.2)
        return torch.arange(6, dtype=torch.float32).reshape(3, 2)

    def worker():
        events.append(DiskCache(tmp_path).get_or_build(fields, build)[1])

    t1 = threading.Thread(target=worker)
    t1.start()
    started.wait(5)
    t2 = threading.Thread(target=worker)
    t2.start()
    t1.join(), t2.join()
    assert builds == [1] and sorted(events) == ["hit", "miss"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_engines_reuse_the_cache(make_cfg, tiny_clip, tiny_dataset, counted):
    """A second engine (a resume, a bench cell, an audit shadow) reads the features from disk and
    evaluates exactly as the first."""
    cfg = make_cfg(rounds=1)
    e1 = Engine(cfg, clip=tiny_clip, dataset=tiny_dataset)
    e2 = Engine(cfg, clip=tiny_clip, dataset=tiny_dataset)
    assert e1.store.events == {"train": "miss", "test": "miss"} and e2.store.events == {"train": "hit", "test": "hit"}
    assert len(counted) == 2
    assert e1.zeroshot == e2.zeroshot
    assert np.isfinite(e1.zeroshot["local_acc"])
