"""Dataset interface shared by every format.

A dataset is two labelled image splits (train, test) plus human-readable class names. Images are
loaded lazily one by one (``load``) so that a corrupt file is reported by name, and each example has
a stable integer id (its index in the split) that the membership record and the audits use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import DataError


class ImageSplit:
    """A labelled split. Subclasses implement :meth:`_load` and :meth:`describe`.

    Contract: ``labels`` is an int64 array (N,) with values in [0, n_classes); ``load(i)`` returns an
    RGB ``PIL.Image`` or raises :class:`DataError` naming the file (or in-memory location).
    """

    labels: np.ndarray

    def __len__(self) -> int:
        return int(len(self.labels))

    def _load(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """Where example ``i`` comes from (a path, or 'array[i]'), for error messages."""
        return f"example {i}"

    def load(self, i: int) -> Image.Image:
        try:
            img = self._load(i)
            img.load()
        except DataError:
            raise
        except Exception as exc:  # PIL raises many types for corrupt/truncated files
            raise DataError(f"cannot read image {self.describe(i)}: {exc}") from exc
        return img.convert("RGB")


class ArraySplit(ImageSplit):
    """Images held in memory as uint8 (N, H, W, 3) -- CIFAR batches and the synthetic task."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], origin: str = "array"):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise DataError(f"{origin}: expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(images):
            raise DataError(f"{origin}: {len(images)} images but {len(self.labels)} labels")
        self.origin = origin

    def _load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def describe(self, i: int) -> str:
        return f"{self.origin}[{i}]"


class FileSplit(ImageSplit):
    """Images on disk, one path per example."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise DataError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def _load(self, i: int) -> Image.Image:
        return Image.open(self.paths[i])

    def describe(self, i: int) -> str:
        return self.paths[i]


@dataclass
class Dataset:
    """A dataset: class names and train/test splits (labels index ``classnames``)."""

    name: str
    classnames: list[str]
    train: ImageSplit
    test: ImageSplit

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def validate(self) -> None:
        for split_name, split in (("train", self.train), ("test", self.test)):
            if len(split) == 0:
                raise DataError(f"dataset {self.name!r}: the {split_name} split is empty")
            lab = split.labels
            if lab.min() < 0 or lab.max() >= self.n_classes:
                raise DataError(
                    f"dataset {self.name!r}: {split_name} labels span [{lab.min()}, {lab.max()}] "
                    f"but there are {self.n_classes} class names"
                )


# name -> loader(root, **options) -> Dataset ; filled by the format modules (see registry.py)
DatasetLoader = Callable[..., Dataset]
