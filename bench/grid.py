"""Benchmark grids: method x epsilon x seed (x other axes), expanded into readable cells.

A :class:`GridSpec` holds

- ``base``: flat :class:`~dpfpl.config.RunConfig` overrides shared by every cell (``rounds``,
  ``model``, ``root``...);
- the axes ``methods``, ``epsilons`` (``None`` = non-private; ``"clip"`` = clipped, no noise: privacy
  mode dp with both noise multipliers 0, the private cells' settings and ``private_base``, eps
  infinite; tagged ``clip`` in cell ids) and ``seeds``, plus ``axes``: other
  RunConfig fields to sweep (``dataset``, ``rank``, ``num_clients``...);
- ``blocks``: extra sub-grids (e.g. a rank ablation) that override some of the above; the cells
  are the union of the main grid and every block, without duplicates;
- ``private_mode``: the privacy mode of the eps cells (``dp``: honest accounting, calibrated to the
  target eps; ``reference``: the public code's calibration, eps is a claim); a block may set its
  own (the default grid adds DP-FPL in reference mode beside the honest cells); reference-mode
  cells are tagged ``ref<eps>`` instead of ``eps<eps>``;
- ``private_base`` / ``nonprivate_base``: overrides for the eps cells / the non-private cells only
  (e.g. a learning rate tuned for clipped gradients and one for raw gradients);
- ``tuned``: per-method settings (e.g. a tuned learning rate), keyed ``method`` (every cell of the
  method), ``method:private`` (its clipped and eps cells) or ``method:<level>`` (``none``, ``clip``,
  ``4``...), applied in that order after ``private_base`` / ``nonprivate_base``; the lr sweep
  writes this mapping (``tuned_lr.json``);
- ``dataset_options``: keyword options of the dataset loader (e.g. the synthetic task's size);
- ``reference``: published numbers shown next to ours in the tables.

Each :class:`Cell` has an id made of its axis values, e.g. ``dpfpl_eps0.5_s0`` or
``caltech101_r8_dpfpl_nodp_s1``; every cell of a grid has the same id layout (the union of the
axis names of all blocks), so a cell in two blocks is recognised and run once. Methods that do not
train (zero-shot) get only the non-private cell: no data is touched, so no eps applies.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from dpfpl.config import RunConfig, field_index
from dpfpl.errors import ConfigError

from .labels import CLIP  # the eps axis value of the clipped-no-noise cells

#: Cell axes handled by the grid itself (not in ``axes``).
GRID_KEYS = ("method", "epsilon", "seed")
#: Config fields the grid sets per cell; they may not appear in ``base`` or ``axes``.
CELL_KEYS = ("method", "epsilon", "seed", "privacy")
#: Short id prefixes of common axes (others use the field name).
AXIS_TAGS = {"rank": "r", "num_clients": "n", "rounds": "R", "batch_size": "b", "dirichlet_beta": "beta",
             "shots": "k", "n_ctx": "ctx", "local_steps": "K", "lr": "lr", "clip_norm": "C",
             "client_fraction": "frac", "model": "", "dataset": "", "partition": ""}
PRIVATE_MODES = ("dp", "reference")
BLOCK_KEYS = {"name", "methods", "epsilons", "seeds", "axes", "base", "private_mode"}


#: Overrides of a clipped-no-noise cell (on top of ``private_base``): DP mode, no noise, no target.
CLIP_OVERRIDES = {"privacy": "dp", "epsilon": None, "noise_multiplier_local": 0.0, "noise_multiplier_global": 0.0}

Epsilon = Optional[float | str]  # None (non-private), CLIP, or a target eps


def eps_tag(eps: Epsilon, mode: str = "dp") -> str:
    """``nodp``, ``clip``, ``eps0.5`` (honest DP) or ``ref0.5`` (reference mode: 0.5 is the claimed eps)."""
    if eps is None:
        return "nodp"
    if eps == CLIP:
        return CLIP
    return f"{'ref' if mode == 'reference' else 'eps'}{eps:g}"


def eps_label(eps: Epsilon) -> str:
    return "none" if eps is None else ("clipped, no noise" if eps == CLIP else f"{eps:g}")


def parse_epsilon(v: Any) -> Epsilon:
    """``None``/'none'/'inf'/'nodp' -> None (non-private); 'clip' -> CLIP (clipped, no noise);
    otherwise a positive float."""
    if v is None:
        return None
    if isinstance(v, str) and v.strip().lower() in (CLIP, "clipped", "clip-only", "nonoise"):
        return CLIP
    if isinstance(v, str) and v.strip().lower() in ("none", "null", "inf", "nodp", "nonprivate", "non-private", ""):
        return None
    try:
        e = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"epsilon {v!r} is neither a positive number nor 'none'") from None
    if math.isinf(e):
        return None
    if not (e > 0 and math.isfinite(e)):
        raise ConfigError(f"epsilon must be positive (or 'none' for non-private), got {v!r}")
    return e


def _slug(v: Any) -> str:
    s = f"{v:g}" if isinstance(v, float) else str(v)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", s).strip("-") or "x"


def axis_tag(name: str, value: Any) -> str:
    return f"{AXIS_TAGS.get(name, name)}{_slug(value)}"


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    id: str
    method: str
    epsilon: Epsilon   # None: non-private; CLIP: clipped, no noise; else the target eps
    seed: int
    axes: tuple[tuple[str, Any], ...]       # (name, value) of every extra axis, in id order
    overrides: tuple[tuple[str, Any], ...]  # complete flat RunConfig overrides of this cell
    dataset_options: tuple[tuple[str, Any], ...] = ()

    @property
    def private(self) -> bool:
        """Whether the cell runs a DP mechanism (clipped-no-noise cells do: per-example clipping)."""
        return self.epsilon is not None

    def overrides_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    def config(self) -> RunConfig:
        """The cell's RunConfig (a fresh copy: callers may change it)."""
        cached = self.__dict__.get("_cfg")
        if cached is None:
            cached = RunConfig().update(self.overrides_dict(), source=f"cell {self.id}").validate()
            object.__setattr__(self, "_cfg", cached)
        return copy.deepcopy(cached)

    def spec(self) -> dict[str, Any]:
        """What identifies the cell's work (compared on resume)."""
        return {"id": self.id, "method": self.method, "epsilon": self.epsilon, "seed": self.seed,
                "axes": {k: v for k, v in self.axes}, "config": self.config().to_dict(),
                "dataset_options": dict(self.dataset_options)}

    def key(self) -> dict[str, Any]:
        """Axis values by name (dataset included), for tables."""
        cfg = self.overrides_dict()
        return {"dataset": cfg.get("dataset", RunConfig().data.dataset), **dict(self.axes),
                "method": self.method, "epsilon": self.epsilon, "seed": self.seed}


