"""GPU numbers in one prepared run (``make gpu-check``; issue 14 item 6, under 8 minutes on one GPU).

    python -m bench.gpu_check [--out results/gpu] [--device cuda]

Without a CUDA device it prints one line and exits with status 2, measuring nothing. With one:

1. CUDA checks: per-example gradients (vjp, jacobian) on the GPU equal the CPU ones (tiny model);
   the shared-prefix text pass equals the full sequences on the GPU; one DP and one non-private
   round of the in-process engine train on the GPU; a vectorised DP round equals the sequential one.
2. Gradient-step time and peak memory, tiny model and ViT-B-16 with random weights (timing needs
   no real weights), 100 classes, n_ctx 16, B = 32 and 256: non-private (``batch_ctx_grad``) and
   DP (per-example gradients by each strategy, and "vjp" without the shared prefix, then
   per-example clipping and Gaussian noise), on random unit image features (image features are
   cached, the text side is the step's cost).
3. Vectorised vs sequential rounds at 1, 10 and 64 clients, DP and non-private
   (:func:`bench.vectorize.measure` on the GPU, tiny model), and the issue's goal: a vectorised
   64-client DP round within 2x of a 1-client round.

``--smoke`` runs the same script on ``--device cpu`` at whatever sizes are given, to test the
script itself (tests/test_gpu_check.py); its output is labelled as not GPU figures.
Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (the command that made them included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

NO_CUDA_STATUS = 2


def _cuda_checks(dev) -> dict[str, Any]:
    import torch

    from dpfpl.clip import load_clip
    from dpfpl.config import RunConfig
    from dpfpl.data import load_dataset
    from dpfpl.engine import Engine
    from dpfpl.grads import per_example_ctx_grads
    from dpfpl.text import PromptTextEncoder

    from bench.vectorize import _dataset, _engines

    out: dict[str, Any] = {}
    ds = load_dataset("synthetic", None, seed=0, n_classes=16, train_per_class=8, test_per_class=2)
    clips = {d: load_clip("dpfpl-tiny", None, d, init_seed=0) for d in ("cpu", dev)}
    encs = {d: PromptTextEncoder(clips[d], ds.classnames, 16) for d in ("cpu", dev)}
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(16, 64, generator=g), dim=-1)
    labels = torch.randint(0, 16, (16,), generator=g)
    ctx = torch.randn(16, 64, generator=g) * 0.02
    _, ref = per_example_ctx_grads(encs["cpu"], ctx, feats, labels, 100.0, strategy="vjp")
    for s in ("vjp", "jacobian"):
        _, G = per_example_ctx_grads(encs[dev], ctx.to(dev), feats.to(dev), labels.to(dev), 100.0, strategy=s)
        rel = float((G.cpu() - ref).abs().max() / ref.abs().max())
        out[f"per_example_{s}_rel_diff_vs_cpu"] = rel
        out[f"per_example_{s}_ok"] = rel < 1e-4
    full = PromptTextEncoder(clips[dev], ds.classnames, 16, share_prefix=False)
    _, Gs = per_example_ctx_grads(encs[dev], ctx.to(dev), feats.to(dev), labels.to(dev), 100.0, strategy="vjp")
    _, Gf = per_example_ctx_grads(full, ctx.to(dev), feats.to(dev), labels.to(dev), 100.0, strategy="vjp")
    out["shared_prefix_rel_diff"] = float((Gs - Gf).abs().max() / Gf.abs().max())
    out["shared_prefix_ok"] = out["shared_prefix_rel_diff"] < 1e-4
    engines = _engines(4, True, clips[dev], _dataset(4), str(dev))
    for e in engines.values():
        e.train_round()
    diff = float((engines[True].server.p_G - engines[False].server.p_G).detach().abs().max())
    out["vectorised_round_max_abs_p_G_diff"] = diff
    out["vectorised_round_ok"] = diff < 1e-5
    for private in (False, True):
        ov = {"pretrained": "none", "device": str(dev), "num_clients": 2, "rounds": 1, "local_steps": 2,
              "batch_size": 8, "n_ctx": 4, "rank": 2}
        if private:
            ov.update(privacy="dp", noise_multiplier_local=1.0, noise_multiplier_global=1.0)
        row = Engine(RunConfig().update(ov), dataset=ds).run()
        key = "engine_dp" if private else "engine_nonprivate"
        out[f"{key}_local_acc"] = row.get("local_acc")
        out[f"{key}_ok"] = row.get("local_acc") is not None
    return out


def _peak_reset(dev) -> int:
    import torch

    if dev.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev)


def _peak_mib(dev, base: int) -> Optional[float]:
    import torch

    return (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else None


def _step_timings(dev, batch_sizes: list[int], models: list[str], n_classes: int = 100,
                  warmup: int = 2, repeats: int = 5) -> list[dict[str, Any]]:
    import torch

    from bench.timing import time_callable
    from dpfpl.clip import load_clip
    from dpfpl.grads import batch_ctx_grad, choose_strategy, per_example_ctx_grads
    from dpfpl.text import PromptTextEncoder

    rows = []
    names = [f"class {i}" for i in range(n_classes)]
    for model in models:
        clip = load_clip(model, None, dev, init_seed=0)
        enc = PromptTextEncoder(clip, names, 16)
        full = PromptTextEncoder(clip, names, 16, share_prefix=False)
        E = int(clip.model.text_projection.shape[1]) if getattr(clip.model, "text_projection", None) is not None \
            else enc.width
        g = torch.Generator(device=dev).manual_seed(0)
        ctx = torch.randn(16, enc.width, generator=g, device=dev) * 0.02  # (n_ctx, D)
        for B in batch_sizes:
            feats = torch.nn.functional.normalize(torch.randn(B, E, generator=g, device=dev), dim=-1)  # (B, E)
            labels = torch.randint(0, n_classes, (B,), generator=g, device=dev)

            def dp_step(strategy, e=enc):
                _, G = per_example_ctx_grads(e, ctx, feats, labels, 100.0, strategy=strategy)  # (B, n_ctx, D)
                norms = G.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
                G = G * (1.0 / norms).clamp(max=1.0)[:, None, None]
                return G.sum(0) + torch.randn(ctx.shape, generator=g, device=dev)

            cases = {"nonprivate": lambda: batch_ctx_grad(enc, ctx, feats, labels, 100.0),
                     "dp-vjp": lambda: dp_step("vjp"), "dp-vjp-full-seq": lambda: dp_step("vjp", full),
                     "dp-jacobian": lambda: dp_step("jacobian"), "dp-auto": lambda: dp_step("auto")}
            for name, fn in cases.items():
                base = _peak_reset(dev)
                t = time_callable(fn, f"{model} {name} B={B}", warmup=warmup, repeats=repeats, device=dev)
                row = {"model": model, "case": name, "B": B, "n_classes": n_classes, "n_ctx": 16,
                       "median_ms": t.median_s * 1e3, "q25_ms": t.q25_s * 1e3, "q75_ms": t.q75_s * 1e3,
                       "peak_mib": _peak_mib(dev, base)}
                if name == "dp-auto":
                    row["picked"] = choose_strategy(enc, ctx, B)
                rows.append(row)
                print(f"{model:10s} {name:16s} B={B:4d} {row['median_ms']:9.2f} ms {row['peak_mib'] or 0:9.1f} MiB",
                      flush=True)
        del clip, enc, full
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _vectorised_rounds(dev, clients: list[int], repeats: int) -> dict[str, Any]:
    """bench.vectorize's sequential vs vectorised round times on ``dev`` (tiny model), and the goal:
    the vectorised DP round at the most clients within 2x of the one at the fewest."""
    import torch

    from bench.vectorize import measure
    from dpfpl.clip import load_clip

    clip = load_clip("dpfpl-tiny", None, dev, init_seed=0)
    rows = []
    for private in (True, False):
        for K in clients:
            r = measure(K, private, repeats, clip, str(dev))
            rows.append({"threads": torch.get_num_threads(), **{k: v for k, v in r.items() if not k.endswith("_all_s")}})
            print(f"{r['mode']:10s} K={K:3d}: sequential {r['sequential_s']:.4f} s, vectorised "
                  f"{r['vectorized_s']:.4f} s ({r['speedup']:.2f}x)", flush=True)
    dp = {r["clients"]: r["vectorized_s"] for r in rows if r["mode"] == "dp"}
    lo, hi = min(dp), max(dp)
    ratio = dp[hi] / dp[lo]
    return {"rows": rows, "goal": f"vectorised DP round at {hi} clients / at {lo}: {ratio:.2f} (goal <= 2)",
            "dp_ratio": ratio, "goal_met": ratio <= 2.0}


def table(res: dict[str, Any]) -> str:
    from bench.vectorize import table as vectorize_table

    lines = ["# GPU check\n", f"Command: `{res['command']}`\n", f"Device: {res['device']}\n"]
    if res.get("smoke"):
        lines.append("SMOKE RUN on the CPU (a test of the script): not GPU figures.\n")
    lines += ["## CUDA checks\n"] + [f"- {k}: {v}" for k, v in res["checks"].items()]
    lines += [f"\n## Gradient step ({res['n_classes']} classes, n_ctx 16; random weights)\n",
              "| model | case | B | median ms | peak MiB | auto picked |", "|---|---|---|---|---|---|"]
    for r in res["steps"]:
        mem = f"{r['peak_mib']:.1f}" if r["peak_mib"] is not None else "-"
        lines.append(f"| {r['model']} | {r['case']} | {r['B']} | {r['median_ms']:.2f} | {mem} | {r.get('picked', '')} |")
    v = res["vectorised_rounds"]
    lines += ["\n## Vectorised vs sequential rounds (tiny model; bench.vectorize.measure)\n", vectorize_table(v["rows"])]
    lines.append(f"\nGoal: {v['goal']}: {'met' if v['goal_met'] else 'NOT met'}.")
    lines.append(f"\nWall time: {res['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--models", nargs="+", default=["dpfpl-tiny", "ViT-B-16"])
    ap.add_argument("--classes", type=int, default=100, help="classes of the gradient-step timings")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 10, 64], help="clients of the round timings")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per gradient step (after 2 warm-up)")
    ap.add_argument("--round-repeats", type=int, default=3, help="timed rounds per (mode, K) after a warm-up")
    ap.add_argument("--smoke", action="store_true", help="allow --device cpu: a test of the script, not GPU figures")
    args = ap.parse_args(argv)
    import torch

    dev = torch.device(args.device)
    if dev.type == "cpu" and not args.smoke:
        print("gpu-check: --device cpu measures no GPU; add --smoke to test the script itself", file=sys.stderr)
        return NO_CUDA_STATUS
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing measured, "
              f"{args.out} left as it is", file=sys.stderr)
        return NO_CUDA_STATUS
    t0 = time.perf_counter()
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, Any] = {"command": f"python -m bench.gpu_check {args_text}".strip(),
                           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)",
                           "torch": torch.__version__, "smoke": args.smoke, "n_classes": args.classes}
    res["checks"] = _cuda_checks(dev)
    res["steps"] = _step_timings(dev, args.batch_sizes, args.models, args.classes,
                                 warmup=0 if args.smoke else 2, repeats=args.repeats)
    res["vectorised_rounds"] = _vectorised_rounds(dev, args.clients, args.round_repeats)
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table(res))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {res['wall_s']:.0f} s")
    return 0 if all(v for k, v in res["checks"].items() if k.endswith("_ok")) else 1


if __name__ == "__main__":
    sys.exit(main())
