"""Dataset registry: name -> loader, and :func:`load_dataset`.

Every loader is called as ``loader(root, seed=seed, **options)`` and returns a :class:`Dataset`;
:func:`load_dataset` checks the name, that ``root`` is given when the format needs one, that the
options are ones the loader accepts, and validates the dataset before returning it.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from . import cifar, coop, folder
from .base import Dataset, DatasetLoader


def _synthetic(root: str | None = None, seed: int = 0, **options: Any) -> Dataset:
    from .synthetic import load_synthetic  # lazy: written separately

    return load_synthetic(root=root, seed=seed, **options)


def _coop(name: str) -> DatasetLoader:
    def load(root: str, seed: int = 0, use_val: bool = False) -> Dataset:
        return coop.load_coop(name, root, use_val=use_val)

    load.__name__ = f"load_{name}"
    return load


def _cifar10(root: str, seed: int = 0) -> Dataset:
    return cifar.load_cifar10(root)


def _cifar100(root: str, seed: int = 0) -> Dataset:
    return cifar.load_cifar100(root)


def _imagefolder(root: str, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    return folder.load_imagefolder(root, seed=seed, test_fraction=test_fraction)


DATASETS: dict[str, DatasetLoader] = {
    "synthetic": _synthetic,
    **{n: _coop(n) for n in coop.COOP_SPECS},
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "imagefolder": _imagefolder,
}

# name -> (accepted options, or None for "any"; expected layout, or None when no root is needed)
_OPTIONS: dict[str, tuple[set[str] | None, str | None]] = {
    "synthetic": (None, None),
    **{n: ({"use_val"}, coop.expected_layout(n)) for n in coop.COOP_SPECS},
    "cifar10": (set(), cifar.LAYOUTS["cifar10"]),
    "cifar100": (set(), cifar.LAYOUTS["cifar100"]),
    "imagefolder": ({"test_fraction"}, folder.LAYOUT),
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`load_dataset`, in registry order."""
    return list(DATASETS)


def config_options(cfg: Any) -> dict[str, Any]:
    """Loader options a :class:`~dpfpl.config.RunConfig` sets (the synthetic task's size)."""
    d = cfg.data
    return {k: getattr(d, k) for k in ("train_per_class", "test_per_class") if getattr(d, k) is not None}


def load_run_dataset(cfg: Any, **options: Any) -> Dataset:
    """The dataset a run's config names (name, root, seed and the config's loader options):
    every engine, audit and benchmark loads through here, so a run directory's config.json alone
    rebuilds its data."""
    return load_dataset(cfg.data.dataset, cfg.data.root, seed=cfg.train.seed, **{**config_options(cfg), **options})


def load_dataset(name: str, root: str | os.PathLike | None, seed: int = 0, **options: Any) -> Dataset:
    """Load dataset ``name`` from ``root``; raises ConfigError for a bad name/option or missing root,
    DataError for a missing or malformed dataset."""
    if name not in DATASETS:
        raise ConfigError(f"data.dataset={name!r} is unknown; valid: {', '.join(DATASETS)}")
    accepted, layout = _OPTIONS[name]
    if layout is not None and root is None:
        raise ConfigError(f"--root is required for dataset {name}: expected layout {layout}")
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ConfigError(f"dataset {name} does not accept option(s) {unknown}; "
                              f"accepted: {sorted(accepted) or 'none'}")
    root_arg = None if root is None else os.fspath(root)
    dataset = DATASETS[name](root_arg, seed=seed, **options)
    dataset.validate()
    return dataset
