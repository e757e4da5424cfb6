"""Generic image folder: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``.

If ``ROOT`` has neither ``train/`` nor ``test/``, it is one folder of class subfolders
(``ROOT/<class>/*``) and each class is split deterministically: a fraction ``test_fraction`` of its
images (at least one when the class has two or more, never all), drawn by a generator seeded with the
class folder's name only, goes to test. The split does not depend on the run's ``--seed``: runs
with different seeds train and test on the same images (``seed`` is accepted and ignored here). Class names are the sorted folder names with '_'
replaced by ' '. Image files: .jpg .jpeg .png .bmp .webp (any case); hidden files are ignored.
Missing folders and empty classes raise :class:`DataError` naming the path and the layout.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .base import Dataset, FileSplit

HOLDOUT_SEED = 0  # the flat layout's split is fixed: independent of the run's seed
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
LAYOUT = ("ROOT/train/<class>/*.{jpg,jpeg,png,bmp,webp} and ROOT/test/<class>/*, "
          "or ROOT/<class>/* (split by a seeded per-class holdout)")


def _class_dirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"imagefolder: folder {folder} not found; expected layout: {LAYOUT}")
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise DataError(f"imagefolder: {folder} has no class subfolders; expected layout: {LAYOUT}")
    return dirs


def _images(class_dir: Path) -> list[Path]:
    files = sorted(p for p in class_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(f"imagefolder: class folder {class_dir} holds no images "
                        f"({'/'.join(sorted(IMAGE_EXTS))}); expected layout: {LAYOUT}")
    return files


def _holdout(n: int, test_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the test images among ``n`` images of one class."""
    k = int(round(n * test_fraction))
    k = min(max(k, 1 if n >= 2 else 0), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[:k]] = True
    return mask


def load_imagefolder(root: str | os.PathLike, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Load an image-folder dataset from ``root`` (see module docstring for the layout)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"imagefolder: dataset root {base} does not exist or is not a folder; "
                        f"expected layout: {LAYOUT}")
    has_train, has_test = (base / "train").is_dir(), (base / "test").is_dir()
    if has_train != has_test:
        missing = base / ("test" if has_train else "train")
        raise DataError(f"imagefolder: {missing} not found (both train/ and test/ are needed); "
                        f"expected layout: {LAYOUT}")
    if has_train:
        train_dirs = _class_dirs(base / "train")
        folders = [d.name for d in train_dirs]
        index = {c: i for i, c in enumerate(folders)}
        splits = []
        for dirs in (train_dirs, _class_dirs(base / "test")):
            paths, labels = [], []
            for d in dirs:
                if d.name not in index:
                    raise DataError(f"imagefolder: test class folder {d} has no counterpart in {base / 'train'}")
                files = _images(d)
                paths += files
                labels += [index[d.name]] * len(files)
            splits.append(FileSplit(paths, labels))
        train, test = splits
    else:
        if not 0.0 < float(test_fraction) < 1.0:
            raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        dirs = _class_dirs(base)
        folders = [d.name for d in dirs]
        tr_p, tr_l, te_p, te_l = [], [], [], []
        for label, d in enumerate(dirs):
            files = _images(d)
            rng = np.random.default_rng([HOLDOUT_SEED, zlib.crc32(d.name.encode())])
            mask = _holdout(len(files), float(test_fraction), rng)
            for f, is_test in zip(files, mask):
                (te_p if is_test else tr_p).append(f)
                (te_l if is_test else tr_l).append(label)
        train, test = FileSplit(tr_p, tr_l), FileSplit(te_p, te_l)
    classnames = [" ".join(c.replace("_", " ").split()) for c in folders]
    return Dataset("imagefolder", classnames, train, test)
