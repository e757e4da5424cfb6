"""The benchmark harness: grid expansion, presets, resume, tables / plots / README, runs.csv, CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from bench.grid import GridSpec, axis_tag, eps_tag, parse_axis, parse_epsilon
from bench.harness import Harness, cell_status, normalize_audit
from bench.presets import ALL_METHODS, PAPER_REFERENCE, get_preset, load_grid_file, preset_names
from bench.timing import PeakMemory, Stopwatch, time_callable
from dpfpl.errors import ConfigError

TINY = {"pretrained": "none", "num_clients": 2, "rounds": 1, "local_steps": 1, "batch_size": 8, "n_ctx": 4,
        "rank": 2, "lr": 0.05}


def tiny_grid(**kw) -> GridSpec:
    d = dict(name="tiny", base=dict(TINY), methods=["dpfpl", "local", "zeroshot"], epsilons=[None], seeds=[0, 1])
    d.update(kw)
    return GridSpec.from_dict(d)


def harness(grid, out, clip, dataset, **kw) -> Harness:
    # one torch thread: tiny models gain nothing from more, and lose a lot when the cores are shared
    return Harness(grid, out, progress=False, audit=False, clip=clip, dataset=dataset, command="dpfpl bench --test",
                   threads=1, **kw)


# ------------------------------------------------------------------------------------ grid

def test_default_grid_expansion():
    from bench.presets import DEFAULT_METHODS

    g = get_preset("default")
    cells = g.cells()
    trainable = [m for m in g.methods if m != "zeroshot"]
    assert g.methods == DEFAULT_METHODS and set(trainable) == {"promptfl", "fedotp", "fedpgp", "dpfpl"}
    assert g.epsilons == [None, "clip", 4.0, 1.0, 0.25] and len(g.seeds) >= 3 and not g.blocks
    # + zero-shot once per seed
    assert len(cells) == len(trainable) * len(g.epsilons) * len(g.seeds) + len(g.seeds)
    ids = [c.id for c in cells]
    assert len(set(ids)) == len(ids)
    assert "dpfpl_eps4_s0" in ids and "dpfpl_nodp_s1" in ids and "fedpgp_clip_s2" in ids
    assert [c.id for c in cells if c.method == "zeroshot"] == ["zeroshot_nodp_s0", "zeroshot_nodp_s1", "zeroshot_nodp_s2"]
    cfg = next(c for c in cells if c.id == "dpfpl_eps4_s1").config()
    assert (cfg.privacy.privacy, cfg.privacy.epsilon, cfg.train.seed, cfg.train.method) == ("dp", 4.0, 1, "dpfpl")
    nodp = next(c for c in cells if c.id == "dpfpl_nodp_s0").config()
    assert nodp.privacy.privacy == "none"
    # clipped, no noise: dp mode, both noise multipliers 0, no target eps, the private cells' lr and clipping
    clip = next(c for c in cells if c.id == "dpfpl_clip_s0").config()
    assert (clip.privacy.privacy, clip.privacy.epsilon, clip.privacy.noise_multiplier_local,
            clip.privacy.noise_multiplier_global) == ("dp", None, 0.0, 0.0)
    assert (clip.train.lr, clip.privacy.clip_norm, clip.privacy.sampling) == \
        (cfg.train.lr, cfg.privacy.clip_norm, cfg.privacy.sampling)
    # per-privacy overrides: the learning rate of clipped (private) vs raw (non-private) gradients
    assert cfg.train.lr == g.private_base["lr"] and nodp.train.lr == g.nonprivate_base["lr"]
    assert {c.config().train.lr for c in g.select(axes={"lr": [0.3]}).cells()} == {0.3}
    # tuned per-method settings: method, method:private, method:<level>, in that order
    g.tuned = {"dpfpl": {"lr": 0.5}, "dpfpl:private": {"lr": 0.2}, "dpfpl:clip": {"lr": 0.05}}
    lrs = {c.id: c.config().train.lr for c in g.cells() if c.seed == 0}
    assert (lrs["dpfpl_nodp_s0"], lrs["dpfpl_eps4_s0"], lrs["dpfpl_clip_s0"], lrs["fedpgp_eps4_s0"]) == \
        (0.5, 0.2, 0.05, g.private_base["lr"])
    full = get_preset("full")
    assert set(full.methods) == set(ALL_METHODS) and full.seeds == g.seeds
    ref = next(c for c in full.cells() if c.id == "dpfpl_ref4_s1").config()
    assert (ref.privacy.privacy, ref.privacy.epsilon, ref.train.lr) == ("reference", 4.0, g.private_base["lr"])
    assert not [c for c in full.cells() if c.id.startswith("dpfpl_ref") and c.epsilon in (None, "clip")]
    with pytest.raises(ConfigError, match="private_mode"):
        tiny_grid(blocks=[{"methods": ["dpfpl"], "private_mode": "public"}]).cells()


def test_lr_sweep_preset():
    g = get_preset("lr-sweep")
    cells = g.cells()
    assert g.axes["lr"] == [0.002, 0.01, 0.03, 0.1, 0.3] and not set(g.seeds) & set(get_preset("default").seeds)
    assert {c.config().data.val_fraction for c in cells} == {0.2}
    assert len(cells) == 4 * 5 * 5 * len(g.seeds)


def test_audits_preset():
    g = get_preset("audits")
    ids = sorted(c.id for c in g.cells())
    assert ids == sorted(["dpfpl_nodp_s0", "dpfpl_eps4_s0", "dpfpl_eps1_s0", "dpfpl_eps0.25_s0", "dpfpl_ref4_s0",
                          "dpfpl_ref1_s0", "dpfpl_ref0.25_s0"])
    assert set(g.audit_attacks) == {"loss", "canary", "whitebox", "final-cosine", "mechanism", "replay"}
    assert g.audit_options["mechanism_trials"] >= 1_000_000
    assert all(g.audits_cell(c) for c in g.cells())
    from audits.audit import AuditSettings

    from bench.audit_hook import split_attacks

    member, _ = split_attacks(g.audit_attacks)
    opts = {k: v for k, v in g.audit_options.items() if not k.startswith("mechanism_")}
    AuditSettings(attacks=member, **opts).validate()  # the preset's membership settings are valid


def test_paper_grid_blocks_and_selection():
    g = get_preset("paper")
    cells = g.cells()
    ids = {c.id for c in cells}
    assert len(ids) == len(cells)
    # main grid: 4 datasets x 4 methods x 6 eps x 5 seeds; ablation adds ranks 1, 2, 4 for dpfpl and
    # ranks 1, 2, 4, 8 for dpfpl-nores (dpfpl at rank 8 is shared with the main grid)
    assert len(cells) == 4 * 4 * 7 * 5 + 4 * 3 * 7 * 5 + 4 * 4 * 7 * 5  # 7 levels: none, clip, 5 eps
    assert "caltech101_r8_dpfpl_eps0.1_s0" in ids and "food101_r1_dpfpl-nores_nodp_s4" in ids
    c = next(c for c in cells if c.id == "oxford-pets_r2_dpfpl_eps0.05_s3")
    cfg = c.config()
    assert (cfg.model.model, cfg.data.num_clients, cfg.train.rounds, cfg.train.batch_size, cfg.train.rank) == \
        ("ViT-B-16", 10, 100, 32, 2)
    assert g.requires == ["root", "weights"] and g.reference == PAPER_REFERENCE
    sel = g.select(methods=["promptfl"], epsilons=["none", "0.1"], seeds=[0])
    assert {c.method for c in sel.cells()} == {"promptfl"}
    assert len(sel.cells()) == 4 * 2  # ablation block (dpfpl only) dropped
    sel = g.select(methods=["dpfpl"], seeds=[0], epsilons=[0.1], axes={"dataset": ["caltech101"]})
    assert sorted(c.id for c in sel.cells()) == [f"caltech101_r{r}_dpfpl_eps0.1_s0" for r in (1, 2, 4, 8)]


def test_cifar_and_presets_listed():
    assert preset_names() == ["default", "full", "lr-sweep", "audits", "paper", "cifar100"]
    g = get_preset("cifar100")
    cfg = g.cells()[0].config()
    assert (cfg.data.dataset, cfg.data.partition, cfg.data.dirichlet_beta) == ("cifar100", "dirichlet", 0.3)
    assert {c.config().data.num_clients for c in g.cells()} == {25, 50}
    with pytest.raises(ConfigError, match="unknown bench preset"):
        get_preset("nope")


def test_parsing_and_bad_grids():
    assert parse_epsilon("none") is None and parse_epsilon("inf") is None and parse_epsilon("0.5") == 0.5
    with pytest.raises(ConfigError):
        parse_epsilon("-1")
    assert parse_axis("rank=1,2,4") == ("rank", [1, 2, 4])
    with pytest.raises(ConfigError, match="--methods"):
        parse_axis("method=dpfpl")
    assert eps_tag(None) == "nodp" and eps_tag(0.05) == "eps0.05" and axis_tag("rank", 8) == "r8"
    with pytest.raises(ConfigError, match="unknown method"):
        tiny_grid(methods=["nope"]).cells()
    with pytest.raises(ConfigError, match="set per cell"):
        tiny_grid(base={**TINY, "seed": 3}).cells()
    with pytest.raises(ConfigError, match="unknown config field"):
        tiny_grid(axes={"bogus": [1]}).cells()


def test_grid_file(tmp_path):
    f = tmp_path / "g.toml"
    f.write_text('[bench]\npreset = "default"\nmethods = ["dpfpl", "promptfl"]\nepsilons = ["none", 1.0]\n'
                 'seeds = [3]\n[bench.axes]\nrank = [1, 2]\n[train]\nrounds = 2\n')
    g = load_grid_file(f)
    assert g.name == "g" and g.base["rounds"] == 2 and g.base["dataset"] == "synthetic"
    ids = {c.id for c in g.cells()}
    assert ids == {f"r{r}_{m}_{e}_s3" for r in (1, 2) for m in ("dpfpl", "promptfl") for e in ("nodp", "eps1")}
    f.write_text("[bench]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_grid_file(f)


# ------------------------------------------------------------------------------------ run + resume + report

def test_tiny_grid_runs_resumes_and_reports(tmp_path, tiny_clip, tiny_dataset):
    out = tmp_path / "res"
    grid = tiny_grid()
    r = harness(grid, out, tiny_clip, tiny_dataset, keep_checkpoints=True).run()
    assert sorted(r.ran) == sorted(c.id for c in grid.cells()) and not r.skipped
    for name in ("runs.csv", "table_local.md", "table_local.tex", "table_local.csv", "table_neighbor.md",
                 "table_privacy.md", "table_privacy.tex", "table_cost.md", "table_cost.csv", "table_local_vs_dpfpl.md",
                 "acc_vs_eps.png", "README.md", "grid.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 6
    for col in ("method", "epsilon", "seed", "local_acc", "neighbor_acc", "wall_s", "epsilon_rdp", "epsilon_pld",
                "steps_per_s", "examples_per_s", "peak_mem_mb", "device", "cell"):
        assert col in rows[0], col
    row = next(x for x in rows if x["cell"] == "dpfpl_nodp_s0")
    assert row["epsilon"] == "" and 0 <= float(row["local_acc"]) <= 1 and float(row["wall_s"]) > 0
    assert float(row["peak_mem_mb"]) > 0 and row["device"].startswith("cpu")
    bench_rec = json.loads((out / "runs/dpfpl_nodp_s0/bench.json").read_text())
    assert bench_rec["steps_per_s"] > 0 and bench_rec["resumed"] is False
    table = (out / "table_local.md").read_text()
    assert "| dataset | eps | Zero-shot | Local only | DP-FPL | DP-FPL vs baselines (p<0.05) |" in table
    assert "| synthetic | none |" in table and "±" in table
    readme = (out / "README.md").read_text()
    assert "dpfpl bench --test" in readme and "![accuracy vs eps](acc_vs_eps.png)" in readme
    assert "finished cells: 6 of 6" in readme

    # a rerun skips every finished cell
    r2 = harness(grid, out, tiny_clip, tiny_dataset).run()
    assert r2.ran == [] and len(r2.skipped) == 6

    # interrupted cells: one with a checkpoint is resumed; one with only debris is redone from scratch
    resumed, debris = out / "runs/dpfpl_nodp_s1", out / "runs/local_nodp_s0"
    (resumed / "summary.json").unlink()
    shutil.rmtree(debris)
    debris.mkdir()
    (debris / "half-written.tmp").write_text("x")
    assert cell_status(grid.cells()[1], out / "runs") == "partial"
    r3 = harness(grid, out, tiny_clip, tiny_dataset).run()
    assert sorted(r3.ran) == ["dpfpl_nodp_s1", "local_nodp_s0"]
    assert json.loads((resumed / "bench.json").read_text())["resumed"] is True
    assert not (debris / "half-written.tmp").exists() and (debris / "summary.json").is_file()
    assert not (debris / "checkpoint.pt").exists()  # removed once finished (only needed to resume)
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 6

    # --fresh (make bench) runs every cell again, even those finished with a checkpoint kept
    before = json.loads((resumed / "bench.json").read_text())["finished_at"]
    r4 = harness(grid, out, tiny_clip, tiny_dataset, fresh=True).run()
    assert sorted(r4.ran) == sorted(c.id for c in grid.cells()) and not r4.skipped
    rec = json.loads((resumed / "bench.json").read_text())
    assert rec["resumed"] is False and rec["finished_at"] > before


def test_changed_settings_refused_then_rerun(tmp_path, tiny_clip, tiny_dataset):
    out = tmp_path / "res"
    harness(tiny_grid(methods=["local"], seeds=[0]), out, tiny_clip, tiny_dataset).run()
    changed = tiny_grid(methods=["local"], seeds=[0], base={**TINY, "lr": 0.1})
    with pytest.raises(ConfigError, match="rerun-changed"):
        harness(changed, out, tiny_clip, tiny_dataset).run()
    r = harness(changed, out, tiny_clip, tiny_dataset, rerun_changed=True).run()
    assert r.ran == ["local_nodp_s0"]
    assert json.loads((out / "runs/local_nodp_s0/config.json").read_text())["train"]["lr"] == 0.1


def test_private_cell_and_privacy_outputs(tmp_path, tiny_clip, tiny_dataset):
    # explicit noise multipliers: no calibration search (kept out of this quick test)
    grid = tiny_grid(methods=["dpfpl"], epsilons=[None, 50.0], seeds=[0],
                     base={**TINY, "noise_multiplier_local": 1.0, "noise_multiplier_global": 1.0})
    out = tmp_path / "res"
    harness(grid, out, tiny_clip, tiny_dataset).run()
    rows = list(csv.DictReader((out / "runs.csv").open()))
    priv = next(r for r in rows if r["cell"] == "dpfpl_eps50_s0")
    assert float(priv["epsilon"]) == 50.0 and float(priv["epsilon_rdp"]) > 0 and float(priv["epsilon_pld"]) > 0
    assert (out / "eps_accounting.png").is_file()
    assert "| synthetic | DP-FPL | 50 |" in (out / "table_privacy.md").read_text()
    assert "![eps: target / claimed vs accounted (RDP, PLD) vs empirical](eps_accounting.png)" in (out / "README.md").read_text()


def test_audit_hook_called_and_normalised(tmp_path, tiny_clip, tiny_dataset, monkeypatch):
    calls = []

    def fake_audit(run_dir, settings=None, clip=None, dataset=None):
        calls.append((Path(run_dir).name, clip is tiny_clip, dataset is tiny_dataset, tuple(settings.attacks)))
        return {"attacks": {"loss": {"auc": 0.6, "tpr_at_1pct_fpr": 0.02, "eps_lower_bound": 0.1},
                            "lira": {"auc": 0.7, "tpr_at_1pct_fpr": 0.05, "eps_lower_bound": 0.4,
                                     "roc": {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1]}}}}

    monkeypatch.setattr("bench.harness.find_audit_hook", lambda: fake_audit)
    out = tmp_path / "res"
    h = Harness(tiny_grid(methods=["local"], seeds=[0], audit_attacks=["loss", "lira"], audit_options={"shadows": 2}),
                out, progress=False, audit=True, clip=tiny_clip, dataset=tiny_dataset, threads=1)
    h.run()
    assert calls == [("local_nodp_s0", True, True, ("loss", "lira"))]
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert float(rows[0]["audit_auc"]) == 0.7 and float(rows[0]["audit_eps_lower_bound"]) == 0.4
    assert "audit AUC" in (out / "table_privacy.md").read_text()
    audit_rows = [x for x in (out / "table_audit.md").read_text().splitlines() if x.startswith("| synthetic")]
    assert len(audit_rows) == 2 and "| lira | 0.7 | 0.05 |" in audit_rows[1]
    assert "error" in normalize_audit({"attacks": {}})


# ------------------------------------------------------------------------------------ timing + CLI

def test_timing_helpers():
    t = time_callable(lambda: sum(range(1000)), "sum", warmup=1, repeats=5, device="cpu")
    assert t.repeats == 5 and t.min_s <= t.median_s <= max(t.times_s) and t.device.startswith("cpu")
    with Stopwatch("cpu") as sw, PeakMemory("cpu") as mem:
        x = bytearray(32 * 2**20)
        x[::4096] = b"\x01" * len(x[::4096])
    assert sw.seconds > 0 and mem.peak_mb > 32 and mem.kind == "cpu_rss"


def test_cli_list_and_dry_run(tmp_path, capsys):
    from dpfpl.cli import main

    assert main(["bench", "--list"]) == 0
    assert "default" in capsys.readouterr().out
    assert main(["bench", "--dry-run", "--out", str(tmp_path / "o"), "--methods", "dpfpl", "zeroshot",
                 "--epsilons", "none", "2", "--seeds", "0", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert "dpfpl_nodp_s0" in out and "dpfpl_eps2_s0" in out and "zeroshot_nodp_s0" in out and "3 cells" in out
    assert main(["bench", "--preset", "paper", "--dry-run", "--out", str(tmp_path / "p"), "--seeds", "0",
                 "--methods", "dpfpl", "--epsilons", "0.1", "--axis", "dataset=caltech101"]) == 0
    assert "4 cells" in capsys.readouterr().out


def test_paper_preset_fails_fast_without_root(tmp_path, capsys):
    from dpfpl.cli import main

    rc = main(["bench", "--preset", "paper", "--out", str(tmp_path / "p"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--root" in err
    assert not (tmp_path / "p" / "runs").exists()


def test_cli_options_reach_every_cell():
    from bench.cli import build_grid
    from dpfpl.cli import build_parser

    args = build_parser().parse_args(["bench", "--lr", "0.3", "--rounds", "2", "--method", "dpfpl", "--seed", "4",
                                      "--epsilons", "none", "1"])
    cells = build_grid(args).cells()
    assert sorted(c.id for c in cells) == ["dpfpl_eps1_s4", "dpfpl_nodp_s4"]
    assert {(c.config().train.lr, c.config().train.rounds) for c in cells} == {(0.3, 2)}


def test_audit_killed_midway_is_completed_by_a_rerun(tmp_path, tiny_clip, tiny_dataset, monkeypatch):
    """A kill during a cell's audit (simulated: the hook raises KeyboardInterrupt) leaves the cell
    unfinished (pending, checkpoint kept); a rerun audits it without training it again."""
    calls = []

    def audit(run_dir, settings=None, clip=None, dataset=None):
        calls.append(Path(run_dir).name)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed mid-audit
        return {"attacks": {"loss": {"auc": 0.61, "tpr_at_1pct_fpr": 0.03, "eps_lower_bound": 0.2}}}

    monkeypatch.setattr("bench.harness.find_audit_hook", lambda: audit)
    out = tmp_path / "res"
    grid = tiny_grid(methods=["local"], seeds=[0], audit_attacks=["loss"])

    def run():
        return Harness(grid, out, progress=False, audit=True, clip=tiny_clip, dataset=tiny_dataset, threads=1).run()

    with pytest.raises(KeyboardInterrupt):
        run()
    d = out / "runs" / "local_nodp_s0"
    assert (d / "summary.json").is_file() and (d / "checkpoint.pt").is_file() and not (d / "audit.json").exists()
    assert cell_status(grid.cells()[0], out / "runs") == "partial"
    trained = (d / "summary.json").read_text(), (d / "metrics.jsonl").read_text()

    r = run()
    assert calls == ["local_nodp_s0", "local_nodp_s0"] and r.ran == ["local_nodp_s0"]
    assert ((d / "summary.json").read_text(), (d / "metrics.jsonl").read_text()) == trained  # not retrained
    assert json.loads((d / "audit.json").read_text())["auc"] == 0.61
    assert float(next(csv.DictReader((out / "runs.csv").open()))["audit_auc"]) == 0.61
    assert not (d / "checkpoint.pt").exists() and not (d / "cell.pending").exists()
    assert cell_status(grid.cells()[0], out / "runs") == "done"
    assert run().skipped == ["local_nodp_s0"] and len(calls) == 2


def test_tiny_lr_sweep_chooses_on_validation(tmp_path, tiny_clip, tiny_dataset):
    grid = tiny_grid(methods=["local"], seeds=[0, 1], axes={"lr": [0.01, 0.5]}, base={**TINY, "val_fraction": 0.3})
    out = tmp_path / "sweep"
    harness(grid, out, tiny_clip, tiny_dataset).run()
    rows = list(csv.DictReader((out / "runs.csv").open()))
    val = {lr: sum(float(r["val_local_acc"]) for r in rows if float(r["lr"]) == lr) / 2 for lr in (0.01, 0.5)}
    test = {lr: sum(float(r["local_acc"]) for r in rows if float(r["lr"]) == lr) / 2 for lr in (0.01, 0.5)}
    best = max(val, key=val.get)
    assert json.loads((out / "tuned_lr.json").read_text()) == {"local:none": {"lr": best}}
    choice = list(csv.DictReader((out / "table_lr_choice.csv").open()))
    assert len(choice) == 1 and float(choice[0]["chosen_lr"]) == best
    assert float(choice[0]["val_mean_pct"]) == pytest.approx(100 * val[best])
    assert float(choice[0]["test_mean_pct_at_chosen"]) == pytest.approx(100 * test[best])
    assert "## Learning rate chosen on validation data" in (out / "README.md").read_text()
