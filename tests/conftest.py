"""Shared fixtures: a tiny random-init CLIP and a tiny class-conditional image dataset, built in
memory in well under a second (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpfpl.config import RunConfig
from dpfpl.data.base import ArraySplit, Dataset

torch.set_num_threads(2)

CLASSNAMES = ["red circle", "green square", "blue triangle", "yellow cross",
              "purple ring", "orange bar", "white star", "black dot"]


def make_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class c: a colour patch at a class-specific place plus noise (easy to separate)."""
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for c in range(len(CLASSNAMES)):
        for _ in range(n_per_class):
            img = rng.integers(0, 60, size=(32, 32, 3)).astype(np.uint8)
            r, col = divmod(c, 4)
            img[r * 16:(r + 1) * 16, col * 8:(col + 1) * 8, c % 3] = 230
            imgs.append(img)
            labels.append(c)
    return np.stack(imgs), np.array(labels)


class StopAfter:
    """Engine callback simulating an interruption (Ctrl-C) after round ``n``."""

    def __init__(self, n: int):
        self.n = n

    def on_round_end(self, engine, row) -> None:
        if row["round"] == self.n:
            raise KeyboardInterrupt


@pytest.fixture(scope="session", autouse=True)
def _session_feature_cache(tmp_path_factory):
    """Session-scoped fixtures that build engines write their image features under a temporary
    folder, never into the user's ~/.cache/dpfpl."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPFPL_CACHE_DIR", str(tmp_path_factory.mktemp("dpfpl-cache")))
        yield


@pytest.fixture(autouse=True)
def _feature_cache(tmp_path, monkeypatch):
    """Every test gets its own empty persistent feature cache (no state shared between tests)."""
    monkeypatch.setenv("DPFPL_CACHE_DIR", str(tmp_path / "dpfpl-cache"))


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models; two threads on a loaded 2-core machine were
    measured up to 20x slower). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def tiny_dataset() -> Dataset:
    xtr, ytr = make_images(10, 0)
    xte, yte = make_images(5, 1)
    return Dataset("tiny", list(CLASSNAMES), ArraySplit(xtr, ytr, "tiny-train"), ArraySplit(xte, yte, "tiny-test"))


@pytest.fixture(scope="session")
def tiny_clip():
    from dpfpl.clip import load_clip

    torch.manual_seed(0)
    return load_clip("dpfpl-tiny", None)


@pytest.fixture
def make_cfg():
    def _make(**overrides) -> RunConfig:
        cfg = RunConfig()
        cfg.update({"pretrained": "none", "num_clients": 2, "rounds": 2, "local_steps": 2, "batch_size": 8,
                    "n_ctx": 4, "rank": 2, "lr": 0.05, "eval_every": 1, **overrides})
        return cfg.validate()

    return _make
