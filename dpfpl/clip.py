"""Load a frozen open_clip model, offline.

``pretrained`` may be
- ``None`` / ``"none"``: random initialisation (tests);
- ``"builtin"``: the tiny checkpoint shipped with (or built and cached by) this package for the
  shipped architecture (see :mod:`dpfpl.pretrain`);
- a path to a local checkpoint file (the path users with downloaded weights take);
- an open_clip tag (``"openai"``, ``"laion2b_s34b_b88k"``...), used only if it is already in the
  local Hugging Face / open_clip cache: nothing is ever downloaded at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ._compat import CONFIG_DIR, open_clip_with_configs
from .errors import ConfigError, DpfplError



_open_clip = open_clip_with_configs  # open_clip with the shipped model configs registered


def available_models() -> list[str]:
    return list(_open_clip().list_models())


def shipped_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"model.device={device!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r} but CUDA is not available on this machine")
    return dev


@dataclass
class FrozenClip:
    """A frozen open_clip model with its eval preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: Optional[str]
    device: torch.device

    @property
    def fingerprint(self) -> str:
        """Identifies the weights, for feature caches."""
        return f"{self.name}|{self.pretrained}"


def load_clip(name: str, pretrained: Optional[str], device: str | torch.device = "cpu",
              init_seed: Optional[int] = 0) -> FrozenClip:
    """Build ``name`` with ``pretrained`` weights (see module doc), frozen, in eval mode.

    Random weights (``pretrained`` None / "none") are drawn with torch's global RNG seeded with
    ``init_seed`` (and restored afterwards), so every process builds the same model; ``None``
    draws from the global RNG as it stands."""
    oc = _open_clip()
    if name not in oc.list_models():
        raise ConfigError(
            f"model.model={name!r} is not an open_clip architecture; shipped: {shipped_models()}; "
            f"e.g. {', '.join(m for m in oc.list_models() if m.startswith('ViT-B'))[:200]}...")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    weights: Optional[str]
    if pretrained is None or str(pretrained).lower() == "none":
        weights = None
    elif pretrained == "builtin":
        from .assets import builtin_checkpoint

        weights = str(builtin_checkpoint(name))
    elif os.path.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if not Path(pretrained).is_file():
            raise ConfigError(f"model.pretrained: checkpoint file not found: {pretrained}")
        weights = pretrained
    else:
        tags = oc.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ConfigError(
                f"model.pretrained={pretrained!r} is not a known tag for {name} (tags: {tags}); "
                "pass a local checkpoint file path instead")
        weights = pretrained
    offline_before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never download at run time
    try:
        with torch.random.fork_rng(devices=[], enabled=weights is None and init_seed is not None):
            if weights is None and init_seed is not None:
                torch.manual_seed(int(init_seed))
            model, _, preprocess = oc.create_model_and_transforms(name, pretrained=weights, device=dev)
    except DpfplError:
        raise
    except Exception as exc:
        if weights is not None and not Path(weights).is_file():
            raise DpfplError(
                f"pretrained weights {name}/{pretrained} are not in the local cache and nothing is "
                f"downloaded at run time: download the checkpoint yourself and pass its path with "
                f"--pretrained /path/to/file ({type(exc).__name__}: {str(exc)[:200]})") from None
        raise DpfplError(f"cannot load {name} with weights {weights}: {exc}") from exc
    finally:
        if offline_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = offline_before
    model.eval().requires_grad_(False)
    return FrozenClip(model, preprocess, oc.get_tokenizer(name), name, pretrained, dev)
