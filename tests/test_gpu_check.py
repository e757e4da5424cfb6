"""``make gpu-check`` without a GPU: one clear line, exit status 2, nothing written."""

from __future__ import annotations

import torch

from bench import gpu_check


def test_no_cuda_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu"
    assert gpu_check.main(["--out", str(out)]) == gpu_check.NO_CUDA_STATUS == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err
    assert not out.exists()


def test_cpu_needs_smoke_and_measures_nothing_without_it(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 2
    assert "add --smoke" in capsys.readouterr().err and not out.exists()


def test_smoke_run_executes_every_part_of_the_prepared_script(tmp_path):
    """The GPU script runs end to end on the CPU at tiny sizes (so a lent GPU's minutes are not spent
    finding its bugs): every check passes, every case is timed, the vectorised rounds and the goal
    line are written, and the output says it is no GPU figure."""
    import json

    out = tmp_path / "gpu"
    rc = gpu_check.main(["--device", "cpu", "--smoke", "--models", "dpfpl-tiny", "--batch-sizes", "4",
                         "--classes", "8", "--clients", "1", "2", "--repeats", "1", "--round-repeats", "1",
                         "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["smoke"] and all(v for k, v in res["checks"].items() if k.endswith("_ok"))
    assert {"per_example_vjp_ok", "per_example_jacobian_ok", "shared_prefix_ok", "vectorised_round_ok",
            "engine_dp_ok", "engine_nonprivate_ok"} <= set(res["checks"])
    assert [r["case"] for r in res["steps"]] == ["nonprivate", "dp-vjp", "dp-vjp-full-seq", "dp-jacobian", "dp-auto"]
    assert all(r["median_ms"] > 0 and r["peak_mib"] is None for r in res["steps"])
    rounds = res["vectorised_rounds"]
    assert [(r["mode"], r["clients"]) for r in rounds["rows"]] == [("dp", 1), ("dp", 2), ("nonprivate", 1),
                                                                    ("nonprivate", 2)]
    assert all(r["max_abs_p_G_diff"] < 1e-5 for r in rounds["rows"])
    assert rounds["dp_ratio"] > 0 and "goal <= 2" in rounds["goal"]
    md = (out / "gpu_check.md").read_text()
    assert "SMOKE RUN on the CPU" in md and "## Vectorised vs sequential rounds" in md
