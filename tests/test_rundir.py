"""Run directories: one owner (lock), one run id per directory, checks before any work, one-line
errors for OS failures, and what --resume does (issue 13)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dpfpl import rundir
from dpfpl.cli import main
from dpfpl.errors import ConfigError, DpfplError
from dpfpl.rundir import RunDir, mixed_run_problem
from dpfpl.train import train

from .conftest import StopAfter

TINY = ["--pretrained", "none", "--rounds", "2", "--local-steps", "1", "--n-ctx", "4", "--rank", "2",
        "--num-clients", "2", "--batch-size", "8", "--train-per-class", "6", "--test-per-class", "3", "--no-progress"]
FILES = ("config.json", "summary.json", "metrics.jsonl", "metrics.csv", "ledger.json", "membership.json",
         "checkpoint.pt", "prompts.safetensors")


def _err_line(capsys) -> str:
    """The one error line on stderr (asserts there is exactly one and no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("dpfpl: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded (checks must come before the expensive part)."""
    def load_clip(*a, **k):
        pytest.fail("the model was loaded before the bad input was rejected")

    monkeypatch.setattr("dpfpl.engine.load_clip", load_clip)


@pytest.fixture
def finished(tmp_path_factory, tiny_clip, tiny_dataset, make_cfg):
    """A finished private run directory (explicit noise: no calibration)."""
    d = tmp_path_factory.mktemp("fin") / "run"
    cfg = make_cfg(privacy="dp", noise_multiplier_local=1.0, noise_multiplier_global=1.0)
    train(cfg, out=d, clip=tiny_clip, dataset=tiny_dataset)
    return d


# ------------------------------------------------------------------------------------ defect 1
def test_every_file_carries_the_run_id(finished):
    rid = json.loads((finished / "config.json").read_text())["run_id"]
    assert isinstance(rid, str) and len(rid) == 16
    for name in ("summary.json", "ledger.json", "membership.json"):
        assert json.loads((finished / name).read_text())["run_id"] == rid, name
    rows = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    assert [r["run_id"] for r in rows] == [rid, rid]
    assert torch.load(finished / "checkpoint.pt", weights_only=True)["run_id"] == rid
    assert mixed_run_problem(finished) is None


def test_audit_refuses_files_of_different_runs(finished, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    for name in FILES:
        (d / name).write_bytes((finished / name).read_bytes())
    s = json.loads((d / "summary.json").read_text())
    s["run_id"] = "0123456789abcdef"  # the summary of another run, as two writers leave it
    (d / "summary.json").write_text(json.dumps(s))
    assert "summary.json is from run 0123456789abcdef" in mixed_run_problem(d)
    from audits.audit import audit_run_dir

    with pytest.raises(ConfigError, match="mixes the files of different runs"):
        audit_run_dir(d)
    assert main(["audit", str(d), "--attack", "loss"]) == 2
    assert "different runs" in _err_line(capsys)
    assert not (d / "audit").exists()


def test_second_writer_is_refused_until_the_owner_dies(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from dpfpl.rundir import RunDir
            owner = RunDir({str(d)!r})
            owner.acquire()
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert owner.stdout.readline().strip() == "locked"
        assert main(["train", *TINY, "--out", str(d)]) == 2
        line = _err_line(capsys)
        assert f"in use by process {owner.pid}" in line and str(d) in line
        assert not (d / "config.json").exists()  # the second writer wrote nothing
        with pytest.raises(DpfplError, match=f"process {owner.pid}"):
            RunDir(d).acquire()
    finally:
        owner.kill()  # kill -9: the kernel releases the lock
        owner.wait()
    assert main(["train", *TINY, "--out", str(d)]) == 0
    assert json.loads((d / "summary.json").read_text())["rounds"] == 2


def test_resume_is_refused_while_the_run_is_owned(finished, capsys):
    holder = RunDir(finished)
    holder.acquire()
    try:
        assert main(["train", "--resume", str(finished)]) == 2
        assert f"in use by process {os.getpid()} (this process)" in _err_line(capsys)
    finally:
        holder.release()


# ------------------------------------------------------------------------------------ defect 3
CUDA = torch.cuda.is_available()
PRIV = ["--privacy", "dp", "--noise-multiplier-local", "1", "--noise-multiplier-global", "1"]


@pytest.mark.parametrize("args, needle", [
    (["--rank", "17", "--n-ctx", "16"], "train.rank=17"),
    (["--rank", "3", "--n-ctx", "2"], "train.rank=3"),
    ([*PRIV, "--clip-unit", "bogus"], "privacy.clip_unit='bogus'"),
    ([*PRIV, "--clip-unit", "microbatch:0"], "privacy.clip_unit='microbatch:0'"),
    ([*PRIV, "--dp-level", "client", "--protocol", "grad"], "needs the fedavg protocol"),
    (["--privacy", "dp", "--epsilon", "1", "--budget-split", "0"], "privacy.budget_split=0.0"),
    (["--privacy", "dp", "--epsilon", "1", "--budget-split", "1"], "privacy.budget_split=1.0"),
    (["--privacy", "dp"], "needs --epsilon"),
    (["--privacy", "reference"], "needs --epsilon"),
    (["--privacy", "dp", "--epsilon", "1e-12"], "cannot calibrate noise for epsilon=1e-12"),
    (["--model", "NoSuchNet"], "not an open_clip architecture"),
    (["--pretrained", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    (["--dataset", "nope", "--train-per-class", "none", "--test-per-class", "none"], "data.dataset='nope'"),
    pytest.param(["--device", "cuda"], "CUDA is not available", marks=pytest.mark.skipif(CUDA, reason="has CUDA")),
])
def test_bad_config_rejected_before_any_work(tmp_path, capsys, no_model, args, needle):
    out = tmp_path / "r"
    assert main(["train", *TINY, "--out", str(out), *args]) == 2
    assert needle in _err_line(capsys)
    assert not out.exists()  # no stub run directory


def test_api_rejects_unreachable_epsilon_without_directory(tmp_path, no_model, make_cfg, tiny_dataset):
    with pytest.raises(ConfigError, match="cannot calibrate"):
        train(make_cfg(privacy="dp", epsilon=1e-12), out=tmp_path / "r", dataset=tiny_dataset)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------ defect 4
def test_out_naming_a_file(tmp_path, capsys, no_model):
    f = tmp_path / "file.txt"
    f.write_text("keep")
    assert main(["train", *TINY, "--out", str(f)]) == 2
    assert f"--out {f} is a file" in _err_line(capsys)
    assert f.read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["train", *TINY, "--out", str(ro / "run")]) == 2
        assert f"{ro} is not writable" in _err_line(capsys)
    finally:
        ro.chmod(0o755)


def test_permission_denied_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    """What a read-only folder gives where the up-front check cannot see it (e.g. as root)."""
    def denied(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(rundir, "atomic_write_bytes", denied)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert f"cannot write {out / 'config.json'}: Permission denied; nothing was trained" in line


def test_full_disk_mid_run_stays_resumable(tmp_path, capsys, monkeypatch):
    real = rundir.atomic_write_bytes
    writes = {"metrics.jsonl": 0}

    def full_disk(path, data):
        if path.name == "metrics.jsonl":
            writes["metrics.jsonl"] += 1
            if writes["metrics.jsonl"] == 2:  # round 2's first write
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(rundir, "atomic_write_bytes", full_disk)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--rounds", "3", "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert f"cannot write {out / 'metrics.jsonl'}: No space left on device" in line
    assert f"resumable from round 1" in line and f"--resume {out}" in line
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and not (out / "summary.json").exists()
    monkeypatch.setattr(rundir, "atomic_write_bytes", real)
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rounds"] == 3 and len(s["sessions"]) == 2
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_edited_config_does_not_match_checkpoint(tmp_path, capsys, tiny_clip, tiny_dataset, make_cfg):
    d = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(rounds=3), out=d, clip=tiny_clip, dataset=tiny_dataset, callbacks=(StopAfter(1),))
    c = json.loads((d / "config.json").read_text())
    c["train"]["n_ctx"] = 8
    (d / "config.json").write_text(json.dumps(c))
    assert main(["train", "--resume", str(d)]) == 2
    assert "no longer matches the checkpoint (train.n_ctx is 8 in config.json but 4 in checkpoint.pt)" in _err_line(capsys)


def test_bad_flag_value_without_out_and_usage_errors(capsys):
    assert main(["train", "--rounds", "abc"]) == 2
    assert "train.rounds: cannot read 'abc' as int" in _err_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["train", "--engine", "nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'nope'" in err[0] and err[0].endswith("(see dpfpl train --help)")


# ------------------------------------------------------------------------------------ defect 5
@pytest.mark.parametrize("flag", ["--config", "--out"])
def test_resume_refuses_config_and_out(finished, tmp_path, capsys, flag):
    assert main(["train", "--resume", str(finished), flag, str(tmp_path / "x")]) == 2
    assert f"{flag} cannot be combined with it" in _err_line(capsys)


def test_resuming_a_finished_run_changes_nothing(finished, capsys):
    before = {n: ((finished / n).read_bytes(), (finished / n).stat().st_mtime_ns) for n in FILES}
    assert main(["train", "--resume", str(finished), "--no-progress"]) == 0
    assert f"run {finished} is already finished (2 of 2 rounds): nothing was done" in capsys.readouterr().err
    assert {n: ((finished / n).read_bytes(), (finished / n).stat().st_mtime_ns) for n in FILES} == before


def test_wall_time_accumulates_over_sessions(tmp_path, tiny_clip, tiny_dataset, make_cfg):
    d = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(rounds=3), out=d, clip=tiny_clip, dataset=tiny_dataset, callbacks=(StopAfter(1),))
    s = train(resume=d, clip=tiny_clip, dataset=tiny_dataset)
    sessions = s["sessions"]
    assert [(x["first_round"], x["last_round"]) for x in sessions] == [(1, 1), (2, 3)]
    assert s["wall_s"] == pytest.approx(sum(x["wall_s"] for x in sessions))
    assert s["wall_s"] >= s["train_s"] > 0
    assert json.loads((d / "summary.json").read_text())["wall_s"] == pytest.approx(s["wall_s"])


def test_more_rounds_on_a_finished_run_extend_it(tmp_path, tiny_clip, tiny_dataset, make_cfg):
    d = tmp_path / "run"
    first = train(make_cfg(rounds=2), out=d, clip=tiny_clip, dataset=tiny_dataset)
    s = train(resume=d, overrides={"rounds": 3}, clip=tiny_clip, dataset=tiny_dataset)
    assert s["rounds"] == 3 and s["run_id"] == first["run_id"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["train"]["rounds"] == 3 and cfg["run_id"] == first["run_id"]  # config.json stays true
    assert [json.loads(x)["round"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------------------------ defect 6
def test_top_level_help_imports_no_subcommand_module():
    code = ("import sys, contextlib, io\nfrom dpfpl.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'dp_accounting', 'audits.audit', 'bench.harness', 'open_clip') if m in sys.modules]\n"
            "print(heavy, 'account' in out.getvalue() and 'bench' in out.getvalue())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert res.stdout.strip() == "[] True", res.stdout + res.stderr


def test_account_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["account", "--help"])
    out = capsys.readouterr().out
    assert "target delta (default: 1e-05)" in out and "Poisson sampling rate q (default: 1.0)" in out


def test_zero_shot_prints_no_empty_round(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "zeroshot", "--out", str(tmp_path / "z")]) == 0
    err = capsys.readouterr().err
    assert "evaluated without training: local" in err and "round 0/0" not in err and "nan" not in err


def test_reference_mode_says_what_it_overrides(tmp_path, capsys, monkeypatch):
    def stop(*a, **k):
        raise DpfplError("stopped before the model")

    monkeypatch.setattr("dpfpl.engine.load_clip", stop)
    assert main(["train", *TINY, "--out", str(tmp_path / "r"), "--privacy", "reference", "--epsilon", "1",
                 "--sampling", "poisson", "--clip-unit", "example"]) == 2
    err = capsys.readouterr().err
    note = [x for x in err.splitlines() if x.startswith("dpfpl: note:")]
    assert len(note) == 1 and "ignores --sampling poisson (runs shuffle); --clip-unit example" in note[0]
    assert main(["train", *TINY, "--out", str(tmp_path / "r2"), "--privacy", "reference", "--epsilon", "1"]) == 2
    assert "dpfpl: note" not in capsys.readouterr().err  # nothing asked, nothing to say
