"""Every speed measurement of the suite in one run (issue 14's "done when"): ``make microbench``.

    python -m bench.microbench [--out results/microbench] [--quick] [--skip NAME ...]

Runs, one fresh process each (so that no measurement inherits another's threads, caches or
allocations), and writes their files into ``--out``:

=================  ==================================================================================
``vectorize``      sequential vs vectorised round time at 1 / 4 / 16 / 64 clients, DP and
                   non-private, 1 torch thread and one per core (:mod:`bench.vectorize`,
                   ``vectorize.md``)
``per_example``    per-example gradient time and peak memory vs B (8 ... 1024) for vjp, jacobian,
                   auto and Opacus (:mod:`bench.per_example`, ``per_example.md``)
``feature_cache``  a run's image features cold / warm and a bench grid's wall time with the cache
                   off, cold and warm (:mod:`bench.feature_cache`, ``feature_cache.md``)
``startup``        ``dpfpl --help`` and ``dpfpl train`` to its first round (:mod:`bench.startup`,
                   one row appended to ``startup.md``, labelled with the commit)
=================  ==================================================================================

then ``README.md`` in ``--out``: the commands, each one's wall time, the machine and its load, and
every table. ``--quick`` shrinks each measurement (fewer repeats, clients up to 16, B up to 128,
one grid repeat) for a smoke run; its numbers are labelled as such. The pytest-benchmark
micro-timings (``pytest bench --benchmark-only``) stay a separate step of ``make microbench``.
Exit status: 0, or 1 naming the measurements that failed (the others' files are still written).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["STEPS", "commands", "main"]

STEPS = ("vectorize", "per_example", "feature_cache", "startup")


def _commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return r.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def commands(out: Path, quick: bool = False) -> dict[str, list[str]]:
    """The module command line of each measurement (``python -m ...`` arguments)."""
    full = {
        "vectorize": ["bench.vectorize", "--clients", "1", "4", "16", "64", "--repeats", "5", "--threads", "1",
                      str(os.cpu_count() or 1), "--out", str(out / "vectorize.md")],
        "per_example": ["bench.per_example", "--batch-sizes", "8", "32", "128", "512", "1024", "--repeats", "3",
                        "--out", str(out)],
        "feature_cache": ["bench.feature_cache", "--rounds", "2", "--repeats", "3", "--vit-images", "16",
                          "--out", str(out)],
        "startup": ["bench.startup", "--repeats", "5", "--label", f"HEAD ({_commit()})",
                    "--out", str(out / "startup.md")],
    }
    if quick:
        full["vectorize"] = ["bench.vectorize", "--clients", "1", "4", "16", "--repeats", "2",
                             "--out", str(out / "vectorize.md")]
        full["per_example"] = ["bench.per_example", "--batch-sizes", "8", "32", "128", "--repeats", "1",
                               "--out", str(out)]
        full["feature_cache"] = ["bench.feature_cache", "--rounds", "1", "--repeats", "1", "--vit-images", "4",
                                 "--out", str(out)]
        full["startup"] = ["bench.startup", "--repeats", "1", "--label", f"HEAD ({_commit()}, quick)",
                           "--out", str(out / "startup.md")]
    return full


FILES = {"vectorize": "vectorize.md", "per_example": "per_example.md", "feature_cache": "feature_cache.md",
         "startup": "startup.md"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.microbench", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/microbench")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run; numbers labelled quick)")
    ap.add_argument("--skip", nargs="+", default=[], choices=STEPS, metavar="NAME",
                    help=f"measurements to leave out ({', '.join(STEPS)})")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmds = commands(out, args.quick)
    rows, failed = [], []
    load0 = os.getloadavg()
    for name in STEPS:
        if name in args.skip:
            continue
        cmd = [sys.executable, "-m", *cmds[name]]
        print(f"[microbench] {name}: python -m {' '.join(cmds[name])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        dt = time.perf_counter() - t0
        rows.append((name, cmds[name], dt, rc))
        if rc != 0:
            failed.append(name)
    load1 = os.getloadavg()
    lines = ["# Microbenchmarks", "",
             f"Made by `python -m bench.microbench{' --quick' if args.quick else ''} --out {out}` (`make microbench`) "
             f"at commit {_commit()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{os.cpu_count()} CPU core(s), load average (1/5/15 min) {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} "
             f"before, {load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} after." + (
                 " QUICK run: small sizes, fewer repeats; not the committed figures." if args.quick else ""),
             "", "GPU figures: `make gpu-check` on a CUDA machine writes results/gpu/ (absent until one is lent).", "",
             "| measurement | command | wall s | status |", "|---|---|---:|---|"]
    lines += [f"| {n} | `python -m {' '.join(c)}` | {dt:.1f} | {'ok' if rc == 0 else f'FAILED (exit {rc})'} |"
              for n, c, dt, rc in rows]
    for name, _, _, rc in rows:
        f = out / FILES[name]
        if rc == 0 and f.is_file():
            body = f.read_text().strip().splitlines()
            lines += ["", "---", ""] + ["#" + ln if ln.startswith("#") else ln for ln in body]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"[microbench] wrote {out / 'README.md'}", file=sys.stderr)
    if failed:
        print(f"[microbench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
