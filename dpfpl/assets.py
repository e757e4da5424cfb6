"""The shipped checkpoints (``dpfpl/assets``) and their integrity checks: sidecar format and
sha256 verified on every load. Kept apart from :mod:`dpfpl.pretrain` (which builds them) so that
:mod:`dpfpl.clip` can load them without importing the trainer (no import cycle)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import ConfigError, DpfplError

FORMAT = "dpfpl-pretrain/1"
ASSET_DIR = Path(__file__).parent / "assets"


# ----------------------------------------------------------------------------------------------
# paths and integrity


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(weights: str | Path) -> Path:
    """``foo.safetensors`` -> ``foo.meta.json`` (next to the weights)."""
    p = Path(weights)
    return p.with_name(p.stem + ".meta.json")


def builtin_models() -> list[str]:
    """Architectures with a checkpoint shipped in ``dpfpl/assets``."""
    return sorted(p.name[: -len(".safetensors")] for p in ASSET_DIR.glob("*.safetensors"))


_VERIFIED: dict[str, str] = {}


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check ``path`` against its sidecar (format, sha256); return the sidecar. Raises DpfplError."""
    path = Path(path)
    meta_path = sidecar_path(path)
    if not meta_path.is_file():
        raise DpfplError(f"checkpoint {path} has no sidecar {meta_path.name}: cannot verify it")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise DpfplError(f"cannot read checkpoint sidecar {meta_path}: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DpfplError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    key = str(path.resolve())
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    if _VERIFIED.get(key) != stamp:
        digest = sha256_file(path)
        if digest != meta.get("sha256"):
            raise DpfplError(
                f"checkpoint {path} is corrupt or was modified: sha256 {digest} does not match "
                f"{meta.get('sha256')} recorded in {meta_path.name}; reinstall the package or "
                f"rebuild it with `dpfpl pretrain --out {path}`")
        _VERIFIED[key] = stamp
    return meta


def builtin_checkpoint(model_name: str) -> Path:
    """The shipped, verified checkpoint of ``model_name`` (``--pretrained builtin``)."""
    path = ASSET_DIR / f"{model_name}.safetensors"
    if not path.is_file():
        have = builtin_models()
        raise ConfigError(
            f"model.pretrained='builtin': there is no builtin checkpoint for {model_name!r} "
            f"(builtin: {', '.join(have) if have else 'none'}); pass a local checkpoint file with "
            f"--pretrained PATH, or build one for the tiny architecture with `dpfpl pretrain --out PATH`")
    meta = verify_checkpoint(path)
    from ._compat import open_clip_with_configs  # lazy: imports open_clip

    config = open_clip_with_configs().get_model_config(model_name)
    if meta.get("model_config") != config:
        raise DpfplError(
            f"the builtin checkpoint {path.name} was built for another {model_name} architecture than "
            f"model_configs/{model_name}.json now describes; rebuild it with "
            f"`dpfpl pretrain --model {model_name} --out {path}` or restore the config")
    return path


