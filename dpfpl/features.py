"""Image features of the frozen image tower, cached in memory and on disk.

The image encoder is frozen and the default inputs are not augmented, so every image's feature is
a constant: :class:`FeatureStore` computes each split's L2-normalised features once and serves
minibatches by index. With ``cache=False`` it encodes the images of every batch again (the slow
path, kept for benchmarks and for augmented inputs).

Persistent cache (:class:`DiskCache`): one entry per (model, preprocessing, split, device type),
under :func:`resolve_cache_dir` (``train.feature_cache_dir``; else ``$DPFPL_CACHE_DIR/features``;
else ``~/.cache/dpfpl/features``; ``'off'``: none). An entry's key is the SHA-256 of

- the image tower's weights (a content hash of every tensor of its state dict: a checkpoint file,
  the builtin weights or a random init with its seed all reduce to the weights themselves), the
  architecture name, the open_clip and torch versions;
- the preprocessing (the transform's repr, object addresses removed);
- the split's content: images and labels of an in-memory split, (path, size, mtime) of every file
  and the labels of a file split; splits of other kinds are not cached on disk;
- the device type (CPU and CUDA kernels round differently: a warm run equals a cold one bitwise).

An entry is ``KEY.safetensors`` (tensor ``features`` (N, E) float32) plus ``KEY.json`` (the
manifest: what the key was made of, N, E and the SHA-256 of the feature bytes). A missing,
unreadable, mismatched or corrupt entry (hash differs) is rebuilt. Files are written to a temporary
name and moved into place with ``os.replace``; building and checking an entry hold an exclusive
``flock`` on ``KEY.lock``, so two processes wanting the same entry encode it once and never read
a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .clip import FrozenClip
from .data.base import ArraySplit, FileSplit, ImageSplit
from .rundir import atomic_write_bytes

CACHE_ENV = "DPFPL_CACHE_DIR"
FORMAT = 1
_MODEL_IDS: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_SPLIT_IDS: "weakref.WeakKeyDictionary[ImageSplit, Optional[str]]" = weakref.WeakKeyDictionary()


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


# ---------------------------------------------------------------------------------- identities

def resolve_cache_dir(setting: Optional[str | Path] = None) -> Optional[Path]:
    """The cache folder for ``train.feature_cache_dir`` = ``setting`` (module doc); None when off."""
    if setting is not None and str(setting).lower() == "off":
        return None
    if setting is not None:
        return Path(setting).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return None if env.lower() == "off" else Path(env).expanduser() / "features"
    return Path.home() / ".cache" / "dpfpl" / "features"


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_identity(clip: FrozenClip) -> str:
    """SHA-256 of the image tower's weights, architecture and library versions (memoised per model)."""
    tower = getattr(clip.model, "visual", clip.model)
    if tower not in _MODEL_IDS:
        from ._compat import import_open_clip

        h = hashlib.sha256(f"{clip.name}|open_clip {import_open_clip().__version__}|torch {torch.__version__}".encode())
        for name, t in sorted(tower.state_dict().items()):
            h.update(name.encode())
            _hash_tensor(h, t)
        _MODEL_IDS[tower] = h.hexdigest()
    return _MODEL_IDS[tower]


def preprocess_identity(clip: FrozenClip) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(clip.preprocess))


def split_identity(split: ImageSplit) -> Optional[str]:
    """SHA-256 of a split's content (module doc), or None for a split kind that is not hashable."""
    if split in _SPLIT_IDS:
        return _SPLIT_IDS[split]
    h = hashlib.sha256(type(split).__name__.encode())
    if isinstance(split, ArraySplit):
        h.update(f"{split.images.dtype}{split.images.shape}".encode())
        h.update(memoryview(split.images.reshape(-1)))  # ascontiguous view of the uint8 images
    elif isinstance(split, FileSplit):
        for p in split.paths:
            try:
                st = os.stat(p)
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{p}\0missing\n".encode())
    else:
        _SPLIT_IDS[split] = None
        return None
    h.update(split.labels.astype("int64").tobytes())
    _SPLIT_IDS[split] = h.hexdigest()
    return _SPLIT_IDS[split]


def entry_fields(clip: FrozenClip, split: ImageSplit) -> Optional[dict[str, Any]]:
    """What an entry's key is made of (None: the split cannot be cached on disk)."""
    sid = split_identity(split)
    if sid is None:
        return None
    return {"format": FORMAT, "model": model_identity(clip), "preprocess": preprocess_identity(clip),
            "split": sid, "n": len(split), "device_type": clip.device.type}