def _known_attacks() -> Optional[tuple[str, ...]]:
    """Membership and mechanism-level attack names, or None without the audits package."""
    try:
        from audits.attacks import ATTACKS
        from audits.mechanism_run import MECHANISM_ATTACKS
    except ImportError:
        return None
    return tuple(ATTACKS) + tuple(MECHANISM_ATTACKS)


@dataclass
class GridSpec:
    name: str
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    methods: list[str] = field(default_factory=list)
    epsilons: list[Optional[float]] = field(default_factory=lambda: [None])
    seeds: list[int] = field(default_factory=lambda: [0])
    axes: dict[str, list[Any]] = field(default_factory=dict)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    private_mode: str = "dp"
    private_base: dict[str, Any] = field(default_factory=dict)     # overrides for the eps cells only
    nonprivate_base: dict[str, Any] = field(default_factory=dict)  # overrides for the non-private cells only
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # "method[:private|:<level>]" -> overrides
    dataset_options: dict[str, Any] = field(default_factory=dict)
    reference: list[dict[str, Any]] = field(default_factory=list)
    reference_source: str = ""
    requires: list[str] = field(default_factory=list)   # "root", "weights"
    notes: list[str] = field(default_factory=list)
    audit: bool = True   # run the audit hook when audits are available
    audit_attacks: list[str] = field(default_factory=lambda: ["loss"])  # attacks of the audited cells
    audit_options: dict[str, Any] = field(default_factory=dict)         # AuditSettings fields + mechanism_trials/_seed
    audit_seeds: Optional[list[int]] = None  # audit only the cells of these seeds (None: all)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GridSpec":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"bench grid: unknown key(s) {unknown}; known: {sorted(known)}")
        g = cls(**copy.deepcopy(d))
        g.normalize()
        return g

    def audits_cell(self, cell: "Cell") -> bool:
        """Whether audits (when enabled) cover ``cell`` (zero-shot trains nothing: never audited)."""
        from dpfpl.registry import get_method

        return get_method(cell.method).trainable and (self.audit_seeds is None or cell.seed in self.audit_seeds)

    def copy(self) -> "GridSpec":
        return GridSpec.from_dict(self.to_dict())

    def normalize(self) -> "GridSpec":
        self.methods = [str(m) for m in self.methods]
        self.epsilons = [parse_epsilon(e) for e in self.epsilons]
        self.seeds = [_as_int(s, "seed") for s in self.seeds]
        self.axes = {str(k): list(v) if isinstance(v, (list, tuple)) else [v] for k, v in self.axes.items()}
        for b in self.blocks:
            if "epsilons" in b:
                b["epsilons"] = [parse_epsilon(e) for e in b["epsilons"]]
            if "seeds" in b:
                b["seeds"] = [_as_int(s, "seed") for s in b["seeds"]]
        return self

    # ------------------------------------------------------------------ selection from the CLI
    def select(self, methods: Optional[Sequence[str]] = None, epsilons: Optional[Sequence[Any]] = None,
               seeds: Optional[Sequence[int]] = None, axes: Optional[dict[str, list[Any]]] = None) -> "GridSpec":
        """A copy with the given lists: they replace the main grid's lists, and are intersected with
        the lists a block sets itself (``--methods dpfpl`` keeps a dpfpl-only ablation block and
        drops a fedpgp-only one)."""
        g = self.copy()
        repl = {"methods": list(methods) if methods else None,
                "epsilons": [parse_epsilon(e) for e in epsilons] if epsilons else None,
                "seeds": [_as_int(s, "seed") for s in seeds] if seeds else None}
        for name, val in repl.items():
            if val is None:
                continue
            setattr(g, name, val)
            for b in g.blocks:
                if name in b:
                    b[name] = [x for x in b[name] if x in val]
        for name, vals in (axes or {}).items():
            g.axes[name] = list(vals)
            for b in g.blocks:
                if name in b.get("axes", {}):
                    b["axes"][name] = [x for x in b["axes"][name] if x in vals]
        return g

    # ------------------------------------------------------------------ validation and expansion
    def validate(self) -> "GridSpec":
        from dpfpl.registry import method_names

        if self.private_mode not in PRIVATE_MODES:
            raise ConfigError(f"bench grid {self.name}: private_mode={self.private_mode!r} is not one of {list(PRIVATE_MODES)}")
        valid = set(method_names())
        index = field_index()
        for b in self.blocks:
            bad = sorted(set(b) - BLOCK_KEYS)
            if bad:
                raise ConfigError(f"bench grid {self.name}: block keys {bad} unknown; known: {sorted(BLOCK_KEYS)}")
            if b.get("private_mode", self.private_mode) not in PRIVATE_MODES:
                raise ConfigError(f"bench grid {self.name}: block {b.get('name', '?')!r}: private_mode="
                                  f"{b['private_mode']!r} is not one of {list(PRIVATE_MODES)}")
        for part in [self._main()] + self.blocks:
            for m in part.get("methods", []):
                if m not in valid:
                    raise ConfigError(f"bench grid {self.name}: unknown method {m!r}; valid: {', '.join(sorted(valid))}")
            for k in list(part.get("axes", {})) + list(part.get("base", {})):
                if k in CELL_KEYS:
                    raise ConfigError(f"bench grid {self.name}: {k!r} is set per cell by the grid "
                                      f"(use methods / epsilons / seeds / private_mode)")
                if k not in index:
                    raise ConfigError(f"bench grid {self.name}: unknown config field {k!r} in axes/base")
        for k in list(self.base) + list(self.private_base) + list(self.nonprivate_base) + \
                [f for ov in self.tuned.values() for f in ov]:
            if k in CELL_KEYS:
                raise ConfigError(f"bench grid {self.name}: {k!r} is set per cell by the grid "
                                  f"(use methods / epsilons / seeds / private_mode)")
            if k not in index:
                raise ConfigError(f"bench grid {self.name}: unknown config field {k!r} in base")
        RunConfig().update({**self.base, **self.private_base}, source=f"bench grid {self.name} base")
        RunConfig().update({**self.base, **self.nonprivate_base}, source=f"bench grid {self.name} base")
        if not self.seeds:
            raise ConfigError(f"bench grid {self.name}: no seeds")
        known = _known_attacks()
        if known is not None:
            bad = [a for a in self.audit_attacks if a not in known]
            if bad:
                raise ConfigError(f"bench grid {self.name}: audit attack {bad[0]!r} is unknown; valid: {', '.join(known)}")
        return self

    def tuned_for(self, method: str, eps: Any) -> dict[str, Any]:
        """The ``tuned`` overrides of a method at an eps axis value (see the module doc)."""
        from .labels import level_of

        out: dict[str, Any] = dict(self.tuned.get(method, {}))
        if eps is not None:
            out.update(self.tuned.get(f"{method}:private", {}))
        out.update(self.tuned.get(f"{method}:{level_of(eps)}", {}))
        return out

    def _main(self) -> dict[str, Any]:
        return {"methods": self.methods, "epsilons": self.epsilons, "seeds": self.seeds, "axes": self.axes,
                "base": {}}

    def _block(self, b: dict[str, Any]) -> dict[str, Any]:
        """A block inherits the main grid's lists and axes and overrides/extends them."""
        return {**self._main(), **b, "axes": {**self.axes, **b.get("axes", {})}}

    def axis_names(self) -> list[str]:
        names: list[str] = []
        for part in [self._main()] + self.blocks:
            for k in part.get("axes", {}):
                if k not in names:
                    names.append(k)
        return names

    def cells(self) -> list[Cell]:
        """Every cell of the grid (main grid then blocks, first occurrence kept)."""
        from dpfpl.registry import get_method

        self.validate()
        names = self.axis_names()
        index = field_index()
        out: dict[str, Cell] = {}
        for part in [self._main()] + [self._block(b) for b in self.blocks]:
            axes = part.get("axes", {})
            mode = part.get("private_mode", self.private_mode)
            combos = itertools.product(*[axes[k] for k in axes]) if axes else [()]
            for combo in combos:
                avals = dict(zip(axes, combo))
                for method in part["methods"]:
                    trainable = get_method(method).trainable
                    for eps in part["epsilons"]:
                        if eps is not None and not trainable:
                            continue
                        if eps == CLIP and mode == "reference":
                            continue  # the reference mode has no "no noise" variant: its cells are dp ones
                        by_privacy = self.nonprivate_base if eps is None else self.private_base
                        tuned = self.tuned_for(method, eps)
                        for seed in part["seeds"]:
                            ov = {**self.base, **by_privacy, **tuned, **part.get("base", {}), **avals,
                                  "method": method, "seed": seed}
                            if eps is None:
                                ov.update({"privacy": "none", "epsilon": None})
                            elif eps == CLIP:
                                ov.update(CLIP_OVERRIDES)
                            else:
                                ov.update({"privacy": mode, "epsilon": eps})
                            _fit_privacy(ov, method)
                            cfg = RunConfig().update(ov)
                            id_axes = tuple((k, _config_value(cfg, k, index)) for k in names)
                            parts = [axis_tag(k, v) for k, v in id_axes] + [method, eps_tag(eps, mode), f"s{seed}"]
                            cid = "_".join(parts)
                            cell = Cell(cid, method, eps, seed, id_axes, tuple(sorted(ov.items())),
                                        tuple(sorted(self.dataset_options.items())))
                            object.__setattr__(cell, "_cfg", cfg.validate())
                            if cid in out:
                                if out[cid].config().to_dict() != cell.config().to_dict():
                                    raise ConfigError(f"bench grid {self.name}: two different cells share the id {cid}; "
                                                      "add the axis that tells them apart to 'axes'")
                                continue
                            out[cid] = cell
        if not out:
            raise ConfigError(f"bench grid {self.name}: the selection leaves no cell to run")
        return list(out.values())


