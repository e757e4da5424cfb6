"""The one-run microbenchmark driver (bench.microbench) and the start-up measurement's options.

No measurement runs here (speed figures belong to `make microbench`): the driver's subprocess
calls are recorded and answered with small fake result files.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import microbench, startup


def test_every_measurement_names_an_importable_module_and_writes_into_out(tmp_path):
    for quick in (False, True):
        cmds = microbench.commands(tmp_path, quick=quick)
        assert list(cmds) == list(microbench.STEPS)
        for name, c in cmds.items():
            assert importlib.util.find_spec(c[0]) is not None, c[0]
            out = c[c.index("--out") + 1]
            assert Path(out) == tmp_path or Path(out).parent == tmp_path, (name, out)
    full = microbench.commands(tmp_path)
    assert full["vectorize"][full["vectorize"].index("--clients") + 1:][:4] == ["1", "4", "16", "64"]
    bs = full["per_example"]
    assert bs[bs.index("--batch-sizes") + 1:][:5] == ["8", "32", "128", "512", "1024"]


def test_driver_runs_each_measurement_and_collects_its_tables(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, *a, **k):
        if cmd[:2] == ["git", "rev-parse"]:
            return SimpleNamespace(stdout="abc1234\n", returncode=0)
        if cmd[:2] == ["git", "status"]:
            return SimpleNamespace(stdout="", returncode=0)
        name = cmd[2].removeprefix("bench.")
        calls.append(name)
        if name == "feature_cache":
            return SimpleNamespace(returncode=3)  # a failing measurement: reported, the others kept
        (tmp_path / microbench.FILES[name]).write_text(f"# {name} table\n\n| x |\n|---|\n| {len(calls)} |\n")
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    rc = microbench.main(["--out", str(tmp_path), "--skip", "startup"])
    assert rc == 1 and calls == ["vectorize", "per_example", "feature_cache"]
    text = (tmp_path / "README.md").read_text()
    assert "at commit abc1234" in text and "FAILED (exit 3)" in text
    assert "## vectorize table" in text and "## per_example table" in text  # headings shifted one level
    assert "feature_cache table" not in text and "startup" not in text.split("| measurement |")[1]
    assert "results/gpu/" in text  # the missing GPU figures are named


def test_startup_repo_must_be_a_checkout(tmp_path, capsys):
    assert startup.main(["--repo", str(tmp_path)]) == 2
    assert "no dpfpl/cli.py" in capsys.readouterr().err


def test_startup_drops_the_cache_option_an_older_checkout_lacks(monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="usage: dpfpl train [--rounds]"))
    args = startup.train_args()
    assert "--feature-cache-dir" not in args and args[:3] == ["train", "--rounds", "1"]
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="--feature-cache-dir DIR"))
    assert startup.train_args() == startup.TRAIN_ARGS


def test_startup_row_marks_phases_an_older_checkout_does_not_print():
    m = {"help_s": 0.1, "train_help_s": 0.2, "train_phases_s": {"exit": 3.0}, "imports": [("torch", 1.5)]}
    row = startup.row("before", m, (1.0, 1.0, 1.0))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:8] == ["before", "0.10", "0.20", "-", "-", "-", "-", "3.00"] and "torch 1.50" in cells[-1]
