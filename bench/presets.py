"""The embedded benchmark grids (``dpfpl bench --preset NAME``) and custom grids from a file.

``default``
    The synthetic colour-shape task (:mod:`dpfpl.data.synthetic`) on the shipped tiny CLIP
    (``pretrained="builtin"``): zero-shot and the paper's four methods (PromptFL, FedOTP, FedPGP,
    DP-FPL), raw non-private, clipped-no-noise and three eps levels, three seeds, sized so that
    the whole grid runs in at most 5 minutes on 2 CPU cores (see ``DEFAULT_NOTES``).
``full``
    The default task with every method (Local only, FedPrompt and DP-FPL without residual too) and
    DP-FPL in reference mode: what the default grid leaves out to fit its time budget.
``lr-sweep``
    The learning rate per method x privacy level, chosen on a validation split carved from each
    client's training images (``val_fraction``), on seeds the reported grids do not use; writes
    ``table_lr_choice`` and ``tuned_lr.json`` (a grid's ``tuned`` mapping).
``paper``
    The DP-FPL paper's setting (Tran et al., ICLR 2025, Tables 2-3): ViT-B/16, Caltech101 /
    OxfordPets / OxfordFlowers / Food101 with the pathological split, 10 clients, 100 rounds,
    batch 32, rank 8 (and ranks 1, 2, 4, 8 for DP-FPL with and without the residual),
    eps 0.4 / 0.2 / 0.1 / 0.05 / 0.01, 5 seeds. Needs ``--root`` (CoOp layout) and local ViT-B/16
    weights (``--pretrained PATH``, or the ``openai`` tag already in the open_clip cache); the
    paper's published numbers are shown next to ours.
``cifar100``
    CIFAR-100 with a Dirichlet(0.3) label split over 25 and 50 clients (the paper's second
    setting, ResNet-50 CLIP, 200 rounds). Needs ``--root`` and local RN50 weights.

A custom grid is a TOML or JSON file: a ``[bench]`` table with :class:`~bench.grid.GridSpec` keys
(``preset`` to start from an embedded grid; its ``methods`` / ``epsilons`` / ``seeds`` then narrow
the preset's blocks as the CLI flags do), and any RunConfig options (by section or flat) that
become the grid's ``base``::

    [bench]
    preset = "default"          # optional: start from this preset
    name = "ranks"
    methods = ["dpfpl", "fedpgp"]
    epsilons = ["none", 2.0]
    seeds = [0, 1]
    [bench.axes]
    rank = [1, 2, 4]
    [train]
    rounds = 10
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from dpfpl.config import RunConfig, load_mapping
from dpfpl.errors import ConfigError

from .audit_hook import MECHANISM_ATTACKS
from .grid import CLIP, GridSpec

PAPER_SOURCE = ("Tran et al., ICLR 2025 (arXiv 2501.13904), Table 2 (local accuracy, rank 8) and Table 3 "
                "(neighbour accuracy), as transcribed in the project's paper digest; blank = not transcribed")
PAPER_METHODS = ["promptfl", "fedotp", "fedpgp", "dpfpl"]


def _ref(table: str, dataset: str, eps: Optional[float], values: list[float], **match: Any) -> dict[str, Any]:
    return {"table": table, "match": {"dataset": dataset, "epsilon": eps, **match},
            "values": dict(zip(PAPER_METHODS, values))}


#: Paper Table 2 (local) and Table 3 (neighbour), rank 8, in % (digest section 2).
PAPER_REFERENCE = [
    _ref("local", "caltech101", None, [94.45, 97.06, 95.21, 96.06], rank=8),
    _ref("local", "caltech101", 0.4, [82.53, 95.09, 95.12, 95.74], rank=8),
    _ref("local", "caltech101", 0.1, [80.42, 84.98, 80.01, 92.71], rank=8),
    _ref("local", "caltech101", 0.01, [78.52, 78.86, 77.23, 85.21], rank=8),
    _ref("local", "oxford_pets", None, [76.85, 99.63, 94.66, 96.91], rank=8),
    _ref("local", "oxford_pets", 0.4, [74.36, 80.03, 86.56, 95.13], rank=8),
    _ref("local", "oxford_pets", 0.1, [72.77, 59.54, 63.21, 85.25], rank=8),
    _ref("local", "oxford_flowers", None, [84.04, 97.84, 79.11, 85.75], rank=8),
    _ref("local", "oxford_flowers", 0.1, [38.25, 42.31, 52.42, 72.11], rank=8),
    _ref("local", "food101", None, [86.50, 86.65, 84.40, 86.08], rank=8),
    _ref("local", "food101", 0.1, [69.00, 70.48, 75.18, 80.57], rank=8),
    _ref("neighbor", "caltech101", 0.1, [80.83, 78.91, 79.31, 90.02], rank=8),
]

#: Paper, CIFAR-100 with 25 clients at eps 0.4 (overall accuracy; shown in the local table).
CIFAR100_REFERENCE = [_ref("local", "cifar100", 0.4, [53.69, 47.22, 58.87, 66.23], num_clients=25)]

ALL_METHODS = ["zeroshot", "local", "promptfl", "fedprompt", "fedotp", "fedpgp", "dpfpl-nores", "dpfpl"]

# The default grid (see DEFAULT_NOTES for the reasons behind each number).
DEFAULT_BASE: dict[str, Any] = {
    "dataset": "synthetic",
    "model": "dpfpl-tiny",
    "pretrained": "builtin",
    "num_clients": 4,
    "partition": "pathological",
    "rounds": 8,
    "local_steps": 8,
    "batch_size": 8,
    "n_ctx": 4,
    "rank": 2,
    "eval_every": 8,
    "clip_norm": 1.0,
}
#: Learning rates: private cells clip every example's gradient at C = 1; the non-private cells take
#: raw (unclipped, much larger) gradients, hence a much smaller step (see DEFAULT_NOTES for the sweep).
DEFAULT_LR_PRIVATE = 0.1
DEFAULT_LR_NONPRIVATE = 0.002
DEFAULT_EPSILONS = [None, 4.0, 1.0, 0.25]
#: Privacy levels of the default grid: raw non-private, clipped with no noise, then the eps levels.
DEFAULT_LEVELS = [None, CLIP, 4.0, 1.0, 0.25]
DEFAULT_SEEDS = [0, 1, 2]
#: The default grid's methods: zero-shot and the paper's Table 2 methods (see DEFAULT_NOTES).
DEFAULT_METHODS = ["zeroshot", "promptfl", "fedotp", "fedpgp", "dpfpl"]
# the synthetic task's size (config fields, so every run directory rebuilds its data from config.json)
DEFAULT_BASE.update({"train_per_class": 200, "test_per_class": 100})
DEFAULT_NOTES = [
    "Sized for <= 5 min on 2 CPU cores (two worker processes, one torch thread each): zero-shot and the "
    "paper's four methods (PromptFL, FedOTP, FedPGP, DP-FPL) x {raw non-private, clipped no noise, eps 4, 1, "
    "0.25} x 3 seeds = 63 cells. Left out to stay there: Local only, FedPrompt, DP-FPL without residual and "
    "DP-FPL in reference mode (the audits preset runs the reference mode); `dpfpl bench --preset full` runs "
    "all of them (117 cells, about twice the time). Every cell trains 4 clients x 8 rounds x 8 local steps at "
    "batch 8 with 4 context vectors (rank 2 for the low-rank methods, half of n_ctx as in the paper's rank 8 "
    "of 16); private cells dominate, because DP needs per-example gradients (about B backward passes per step) "
    "and a noise calibration.",
    "The synthetic task has 200 training images per class (3200, i.e. 800 per client under the pathological "
    "split of 16 classes over 4 clients): the Poisson sampling rate 8/800 = 0.01 gives DP a workable "
    "privacy/utility trade-off, and more images cost only their one-off feature encoding. 100 test images per "
    "class keep the standard error of an accuracy near 1 point.",
    "eps levels 4 / 1 / 0.25 (delta 1e-5), log-spaced: from 'DP costs little' to 'DP costs most of the gain "
    "over zero-shot' on this problem. Noise is calibrated by the accountant for each cell.",
    "'clipped, no noise': privacy mode dp with both noise multipliers 0 (eps = inf): the private cells' "
    "per-example clipping, Poisson sampling and learning rate without noise, so each table separates the cost "
    "of clipping (none vs clipped) from the cost of noise (clipped vs eps).",
    "Learning rate 0.1 in the clipped and private cells (every example's gradient clipped at C = 1) and 0.002 "
    "in the raw non-private ones. `dpfpl bench --preset lr-sweep` chooses the lr per method x privacy level on "
    "validation accuracy (data.val_fraction, seeds 10 and 11) and writes tuned_lr.json, which goes into this "
    "preset's `tuned` mapping once run.",
    "3 seeds: intervals are 95% t-intervals (t_{0.975,2} = 4.30), and 'best' is bold only where the paired "
    "t-test over seeds says so; the paper preset runs 5.",
    "Zero-shot uses no training data, so its accuracy holds at every eps; it is shown in every row.",
    "Membership audits (when the audits package is present) run on the seed-0 cells only, with the "
    "audits' default settings on the run directory (members: the examples client 0 trained on; "
    "non-members: test examples of its classes); their eps lower bounds are indicative, not proofs.",
]


def _default() -> GridSpec:
    return GridSpec(
        name="default",
        description="synthetic colour-shape task on the shipped tiny CLIP: zero-shot and the paper's four "
                    "methods, non-private, clipped-no-noise and eps 4 / 1 / 0.25, three seeds; <= 5 min on 2 CPU cores",
        base=dict(DEFAULT_BASE), methods=list(DEFAULT_METHODS), epsilons=list(DEFAULT_LEVELS),
        seeds=list(DEFAULT_SEEDS), notes=list(DEFAULT_NOTES),
        private_base={"lr": DEFAULT_LR_PRIVATE}, nonprivate_base={"lr": DEFAULT_LR_NONPRIVATE}, audit_seeds=[0],
    )


def _full() -> GridSpec:
    g = _default()
    g.name = "full"
    g.description = ("the default task with every method and DP-FPL in reference mode: what the default grid "
                     "leaves out to fit in 5 minutes")
    g.methods = list(ALL_METHODS)
    g.blocks = [{"name": "reference mode", "methods": ["dpfpl"], "epsilons": [e for e in DEFAULT_EPSILONS if e],
                 "private_mode": "reference"}]
    g.notes = ["The default preset's settings (see its notes) for all methods, plus DP-FPL in reference mode (the "
               "public code's calibration: batch-mean clipping, sigma = sqrt(R log(1/delta)) / eps; the eps is a "
               "claim) at the three eps: the privacy table sets its claimed eps beside what the accountant makes "
               "of the same noise."] + DEFAULT_NOTES[1:]
    return g


SWEEP_LRS = [0.002, 0.01, 0.03, 0.1, 0.3]
SWEEP_SEEDS = [10, 11]
SWEEP_NOTES = [
    "Chooses the learning rate of each method x privacy level (raw non-private, clipped no noise, eps 4 / 1 / "
    "0.25) by the highest mean validation accuracy over seeds 10 and 11 (not the reported grids' seeds): 20% of "
    "each client's training images of each class are held out (data.val_fraction = 0.2) and never trained on; "
    "the test split is never used to choose (its accuracy is shown for information).",
    "What tuning costs in privacy: the validation images belong to the clients, so on real private data every "
    "trial is a release. Picking the best of k private trials is not covered by one trial's eps: the standard "
    "accounting composes them (k x eps), and random-search bounds (Liu & Talwar 2019; Papernot & Steinke 2022) "
    "give about 3 eps plus a term in k for a randomised number of trials. The committed sweep runs on the "
    "synthetic task, a stand-in for public data with the private task's shape, so the reported eps does not "
    "include it; on private data, count the sweep in the budget or tune on public data.",
    "`dpfpl bench --preset lr-sweep --methods M ... --axis lr=...` narrows it; tuned_lr.json is the chosen "
    "mapping, ready for a preset's `tuned` field.",
]


def _lr_sweep() -> GridSpec:
    g = _default()
    return GridSpec(
        name="lr-sweep",
        description="lr per method x privacy level, chosen on a validation split of the clients' training data",
        base={**g.base, "val_fraction": 0.2}, methods=[m for m in DEFAULT_METHODS if m != "zeroshot"],
        epsilons=list(DEFAULT_LEVELS), private_base=dict(g.private_base), nonprivate_base=dict(g.nonprivate_base),
        seeds=list(SWEEP_SEEDS), axes={"lr": list(SWEEP_LRS)}, notes=list(SWEEP_NOTES), audit=False,
    )


def _paper() -> GridSpec:
    return GridSpec(
        name="paper",
        description="the DP-FPL paper's grid (Tables 2-3 and the rank ablation): ViT-B/16, four CoOp "
                    "datasets, pathological split over 10 clients, 100 rounds, batch 32",
        base={"model": "ViT-B-16", "pretrained": "openai", "num_clients": 10, "partition": "pathological",
              "rounds": 100, "batch_size": 32, "n_ctx": 16, "rank": 8, "delta": 1e-5, "eval_every": 10},
        methods=list(PAPER_METHODS),
        epsilons=[None, CLIP, 0.4, 0.2, 0.1, 0.05, 0.01],
        seeds=[0, 1, 2, 3, 4],
        axes={"dataset": ["caltech101", "oxford_pets", "oxford_flowers", "food101"], "rank": [8]},
        blocks=[{"name": "rank ablation", "methods": ["dpfpl", "dpfpl-nores"], "axes": {"rank": [1, 2, 4, 8]}}],
        reference=list(PAPER_REFERENCE), reference_source=PAPER_SOURCE,
        requires=["root", "weights"], audit_seeds=[0],
        notes=["Learning rate, clipping bound and local steps are this suite's defaults (one pass over the "
               "mean client's data per round, per-example clipping at C = 1, accountant-calibrated noise); "
               "the paper's code clips batch means and claims an eps it does not account for, so its "
               "numbers are a reference, not a target.",
               "Needs --root DIR with the CoOp layout of each dataset and ViT-B-16 weights "
               "(--pretrained /path/to/weights or the 'openai' tag in the local open_clip cache).",
               "A GPU is assumed; narrow the grid with --methods / --epsilons / --seeds / --axis dataset=..."],
    )


def _cifar100() -> GridSpec:
    return GridSpec(
        name="cifar100",
        description="CIFAR-100, Dirichlet(0.3) label split over 25 and 50 clients (the paper's second setting)",
        base={"dataset": "cifar100", "model": "RN50", "pretrained": "openai", "partition": "dirichlet",
              "dirichlet_beta": 0.3, "rounds": 200, "batch_size": 32, "n_ctx": 16, "rank": 8, "eval_every": 20},
        methods=list(PAPER_METHODS),
        epsilons=[None, 0.4, 0.2, 0.1, 0.05, 0.01],
        seeds=[0, 1, 2, 3, 4],
        axes={"num_clients": [25, 50]},
        reference=list(CIFAR100_REFERENCE), reference_source=PAPER_SOURCE + " (CIFAR-100: overall accuracy)",
        requires=["root", "weights"], audit_seeds=[0],
        notes=["Needs --root DIR holding cifar-100-python/ and RN50 CLIP weights (--pretrained PATH or the "
               "'openai' tag in the local open_clip cache). The paper reports overall accuracy for CIFAR-100; "
               "it is shown as the reference in the local-accuracy table."],
    )


# Membership attacks of the audits preset: the cheap black-box one (loss), the sound one-run audits
# (input canaries; white-box per-step canaries; final-prompt cosine canaries). The shadow-model
# attacks (shadow, lira, rmia: ~55 s a cell for 4 shadows) and the older broadcast-only
# gradient-canary run in the controls and on demand (`dpfpl audit RUN --attack lira`), to keep
# `make audits` near its ~10-minute budget on 2 cores.
AUDIT_ATTACKS = ["loss", "canary", "whitebox", "final-cosine"]
MECHANISM_TRIALS = 1_000_000  # canary world (the other world 4x): ratio ~0.8 expected at eps 1-4 (results/audits/tightness)


def _audits() -> GridSpec:
    g = _default()
    return GridSpec(
        name="audits",
        description="membership-inference audits of DP-FPL on a few-shot version of the default task (16 "
                    "shots, 16 rounds): every attack, non-private and eps 4 / 1 / 0.25 in our DP mode and in "
                    "reference mode, seed 0",
        base={**g.base, "shots": 16, "rounds": 16, "eval_every": 16}, methods=["dpfpl"], epsilons=list(DEFAULT_EPSILONS), seeds=[0],
        private_base=g.private_base, nonprivate_base=g.nonprivate_base,
        blocks=[{"name": "reference mode", "epsilons": [e for e in DEFAULT_EPSILONS if e], "private_mode": "reference"}],
        audit_attacks=list(AUDIT_ATTACKS) + list(MECHANISM_ATTACKS),  # mechanism: private cells only
        audit_options={"mechanism_trials": MECHANISM_TRIALS},
        notes=["The default task's recipe (see the default preset) with 16 training images per class (64 per "
               "client) and 16 rounds, so that every example is seen ~16 times (the default grid sees each "
               "example less than once, too little for any attack). DP-FPL only. Every cell is audited with "
               f"{', '.join(AUDIT_ATTACKS)} on client 0 (loss: its personalised model; canary: 100 mislabelled "
               "input canaries; whitebox: per-step likelihood-ratio canaries, one orthonormal direction per "
               "canary, other examples' gradients zero on the noised parts, every release observed; "
               "final-cosine: 4 random canaries read from the final global prompt with the exact null). "
               "Shadow-model attacks (shadow, lira, rmia) run in the controls.",
               "Private cells also get the mechanism-level audits (`dpfpl audit RUN --attack mechanism --attack "
               f"replay`, {MECHANISM_TRIALS:,} trials of the canary world, 4x as many of the other): a sound lower "
               "bound of the run's own release "
               "code on its worst case, and the replay check of every release's sensitivity and noise.",
               "A lower bound above the accountant's eps in our DP mode would be a bug in the mechanism or the "
               "accountant; above the claimed eps in reference mode it refutes the public code's claim.",
               "Controls (`make audits` runs them into controls/): `dpfpl audit --train --control positive` "
               "(overfitting non-private recipe: the attacks must find leakage) and `--control negative` "
               "(untrained target and shadows: AUC ~0.5, bound 0)."],
    )


PRESETS = {"default": _default, "full": _full, "lr-sweep": _lr_sweep, "audits": _audits, "paper": _paper,
           "cifar100": _cifar100}


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> GridSpec:
    if name not in PRESETS:
        raise ConfigError(f"unknown bench preset {name!r}; presets: {', '.join(PRESETS)} "
                          "(or pass --config FILE for your own grid)")
    return PRESETS[name]().normalize()


def _flatten_config(d: dict[str, Any], source: str) -> dict[str, Any]:
    """Nested or flat RunConfig mapping -> flat overrides (validated by RunConfig.update)."""
    RunConfig().update(d, source=source)
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if k in RunConfig.SECTIONS and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


def load_grid_file(path: str | Path, preset: Optional[str] = None) -> GridSpec:
    """A grid from a TOML/JSON file (see the module doc); ``preset`` is the fallback base grid."""
    data = load_mapping(path)
    bench = dict(data.pop("bench", {}) or {})
    if not isinstance(bench, dict):
        raise ConfigError(f"{path}: [bench] must be a table")
    start = bench.pop("preset", None) or preset
    grid = get_preset(start) if start else GridSpec(name=Path(path).stem, methods=list(ALL_METHODS))
    if not start:
        grid.reference, grid.requires = [], []
    d = grid.to_dict()
    unknown = sorted(set(bench) - set(d))
    if unknown:
        raise ConfigError(f"{path}: unknown [bench] key(s) {unknown}; known: {sorted(set(d))}")
    if "base" in bench:
        bench["base"] = {**d["base"], **_flatten_config(bench["base"], f"{path} [bench.base]")}
    # lists narrowing a preset narrow its blocks too (as --methods / --epsilons / --seeds do)
    narrow = {k: bench.pop(k) for k in ("methods", "epsilons", "seeds") if k in bench and start and "blocks" not in bench}
    d.update(bench)
    d["base"] = {**d["base"], **_flatten_config(data, str(path))}
    if "name" not in bench:
        d["name"] = Path(path).stem
    g = GridSpec.from_dict(d)
    return g.select(**narrow) if narrow else g
