"""Start-up time of the command line: ``dpfpl --help`` and ``dpfpl train`` up to its first round.

    python -m bench.startup [--repeats 5] [--label NAME] [--out results/microbench/startup.md]

Each measurement is a fresh process (``sys.executable -m dpfpl.cli``, what the ``dpfpl`` entry
point runs), median of ``--repeats``:

- ``dpfpl --help`` and ``dpfpl train --help``: wall time of the whole process;
- ``dpfpl train`` (the tiny default run cut to 1 round of 1 local step, 2 clients, no live display,
  no persistent feature cache, in a temporary run directory): the time from launching the
  process to each status line it prints on stderr (``loading dataset``, ``loading model``,
  ``encoding images``) and to the end of round 1 (its ``[dpfpl] round 1/1`` line), and the
  process's wall time;
- the heaviest imports of that run (``python -X importtime``: cumulative microseconds of the
  top-level packages), once.

``--label`` names the row (e.g. ``before``/``after`` a change); with ``--out`` the row is appended
to the Markdown file (created with its header if missing), with the command and machine load.
``--repo DIR`` measures another checkout (the processes run in DIR, so ``-m dpfpl.cli`` imports
DIR's code), e.g. the commit before the lazy imports::

    git worktree add /tmp/before 9a212d2^
    python -m bench.startup --repo /tmp/before --label "before (9a212d2^)" --out results/microbench/startup.md

An older checkout that prints no phase lines or has no ``--feature-cache-dir`` option (it had no
persistent cache) gets ``-`` in those columns and runs without the option.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

TRAIN_ARGS = ["train", "--rounds", "1", "--local-steps", "1", "--num-clients", "2", "--no-progress",
              "--feature-cache-dir", "off", "--device", "cpu"]
PHASES = ("loading dataset", "loading model", "encoding images", "round 1/1")


REPO: Optional[str] = None  # checkout whose dpfpl is measured (None: this one)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dpfpl.cli", *args]


def train_args() -> list[str]:
    """TRAIN_ARGS, without ``--feature-cache-dir`` where the measured checkout has no such option."""
    r = subprocess.run(_cli("train", "--help"), capture_output=True, text=True, cwd=REPO)
    if "--feature-cache-dir" in r.stdout:
        return list(TRAIN_ARGS)
    i = TRAIN_ARGS.index("--feature-cache-dir")
    return TRAIN_ARGS[:i] + TRAIN_ARGS[i + 2:]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=REPO)
    return time.perf_counter() - t0


def train_phases(args: list[str]) -> dict[str, float]:
    """Seconds from process launch to each phase line of a 1-round ``dpfpl train``, and ``exit``
    (phases the checkout does not print are absent)."""
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        p = subprocess.Popen(_cli(*args, "--out", str(Path(d) / "run")), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
        out: dict[str, float] = {}
        assert p.stderr is not None
        for line in p.stderr:
            for ph in PHASES:
                if ph in line and ph not in out:
                    out[ph] = time.perf_counter() - t0
        if p.wait() != 0:
            raise RuntimeError(f"dpfpl train failed (exit {p.returncode})")
        out["exit"] = time.perf_counter() - t0
    return out


def heavy_imports(args: list[str], top: int = 8) -> list[tuple[str, float]]:
    """(top-level package, cumulative import seconds) of a 1-round ``dpfpl train``, heaviest first."""
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "dpfpl.cli", *args, "--out",
                            str(Path(d) / "run")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           cwd=REPO)
    cum: dict[str, float] = {}
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        self_us, cum_us, raw = line[len("import time:"):].split("|")
        name = raw[1:]  # "| " then two spaces per nesting level
        if cum_us.strip().isdigit() and name == name.lstrip():  # a top-level import
            cum[name] = cum.get(name, 0.0) + int(cum_us) / 1e6
    return sorted(cum.items(), key=lambda kv: -kv[1])[:top]


def measure(repeats: int) -> dict[str, Any]:
    help_s = statistics.median(wall(_cli("--help")) for _ in range(repeats))
    train_help_s = statistics.median(wall(_cli("train", "--help")) for _ in range(repeats))
    args = train_args()
    runs = [train_phases(args) for _ in range(repeats)]
    phases = {k: statistics.median(r[k] for r in runs) for k in runs[0] if all(k in r for r in runs)}
    return {"help_s": help_s, "train_help_s": train_help_s, "train_phases_s": phases, "imports": heavy_imports(args)}


HEADER = ["# Start-up time", "",
          "Rows: `python -m bench.startup --label NAME` (fresh processes, median of the repeats). "
          "`dpfpl train` = `dpfpl " + " ".join(TRAIN_ARGS) + " --out TMP`; phase columns = seconds from "
          "launching the process to that status line on stderr; 'round 1 done' = its `[dpfpl] round 1/1` line.", "",
          "| label | `dpfpl --help` (s) | `dpfpl train --help` (s) | loading dataset | loading model | "
          "encoding images | round 1 done | exit | load avg 1/5/15 | heaviest imports of `dpfpl train` (cumulative s) |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]


def row(label: str, m: dict[str, Any], load: tuple[float, float, float]) -> str:
    ph = m["train_phases_s"]
    imports = ", ".join(f"{n} {s:.2f}" for n, s in m["imports"][:6])
    cols = " | ".join(f"{ph[k]:.2f}" if k in ph else "-" for k in (*PHASES, "exit"))
    return (f"| {label} | {m['help_s']:.2f} | {m['train_help_s']:.2f} | {cols} | "
            f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} | {imports} |")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="now")
    ap.add_argument("--out", default=None, help="Markdown file to append the row to")
    ap.add_argument("--repo", default=None, help="measure the dpfpl of this checkout (default: this one)")
    args = ap.parse_args(argv)
    global REPO
    if args.repo is not None:
        if not (Path(args.repo) / "dpfpl" / "cli.py").is_file():
            print(f"python -m bench.startup: error: --repo {args.repo}: no dpfpl/cli.py there", file=sys.stderr)
            return 2
        REPO = str(Path(args.repo).resolve())
    m = measure(args.repeats)
    load = os.getloadavg()
    line = row(args.label, m, load)
    print("\n".join(HEADER[-2:] + [line]))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = out.read_text() if out.is_file() else "\n".join(HEADER) + "\n"
        out.write_text(text + line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
