"""Typed run configuration: the one source of defaults.

A run is described by :class:`RunConfig`, made of four sections (``model``, ``data``, ``train``,
``privacy``). Every field has a default and a help string; the CLI builds one ``--flag`` per field
(``--n-ctx`` for ``train.n_ctx``), so field names are unique across sections. A TOML/JSON file
may set any subset, by section (``[train] rounds = 5``) or flat (``rounds = 5``); explicit flags
override the file. :meth:`RunConfig.validate` names the field and the value of anything invalid.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError


def opt(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    """A dataclass field with its CLI help (and allowed values, checked by ``validate``)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    model: str = opt("dpfpl-tiny", "open_clip architecture name (or a shipped tiny config)")
    pretrained: Optional[str] = opt(
        "builtin", "open_clip pretrained tag, a local checkpoint path, 'builtin' (shipped tiny "
        "weights) or 'none' (random init)")
    device: str = opt("auto", "torch device: auto, cpu, cuda, cuda:N")


@dataclass
class DataConfig:
    dataset: str = opt("synthetic", "dataset name")
    root: Optional[str] = opt(None, "dataset root folder (not needed for synthetic)")
    num_clients: int = opt(4, "number of clients")
    partition: str = opt("pathological", "how classes/examples are split among clients",
                         ("pathological", "dirichlet", "iid"))
    dirichlet_beta: float = opt(0.3, "Dirichlet concentration for partition=dirichlet")
    shots: Optional[int] = opt(None, "few-shot: keep k training examples per class (None: all)")
    train_per_class: Optional[int] = opt(None, "synthetic dataset only: training images per class (None: 40)")
    test_per_class: Optional[int] = opt(None, "synthetic dataset only: test images per class (None: 25)")
    val_fraction: float = opt(0.0, "share of each client's training images held out as its validation split "
                              "(for tuning; never the test split; 0: off)")


@dataclass
class TrainConfig:
    method: str = opt("dpfpl", "method name (see `dpfpl methods`)")
    rounds: int = opt(10, "global rounds")
    local_steps: Optional[int] = opt(
        None, "steps per round per client (None: one pass over the mean client training set)")
    batch_size: int = opt(32, "minibatch size (expected size under Poisson sampling)")
    lr: float = opt(0.01, "SGD learning rate of the prompts (tuned on the synthetic default; the paper "
                    "used 1e-4 for ViT-B/16)")
    global_lr: Optional[float] = opt(None, "server learning rate for the global prompt (None: lr)")
    momentum: float = opt(0.9, "SGD momentum (each client keeps its own buffers)")
    weight_decay: float = opt(0.0, "SGD weight decay")
    n_ctx: int = opt(16, "number of learnable context vectors")
    rank: int = opt(8, "rank k of the low-rank local prompt (dpfpl, dpfpl-nores, fedpgp)")
    ctx_init_std: float = opt(0.02, "std of the N(0, s^2) prompt initialisation")
    protocol: Optional[str] = opt(
        None, "aggregation protocol: 'grad' (server averages global gradients every step) or "
        "'fedavg' (clients send parameters every local_steps); None: the method's default",
        (None, "grad", "fedavg"))
    client_fraction: float = opt(1.0, "fraction of clients sampled each round")
    eval_every: int = opt(1, "evaluate every this many rounds (the last round always)")
    seed: int = opt(0, "seed for data split, initialisation and batches")
    cut_text: bool = opt(True, "cut the causal text encoder after the last end-of-text token")
    cache_features: bool = opt(True, "cache frozen image features (inputs are not augmented)")
    feature_cache_dir: Optional[str] = opt(
        None, "folder of the persistent image-feature cache (None: $DPFPL_CACHE_DIR/features, else "
        "~/.cache/dpfpl/features; 'off': keep features in memory only)")
    per_example_grads: str = opt(
        "auto", "exact per-example gradient strategy for DP: vjp (cost grows with the batch), "
        "jacobian (text Jacobian once per step), auto (the cheaper, by a measured cost model)",
        ("auto", "vjp", "jacobian"))
    vectorize_clients: Optional[bool] = opt(
        None, "run the sampled clients' local step in ONE batched pass (stacked contexts, one text-encoder "
        "call, one vmap of per-example gradients), then each client's own release and update; equal to the "
        "client-by-client loop up to float rounding. None (default): on in the in-process engine, off on "
        "Flower (one ClientApp per client, where true is an error); see README 'Vectorised clients'")


