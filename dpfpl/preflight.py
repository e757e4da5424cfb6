"""Checks of everything knowable from a RunConfig, before any data, model or run directory.

:func:`check_config` raises :class:`~dpfpl.errors.ConfigError` naming the field and value of the
first problem: field values (``RunConfig.validate``), the method, the model
architecture (read from its open_clip JSON config: no weights are built) and the method's rank
against ``n_ctx`` and the text width, a ``--pretrained`` file that does not exist, an unavailable
device, and the privacy settings (clip unit syntax, client-level DP needs the fedavg protocol, an
epsilon or explicit multipliers to calibrate, a budget split strictly inside (0, 1) when both
mechanisms are calibrated). What needs the data (an epsilon the planned steps cannot reach) is
checked by the engine right after the partition, still before the model is loaded; so is the dataset
name (API callers may pass a dataset object the registry does not know).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

from .config import RunConfig
from .errors import ConfigError
from .plan import effective_protocol

SHIPPED_CONFIGS = Path(__file__).parent / "model_configs"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _config_dirs() -> list[Path]:
    dirs = [SHIPPED_CONFIGS]
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "model_configs" for p in spec.submodule_search_locations]
    return dirs


def model_config(name: str) -> dict:
    """The open_clip JSON config of architecture ``name`` (shipped or open_clip's), or ConfigError."""
    for d in _config_dirs():
        f = d / f"{name}.json"
        if f.is_file():
            return json.loads(f.read_text())
    known = sorted(p.stem for d in _config_dirs() if d.is_dir() for p in d.glob("*.json"))
    shipped = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json"))
    examples = ", ".join(m for m in known if m.startswith("ViT-B"))[:200]
    raise ConfigError(f"model.model={name!r} is not an open_clip architecture; shipped: {shipped}; e.g. {examples}...")


def text_width(name: str) -> Optional[int]:
    """Width of the text transformer (the prompt vectors' dimension); None when the config does not
    say (Hugging Face text towers: the engine checks after loading)."""
    w = model_config(name).get("text_cfg", {}).get("width")
    return int(w) if w is not None else None


def is_checkpoint_path(pretrained: str) -> bool:
    """Whether ``--pretrained`` names a file (rather than 'builtin', 'none' or an open_clip tag)."""
    return os.path.sep in pretrained or Path(pretrained).suffix in CHECKPOINT_SUFFIXES


def check_config(cfg: RunConfig, engine: str = "inprocess") -> RunConfig:
    """Raise ConfigError for the first problem knowable from ``cfg`` and the ``engine`` it will run
    on ("inprocess" or "flower") alone; returns ``cfg``."""
    from .registry import get_method

    cfg.validate()
    t, m, p = cfg.train, cfg.model, cfg.privacy
    if engine == "flower" and t.vectorize_clients:
        raise ConfigError("train.vectorize_clients=true cannot take effect on the Flower engine (one ClientApp "
                          "per client steps one client); leave it unset or false")
    method = get_method(t.method)(rank=t.rank, ctx_init_std=t.ctx_init_std)
    width = text_width(m.model)
    if width is not None:
        method.check(t.n_ctx, width)
    if m.pretrained and m.pretrained.lower() not in ("builtin", "none") and is_checkpoint_path(m.pretrained) \
            and not Path(m.pretrained).is_file():
        raise ConfigError(f"model.pretrained: checkpoint file not found: {m.pretrained}")
    if m.device != "auto":
        from .clip import resolve_device

        resolve_device(m.device)
    if p.privacy != "none":
        _check_privacy(cfg, method)
    return cfg


def _check_privacy(cfg: RunConfig, method) -> None:
    from .privacy.dp import parse_clip_unit

    p = cfg.privacy
    parse_clip_unit(p.clip_unit)
    if p.dp_level == "client" and effective_protocol(cfg.train.protocol, method) != "fedavg":
        raise ConfigError("privacy.dp_level=client needs the fedavg protocol (--protocol fedavg)")
    if p.epsilon is None and p.privacy == "reference":
        raise ConfigError("privacy=reference needs --epsilon (the nominal eps the public rule claims)")
    if p.privacy != "dp":
        return
    need_l = method.uses_local and p.noise_multiplier_local is None
    need_g = method.uses_global and p.noise_multiplier_global is None
    if (need_l or need_g) and p.epsilon is None:
        raise ConfigError("privacy=dp needs --epsilon (to calibrate) or explicit "
                          "--noise-multiplier-local/--noise-multiplier-global")
    if need_l and need_g and p.dp_level != "client" and not 0 < p.budget_split < 1:
        raise ConfigError(f"privacy.budget_split={p.budget_split!r} must be strictly between 0 and 1 when both the "
                          "local and the global noise are calibrated (or pass one explicit noise multiplier)")


def reference_note(cfg: RunConfig, asked: set[str]) -> Optional[str]:
    """A one-line note when reference mode overrides a setting the user asked for (``asked``: the
    field names given by flag or config file), else None."""
    if cfg.privacy.privacy != "reference":
        return None
    ignored = []
    if "sampling" in asked and cfg.privacy.sampling != "shuffle":
        ignored.append(f"--sampling {cfg.privacy.sampling} (runs shuffle)")
    if "clip_unit" in asked:
        ignored.append(f"--clip-unit {cfg.privacy.clip_unit} (clips batch means per tensor)")
    if not ignored:
        return None
    return ("privacy=reference runs the public code's rule and ignores " + "; ".join(ignored)
            + " (summary.json records the values used)")
