"""Dataset loaders and partitions, on tiny fake datasets built in tmp_path."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpfpl.data import ClientData, Dataset, dataset_names, few_shot, load_dataset, partition
from dpfpl.data.base import ArraySplit
from dpfpl.data.coop import COOP_SPECS
from dpfpl.errors import ConfigError, DataError


def _img(path: Path, color=(200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


# ----------------------------------------------------------------------------------------- CoOp


def make_coop(root: Path, name: str = "caltech101", per_class: int = 3, with_val: bool = True) -> Path:
    """Fake CoOp dataset with 3 classes; json classnames use underscores. Returns the dataset dir."""
    spec = COOP_SPECS[name]
    ddir = root / spec.folder
    classes = [("Faces_easy", "face_easy"), ("leopard", "leopard"), ("great_dane", "great_dane")]
    split: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, (folder, cname) in enumerate(classes):
        for j in range(per_class):
            for key in ("train", "val", "test") if with_val else ("train", "test"):
                rel = f"{folder}/{key}_{j}.jpg"
                _img(ddir / spec.image_dir / rel, (label * 80, j * 40, 0))
                split[key].append([rel, label, cname])
    (ddir / spec.split_file).write_text(json.dumps(split))
    return ddir


@pytest.mark.parametrize("name", sorted(COOP_SPECS))
def test_coop_loads_every_format(tmp_path, name):
    make_coop(tmp_path, name)
    ds = load_dataset(name, str(tmp_path))
    assert isinstance(ds, Dataset) and ds.name == name
    assert ds.classnames == ["face easy", "leopard", "great dane"]
    assert len(ds.train) == 9 and len(ds.test) == 9
    assert sorted(ds.train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    img = ds.train.load(0)
    assert img.mode == "RGB" and img.size == (8, 8)


def test_coop_use_val_and_root_is_dataset_folder(tmp_path):
    ddir = make_coop(tmp_path)
    ds = load_dataset("caltech101", ddir, use_val=True)  # ROOT = dataset folder itself
    assert len(ds.train) == 18 and len(ds.test) == 9


def test_coop_missing_root_and_folder(tmp_path):
    with pytest.raises(DataError, match="nope") as e:
        load_dataset("dtd", str(tmp_path / "nope"))
    assert "split_zhou_DescribableTextures.json" in str(e.value)
    with pytest.raises(DataError, match="food-101") as e:
        load_dataset("food101", str(tmp_path))
    assert "split_zhou_Food101.json" in str(e.value)


def test_coop_missing_split_file(tmp_path):
    ddir = make_coop(tmp_path, "oxford_pets")
    (ddir / "split_zhou_OxfordPets.json").unlink()
    with pytest.raises(DataError, match="split_zhou_OxfordPets.json") as e:
        load_dataset("oxford_pets", str(tmp_path))
    assert str(ddir) in str(e.value)


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"train": [["a.jpg", "x", "c"]], "test": []}'])
def test_coop_malformed_json(tmp_path, content):
    ddir = make_coop(tmp_path, "oxford_flowers")
    path = ddir / "split_zhou_OxfordFlowers.json"
    path.write_text(content)
    with pytest.raises(DataError, match="split_zhou_OxfordFlowers.json"):
        load_dataset("oxford_flowers", str(tmp_path))


def test_coop_missing_images_reported_up_front(tmp_path):
    ddir = make_coop(tmp_path)
    gone = ddir / "101_ObjectCategories" / "leopard" / "test_1.jpg"
    gone.unlink()
    (ddir / "101_ObjectCategories" / "leopard" / "test_2.jpg").unlink()
    with pytest.raises(DataError) as e:
        load_dataset("caltech101", str(tmp_path))
    msg = str(e.value)
    assert str(gone) in msg and "2 of 9" in msg


def test_coop_inconsistent_labels(tmp_path):
    ddir = make_coop(tmp_path)
    path = ddir / "split_zhou_Caltech101.json"
    split = json.loads(path.read_text())
    split["test"][0][2] = "other"  # label 0 named twice
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match="label 0"):
        load_dataset("caltech101", str(tmp_path))
    split = json.loads(make_coop(tmp_path / "b").joinpath("split_zhou_Caltech101.json").read_text())
    for key in split:  # labels 0, 1, 5: not contiguous
        for row in split[key]:
            row[1] = 5 if row[1] == 2 else row[1]
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match="contiguous"):
        load_dataset("caltech101", str(tmp_path))


def test_corrupt_image_names_file_on_load(tmp_path):
    ddir = make_coop(tmp_path)
    bad = ddir / "101_ObjectCategories" / "leopard" / "train_0.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    ds = load_dataset("caltech101", str(tmp_path))
    i = ds.train.paths.index(str(bad))
    with pytest.raises(DataError, match="train_0.jpg"):
        ds.train.load(i)


# ---------------------------------------------------------------------------------------- CIFAR


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def make_cifar10(root: Path, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    rng = np.random.default_rng(0)
    for fn in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(folder / fn, {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                              b"labels": [i % 3 for i in range(n)]})
    _pickle(folder / "batches.meta", {b"label_names": [b"airplane", b"sports_car", b"bird"]})
    return folder


def make_cifar100(root: Path, n: int = 5) -> Path:
    folder = root / "cifar-100-python"
    data = np.zeros((n, 3072), np.uint8)
    data[0, :1024] = 255  # image 0: red channel full
    for fn in ("train", "test"):
        _pickle(folder / fn, {b"data": data, b"fine_labels": list(range(n)), b"coarse_labels": [0] * n})
    _pickle(folder / "meta", {b"fine_label_names": [f"class_{i}".encode() for i in range(n)]})
    return folder


def test_cifar10(tmp_path):
    make_cifar10(tmp_path)
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.classnames == ["airplane", "sports car", "bird"]
    assert isinstance(ds.train, ArraySplit) and ds.train.images.shape == (20, 32, 32, 3)
    assert len(ds.test) == 4 and ds.train.labels.dtype == np.int64
    assert ds.train.load(3).size == (32, 32)


def test_cifar100_channel_major_and_root_is_folder(tmp_path):
    folder = make_cifar100(tmp_path)
    ds = load_dataset("cifar100", folder)
    assert ds.classnames[1] == "class 1" and len(ds.train) == 5
    assert ds.train.images[0, :, :, 0].min() == 255 and ds.train.images[0, :, :, 1:].max() == 0
    assert ds.train.load(0).getpixel((5, 5)) == (255, 0, 0)


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", str(tmp_path))
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))
    folder = make_cifar100(tmp_path)
    _pickle(folder / "test", {b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(DataError, match="3072"):
        load_dataset("cifar100", str(tmp_path))


def test_cifar_refuses_code_in_pickle(tmp_path):
    folder = make_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    _pickle(folder / "batches.meta", {b"label_names": Evil()})
    with pytest.raises(DataError, match="batches.meta"):
        load_dataset("cifar10", str(tmp_path))
    assert not marker.exists()


# --------------------------------------------------------------------------------- image folder


def test_imagefolder_train_test(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("b_class", "a_class"):
            for j in range(n):
                _img(tmp_path / split / c / f"{j}.png")
    (tmp_path / "train" / "a_class" / "notes.txt").write_text("ignored")
    ds = load_dataset("imagefolder", str(tmp_path))
    assert ds.classnames == ["a class", "b class"]
    assert len(ds.train) == 6 and len(ds.test) == 4
    assert ds.test.load(0).mode == "RGB"


def test_imagefolder_holdout_is_fixed(tmp_path):
    """The flat layout's holdout is seeded by the class folder name, not the run's seed: every seed
    tests on the same images, and the held-out images are not simply the first files."""
    for c in ("cat", "dog"):
        for j in range(10):
            _img(tmp_path / c / f"{j}.jpeg")
    a = load_dataset("imagefolder", str(tmp_path), seed=1)
    b = load_dataset("imagefolder", str(tmp_path), seed=1)
    c = load_dataset("imagefolder", str(tmp_path), seed=2)
    assert len(a.train) == 16 and len(a.test) == 4
    assert a.test.paths == b.test.paths == c.test.paths and a.train.paths == c.train.paths
    names = [(p.parent.name, p.name) for p in map(Path, a.test.paths)]
    assert names != [("cat", "0.jpeg"), ("cat", "1.jpeg"), ("dog", "0.jpeg"), ("dog", "1.jpeg")]
    assert set(a.train.paths).isdisjoint(a.test.paths)
    assert sorted(a.test.labels.tolist()) == [0, 0, 1, 1]


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="missing_root"):
        load_dataset("imagefolder", str(tmp_path / "missing_root"))
    (tmp_path / "train" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="test"):
        load_dataset("imagefolder", str(tmp_path))
    (tmp_path / "test" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train[/\\]x holds no images"):
        load_dataset("imagefolder", str(tmp_path))


# ------------------------------------------------------------------------------------- registry


def test_registry_names_and_errors(tmp_path):
    assert set(dataset_names()) >= {"synthetic", "caltech101", "oxford_pets", "oxford_flowers", "food101",
                                    "dtd", "cifar10", "cifar100", "imagefolder"}
    with pytest.raises(ConfigError, match="valid: .*caltech101"):
        load_dataset("imagenet", str(tmp_path))
    with pytest.raises(ConfigError, match="--root is required for dataset caltech101: expected layout"):
        load_dataset("caltech101", None)
    with pytest.raises(ConfigError, match="bogus"):
        load_dataset("cifar10", str(tmp_path), bogus=1)


def test_import_does_not_pull_torch():
    code = "import sys, dpfpl.data; assert 'torch' not in sys.modules and 'open_clip' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------ partition


def _fake(n_classes: int = 10, per_class: int = 20, test_per_class: int = 5, name: str = "fake") -> Dataset:
    def split(k):
        labels = np.repeat(np.arange(n_classes), k)
        return ArraySplit(np.zeros((len(labels), 2, 2, 3), np.uint8), labels)

    return Dataset(name, [f"c{i}" for i in range(n_classes)], split(per_class), split(test_per_class))


def _check_cover(ds: Dataset, clients: list[ClientData], expected: np.ndarray | None = None) -> None:
    allidx = np.concatenate([c.train_idx for c in clients])
    want = np.arange(len(ds.train)) if expected is None else expected
    assert len(allidx) == len(want) and np.array_equal(np.sort(allidx), want)  # exactly once
    test_lab = ds.test.labels
    for c in clients:
        assert c.train_idx.dtype == np.int64 and np.all(np.diff(c.train_idx) > 0)
        assert np.array_equal(c.classes, np.unique(ds.train.labels[c.train_idx]))
        assert np.array_equal(c.local_test_idx, np.flatnonzero(np.isin(test_lab, c.classes)))
        others = np.unique(np.concatenate([o.classes for o in clients if o is not c]))
        neigh = np.setdiff1d(others, c.classes)
        assert np.array_equal(c.neighbor_test_idx, np.flatnonzero(np.isin(test_lab, neigh)))


def test_pathological_no_overlap_and_full_classes():
    ds = _fake(n_classes=10)
    clients = partition(ds, 3, "pathological", seed=0)
    _check_cover(ds, clients)
    sizes = sorted(len(c.classes) for c in clients)
    assert sizes == [3, 3, 4]
    for a in clients:
        for b in clients:
            if a is not b:
                assert not set(a.classes) & set(b.classes)
        assert len(a.train_idx) == 20 * len(a.classes)  # all examples of its classes, no truncation
        assert len(a.neighbor_test_idx) == 5 * (10 - len(a.classes))
    other = partition(ds, 3, "pathological", seed=1)
    assert [c.classes.tolist() for c in clients] != [c.classes.tolist() for c in other]


def test_pathological_unbalanced_classes_not_truncated():
    ds = _fake(n_classes=4)
    ds.train.labels[20:35] = 0  # class 0 has 35 examples, class 1 only 5
    clients = partition(ds, 4, "pathological", seed=3)
    _check_cover(ds, clients)
    assert sorted(len(c.train_idx) for c in clients) == [5, 20, 20, 35]


def test_dirichlet_reproducible_and_seeded():
    ds = _fake(n_classes=10)
    a = partition(ds, 5, "dirichlet", seed=4, beta=0.3)
    b = partition(ds, 5, "dirichlet", seed=4, beta=0.3)
    c = partition(ds, 5, "dirichlet", seed=5, beta=0.3)
    _check_cover(ds, a)
    assert all(len(x.train_idx) > 0 for x in a)
    assert all(np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, b))
    assert any(not np.array_equal(x.train_idx, y.train_idx) for x, y in zip(a, c))


def test_dirichlet_impossible_raises():
    ds = _fake(n_classes=2, per_class=2)
    with pytest.raises(ConfigError, match="num_clients=5"):
        partition(ds, 5, "dirichlet", seed=0, beta=0.3)


def test_iid_all_classes_and_no_neighbors():
    ds = _fake(n_classes=4)
    clients = partition(ds, 3, "iid", seed=0)
    assert sorted(len(c.train_idx) for c in clients) == [26, 27, 27]
    allidx = np.sort(np.concatenate([c.train_idx for c in clients]))
    assert np.array_equal(allidx, np.arange(80))
    for c in clients:
        assert c.classes.tolist() == [0, 1, 2, 3]
        assert len(c.local_test_idx) == 20 and len(c.neighbor_test_idx) == 0


def test_few_shot_counts_and_partition_with_shots():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 5)
    idx = few_shot(labels, 4, seed=0)
    assert np.bincount(labels[idx]).tolist() == [4, 2, 4]
    assert np.array_equal(idx, few_shot(labels, 4, seed=0))
    # the seed chooses the shots: 20 seeds give many different selections (one if it were ignored)
    assert len({tuple(few_shot(labels, 4, seed=s)) for s in range(20)}) >= 10
    ds = _fake(n_classes=6)
    pool = few_shot(ds.train.labels, 3, seed=2)
    clients = partition(ds, 2, "pathological", seed=2, shots=3)
    _check_cover(ds, clients, expected=pool)
    assert sum(len(c.train_idx) for c in clients) == 18
    with pytest.raises(ConfigError, match="data.shots"):
        few_shot(labels, 0, seed=0)


def test_partition_config_errors():
    ds = _fake(n_classes=10, name="X")
    with pytest.raises(ConfigError, match=r"data.num_clients=12 > 10 classes in dataset X for a pathological split"):
        partition(ds, 12, "pathological", seed=0)
    with pytest.raises(ConfigError, match="'bogus'.*pathological, dirichlet, iid"):
        partition(ds, 2, "bogus", seed=0)
    with pytest.raises(ConfigError, match="data.num_clients"):
        partition(ds, 0, "iid", seed=0)
    with pytest.raises(ConfigError, match="data.dirichlet_beta"):
        partition(ds, 2, "dirichlet", seed=0, beta=0.0)


def test_registry_synthetic_needs_no_root():
    pytest.importorskip("dpfpl.data.synthetic")
    ds = load_dataset("synthetic", None, seed=0)
    assert ds.n_classes >= 2 and len(ds.train) > 0
    _check_cover(ds, partition(ds, 2, "pathological", seed=0))


def test_run_config_sets_synthetic_size_and_rejects_it_elsewhere():
    """The synthetic task's size lives in the run config (config.json rebuilds the data)."""
    from dpfpl.config import RunConfig
    from dpfpl.data import load_run_dataset

    cfg = RunConfig().update({"train_per_class": 3, "test_per_class": 2}).validate()
    ds = load_run_dataset(cfg)
    assert len(ds.train) == 3 * len(ds.classnames) and len(ds.test) == 2 * len(ds.classnames)
    with pytest.raises(ConfigError, match="data.train_per_class applies to the synthetic dataset only"):
        RunConfig().update({"dataset": "cifar10", "root": "/x", "train_per_class": 3}).validate()
    with pytest.raises(ConfigError, match="data.test_per_class must be positive"):
        RunConfig().update({"test_per_class": 0}).validate()
