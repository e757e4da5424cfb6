"""Membership-inference audits of a run directory or of a target trained for the audit.

Two ways to get a target (see ``issues show 4`` and ``audit.md`` of any audit):

- :func:`audit_train` (``dpfpl audit --train ...``): the recipe is trained here. Each client's
  candidate pool (its share of the partition) is split by independent fair coin flips (seeded,
  recorded in ``audit.json["design"]``): heads are trained on, tails are held out. Members and
  non-members are exchangeable, and the one-run audit's bound (Steinke et al. 2023) is a sound
  lower bound on the recipe's eps. Controls: ``positive`` (non-private, made to overfit) and
  ``negative`` (nothing trained: target and shadows are models at initialisation).
- :func:`audit_run_dir` (``dpfpl audit RUN_DIR``): members are the examples the audited client
  actually used (membership record); non-members are the test examples of its classes (and training
  examples of its classes no client was assigned). A quarter of the test non-members (seeded) is
  kept aside as RMIA's population. Membership was not randomised, so the bound is indicative only.

Shadow/reference models (attacks ``shadow``, ``lira``, ``rmia``) retrain the same recipe on random
halves of each audited client's candidate pool (complementary pairs), other clients keeping the
data they had in the target; they are cached under ``OUT/cache`` by a hash of everything that
determines them. The ``canary`` attack trains the recipe once more with input canaries (see
:mod:`audits.canary`); ``gradient-canary`` once more with white-box gradient canaries observed
through every global broadcast (see :mod:`audits.whitebox`).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from dpfpl.config import RunConfig
from dpfpl.data import load_run_dataset, partition
from dpfpl.data.base import Dataset
from dpfpl.errors import ConfigError
from dpfpl.progress import LiveProgress

from .attacks import (ATTACKS, check_shadow_count, evaluate_scores, lira_scores, loss_attack, rmia_scores,
                      shokri_attack)
from .canary import CANARY_KINDS, make_canaries
from .report import flag_attack, write_outputs
from .shadow import ModelCache, ShadowDesign, TrainedModel, build_clients, derive_seed, recipe_dict, train_model
from .target import Signals, World, load_run_dir, seeded_clip

__all__ = ["AuditSettings", "audit_run_dir", "audit_train", "POSITIVE_CONTROL", "CONTROLS", "TARGETS"]

TARGETS = ("personalized", "global")
CONTROLS = ("positive", "negative")
# non-private training made to overfit: few shots, many rounds, a high learning rate
POSITIVE_CONTROL: dict[str, Any] = {"privacy": "none", "epsilon": None, "shots": 4, "rounds": 50, "lr": 0.5,
                                    "local_steps": 20, "weight_decay": 0.0}


@dataclass
class AuditSettings:
    attacks: Sequence[str] = ("loss",)
    shadows: int = 4
    client: Union[int, str] = 0            # a client id, or "all"
    target: str = "personalized"           # or "global"
    seed: int = 0
    confidence: float = 0.95
    delta: Optional[float] = None          # default: the run's privacy.delta
    canaries: Optional[int] = None         # default: min(100, what the data allows)
    canary_kind: str = "mislabel"
    canary_data: str = "zero"              # whitebox / final-cosine: "zero" (other examples' gradients 0) or "real"
    canary_directions: str = "orthonormal" # whitebox: "orthonormal" or "coordinate" (Dirac)
    lira_variance: str = "auto"
    rmia_gamma: float = 1.0
    rmia_offline_a: float = 0.3
    population_fraction: float = 0.25
    progress: bool = False
    cache: bool = True

    def validate(self) -> "AuditSettings":
        if not self.attacks:
            raise ConfigError("--attack: name at least one attack")
        bad = [a for a in self.attacks if a not in ATTACKS]
        if bad:
            raise ConfigError(f"--attack {bad[0]!r} is unknown; valid: {', '.join(ATTACKS)}")
        self.attacks = list(dict.fromkeys(self.attacks))
        if isinstance(self.shadows, bool) or int(self.shadows) != self.shadows or self.shadows < 0:
            raise ConfigError(f"--shadows must be an integer >= 0, got {self.shadows!r}")
        self.shadows = int(self.shadows)
        check_shadow_count(self.attacks, self.shadows)
        if self.target not in TARGETS:
            raise ConfigError(f"--target {self.target!r}: expected one of {list(TARGETS)}")
        if not (isinstance(self.client, str) and self.client == "all"):
            try:
                c = int(self.client)
            except (TypeError, ValueError):
                raise ConfigError(f"--client must be a client id or 'all', got {self.client!r}") from None
            if c < 0 or c != float(self.client):
                raise ConfigError(f"--client must be a client id >= 0 or 'all', got {self.client!r}")
            self.client = c
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence must be in (0, 1), got {self.confidence!r}")
        if self.delta is not None and not 0 <= self.delta < 1:
            raise ConfigError(f"--delta must be in [0, 1), got {self.delta!r}")
        if self.canaries is not None and (isinstance(self.canaries, bool) or int(self.canaries) != self.canaries
                                          or self.canaries < 1):
            raise ConfigError(f"--canaries must be a positive integer, got {self.canaries!r}")
        if self.canary_kind not in CANARY_KINDS:
            raise ConfigError(f"--canary-kind {self.canary_kind!r}: expected one of {list(CANARY_KINDS)}")
        from .canary_directions import DIRECTION_KINDS
        from .whitebox_steps import CANARY_DATA

        if self.canary_data not in CANARY_DATA:
            raise ConfigError(f"--canary-data {self.canary_data!r}: expected one of {list(CANARY_DATA)}")
        if self.canary_directions not in DIRECTION_KINDS:
            raise ConfigError(f"--canary-directions {self.canary_directions!r}: expected one of {list(DIRECTION_KINDS)}")
        if not 0 < self.population_fraction < 1:
            raise ConfigError(f"population_fraction must be in (0, 1), got {self.population_fraction!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed!r}")
        return self


@dataclass
class Design:
    clients: list[int]                     # audited clients
    pools: dict[int, np.ndarray]           # candidate universe ids
    member: dict[int, np.ndarray]          # bool per pool entry
    fixed: dict[int, np.ndarray]           # non-audited clients' training ids (kept by shadows)
    base_sets: dict[int, np.ndarray]       # every client's training ids in the target run
    classes: dict[int, np.ndarray]
    population: dict[int, np.ndarray]      # RMIA population per audited client
    universe: bool
    kind: str                              # "randomized" | "fixed"
    members_def: str
    nonmembers_def: str


@dataclass
class Prepared:
    world: World
    recipe: RunConfig
    target: TrainedModel
    design: Design
    privacy: dict[str, Any]
    source: str
    mode: str
    control: Optional[str] = None
    untrained: bool = False
    notes: list[str] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# progress

class _Progress(LiveProgress):
    """Bars for the models an audit trains; plain status lines only when progress is on."""

    def __init__(self, enabled: bool):
        super().__init__(enabled, "[dpfpl audit]", echo=enabled)
        self.models = self.steps = None

    def start_models(self, total: int, what: str) -> None:
        if self.progress and total:
            self.models = self.progress.add_task(what, total=total)

    def model_done(self) -> None:
        if self.progress and self.models is not None:
            self.progress.advance(self.models)

    def stepper(self, rounds: int, label: str) -> Callable[[int, int], None]:
        """Step callback for one model's training (one shared bar, reset per model)."""
        if not self.progress:
            return lambda done, total: None
        if self.steps is None:
            self.steps = self.progress.add_task("", total=None)
        self.progress.reset(self.steps, total=None, description=f"  {label} steps")
        state = {"n": 0}

        def on_step(done: int, total: int) -> None:
            state["n"] += 1
            self.progress.update(self.steps, completed=state["n"], total=max(rounds * total, state["n"]))
        return on_step