def entry_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------- disk cache

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _digest(feats: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, feats)
    return h.hexdigest()


class DiskCache:
    """Entries of :func:`encode_split` results in ``root`` (module doc)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def paths(self, key: str) -> tuple[Path, Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.json", self.root / f"{key}.lock"

    def _read(self, key: str, fields: dict[str, Any]) -> tuple[Optional[torch.Tensor], str]:
        """(features, "") for a valid entry, else (None, why it is not)."""
        from safetensors.torch import load_file

        data, manifest, _ = self.paths(key)
        if not data.exists() and not manifest.exists():
            return None, "missing"
        try:
            meta = json.loads(manifest.read_text())
            feats = load_file(str(data))["features"]
        except Exception as exc:  # unreadable, truncated, not JSON, no tensor
            return None, f"unreadable ({type(exc).__name__})"
        if {k: meta.get(k) for k in fields} != fields:
            return None, "manifest does not match the model/dataset/preprocessing"
        if tuple(feats.shape) != (fields["n"], meta.get("dim")) or feats.dtype != torch.float32:
            return None, "shape or dtype differs from the manifest"
        if _digest(feats) != meta.get("sha256"):
            return None, "content hash differs from the manifest (corrupt)"
        return feats, ""

    def get_or_build(self, fields: dict[str, Any], build: Callable[[], torch.Tensor],
                     info: Optional[dict[str, Any]] = None) -> tuple[torch.Tensor, str]:
        """(features (N, E) on CPU, event) with event "hit", "miss" or "rebuilt: <reason>";
        ``info`` (e.g. the model name) is written to the manifest but is not part of the key."""
        from safetensors.torch import save

        key = entry_key(fields)
        self.root.mkdir(parents=True, exist_ok=True)
        data, manifest, lock = self.paths(key)
        with _locked(lock):
            feats, why = self._read(key, fields)
            if feats is not None:
                return feats, "hit"
            feats = build().float().cpu().contiguous()  # (N, E)
            digest = _digest(feats)
            atomic_write_bytes(data, save({"features": feats}, metadata={"key": key, "sha256": digest}))
            meta = {**(info or {}), **fields, "key": key, "dim": int(feats.shape[1]) if feats.ndim == 2 else 0,
                    "dtype": "float32", "sha256": digest, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            atomic_write_bytes(manifest, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        return feats, "miss" if why == "missing" else f"rebuilt: {why}"


class FeatureStore:
    """Serves (features (B, E), labels (B,)) for indices of a dataset split.

    ``events[split]`` says where each split's features came from: "hit" / "miss" / "rebuilt: why"
    (persistent cache), "memory" (no disk cache for this split or cache dir off), "uncached"
    (``cache=False``); ``encode_s[split]`` the seconds spent encoding it in this process."""

    def __init__(self, clip: FrozenClip, splits: dict[str, ImageSplit], cache: bool = True,
                 on_batch: Optional[Callable[[str, int], None]] = None, cache_dir: Optional[str | Path] = None):
        self.clip, self.splits, self.cache = clip, splits, cache
        self.labels = {k: torch.as_tensor(s.labels, dtype=torch.long, device=clip.device) for k, s in splits.items()}
        self._feats: dict[str, torch.Tensor] = {}
        self.events: dict[str, str] = {}
        self.encode_s: dict[str, float] = {}
        root = resolve_cache_dir(cache_dir) if cache else None
        disk = DiskCache(root) if root is not None else None
        for name, split in splits.items():
            if not cache:
                self.events[name] = "uncached"
                continue
            cb = (lambda n, name=name: on_batch(name, n)) if on_batch else None

            def build(split=split, cb=cb, name=name) -> torch.Tensor:
                t0 = time.perf_counter()
                out = encode_split(clip, split, on_batch=cb)
                self.encode_s[name] = time.perf_counter() - t0
                return out

            fields = entry_fields(clip, split) if disk is not None and len(split) else None
            if fields is None:
                self._feats[name], self.events[name] = build(), "memory"
            else:
                info = {"model_name": clip.name, "pretrained": None if clip.pretrained is None else
                        str(clip.pretrained), "split_name": name, "split_kind": type(split).__name__}
                feats, self.events[name] = disk.get_or_build(fields, build, info)
                self._feats[name] = feats.to(clip.device)

    def get(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.labels[split].device)
        if self.cache:
            return self._feats[split][idx], self.labels[split][idx]
        return encode_split(self.clip, self.splits[split], idx.cpu()), self.labels[split][idx]
