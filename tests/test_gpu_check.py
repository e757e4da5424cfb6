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