@dataclass
class PrivacyConfig:
    privacy: str = opt("none", "privacy mode: none, dp (honest accounting), reference (public "
                       "code's calibration, its eps is a claim)", ("none", "dp", "reference"))
    epsilon: Optional[float] = opt(None, "target epsilon; calibrates the noise multipliers")
    delta: float = opt(1e-5, "target delta")
    clip_norm: float = opt(1.0, "clipping bound C (per clipping unit)")
    clip_unit: str = opt("example", "clipping unit: example, microbatch:M, batch")
    noise_multiplier_local: Optional[float] = opt(None, "local noise multiplier (None: calibrate)")
    noise_multiplier_global: Optional[float] = opt(None, "global noise multiplier (None: calibrate)")
    budget_split: float = opt(0.5, "share of epsilon given to the local mechanism when calibrating")
    sampling: str = opt("poisson", "minibatch sampling: poisson (amplified) or shuffle (not)",
                        ("poisson", "shuffle"))
    dp_level: str = opt("example", "global DP unit: example, or client (fedavg protocol only)",
                        ("example", "client"))
    noise_seed: Optional[int] = opt(None, "seed of the noise and batch-selection generators (None: secret, "
                                    "from the OS CSPRNG; N: reproducible, public noise, labelled noise_secret=false)")
    accountant: str = opt("pld", "accountant that calibrates and reports eps: pld (tight: min of PLD and RDP) "
                          "or rdp", ("pld", "rdp"))
    secure_noise: bool = opt(False, "draw Gaussian noise and Poisson batches from the OS CSPRNG (4 Box-Muller "
                             "normals per value, Holohan & Braghin 2021); slower")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    SECTIONS = ("model", "data", "train", "privacy")

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {s: asdict(getattr(self, s)) for s in self.SECTIONS}

    META = ("dpfpl_version", "run_id")  # run-directory facts stored beside the fields in config.json

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        """A config from a mapping; the run-directory keys in :attr:`META` are ignored."""
        cfg = cls()
        cfg.update({k: v for k, v in d.items() if k not in cls.META}, source=source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(load_mapping(path), source=str(path))

    def update(self, d: dict[str, Any], source: str = "config") -> "RunConfig":
        """Set fields from a nested (``{'train': {...}}``) or flat (``{'rounds': 5}``) mapping."""
        index = field_index()
        for key, value in d.items():
            if key in self.SECTIONS and isinstance(value, dict):
                for k, v in value.items():
                    if k not in index or index[k][0] != key:
                        raise ConfigError(f"{source}: unknown option {key}.{k}")
                    setattr(getattr(self, key), k, coerce(index[k][1].type, v, f"{key}.{k}"))
            elif key in index:
                section, f = index[key]
                setattr(getattr(self, section), key, coerce(f.type, value, f"{section}.{key}"))
            else:
                raise ConfigError(f"{source}: unknown option {key!r}")
        return self

    # ---------------------------------------------------------------- validation
    @property
    def batch_sampling(self) -> str:
        """How batches are drawn: ``privacy.sampling``, except in reference mode, which runs the
        public code's shuffled fixed-size batches (engines and mechanisms read it here)."""
        return "shuffle" if self.privacy.privacy == "reference" else self.privacy.sampling

    def validate(self) -> "RunConfig":
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        for section in self.SECTIONS:
            obj = getattr(self, section)
            for f in fields(obj):
                choices = f.metadata.get("choices")
                v = getattr(obj, f.name)
                if choices is not None and v not in choices:
                    raise ConfigError(f"{section}.{f.name}={v!r} is not one of {list(c for c in choices if c is not None)}")
        t, d, p = self.train, self.data, self.privacy
        positive = {"train.rounds": t.rounds, "train.batch_size": t.batch_size, "train.lr": t.lr,
                    "train.n_ctx": t.n_ctx, "train.rank": t.rank, "data.num_clients": d.num_clients,
                    "train.eval_every": t.eval_every, "privacy.clip_norm": p.clip_norm}
        if t.local_steps is not None:
            positive["train.local_steps"] = t.local_steps
        if t.global_lr is not None:
            positive["train.global_lr"] = t.global_lr
        if d.shots is not None:
            positive["data.shots"] = d.shots
        for name in ("train_per_class", "test_per_class"):
            v = getattr(d, name)
            if v is not None:
                positive[f"data.{name}"] = v
                if d.dataset != "synthetic":
                    raise ConfigError(f"data.{name} applies to the synthetic dataset only, not {d.dataset!r}")
        for name, v in positive.items():
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be positive, got {v!r}")
        if t.vectorize_clients is not None and not isinstance(t.vectorize_clients, bool):
            raise ConfigError(f"train.vectorize_clients must be true, false or none, got {t.vectorize_clients!r}")
        if not 0 < t.client_fraction <= 1:
            raise ConfigError(f"train.client_fraction must be in (0, 1], got {t.client_fraction!r}")
        if not 0 <= t.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {t.momentum!r}")
        if t.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, got {t.weight_decay!r}")
        if not 0 <= d.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {d.val_fraction!r}")
        if d.dirichlet_beta <= 0:
            raise ConfigError(f"data.dirichlet_beta must be positive, got {d.dirichlet_beta!r}")
        if p.epsilon is not None and not (p.epsilon > 0 and math.isfinite(p.epsilon)):
            raise ConfigError(f"privacy.epsilon must be positive, got {p.epsilon!r}")
        if not 0 < p.delta < 1:
            raise ConfigError(f"privacy.delta must be in (0, 1), got {p.delta!r}")
        if not 0 <= p.budget_split <= 1:
            raise ConfigError(f"privacy.budget_split must be in [0, 1], got {p.budget_split!r}")
        for name in ("noise_multiplier_local", "noise_multiplier_global"):
            v = getattr(p, name)
            if v is not None and not (v >= 0 and math.isfinite(v)):
                raise ConfigError(f"privacy.{name} must be a finite number >= 0, got {v!r}")
        if p.noise_seed is not None and p.noise_seed < 0:
            raise ConfigError(f"privacy.noise_seed must be >= 0 (leave it unset for secret noise), got {p.noise_seed!r}")
        if p.secure_noise and p.noise_seed is not None:
            raise ConfigError("privacy.secure_noise draws from the OS CSPRNG; it cannot be combined with "
                              f"privacy.noise_seed={p.noise_seed}")
        self._check_privacy_options_take_effect()
        return self

    #: privacy options and the modes in which they take effect
    _PRIVACY_OPTION_MODES = {
        "epsilon": ("dp", "reference"), "delta": ("dp", "reference"), "clip_norm": ("dp", "reference"),
        "noise_multiplier_local": ("dp",), "noise_multiplier_global": ("dp",), "budget_split": ("dp",),
        "clip_unit": ("dp",), "dp_level": ("dp",), "noise_seed": ("dp", "reference"),
        "secure_noise": ("dp", "reference"), "accountant": ("dp", "reference"),
    }

    def _check_privacy_options_take_effect(self) -> None:
        """A privacy option set away from its default in a mode where it cannot act is an error
        (e.g. ``--epsilon 1`` without ``--privacy dp`` would otherwise train non-privately)."""
        p, default = self.privacy, PrivacyConfig()
        for name, modes in self._PRIVACY_OPTION_MODES.items():
            if p.privacy not in modes and getattr(p, name) != getattr(default, name):
                hint = "set --privacy dp" if p.privacy == "none" else "reference mode uses the public code's own rule"
                raise ConfigError(f"privacy.{name}={getattr(p, name)!r} has no effect with privacy={p.privacy} ({hint})")
        if p.privacy == "dp" and p.budget_split in (0.0, 1.0) and (
                p.noise_multiplier_local is None and p.noise_multiplier_global is None):
            raise ConfigError(f"privacy.budget_split={p.budget_split!r} must be strictly between 0 and 1 "
                              "(it shares the budget between the local and the global noise)")



# -------------------------------------------------------------------- helpers

def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Flat field name -> (section, Field) for every section of :class:`RunConfig`."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    hints = {s: typing.get_type_hints(t) for s, t in _section_types().items()}
    for section, typ in _section_types().items():
        for f in fields(typ):
            assert f.name not in out, f"duplicate config field {f.name}"
            f.type = hints[section][f.name]
            out[f.name] = (section, f)
    return out


def _section_types() -> dict[str, type]:
    return {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "privacy": PrivacyConfig}


def base_type(tp: Any) -> tuple[type, bool]:
    """(underlying type, optional?) of an annotation such as ``Optional[int]``."""
    if isinstance(tp, str):
        tp = eval(tp, {"Optional": Optional, "Any": Any})  # annotations are strings (PEP 563)
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return tp, False


def coerce(tp: Any, value: Any, name: str) -> Any:
    """Convert ``value`` (from TOML, JSON or a CLI string) to the field's type, or raise."""
    typ, optional = base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{name} may not be empty")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            if isinstance(value, bool):
                raise ValueError(value)
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if typ is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read {value!r} as {typ.__name__}") from None
    return value


def load_mapping(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file (chosen by suffix) into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        if p.suffix == ".json":
            return json.loads(p.read_text())
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {p}: {exc}") from None
