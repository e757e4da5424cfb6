"""Image features of the frozen image tower.

The image encoder is frozen and the default inputs are not augmented, so every image's feature is
a constant: :class:`FeatureStore` computes each split's L2-normalised features once (the cache) and
serves minibatches by index. With ``cache=False`` it encodes the images of every batch again (the
slow path, kept for benchmarks and for augmented inputs).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .clip import FrozenClip
from .data.base import ImageSplit


@torch.no_grad()
def encode_split(clip: FrozenClip, split: ImageSplit, indices: Optional[torch.Tensor] = None,
                 batch_size: int = 256, on_batch: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """L2-normalised image features (N, E) of ``split`` (or of ``indices`` of it)."""
    idx = torch.arange(len(split)) if indices is None else indices
    out = []
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size].tolist()
        images = torch.stack([clip.preprocess(split.load(i)) for i in chunk]).to(clip.device)  # (b, 3, H, W)
        out.append(F.normalize(clip.model.encode_image(images).float(), dim=-1))  # (b, E)
        if on_batch is not None:
            on_batch(len(chunk))
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


class FeatureStore:
    """Serves (features (B, E), labels (B,)) for indices of a dataset split."""

    def __init__(self, clip: FrozenClip, splits: dict[str, ImageSplit], cache: bool = True,
                 on_batch: Optional[Callable[[str, int], None]] = None):
        self.clip, self.splits, self.cache = clip, splits, cache
        self.labels = {k: torch.as_tensor(s.labels, dtype=torch.long, device=clip.device) for k, s in splits.items()}
        self._feats: dict[str, torch.Tensor] = {}
        if cache:
            for name, split in splits.items():
                cb = (lambda n, name=name: on_batch(name, n)) if on_batch else None
                self._feats[name] = encode_split(clip, split, on_batch=cb)

    def get(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.labels[split].device)
        if self.cache:
            return self._feats[split][idx], self.labels[split][idx]
        return encode_split(self.clip, self.splits[split], idx.cpu()), self.labels[split][idx]