def _fit_privacy(ov: dict[str, Any], method: str) -> None:
    """Drop the noise multipliers a cell's method has no release for (a grid sets them for every
    method at once; a run config with a multiplier that cannot act is an error)."""
    from dpfpl.registry import get_method

    m = get_method(method)
    if not m.uses_local or ov.get("privacy") != "dp":
        ov.pop("noise_multiplier_local", None)
    if not m.uses_global or ov.get("privacy") != "dp":
        ov.pop("noise_multiplier_global", None)


def _config_value(cfg: RunConfig, name: str, index: dict[str, Any]) -> Any:
    section, _ = index[name]
    return getattr(getattr(cfg, section), name)


def _as_int(v: Any, name: str) -> int:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} {v!r} is not an integer") from None
    if not f.is_integer():
        raise ConfigError(f"{name} {v!r} is not an integer")
    return int(f)


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """``rank=1,2,4`` -> ('rank', [1, 2, 4]) (values coerced to the field's type)."""
    from dpfpl.config import coerce

    if "=" not in text:
        raise ConfigError(f"--axis {text!r}: expected NAME=V1,V2,...")
    name, vals = text.split("=", 1)
    name = name.strip().replace("-", "_")
    index = field_index()
    if name not in index:
        raise ConfigError(f"--axis {text!r}: unknown config field {name!r}")
    if name in CELL_KEYS:
        raise ConfigError(f"--axis {name}: use --methods / --epsilons / --seeds instead")
    f = index[name][1]
    return name, [coerce(f.type, v.strip(), name) for v in vals.split(",") if v.strip()]


def spec_json(cell: Cell) -> str:
    return json.dumps(cell.spec(), sort_keys=True)
