"""Vectorised vs sequential clients: the time of one training round at K sampled clients.

    python -m bench.vectorize [--clients 1 4 16 64] [--repeats 5] [--threads 1 2] \
        [--out results/microbench/vectorize.md]

Setup: the shipped tiny architecture with random weights (timings do not depend on them), the
synthetic task with 16 classes, K clients (iid partition, 40 training images each, all sampled
every round), method dpfpl, n_ctx 16, rank 8, batch size 16 (Poisson, q = 0.4: the clients'
batch sizes differ), 1 local step per round (grad protocol), no evaluation inside the timed
rounds. Two modes: a DP round (per-example gradients, clipping, noise: explicit multipliers
1.0/1.0, reproducible noise, RDP ledger) and a non-private round (batch-mean gradients).
For each (mode, K) two engines are built from the same config, ``train.vectorize_clients`` false
and true; after one warm-up round each, ``--repeats`` rounds are timed (``Engine.train_round``,
``time.perf_counter``) alternately, and the median is reported, with the speedup
sequential / vectorised. Both engines then hold the same prompts up to float rounding: the table
reports the largest |p_G difference| after all rounds (the equality check of
tests/test_vectorize.py, at benchmark scale).

``--threads``: torch thread counts, each a block of rows (1: the per-core efficiency of the two
paths; the machine's core count: what a user of the whole machine sees). ``--profile K`` additionally prints where a vectorised and a sequential DP round's time goes
(cProfile, top functions by cumulative time). Writes the Markdown table to ``--out`` (and a
JSON beside it) with the command and the machine load (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PER_CLIENT = 40
BASE = {"pretrained": "none", "device": "cpu", "method": "dpfpl", "partition": "iid", "n_ctx": 16, "rank": 8,
        "batch_size": 16, "local_steps": 1, "rounds": 10_000, "eval_every": 10_000, "lr": 0.01,
        "feature_cache_dir": "off"}
DP = {"privacy": "dp", "noise_multiplier_local": 1.0, "noise_multiplier_global": 1.0, "noise_seed": 0,
      "accountant": "rdp"}


def _dataset(K: int):
    from dpfpl.data import load_dataset

    per_class = math.ceil(PER_CLIENT * K / 16)
    return load_dataset("synthetic", None, seed=0, n_classes=16, train_per_class=per_class, test_per_class=2)


def _engines(K: int, private: bool, clip, dataset, device: str = "cpu"):
    from dpfpl.config import RunConfig
    from dpfpl.engine import Engine

    out = {}
    for vec in (False, True):
        ov = dict(BASE, device=device, num_clients=K, vectorize_clients=vec, **(DP if private else {}))
        out[vec] = Engine(RunConfig().update(ov), clip=clip, dataset=dataset)
    return out


def measure(K: int, private: bool, repeats: int, clip, device: str = "cpu") -> dict[str, Any]:
    """Sequential and vectorised round times at K clients (``clip`` on ``device``; on CUDA each
    round is timed to a synchronisation)."""
    from bench.timing import synchronize

    engines = _engines(K, private, clip, _dataset(K), device)
    times: dict[bool, list[float]] = {False: [], True: []}
    for e in engines.values():
        e.train_round()  # warm-up (and the cost model of the per-example strategy)
    for _ in range(repeats):
        for vec, e in engines.items():
            synchronize(device)
            t0 = time.perf_counter()
            e.train_round()
            synchronize(device)
            times[vec].append(time.perf_counter() - t0)
    seq, vec = statistics.median(times[False]), statistics.median(times[True])
    diff = float((engines[True].server.p_G - engines[False].server.p_G).detach().abs().max())
    return {"mode": "dp" if private else "nonprivate", "clients": K, "sequential_s": seq, "vectorized_s": vec,
            "speedup": seq / vec, "sequential_all_s": times[False], "vectorized_all_s": times[True],
            "max_abs_p_G_diff": diff, "batch_sizes_last_round": [len(c.last_local_idx) for c in engines[True].clients][:8]}


def profile(K: int, clip, top: int = 18) -> str:
    import cProfile
    import io
    import pstats

    engines = _engines(K, True, clip, _dataset(K))
    out = io.StringIO()
    for vec, e in engines.items():
        e.train_round()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2):
            e.train_round()
        pr.disable()
        out.write(f"\n### {'vectorised' if vec else 'sequential'} DP round, K={K} (2 rounds)\n\n```\n")
        pstats.Stats(pr, stream=out).sort_stats("cumulative").print_stats(top)
        out.write("```\n")
    return out.getvalue()


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| round | torch threads | clients K | sequential (s) | vectorised (s) | speedup | max abs p_G diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r.get('threads', '?')} | {r['clients']} | {r['sequential_s']:.4f} | "
                     f"{r['vectorized_s']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['max_abs_p_G_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vectorize", description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts (one block of rows each)")
    ap.add_argument("--modes", nargs="+", default=["dp", "nonprivate"], choices=["dp", "nonprivate"])
    ap.add_argument("--profile", type=int, default=None, metavar="K", help="also profile a DP round at K clients")
    ap.add_argument("--out", default=None, help="Markdown file to write (a .json beside it)")
    args = ap.parse_args(argv)

    import torch

    from bench.timing import device_name
    from dpfpl.clip import load_clip

    clip = load_clip("dpfpl-tiny", None, "cpu")
    load_before = os.getloadavg()
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mode in args.modes:
            for K in args.clients:
                r = {"threads": threads, **measure(K, mode == "dp", args.repeats, clip)}
                rows.append(r)
                print(f"{threads} thread(s) {mode:10s} K={K:3d}: sequential {r['sequential_s']:.4f} s, vectorised {r['vectorized_s']:.4f} s, "
                      f"speedup {r['speedup']:.2f}x (max |dp_G| {r['max_abs_p_G_diff']:.1e})", flush=True)
    torch.set_num_threads(args.threads[0])
    load_after = os.getloadavg()
    prof = profile(args.profile, clip) if args.profile else ""
    command = "python -m bench.vectorize " + " ".join(sys.argv[1:] if argv is None else argv)
    md = "\n".join([
        "# Vectorised vs sequential clients: one training round", "",
        f"Command: `{command}`", "",
        f"Device: {device_name('cpu').split(' (')[0]}; load average (1/5/15 min) before {load_before[0]:.2f}/{load_before[1]:.2f}/"
        f"{load_before[2]:.2f}, after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} "
        f"on {os.cpu_count()} cores (other processes share them).", "",
        f"Setup: dpfpl-tiny (random weights), synthetic 16 classes, {PER_CLIENT} training images per client "
        "(iid), all K clients sampled, dpfpl, n_ctx 16, rank 8, Poisson batches of expected size 16, 1 local step "
        f"(grad protocol), median of {args.repeats} rounds after a warm-up; DP: per-example gradients, "
        "clipping, noise (multipliers 1.0/1.0). Round time = `Engine.train_round` (no evaluation).", "",
        table(rows), "", prof])
    print("\n" + table(rows))
    if prof:
        print(prof)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(md + "\n")
        out.with_suffix(".json").write_text(json.dumps({"command": command, "device": device_name("cpu"),
                                                        "load_before": load_before, "load_after": load_after,
                                                        "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
