"""The persistent image-feature cache: encode time saved per run, and a bench grid's wall time
without / with a cold / with a warm cache (issue 14 item 4).

    python -m bench.feature_cache [--rounds 2] [--vit-images 16] [--out results/microbench]

1. Per run: the default run's :class:`dpfpl.features.FeatureStore` (builtin tiny model, synthetic
   dataset, train + test) with an empty cache folder (encodes, writes) and again (reads, checks
   the content hash), median of ``--repeats``.
2. A grid: ``dpfpl bench --methods dpfpl promptfl --epsilons none --seeds 0 --rounds R --no-audit
   --fresh`` run three times as separate processes, with ``--feature-cache-dir off``, then with an
   empty cache folder (cold), then again (warm).
3. ViT-B-16 (random weights) image features of ``--vit-images`` synthetic images at 224 px: the
   seconds per image, times the dataset's image count, estimates what a warm cache saves per run
   with that tower (0: skip).

Writes ``OUT/feature_cache.json`` and ``OUT/feature_cache.md`` with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional


def per_run(repeats: int) -> dict[str, Any]:
    from dpfpl.clip import load_clip
    from dpfpl.config import RunConfig
    from dpfpl.data import load_run_dataset
    from dpfpl.features import FeatureStore

    cfg = RunConfig().validate()
    ds = load_run_dataset(cfg)
    clip = load_clip(cfg.model.model, cfg.model.pretrained, "cpu")
    splits = {"train": ds.train, "test": ds.test}
    cold, warm, events = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            s1 = FeatureStore(clip, splits, cache_dir=d)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s2 = FeatureStore(clip, splits, cache_dir=d)
            warm.append(time.perf_counter() - t0)
            events.append((dict(s1.events), dict(s2.events)))
    return {"model": f"{cfg.model.model} ({cfg.model.pretrained})", "dataset": cfg.data.dataset,
            "images": len(ds.train) + len(ds.test), "cold_s": statistics.median(cold),
            "warm_s": statistics.median(warm), "cold_all_s": cold, "warm_all_s": warm, "events": events[-1]}


def grid(rounds: int) -> dict[str, Any]:
    exe = Path(sys.executable).with_name("dpfpl")
    cmd = [str(exe), "bench", "--methods", "dpfpl", "promptfl", "--epsilons", "none", "--seeds", "0",
           "--rounds", str(rounds), "--no-audit", "--fresh", "--no-progress"]
    out: dict[str, Any] = {"command": " ".join(["dpfpl"] + cmd[1:])}
    with tempfile.TemporaryDirectory() as d:
        env = {**os.environ, "DPFPL_CACHE_DIR": str(Path(d) / "cache")}
        for name, extra in (("off", ["--feature-cache-dir", "off"]), ("cold", []), ("warm", [])):
            t0 = time.perf_counter()
            subprocess.run(cmd + ["--out", str(Path(d) / name)] + extra, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            out[f"{name}_wall_s"] = time.perf_counter() - t0
    return out


def vit_estimate(n: int, images: int) -> dict[str, Any]:
    import torch

    from dpfpl.clip import load_clip
    from dpfpl.data import load_dataset
    from dpfpl.features import encode_split

    clip = load_clip("ViT-B-16", None, "cpu", init_seed=0)
    ds = load_dataset("synthetic", None, seed=0, n_classes=16, train_per_class=max(1, n // 16 + 1), test_per_class=1)
    idx = torch.arange(n)
    encode_split(clip, ds.train, idx[:2], batch_size=2)  # warm-up
    t0 = time.perf_counter()
    encode_split(clip, ds.train, idx, batch_size=8)
    per_image = (time.perf_counter() - t0) / n
    return {"images_timed": n, "s_per_image": per_image, "dataset_images": images,
            "estimated_encode_s_per_run": per_image * images}


def table(res: dict[str, Any]) -> str:
    p, g = res["per_run"], res["grid"]
    lines = ["# Persistent feature cache\n", f"Command: `{res['command']}`\n",
             f"Device: {res['device']}; the machine's 2 cores were shared with other jobs (noisy times).\n",
             "## One run's image features\n",
             f"{p['model']}, {p['dataset']} ({p['images']} images, train + test): encode and write "
             f"{p['cold_s']:.2f} s (cold), read and verify {p['warm_s']:.3f} s (warm); medians of "
             f"{len(p['cold_all_s'])}. Events: cold {p['events'][0]}, warm {p['events'][1]}.\n",
             "## Bench grid wall time\n", f"`{g['command']}` (2 cells, one process each run):\n",
             "| cache | wall s |", "|---|---|",
             f"| off | {g['off_wall_s']:.1f} |", f"| cold (empty folder) | {g['cold_wall_s']:.1f} |",
             f"| warm | {g['warm_wall_s']:.1f} |",
             f"\nWith the tiny model the features are {p['cold_s']:.1f} s of a run (cold, both splits), so "
             "differences between these rows much larger than that are load on the shared machine, not "
             "the cache; the cache matters where encoding is expensive (below)."]
    v = res.get("vit")
    if v:
        lines += ["\n## ViT-B-16 estimate\n",
                  f"ViT-B-16 (random weights) image tower: {v['s_per_image']:.3f} s per 224 px image "
                  f"({v['images_timed']} timed, batch 8), so the same {v['dataset_images']} images cost "
                  f"~{v['estimated_encode_s_per_run']:.0f} s per run without a warm cache (an estimate "
                  "from the per-image time, not a full encode; a warm entry is read and hash-checked "
                  "instead, as timed above for the tiny model)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.feature_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vit-images", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/microbench")
    args = ap.parse_args(argv)
    import torch

    from bench.timing import device_name

    torch.set_num_threads(args.threads)
    args_text = " ".join(sys.argv[1:] if argv is None else argv)
    res: dict[str, Any] = {"command": f"python -m bench.feature_cache {args_text}".strip(), "device": device_name("cpu")}
    res["per_run"] = per_run(args.repeats)
    print(f"per run: cold {res['per_run']['cold_s']:.2f} s, warm {res['per_run']['warm_s']:.3f} s", flush=True)
    res["grid"] = grid(args.rounds)
    print(f"grid: {res['grid']}", flush=True)
    if args.vit_images:
        res["vit"] = vit_estimate(args.vit_images, res["per_run"]["images"])
        print(f"vit: {res['vit']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_cache.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "feature_cache.md").write_text(table(res))
    print(f"wrote {out / 'feature_cache.json'} and {out / 'feature_cache.md'}")


if __name__ == "__main__":
    main()
