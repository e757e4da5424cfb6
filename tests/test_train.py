"""Run directory, resume equivalence, the CLI end to end, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dpfpl.cli import main
from dpfpl.engine import Engine
from dpfpl.errors import ConfigError, DataError
from dpfpl.rundir import RunDir

from .conftest import StopAfter
from dpfpl.data.base import Dataset, FileSplit


def _run(cfg, clip, dataset, rd, callbacks=(), state=None):
    e = Engine(cfg, clip=clip, dataset=dataset)
    if state is not None:
        e.load_state_dict(state)
    e.run((rd,) + tuple(callbacks))
    return e


@pytest.mark.parametrize("method", ["dpfpl", "fedprompt"])
def test_resume_equals_uninterrupted(tmp_path, tiny_clip, tiny_dataset, make_cfg, method):
    cfg = make_cfg(method=method, rounds=4, sampling="shuffle")
    full = RunDir(tmp_path / "full")
    full.start(cfg)
    e_full = _run(cfg, tiny_clip, tiny_dataset, full)

    part = RunDir(tmp_path / "part")
    part.start(cfg)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tiny_clip, tiny_dataset, part, callbacks=(StopAfter(2),))
    assert len(part.file("metrics.jsonl").read_text().splitlines()) == 2
    assert not part.file("summary.json").exists()
    e_res = _run(part.load_config(), tiny_clip, tiny_dataset, part, state=part.load_checkpoint())
    assert torch.equal(e_full.server.p_G, e_res.server.p_G)
    for a, b in zip(e_full.clients, e_res.clients):
        for k in a.local:
            assert torch.equal(a.local[k], b.local[k])
    assert e_full.history[-1]["local_acc"] == e_res.history[-1]["local_acc"]
    assert [r["round"] for r in e_res.history] == [1, 2, 3, 4]


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--pretrained", "none", "--rounds", "2", "--local-steps", "2", "--n-ctx", "4", "--rank", "2",
               "--method", "dpfpl", "--dataset", "synthetic", "--seed", "3", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    for k in ("method", "dataset", "rounds", "local_acc", "neighbor_acc"):
        assert k in s
    assert s["method"] == "dpfpl" and s["dataset"] == "synthetic" and s["rounds"] == 2
    assert 0 <= s["local_acc"] <= 1 and 0 <= s["neighbor_acc"] <= 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["seed"] == 3 and cfg["train"]["n_ctx"] == 4
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("round,")
    prompts = load_file(out / "prompts.safetensors")
    assert prompts["global/p_G"].shape == (4, 64) and "client0/p_L" in prompts
    mem = json.loads((out / "membership.json").read_text())
    assert len(mem["clients"]) == s["num_clients"]
    assigned = [set(c["assigned"]) for c in mem["clients"]]
    assert all(set(c["used"]) <= a for c, a in zip(mem["clients"], assigned))
    assert sum(map(len, assigned)) == len(set().union(*assigned))  # each example at most one client
    # a second train into the same directory is refused, pointing to --resume
    assert main(["train", "--pretrained", "none", "--rounds", "1", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, needle", [
    (["--method", "nope"], "valid methods: dpfpl"),
    (["--model", "NoSuchNet"], "not an open_clip architecture"),
    (["--dataset", "nope"], "synthetic"),
    (["--partition", "nope"], "pathological"),
    (["--rank", "99", "--n-ctx", "4"], "train.rank=99"),
    (["--lr", "0"], "train.lr must be positive"),
    (["--rounds", "-1"], "train.rounds must be positive"),
    (["--num-clients", "0"], "data.num_clients must be positive"),
    (["--num-clients", "999"], "num_clients"),
    (["--dataset", "caltech101", "--root", "/nonexistent/x"], "/nonexistent/x"),
    (["--pretrained", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt"),
    (["--lr", "fast"], "train.lr"),
])
def test_bad_input_gives_one_line_error(tmp_path, capsys, args, needle):
    base = [] if "--pretrained" in args else ["--pretrained", "none"]
    rc = main(["train", *base, "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("dpfpl: error: ") and sum(l.startswith("dpfpl: error") for l in lines) == 1, err
    assert needle in err, err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_cli_process_exit_status(tmp_path):
    """As a process: non-zero status and a one-line reason on stderr, no traceback."""
    res = subprocess.run([sys.executable, "-m", "dpfpl.cli", "train", "--method", "nope", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("dpfpl: error: unknown method 'nope'")
    assert "Traceback" not in res.stderr


def test_corrupt_image_mid_run_names_file_and_keeps_run_dir(tmp_path, tiny_clip, tiny_dataset, make_cfg):
    """Without the feature cache images load during training; a corrupt one stops the run with a
    DataError naming the file, and the run directory keeps the rounds finished before."""
    from PIL import Image

    paths, labels = [], []
    for i, lab in enumerate(tiny_dataset.train.labels):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(tiny_dataset.train.images[i]).save(p)
        paths.append(str(p))
        labels.append(int(lab))
    ds = Dataset("files", tiny_dataset.classnames, FileSplit(paths, labels), tiny_dataset.test)
    cfg = make_cfg(method="fedotp", rounds=30, cache_features=False, batch_size=80, local_steps=1)
    rd = RunDir(tmp_path / "run")
    rd.start(cfg)

    class Corrupt:
        def on_round_end(self, engine, row):
            if row["round"] == 1:
                (tmp_path / "img" / "5.png").write_bytes(b"not a png")

    with pytest.raises(DataError, match="5.png"):
        _run(cfg, tiny_clip, ds, rd, callbacks=(Corrupt(),))
    rows = rd.file("metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and rd.load_checkpoint()["round"] == 1
    assert not rd.file("summary.json").exists()


def test_pathological_too_many_clients(tiny_clip, tiny_dataset, make_cfg):
    with pytest.raises(ConfigError, match="num_clients"):
        Engine(make_cfg(num_clients=9), clip=tiny_clip, dataset=tiny_dataset)


def test_every_method_runs_and_zeroshot_is_reference(tiny_clip, tiny_dataset, make_cfg):
    from dpfpl.registry import method_names

    for m in method_names():
        e = Engine(make_cfg(method=m, rounds=1), clip=tiny_clip, dataset=tiny_dataset)
        last = e.run()
        assert 0 <= last["local_acc"] <= 1
        if m == "zeroshot":
            assert last["local_acc"] == e.zeroshot["local_acc"]
