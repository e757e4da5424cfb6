"""The run directory: everything a run produces, written atomically.

    RUN_DIR/config.json        resolved RunConfig (+ dpfpl version)
    RUN_DIR/metrics.jsonl      one JSON object per round (rewritten atomically every round)
    RUN_DIR/metrics.csv        the same rows, scalar columns only
    RUN_DIR/checkpoint.pt      full engine state after the last finished round (resume point)
    RUN_DIR/ledger.json        privacy accountant ledger (private runs)
    RUN_DIR/membership.json    per client: assigned and actually used training example ids
    RUN_DIR/prompts.safetensors  final global prompt and every client's local prompt tensors
    RUN_DIR/summary.json       final means and run facts (written last: its presence = finished)

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a crash never leaves a half-written file; metrics are written before the
checkpoint, and a resume drops metric rows past the checkpoint's round.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import RunConfig
from .errors import ConfigError

SCALARS = (int, float, str, bool, type(None))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _clean(obj: Any) -> Any:
    """JSON-safe: NaN -> None (a missing value), +-inf kept (written ``Infinity``: an infinite eps is
    infinite, never null), tensors -> lists."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if isinstance(v, SCALARS) and k not in cols:
                cols.append(k)
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return out.getvalue()


class RunDir:
    """Reads and writes one run directory; also the engine callback that checkpoints each round."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ lifecycle
    def start(self, cfg: RunConfig, overwrite: bool = False) -> None:
        if self.path.exists() and any(self.path.iterdir()) and not overwrite:
            if self.file("checkpoint.pt").exists() or self.file("summary.json").exists():
                raise ConfigError(f"run directory {self.path} already holds a run: use --resume {self.path} "
                                  "to continue it, or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        from . import __version__

        atomic_write_json(self.file("config.json"), {**cfg.to_dict(), "dpfpl_version": __version__})

    def load_config(self) -> RunConfig:
        f = self.file("config.json")
        if not f.is_file():
            raise ConfigError(f"--resume {self.path}: no config.json there (not a dpfpl run directory)")
        d = json.loads(f.read_text())
        d.pop("dpfpl_version", None)
        return RunConfig.from_dict(d, source=str(f))

    def load_checkpoint(self) -> dict[str, Any] | None:
        f = self.file("checkpoint.pt")
        return torch.load(f, weights_only=True) if f.is_file() else None

    # ------------------------------------------------------------------ per round
    def on_round_end(self, engine, row: dict[str, Any]) -> None:
        rows = engine.history
        atomic_write_bytes(self.file("metrics.jsonl"),
                           "".join(json.dumps(_clean(r)) + "\n" for r in rows).encode())
        atomic_write_bytes(self.file("metrics.csv"), rows_to_csv(rows).encode())
        if engine.privacy.ledger is not None:
            atomic_write_json(self.file("ledger.json"), engine.privacy.ledger_json())
        atomic_write_json(self.file("membership.json"), engine.membership())
        atomic_torch_save(self.file("checkpoint.pt"), engine.state_dict())

    def finish(self, engine, summary: dict[str, Any]) -> None:
        from safetensors.torch import save as st_save

        tensors = {"global/p_G": engine.server.p_G.detach().clone().contiguous()}
        for c in engine.clients:
            for k, v in c.local.items():
                tensors[f"client{c.id}/{k}"] = v.detach().clone().contiguous()
            tensors[f"client{c.id}/context"] = c.personal_context(engine.server.p_G).clone().contiguous()
        atomic_write_bytes(self.file("prompts.safetensors"), st_save(tensors))
        atomic_write_json(self.file("membership.json"), engine.membership())
        atomic_write_json(self.file("summary.json"), summary)