# ------------------------------------------------------------------------------------------------
# helpers

def _cat(sigs: list[Signals]) -> Signals:
    return Signals(np.concatenate([s.loss for s in sigs]), np.concatenate([s.conf for s in sigs]),
                   np.concatenate([s.logit_conf for s in sigs]), np.concatenate([s.logprobs for s in sigs]))


def _ctx(model: TrainedModel, client: int, target: str) -> torch.Tensor:
    return model.p_G if target == "global" else model.contexts[client]


def _resolve_clients(client: Union[int, str], available: list[int]) -> list[int]:
    if client == "all":
        return list(available)
    if int(client) not in available:
        raise ConfigError(f"--client {client}: the run has clients {available}")
    return [int(client)]


def _privacy_info(summary: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    return {"mode": summary.get("privacy", cfg.privacy.privacy),
            "epsilon_spent": summary.get("epsilon_spent"),
            "epsilon_global": summary.get("epsilon_global"),
            "epsilon_local": summary.get("epsilon_local"),
            "epsilon_pld": summary.get("epsilon_pld"),
            "epsilon_target": summary.get("epsilon_target", cfg.privacy.epsilon),
            "epsilon_claimed": summary.get("epsilon_claimed"),
            "delta": summary.get("delta", cfg.privacy.delta),
            "dp_level": summary.get("dp_level", cfg.privacy.dp_level)}


def _eps_for(privacy: dict[str, Any], target: str) -> tuple[Optional[float], Optional[float]]:
    """(accountant eps, claimed eps) relevant to the target model."""
    spent = privacy.get("epsilon_spent")
    if target == "global" and privacy.get("epsilon_global") is not None and privacy.get("dp_level") != "client":
        spent = privacy["epsilon_global"]
    if privacy.get("mode") in (None, "none"):
        spent = None
    return spent, privacy.get("epsilon_claimed")


def _model_from_run_dir(path: Path) -> TrainedModel:
    from safetensors.torch import load_file

    t = load_file(str(path / "prompts.safetensors"))
    mem = json.loads((path / "membership.json").read_text())
    summary = json.loads((path / "summary.json").read_text())
    contexts = {int(c["client_id"]): t[f"client{int(c['client_id'])}/context"].float() for c in mem["clients"]}
    used = {int(c["client_id"]): np.asarray(c["used"], np.int64) for c in mem["clients"]}
    return TrainedModel(t["global/p_G"].float(), contexts, used, summary)


# ------------------------------------------------------------------------------------------------
# preparing a target

def _prepare_run_dir(run_dir: Union[str, Path], s: AuditSettings, clip, dataset) -> Prepared:
    rt = load_run_dir(run_dir, clip=clip, dataset=dataset)
    world, cfg = rt.world, rt.cfg
    ids = [int(c["client_id"]) for c in rt.clients]
    if sorted(ids) != list(range(len(ids))):
        raise ConfigError(f"{rt.path}: clients must be numbered 0..N-1, got {ids}")
    audited = _resolve_clients(s.client, ids)
    A = {int(c["client_id"]): np.asarray(c["assigned"], np.int64) for c in rt.clients}
    U = {int(c["client_id"]): np.asarray(c["used"], np.int64) for c in rt.clients}
    classes = {int(c["client_id"]): np.asarray(c["classes"], np.int64) for c in rt.clients}
    assigned_all = np.unique(np.concatenate(list(A.values())))
    train_labels = world.labels.numpy()[: world.n_train]
    test_labels = np.asarray(world.dataset.test.labels)
    claimed: set[int] = set()
    rng = np.random.default_rng([s.seed, 0x9091])
    pools, member, population = {}, {}, {}
    n_unassigned = 0
    for i in audited:
        test_ids = [t for t in world.test_ids(np.flatnonzero(np.isin(test_labels, classes[i]))) if int(t) not in claimed]
        unassigned = [t for t in np.flatnonzero(np.isin(train_labels, classes[i]) &
                                                ~np.isin(np.arange(world.n_train), assigned_all))
                      if int(t) not in claimed]
        claimed.update(int(t) for t in test_ids)
        claimed.update(int(t) for t in unassigned)
        perm = rng.permutation(np.asarray(test_ids, np.int64))
        n_pop = int(round(s.population_fraction * perm.size)) if perm.size >= 4 else 0
        population[i] = np.sort(perm[:n_pop])
        nonmem = np.sort(np.concatenate([perm[n_pop:], np.asarray(unassigned, np.int64)]))
        n_unassigned += len(unassigned)
        if U[i].size == 0:
            raise ConfigError(f"{rt.path}: client {i} used no training example: nothing to audit")
        if nonmem.size == 0:
            raise ConfigError(f"{rt.path}: client {i} has no non-member candidates (no test example of its classes)")
        pool = np.sort(np.concatenate([U[i], nonmem]))
        pools[i], member[i] = pool, np.isin(pool, U[i])
    fixed = {j: A[j] for j in ids if j not in audited}
    design = Design(audited, pools, member, fixed, dict(A), classes, population, universe=True, kind="fixed",
                    members_def=("training examples the audited client actually used (the run's membership "
                                 "record)"),
                    nonmembers_def=("test-split examples of the audited client's classes" +
                                    (" and training examples of those classes no client was assigned"
                                     if n_unassigned else "") +
                                    f" (minus {s.population_fraction:.0%} of the test examples kept as RMIA's "
                                    "population); never trained on by any client"))
    target = TrainedModel(rt.p_G, rt.contexts, U, rt.summary)
    notes = ["Membership in an existing run was not randomised: members (training split) and non-members "
             "(mostly test split) are exchangeable only if the two splits are i.i.d. draws of one distribution. "
             "The eps lower bounds are indicative; `dpfpl audit --train` gives sound ones."]
    if rt.clip_seed is not None:
        notes.append(f"random-init model weights rebuilt with torch seed {rt.clip_seed} (verified against the "
                     "run's recorded accuracy)")
    return Prepared(world, cfg, target, design, _privacy_info(rt.summary, cfg), source=f"run directory {rt.path}",
                    mode="run_dir", notes=notes)


def _coin_flips(n: int, seed: int, client: int) -> np.ndarray:
    """Independent fair coins for n candidates; redrawn (seeded) in the negligible event that all
    land the same way (a client needs data, and a pool needs both members and non-members)."""
    for attempt in range(1000):
        m = np.random.default_rng([seed, 0x1A, client, attempt]).random(n) < 0.5
        if n < 2 or 0 < m.sum() < n:
            return m
    raise ConfigError(f"client {client}: cannot split a pool of {n} examples")  # pragma: no cover


def _prepare_train(cfg: RunConfig, s: AuditSettings, out: Path, control: Optional[str], clip, dataset,
                   prog: _Progress, source: str, world: Optional[World] = None) -> Prepared:
    cfg = copy.deepcopy(cfg)
    notes: list[str] = []
    if control == "positive":
        cfg.update({k: v for k, v in POSITIVE_CONTROL.items() if k != "rounds"})
        cfg.train.rounds = max(cfg.train.rounds, POSITIVE_CONTROL["rounds"])
    cfg.validate()
    if world is not None:
        import dataclasses

        world = dataclasses.replace(world, extras=list(world.extras), extra_tags=list(world.extra_tags))
        dataset = world.dataset
        if world.enc.n_ctx != cfg.train.n_ctx or world.enc.cut != cfg.train.cut_text:
            from dpfpl.text import PromptTextEncoder

            world.enc = PromptTextEncoder(world.clip, dataset.classnames, cfg.train.n_ctx, cut=cfg.train.cut_text)
    else:
        if dataset is None:
            dataset = load_run_dataset(cfg)
        if clip is None:
            clip = seeded_clip(cfg.model.model, cfg.model.pretrained, cfg.model.device, seed=0)
        prog.log("encoding images")
        world = World.build(cfg, clip, dataset)
    if dataset.name != cfg.data.dataset:
        notes.append(f"dataset object {dataset.name!r} given for recipe dataset {cfg.data.dataset!r}")
    parts = partition(dataset, cfg.data.num_clients, cfg.data.partition, seed=cfg.train.seed,
                      beta=cfg.data.dirichlet_beta, shots=cfg.data.shots)
    pools_all = {cd.client_id: cd.train_idx.astype(np.int64) for cd in parts}
    classes = {cd.client_id: cd.classes.astype(np.int64) for cd in parts}
    flips = {j: _coin_flips(p.size, s.seed, j) for j, p in pools_all.items()}
    in_sets = {j: pools_all[j][flips[j]] for j in pools_all}
    audited = _resolve_clients(s.client, sorted(pools_all))
    for i in audited:
        if pools_all[i].size < 2:
            raise ConfigError(f"client {i} has {pools_all[i].size} training example(s): too few to hold half out")
    test_labels = np.asarray(dataset.test.labels)
    design = Design(audited, {i: pools_all[i] for i in audited}, {i: flips[i] for i in audited},
                    {j: in_sets[j] for j in pools_all if j not in audited}, in_sets, classes,
                    {i: world.test_ids(np.flatnonzero(np.isin(test_labels, classes[i]))) for i in audited},
                    universe=False, kind="randomized",
                    members_def=("the audited client's candidates that a fair coin put in its training data "
                                 "(the target trained on them)"),
                    nonmembers_def=("the audited client's candidates held out by the coin flips (same classes, "
                                    "same split: exchangeable with the members)"))
    untrained = control == "negative"
    cache = ModelCache(out / "cache" if s.cache else None)
    if untrained:
        key = ModelCache.key("target-untrained", recipe=recipe_dict(cfg), world=world.fingerprint(), sets=in_sets,
                             classes=classes)
        target = cache.get(key, lambda: train_model(cfg, world, build_clients(world, in_sets, classes), False,
                                                    untrained=True))
        run_path = None
    else:
        key = ModelCache.key("target", recipe=recipe_dict(cfg), world=world.fingerprint(), sets=in_sets,
                             classes=classes)
        run_path = out / "runs" / key
        if s.cache and (run_path / "summary.json").is_file():
            prog.log(f"reusing target run {run_path}")
            target = _model_from_run_dir(run_path)
        else:
            if run_path.exists():
                import shutil

                shutil.rmtree(run_path)  # an unfinished target of ours
            prog.log(f"training the target into {run_path}")
            target = train_model(cfg, world, build_clients(world, in_sets, classes), False,
                                 on_step=prog.stepper(cfg.train.rounds, "target"), out=run_path)
    if cfg.privacy.privacy != "none" and cfg.train.local_steps is None:
        notes.append("local_steps was derived from the clients' data sizes (which the coin flips change); pass "
                     "--local-steps for a data-independent recipe, as the DP analysis assumes")
    unused = sum(int(np.sum(~np.isin(in_sets[i], target.used[i]))) for i in audited)
    if unused and not untrained:
        notes.append(f"{unused} member(s) were in the training data but never sampled into a batch; they count "
                     "as members (DP protects dataset membership)")
    record = {"target_run": str(run_path) if run_path else None,
              "partition_seed": cfg.train.seed, "coin_seed": s.seed,
              "clients": {int(j): {"in": in_sets[j].tolist(), "out": pools_all[j][~flips[j]].tolist()}
                          for j in pools_all}}
    control_src = {"positive": "positive control", "negative": "negative control"}.get(control or "", "")
    return Prepared(world, cfg, target, design, _privacy_info(target.summary, cfg),
                    source=source + (f" ({control_src})" if control_src else ""), mode="train", control=control,
                    untrained=untrained, notes=notes, record=record)


# ------------------------------------------------------------------------------------------------
# attacks

def _shadow_models(prep: Prepared, s: AuditSettings, cache: ModelCache,
                   prog: _Progress) -> tuple[list[TrainedModel], ShadowDesign]:
    d, cfg, world = prep.design, prep.recipe, prep.world
    sd = ShadowDesign({i: d.pools[i] for i in d.clients}, d.fixed, d.classes, seed=derive_seed(s.seed, 1))
    models = []
    prog.start_models(s.shadows, "shadow models")
    for k in range(s.shadows):
        sets = sd.train_sets(k)
        scfg = copy.deepcopy(cfg)
        scfg.train.seed = derive_seed(s.seed, 2, k)
        key = ModelCache.key("shadow", recipe=recipe_dict(scfg), world=world.fingerprint(), sets=sets,
                             classes=d.classes, untrained=prep.untrained, universe=d.universe)
        models.append(cache.get(key, lambda: train_model(scfg, world, build_clients(world, sets, d.classes),
                                                         d.universe, untrained=prep.untrained,
                                                         on_step=prog.stepper(scfg.train.rounds, f"shadow {k + 1}"))))
        prog.model_done()
    prep.record["shadow_design_seed"] = sd.seed
    prep.record["shadow_train_seeds"] = [derive_seed(s.seed, 2, k) for k in range(s.shadows)]
    return models, sd


def _run_attacks(prep: Prepared, s: AuditSettings, out: Path, prog: _Progress) -> dict[str, Any]:
    d, world = prep.design, prep.world
    delta = s.delta if s.delta is not None else float(prep.recipe.privacy.delta)
    cache = ModelCache(out / "cache" if s.cache else None)
    results: dict[str, dict[str, Any]] = {}
    extra_notes: list[str] = []
    labels_y = np.concatenate([d.member[i] for i in d.clients])
    classes_x = np.concatenate([world.label_of(d.pools[i]) for i in d.clients])
    tgt = {i: world.signals(_ctx(prep.target, i, s.target), d.pools[i]) for i in d.clients}
    tgt_all = _cat([tgt[i] for i in d.clients])
    spent, claimed = _eps_for(prep.privacy, s.target)

    def add(name: str, scores: np.ndarray, y: np.ndarray, design: str, extra: dict[str, Any],
            eps: tuple[Optional[float], Optional[float]] = (spent, claimed)) -> None:
        r = evaluate_scores(scores, y, delta=delta, confidence=s.confidence, design=design, seed=s.seed)
        r["epsilon_spent"], r["epsilon_claimed"] = eps
        r.update(extra)
        r["flags"] = flag_attack(r)
        results[name] = r

    if "loss" in s.attacks:
        add("loss", loss_attack(tgt_all), labels_y, d.kind, {"signal": "-loss (Yeom et al. 2018)"})

    needs_shadows = [a for a in s.attacks if a in ("shadow", "lira", "rmia")]
    if needs_shadows:
        models, sd = _shadow_models(prep, s, cache, prog)
        K = len(models)
        sh = [{i: world.signals(_ctx(m, i, s.target), d.pools[i]) for i in d.clients} for m in models]
        sh_all = [_cat([x[i] for i in d.clients]) for x in sh]
        M = {i: sd.in_matrix(K, i) for i in d.clients}
        M_all = np.concatenate([M[i] for i in d.clients], axis=1)
        if "shadow" in s.attacks:
            add("shadow", shokri_attack(tgt_all, sh_all, M_all, classes_x), labels_y, d.kind,
                {"signal": "per-class logistic attack model on shadow log-probability vectors (Shokri et al. 2017)",
                 "shadows": K})
        if "lira" in s.attacks:
            phi_s = np.stack([x.logit_conf for x in sh_all])
            lr = lira_scores(tgt_all.logit_conf, phi_s, M_all, variance=s.lira_variance)
            add("lira", lr["online"], labels_y, d.kind,
                {"signal": "LiRA online (Carlini et al. 2022), logit-scaled confidence", "variance": lr["variance"],
                 "shadows": K})
            add("lira-offline", lr["offline"], labels_y, d.kind,
                {"signal": "LiRA offline (OUT shadows only)", "variance": lr["variance"], "shadows": K})
        if "rmia" in s.attacks:
            scores, modes = [], set()
            for i in d.clients:
                z = d.population[i]
                if z.size == 0:
                    raise ConfigError(f"rmia: client {i} has no population examples (test examples of its classes)")
                tz = world.signals(_ctx(prep.target, i, s.target), z)
                rz = np.stack([world.signals(_ctx(m, i, s.target), z).conf for m in models])
                rx = np.stack([x[i].conf for x in sh])
                r = rmia_scores(tgt[i].conf, rx, M[i], tz.conf, rz, gamma=s.rmia_gamma, a=s.rmia_offline_a)
                scores.append(r["scores"])
                modes.add(r["mode"])
            add("rmia", np.concatenate(scores), labels_y, d.kind,
                {"signal": "RMIA (Zarifzadeh et al. 2024): fraction of population z with LR(x, z) >= gamma",
                 "mode": "/".join(sorted(modes)), "gamma": s.rmia_gamma, "references": K,
                 "population": int(sum(d.population[i].size for i in d.clients))})

    if "gradient-canary" in s.attacks:
        from .whitebox import run_gradient_canaries

        m = int(s.canaries) if s.canaries is not None else 100
        prog.log(f"training the gradient-canary run ({m} canaries)")
        r = run_gradient_canaries(world, prep.recipe, d.base_sets, d.classes, d.clients, m, seed=derive_seed(s.seed, 4),
                                  delta=delta, confidence=s.confidence, cache=cache, untrained=prep.untrained,
                                  on_step=prog.stepper(prep.recipe.train.rounds, "gradient-canary run"))
        r.pop("_owner")
        _finish_canary_attack(r, prep, "global", "epsilon_global (the global mechanism: what this adversary observes)")
        results["gradient-canary"] = r
        extra_notes.append(
            "gradient-canary: WHITE-BOX adversary who sees every global-prompt broadcast (stronger than the paper's "
            "downstream user); Dirac-style gradient canaries in the audited client's global contributions; "
            "one extra training run; compared with the global mechanism's accountant eps")
    if "whitebox" in s.attacks:
        from .whitebox_steps import run_whitebox

        prog.log("training the white-box canary run")
        r = run_whitebox(world, prep.recipe, d.base_sets, d.classes, d.clients, s.canaries, seed=derive_seed(s.seed, 9),
                         delta=delta, confidence=s.confidence, cache=cache, data=s.canary_data,
                         kind=s.canary_directions, untrained=prep.untrained,
                         on_step=prog.stepper(prep.recipe.train.rounds, "white-box canary run"))
        _finish_canary_attack(r, prep, "spent")
        results["whitebox"] = r
        extra_notes.append(
            "whitebox: WHITE-BOX adversary who sees every step's noised release (local and global parts) and chooses "
            f"gradients; {r['m']} secret {s.canary_directions} gradient canaries, each in the audited client's data by "
            f"a fair coin, other examples' gradients {'zero on the noised parts' if s.canary_data == 'zero' else 'real'}; "
            "per-step likelihood-ratio scores; compared with the batch mechanism's accountant eps")
    if "final-cosine" in s.attacks:
        from .final_cosine import run_final_cosine

        prog.log("training the final-cosine canary run")
        r = run_final_cosine(world, prep.recipe, d.base_sets, d.classes, d.clients, s.canaries,
                             seed=derive_seed(s.seed, 10), delta=delta, confidence=s.confidence, cache=cache,
                             data=s.canary_data, untrained=prep.untrained,
                             on_step=prog.stepper(prep.recipe.train.rounds, "final-cosine canary run"))
        _finish_canary_attack(r, prep, "global")
        results["final-cosine"] = r
        extra_notes.append(
            "final-cosine: adversary who sees the FINAL global prompt only (minus its public initial value); random "
            "unit canaries all inserted; exact null of the cosine of an unseen random direction (Andrew et al. 2024)")
    if "canary" in s.attacks:
        results_c, note = _canary_attack(prep, s, cache, delta, prog)
        results.update(results_c)
        extra_notes.append(note)
    return {"results": results, "delta": delta, "notes": extra_notes}


def _finish_canary_attack(r: dict[str, Any], prep: Prepared, which: str, compared: Optional[str] = None) -> None:
    """Accountant / claimed eps of a canary run's own summary beside its bound (``which``: "global",
    the global mechanism's eps, or "spent", the whole batch mechanism's), and the flags."""
    summ = r.pop("_summary")
    priv = _privacy_info(summ, prep.recipe) if not summ.get("untrained") else prep.privacy
    r["epsilon_spent"], r["epsilon_claimed"] = _eps_for(priv, "global" if which == "global" else "personalized")
    r["epsilon_compared"] = compared or ("epsilon_global (the released global prompt)" if which == "global" else
                                         "epsilon_spent (the batch mechanism: every release of the audited client's data)")
    r["flags"] = flag_attack(r)


def _canary_attack(prep: Prepared, s: AuditSettings, cache: ModelCache, delta: float,
                   prog: _Progress) -> tuple[dict[str, Any], str]:
    d, world, cfg = prep.design, prep.world, prep.recipe
    test_labels = np.asarray(world.dataset.test.labels)
    if s.canaries is None:
        if s.canary_kind == "mislabel":
            avail = min(int(np.isin(test_labels, d.classes[i]).sum()) for i in d.clients) * len(d.clients)
            m = max(1, min(100, avail))
        else:
            m = 100
    else:
        m = int(s.canaries)
    cs = make_canaries(world, d.clients, d.classes, m, s.canary_kind, seed=derive_seed(s.seed, 3))
    sets = {j: v.copy() for j, v in d.base_sets.items()}
    for i in d.clients:
        sel = cs.for_client(i)
        sets[i] = np.sort(np.concatenate([sets[i], cs.ids[sel][cs.included[sel]]]))
    key = ModelCache.key("canary", recipe=recipe_dict(cfg), world=world.fingerprint(), sets=sets, classes=d.classes,
                         untrained=prep.untrained)
    prog.log(f"training the canary run ({cs.ids.size} {cs.kind} canaries, {int(cs.included.sum())} inserted)")
    run = cache.get(key, lambda: train_model(cfg, world, build_clients(world, sets, d.classes), True,
                                             untrained=prep.untrained,
                                             on_step=prog.stepper(cfg.train.rounds, "canary run")))
    scores = np.zeros(cs.ids.size)
    for i in d.clients:
        sel = cs.for_client(i)
        phi_run = world.signals(_ctx(run, i, s.target), cs.ids[sel]).logit_conf
        phi_ref = world.signals(_ctx(prep.target, i, s.target), cs.ids[sel]).logit_conf
        diff = phi_run - phi_ref
        # robust per-client standardisation: a function of the released model and of the (public)
        # canary set only, not of the coin flips, so the one-run guarantee still applies
        q25, q50, q75 = np.percentile(diff, [25, 50, 75])
        scores[sel] = (diff - q50) / ((q75 - q25) / 1.349 + 1e-9)
    r = evaluate_scores(scores, cs.included, delta=delta, confidence=s.confidence, design="randomized", seed=s.seed)
    priv = _privacy_info(run.summary, cfg)
    r["epsilon_spent"], r["epsilon_claimed"] = _eps_for(priv, s.target)
    r["signal"] = ("logit-scaled confidence of the canary label, canary run minus reference (the target, trained "
                   "without canaries), standardised per client (median/IQR over all its canaries)")
    r["canaries"] = cs.describe()
    r["members_definition"] = "canaries inserted by a fair coin into the audited client's training data"
    r["flags"] = flag_attack(r)
    note = (f"canary: one extra training run of the recipe on the target's training data plus the {int(cs.included.sum())}"
            f" of {cs.ids.size} {cs.kind} canaries that fair coins inserted; members/non-members of this attack "
            "are the inserted/left-out canaries, and its accountant eps is that run's")
    prep.record["canaries"] = {"ids": cs.ids.tolist(), "labels": cs.labels.tolist(), "client": cs.client.tolist(),
                               "included": cs.included.tolist(), "source_test_idx": cs.source.tolist(),
                               "kind": cs.kind, "run_epsilon_spent": priv.get("epsilon_spent")}
    return {"canary": r}, note


# ------------------------------------------------------------------------------------------------
# report

def _finish(prep: Prepared, s: AuditSettings, out: Path, prog: _Progress) -> dict[str, Any]:
    res = _run_attacks(prep, s, out, prog)
    d = prep.design
    curves = {}
    attacks = {}
    for name, r in res["results"].items():
        curves[name] = r.pop("_roc")
        attacks[name] = r
    cl = "all clients (each scored by its own model)" if s.client == "all" else f"client {d.clients[0]}"
    desc = (f"personalised model of {cl}: its released context (global + local prompt)" if s.target == "personalized"
            else f"the global prompt alone, scored on the candidates of {cl}")
    if prep.untrained:
        desc += " AT INITIALISATION (untrained)"
    control_note = {
        "positive": ("non-private training made to overfit (" + ", ".join(f"{k}={v}" for k, v in POSITIVE_CONTROL.items()
                                                                           if v is not None) +
                     "): the attacks must find clear leakage here, or they are not working."),
        "negative": ("members and non-members are scored by the same UNTRAINED model (and untrained shadows): "
                     "AUC must be near 0.5 and the lower bounds near 0."),
    }.get(prep.control or "")
    n_mem = int(sum(int(d.member[i].sum()) for i in d.clients))
    n_non = int(sum(int((~d.member[i]).sum()) for i in d.clients))
    report = {
        "version": 1,
        "source": prep.source,
        "mode": prep.mode,
        "control": prep.control,
        "control_note": control_note,
        "target": {"kind": s.target, "client": s.client, "clients": d.clients, "description": desc,
                   "untrained": prep.untrained},
        "members": {"definition": d.members_def, "n": n_mem},
        "nonmembers": {"definition": d.nonmembers_def, "n": n_non},
        "design": {"kind": d.kind, "universe_ids": d.universe, **prep.record},
        "design_note": ("Membership randomised by fair coins: the one-run bound is a sound lower bound on eps."
                        if d.kind == "randomized" else
                        "Membership of an existing run was not randomised: eps lower bounds are indicative only."),
        "privacy": prep.privacy,
        "epsilon_spent": _eps_for(prep.privacy, s.target)[0],
        "epsilon_claimed": prep.privacy.get("epsilon_claimed"),
        "recipe": prep.recipe.to_dict(),
        "settings": {**{k: v for k, v in asdict(s).items() if k not in ("progress",)}, "delta": res["delta"],
                     "attacks": list(s.attacks)},
        "seeds": {"audit": s.seed, "recipe": prep.recipe.train.seed,
                  "shadow_design": prep.record.get("shadow_design_seed"),
                  "shadow_train": prep.record.get("shadow_train_seeds")},
        "attacks": attacks,
        "findings": [{"attack": n, **f} for n, r in attacks.items() for f in r["flags"]],
        "notes": prep.notes + res["notes"],
    }
    title = f"MIA audit: {s.target} model, client {s.client}" + (f" ({prep.control} control)" if prep.control else "")
    write_outputs(report, curves, out, title=title)
    return report


def refuse_mixed_run(run_dir: Union[str, Path]) -> None:
    """Raise ConfigError when the run directory's files come from different runs (their run ids,
    see :func:`dpfpl.rundir.mixed_run_problem`, differ): an audit of such a mix means nothing."""
    from dpfpl.rundir import mixed_run_problem

    problem = mixed_run_problem(run_dir)
    if problem is not None:
        raise ConfigError(problem)


def audit_run_dir(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None,
                  settings: Optional[AuditSettings] = None, control: Optional[str] = None,
                  clip=None, dataset: Optional[Dataset] = None) -> dict[str, Any]:
    """Audit a finished run directory; writes ``audit.json``, ``audit.md``, ``roc.png`` under ``out``
    (default ``RUN_DIR/audit``) and returns the report. With ``control``, the run's recipe
    (config.json) is retrained as that control instead (see :func:`audit_train`)."""
    s = (settings or AuditSettings()).validate()
    refuse_mixed_run(run_dir)
    out_p = Path(out) if out is not None else Path(run_dir) / "audit"
    if control is not None:
        p = Path(run_dir)
        if not (p / "config.json").is_file():
            raise ConfigError(f"{p}: no config.json: not a dpfpl run directory")
        d = json.loads((p / "config.json").read_text())
        d.pop("dpfpl_version", None)
        cfg = RunConfig.from_dict(d, source=str(p / "config.json"))
        return audit_train(cfg, out_p, s, control=control, clip=clip, dataset=dataset,
                           source=f"recipe of run directory {p}")
    with _Progress(s.progress) as prog:
        prep = _prepare_run_dir(run_dir, s, clip, dataset)
        return _finish(prep, s, out_p, prog)


def audit_train(cfg: RunConfig, out: Union[str, Path], settings: Optional[AuditSettings] = None,
                control: Optional[str] = None, clip=None, dataset: Optional[Dataset] = None,
                source: str = "target trained for the audit", world: Optional[World] = None) -> dict[str, Any]:
    """Train the recipe ``cfg`` as the audit's target (coin-flip membership) and audit it.

    ``control``: None, "positive" (non-private, overfitting recipe) or "negative" (untrained target
    and shadows). The target's run directory is written under ``out/runs`` and reused by reruns.
    ``world`` (advanced, tests): a prebuilt :class:`World` (its features are used as they are)."""
    if control not in (None,) + CONTROLS:
        raise ConfigError(f"--control {control!r}: expected one of {list(CONTROLS)}")
    s = (settings or AuditSettings()).validate()
    out_p = Path(out)
    with _Progress(s.progress) as prog:
        prep = _prepare_train(cfg, s, out_p, control, clip, dataset, prog, source, world=world)
        return _finish(prep, s, out_p, prog)
