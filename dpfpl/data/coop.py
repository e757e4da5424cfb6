"""CoOp-format datasets (layout of KaiyangZhou/CoOp ``DATASETS.md``).

Each dataset is a folder holding an image directory and a ``split_zhou_*.json`` file of the form
``{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}`` with ``relpath``
relative to the image directory. ``ROOT`` may be the parent folder (holding e.g. ``caltech-101/``)
or the dataset folder itself.

Contract of :func:`load_coop`: class names come from the json (underscores become spaces), indexed by
label; labels must be contiguous ``0..C-1`` with one name per label across all splits; every image
of the returned splits exists on disk (checked up front). Problems raise :class:`DataError` naming
the path and the expected layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .base import Dataset, FileSplit


@dataclass(frozen=True)
class CoopSpec:
    folder: str      # dataset folder under ROOT
    image_dir: str   # image directory inside the dataset folder
    split_file: str  # split json inside the dataset folder


COOP_SPECS: dict[str, CoopSpec] = {
    "caltech101": CoopSpec("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": CoopSpec("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "oxford_flowers": CoopSpec("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": CoopSpec("food-101", "images", "split_zhou_Food101.json"),
    "dtd": CoopSpec("dtd", "images", "split_zhou_DescribableTextures.json"),
}


def expected_layout(name: str) -> str:
    """Human-readable expected layout of CoOp dataset ``name`` (for error messages)."""
    s = COOP_SPECS[name]
    return (f"ROOT/{s.folder}/{s.image_dir}/<images as listed in the split> and "
            f"ROOT/{s.folder}/{s.split_file} (CoOp DATASETS.md; ROOT may also be ROOT/{s.folder})")


def _dataset_dir(name: str, root: str | os.PathLike) -> Path:
    spec = COOP_SPECS[name]
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"{name}: dataset root {base} does not exist or is not a folder; "
                        f"expected layout: {expected_layout(name)}")
    if (base / spec.folder).is_dir():
        return base / spec.folder
    if (base / spec.split_file).is_file() or (base / spec.image_dir).is_dir():
        return base  # ROOT is the dataset folder itself
    raise DataError(f"{name}: dataset folder {base / spec.folder} not found (and {base} is not the "
                    f"dataset folder itself); expected layout: {expected_layout(name)}")


def _read_split(name: str, path: Path) -> dict[str, list[tuple[str, int, str]]]:
    layout = expected_layout(name)
    if not path.is_file():
        raise DataError(f"{name}: split file {path} not found; expected layout: {layout}")
    try:
        with open(path, encoding="utf-8") as f:
            raw: Any = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{name}: split file {path} is not valid json ({exc}); expected "
                        f'{{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}}') from exc
    if not isinstance(raw, dict) or not all(k in raw for k in ("train", "test")):
        raise DataError(f"{name}: split file {path} must be a json object with keys 'train', 'val', 'test'")
    out: dict[str, list[tuple[str, int, str]]] = {}
    for key in ("train", "val", "test"):
        items = raw.get(key, [])
        if not isinstance(items, list):
            raise DataError(f"{name}: split file {path}: '{key}' must be a list of [relpath, label, classname]")
        rows = []
        for j, it in enumerate(items):
            ok = (isinstance(it, (list, tuple)) and len(it) == 3 and isinstance(it[0], str)
                  and isinstance(it[1], int) and not isinstance(it[1], bool) and isinstance(it[2], str))
            if not ok:
                raise DataError(f"{name}: split file {path}: {key}[{j}] = {it!r} is not [relpath, label, classname]")
            rows.append((it[0], int(it[1]), it[2]))
        out[key] = rows
    return out


def _classnames(name: str, path: Path, splits: dict[str, list[tuple[str, int, str]]]) -> list[str]:
    by_label: dict[int, str] = {}
    for key, rows in splits.items():
        for rel, label, cname in rows:
            clean = " ".join(cname.replace("_", " ").split())
            prev = by_label.setdefault(label, clean)
            if prev != clean:
                raise DataError(f"{name}: split file {path}: label {label} is named both {prev!r} and "
                                f"{clean!r} ({key} entry {rel!r}); labels and classnames are inconsistent")
    n = len(by_label)
    missing = sorted(set(range(n)) - set(by_label))
    if missing:
        raise DataError(f"{name}: split file {path}: labels must be contiguous 0..{n - 1}, but labels "
                        f"{missing[:10]} are missing (found {sorted(by_label)[:10]}...)")
    names = [by_label[i] for i in range(n)]
    seen: dict[str, int] = {}
    for i, c in enumerate(names):
        if c in seen:
            raise DataError(f"{name}: split file {path}: labels {seen[c]} and {i} share the class name {c!r}")
        seen[c] = i
    return names


def _file_split(name: str, image_dir: Path, rows: list[tuple[str, int, str]], what: str) -> FileSplit:
    paths = [str(image_dir / rel) for rel, _, _ in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{name}: {len(missing)} of {len(paths)} {what} images listed in the split file are "
                        f"missing, first: {missing[0]}; expected layout: {expected_layout(name)}")
    return FileSplit(paths, [label for _, label, _ in rows])


def load_coop(name: str, root: str | os.PathLike, use_val: bool = False) -> Dataset:
    """Load CoOp dataset ``name`` (a key of :data:`COOP_SPECS`) from ``root``.

    Train split = json "train" (plus "val" when ``use_val``), test split = json "test".
    """
    if name not in COOP_SPECS:
        raise ConfigError(f"data.dataset={name!r} is not a CoOp dataset; valid: {sorted(COOP_SPECS)}")
    if not isinstance(use_val, bool):
        raise ConfigError(f"use_val must be true or false, got {use_val!r}")
    spec = COOP_SPECS[name]
    ddir = _dataset_dir(name, root)
    split_path = ddir / spec.split_file
    splits = _read_split(name, split_path)
    classnames = _classnames(name, split_path, splits)
    image_dir = ddir / spec.image_dir
    if not image_dir.is_dir():
        raise DataError(f"{name}: image folder {image_dir} not found; expected layout: {expected_layout(name)}")
    train_rows = splits["train"] + (splits["val"] if use_val else [])
    train = _file_split(name, image_dir, train_rows, "train" + ("+val" if use_val else ""))
    test = _file_split(name, image_dir, splits["test"], "test")
    return Dataset(name, classnames, train, test)
