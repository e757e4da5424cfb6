"""GPU numbers in one prepared run (``make gpu-check``; issue 14 item 6, under 8 minutes on one GPU).

    python -m bench.gpu_check [--out results/gpu] [--device cuda]

Without a CUDA device it prints one line and exits with status 2, measuring nothing. With one:

1. CUDA checks: per-example gradients (vjp, jacobian) on the GPU equal the CPU ones (tiny model);
   one DP and one non-private round of the in-process engine train on the GPU with finite loss.
2. Gradient-step time and peak memory, tiny model and ViT-B-16 with random weights (timing needs
   no real weights), 100 classes, n_ctx 16, B = 32 and 256: non-private (``batch_ctx_grad``) and
   DP (per-example gradients by each strategy, then per-example clipping and Gaussian noise), on
   random unit image features (image features are cached, the text side is the step's cost).
3. Vectorised 10- and 64-client rounds: not measured until the vectorised-clients engine lands
   (recorded as such).

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

    out: dict[str, Any] = {}
    ds = load_dataset("synthetic", None, seed=0, n_classes=16, train_per_class=8, test_per_class=2)
    encs = {d: PromptTextEncoder(load_clip("dpfpl-tiny", None, d, init_seed=0), ds.classnames, 16)
            for d in ("cpu", dev)}
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


def _step_timings(dev, batch_sizes: list[int], models: list[str]) -> list[dict[str, Any]]:
    import torch

    from bench.timing import time_callable
    from dpfpl.clip import load_clip
    from dpfpl.grads import batch_ctx_grad, choose_strategy, per_example_ctx_grads
    from dpfpl.text import PromptTextEncoder

    rows = []
    names = [f"class {i}" for i in range(100)]
    for model in models:
        clip = load_clip(model, None, dev, init_seed=0)
        enc = PromptTextEncoder(clip, names, 16)
        E = int(clip.model.text_projection.shape[1]) if getattr(clip.model, "text_projection", None) is not None \
            else enc.width
        g = torch.Generator(device=dev).manual_seed(0)
        ctx = torch.randn(16, enc.width, generator=g, device=dev) * 0.02  # (n_ctx, D)
        for B in batch_sizes:
            feats = torch.nn.functional.normalize(torch.randn(B, E, generator=g, device=dev), dim=-1)  # (B, E)
            labels = torch.randint(0, 100, (B,), generator=g, device=dev)

            def dp_step(strategy):
                _, G = per_example_ctx_grads(enc, ctx, feats, labels, 100.0, strategy=strategy)  # (B, n_ctx, D)
                norms = G.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
                G = G * (1.0 / norms).clamp(max=1.0)[:, None, None]
                return G.sum(0) + torch.randn(ctx.shape, generator=g, device=dev)

            cases = {"nonprivate": lambda: batch_ctx_grad(enc, ctx, feats, labels, 100.0),
                     "dp-vjp": lambda: dp_step("vjp"), "dp-jacobian": lambda: dp_step("jacobian"),
                     "dp-auto": lambda: dp_step("auto")}
            for name, fn in cases.items():
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                t = time_callable(fn, f"{model} {name} B={B}", warmup=2, repeats=5, device=dev)
                row = {"model": model, "case": name, "B": B, "n_classes": 100, "n_ctx": 16,
                       "median_ms": t.median_s * 1e3, "q25_ms": t.q25_s * 1e3, "q75_ms": t.q75_s * 1e3,
                       "peak_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
                if name == "dp-auto":
                    row["picked"] = choose_strategy(enc, ctx, B)
                rows.append(row)
                print(f"{model:10s} {name:12s} B={B:4d} {row['median_ms']:9.2f} ms {row['peak_mib']:9.1f} MiB",
                      flush=True)
        del clip, enc
        torch.cuda.empty_cache()
    return rows


def table(res: dict[str, Any]) -> str:
    lines = ["# GPU check\n", f"Command: `{res['command']}`\n", f"Device: {res['device']}\n", "## CUDA checks\n"]
    lines += [f"- {k}: {v}" for k, v in res["checks"].items()]
    lines += ["\n## Gradient step (100 classes, n_ctx 16; random weights)\n",
              "| model | case | B | median ms | peak MiB | auto picked |", "|---|---|---|---|---|---|"]
    for r in res["steps"]:
        lines.append(f"| {r['model']} | {r['case']} | {r['B']} | {r['median_ms']:.2f} | {r['peak_mib']:.1f} | "
                     f"{r.get('picked', '')} |")
    lines.append(f"\nVectorised rounds: {res['vectorised_rounds']}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--models", nargs="+", default=["dpfpl-tiny", "ViT-B-16"])
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing measured, "
              f"{args.out} left as it is", file=sys.stderr)
        return NO_CUDA_STATUS
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    args_text = " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, Any] = {"command": f"python -m bench.gpu_check {args_text}".strip(),
                           "device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    res["checks"] = _cuda_checks(dev)
    res["steps"] = _step_timings(dev, args.batch_sizes, args.models)
    res["vectorised_rounds"] = "not measured: the vectorised-clients engine (issue 14 item 1) has not landed"
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table(res))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {res['wall_s']:.0f} s")
    return 0 if all(v for k, v in res["checks"].items() if k.endswith("_ok")) else 1


if __name__ == "__main__":
    sys.exit(main())
