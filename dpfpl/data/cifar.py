"""CIFAR-10 / CIFAR-100 from the official python pickle batches.

Layouts: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` and
``ROOT/cifar-100-python/{train,test,meta}`` (``ROOT`` may also be that folder itself). Images are
returned as :class:`ArraySplit` of uint8 (N, 32, 32, 3); class names have '_' replaced by ' '.

The pickles are read with a restricted unpickler that only allows the numpy array constructors, so a
tampered dataset file cannot execute code. Missing or corrupt files raise :class:`DataError` naming
the path and the expected layout.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .base import ArraySplit, Dataset

LAYOUTS = {
    "cifar10": "ROOT/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch, batches.meta} "
               "(python version of CIFAR-10; ROOT may also be ROOT/cifar-10-batches-py)",
    "cifar100": "ROOT/cifar-100-python/{train, test, meta} "
                "(python version of CIFAR-100; ROOT may also be ROOT/cifar-100-python)",
}

_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(name: str, path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{name}: file {path} not found; expected layout: {LAYOUTS[name]}")
    try:
        with open(path, "rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # corrupt/truncated pickles raise many types
        raise DataError(f"{name}: cannot read {path} ({type(exc).__name__}: {exc}); "
                        f"expected a CIFAR python pickle; layout: {LAYOUTS[name]}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{name}: {path} does not hold a dict (got {type(obj).__name__}); layout: {LAYOUTS[name]}")
    return obj


def _get(name: str, path: Path, obj: dict, key: bytes) -> Any:
    if key not in obj:
        raise DataError(f"{name}: {path} has no key {key!r} (keys: {sorted(obj)}); layout: {LAYOUTS[name]}")
    return obj[key]


def _batches(name: str, folder: Path, files: list[str], label_key: bytes, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for fn in files:
        path = folder / fn
        obj = _unpickle(name, path)
        data = np.asarray(_get(name, path, obj, b"data"))
        lab = np.asarray(_get(name, path, obj, label_key))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{name}: {path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        if lab.ndim != 1 or len(lab) != len(data) or not np.issubdtype(lab.dtype, np.integer):
            raise DataError(f"{name}: {path}: {label_key!r} must be {len(data)} integer labels, got {lab.dtype} {lab.shape}")
        if len(lab) and (lab.min() < 0 or lab.max() >= n_classes):
            raise DataError(f"{name}: {path}: labels span [{lab.min()}, {lab.max()}] but the meta file has {n_classes} names")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab.astype(np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _names(name: str, path: Path, obj: dict, key: bytes) -> list[str]:
    raw = _get(name, path, obj, key)
    try:
        return [(n.decode() if isinstance(n, bytes) else str(n)).replace("_", " ") for n in raw]
    except Exception as exc:
        raise DataError(f"{name}: {path}: cannot read class names under {key!r} ({exc})") from exc


def _folder(name: str, root: str | os.PathLike, sub: str, marker: str) -> Path:
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{name}: dataset root {base} does not exist or is not a folder; layout: {LAYOUTS[name]}")
    if (base / sub).is_dir():
        return base / sub
    if (base / marker).is_file():
        return base
    raise DataError(f"{name}: folder {base / sub} not found (and {base} has no {marker}); layout: {LAYOUTS[name]}")


def load_cifar10(root: str | os.PathLike) -> Dataset:
    """CIFAR-10: 50,000 train / 10,000 test images, 10 classes."""
    folder = _folder("cifar10", root, "cifar-10-batches-py", "batches.meta")
    meta = folder / "batches.meta"
    classnames = _names("cifar10", meta, _unpickle("cifar10", meta), b"label_names")
    n = len(classnames)
    tr = _batches("cifar10", folder, [f"data_batch_{i}" for i in range(1, 6)], b"labels", n)
    te = _batches("cifar10", folder, ["test_batch"], b"labels", n)
    return Dataset("cifar10", classnames, ArraySplit(*tr, origin=f"{folder}/train"),
                   ArraySplit(*te, origin=f"{folder}/test_batch"))


def load_cifar100(root: str | os.PathLike) -> Dataset:
    """CIFAR-100 (fine labels): 50,000 train / 10,000 test images, 100 classes."""
    folder = _folder("cifar100", root, "cifar-100-python", "meta")
    meta = folder / "meta"
    classnames = _names("cifar100", meta, _unpickle("cifar100", meta), b"fine_label_names")
    n = len(classnames)
    tr = _batches("cifar100", folder, ["train"], b"fine_labels", n)
    te = _batches("cifar100", folder, ["test"], b"fine_labels", n)
    return Dataset("cifar100", classnames, ArraySplit(*tr, origin=f"{folder}/train"),
                   ArraySplit(*te, origin=f"{folder}/test"))
