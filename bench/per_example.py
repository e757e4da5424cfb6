"""Per-example prompt gradients: time and peak memory vs batch size, per strategy (issue 14, items 2-3).

    python -m bench.per_example [--batch-sizes 8 32 128 512 1024] [--threads 1] [--out results/microbench]

Setup: the shipped tiny architecture with random weights (timings do not depend on them), the
synthetic task's 16 class names, n_ctx 16 (P = 16 x 64 = 1024 context entries, E = 64), the text
cut on, ``--threads`` torch threads. Strategies (all exact; every row reports its largest relative
difference from "vjp"):

- ``vjp``: :func:`dpfpl.grads.per_example_ctx_grads` strategy "vjp", automatic chunk size;
- ``vjp-unchunked``: the same in one vmap over all B (the code before issue 14);
- ``vjp-full-seq``: "vjp" through every class's full sequence, without the shared SOT + context
  prefix of :mod:`dpfpl.prefix` (the code before it);
- ``jacobian`` / ``auto``: strategies "jacobian" and "auto" (auto's pick is in the row);
- ``jacfwd``: the Jacobian by forward mode (``jvp`` vmapped over the P basis directions, then
  the same product), at the smallest B only: its cost does not depend on B;
- ``opacus``: Opacus' functorch per-sample path (:mod:`bench.opacus_prompt`), if opacus is installed.

Time: median of ``--repeats`` calls after one warm-up (:func:`bench.timing.time_callable`). Peak
memory, measured on the warm-up call: on CPU the rise of the process's peak resident set
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) above the resident set before
the call, with glibc's mmap threshold fixed so freed buffers go back to the OS (the module re-executes itself with
``MALLOC_MMAP_THRESHOLD_`` set); on CUDA ``max_memory_allocated`` above the allocation before.
Writes ``OUT/per_example.json`` and ``OUT/per_example.md`` (with the command that made them).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM")


def peak_mib(fn: Callable[[], Any], device) -> Optional[float]:
    """Peak memory (MiB) ``fn()`` adds above what was in use before the call (module doc)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        base = _rss()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        fn()
        return (_hwm() - base) / 2**20
    except OSError:
        return None


def jacfwd_grads(enc, ctx, feats, labels, scale: float, chunk: int):
    """The Jacobian by forward mode (P basis directions), then G = U @ J: the alternative to
    :func:`dpfpl.grads._jacobian`'s E reverse passes, kept here for comparison."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dpfpl.grads import _cotangents

    with sdpa_kernel(SDPBackend.MATH):
        basis = torch.eye(ctx.numel(), dtype=ctx.dtype, device=ctx.device).reshape(-1, *ctx.shape)  # (P, n_ctx, D)
        J = torch.func.vmap(lambda t: torch.func.jvp(enc, (ctx,), (t,))[1], chunk_size=chunk)(basis)  # (P, C, E)
        with torch.no_grad():
            losses, cot = _cotangents(enc(ctx), feats, labels, scale)  # (B, C, E)
            G = cot.reshape(len(labels), -1) @ J.reshape(ctx.numel(), -1).T  # (B, C*E) @ (C*E, P)
    return losses, G.reshape(len(labels), *ctx.shape)


def measure(batch_sizes: list[int], repeats: int, device_name_: str = "cpu") -> dict[str, Any]:
    import torch

    from bench.timing import device_name, time_callable
    from dpfpl import grads
    from dpfpl.clip import load_clip
    from dpfpl.data.synthetic import class_names
    from dpfpl.text import PromptTextEncoder

    dev = torch.device(device_name_)
    clip = load_clip("dpfpl-tiny", None, dev, init_seed=0)
    enc = PromptTextEncoder(clip, class_names(16), 16, cut=True)
    full = PromptTextEncoder(clip, class_names(16), 16, cut=True, share_prefix=False)
    chunk = grads.auto_chunk(enc)
    try:
        from bench.opacus_prompt import opacus_module, opacus_per_example_grads
        import opacus  # noqa: F401
        have_opacus = True
    except ImportError:
        have_opacus = False
    rows = []
    g = torch.Generator().manual_seed(0)
    ctx = (torch.randn(16, enc.width, generator=g) * 0.02).to(dev)  # (n_ctx, D)
    for B in batch_sizes:
        feats = torch.nn.functional.normalize(torch.randn(B, 64, generator=g), dim=-1).to(dev)  # (B, E)
        labels = torch.randint(0, 16, (B,), generator=g).to(dev)
        pe = grads.per_example_ctx_grads
        fns: dict[str, Callable] = {
            "vjp": lambda: pe(enc, ctx, feats, labels, 100.0, strategy="vjp"),
            "vjp-unchunked": lambda: pe(enc, ctx, feats, labels, 100.0, strategy="vjp", chunk_size=B),
            "vjp-full-seq": lambda: pe(full, ctx, feats, labels, 100.0, strategy="vjp"),
            "jacobian": lambda: pe(enc, ctx, feats, labels, 100.0, strategy="jacobian"),
            "auto": lambda: pe(enc, ctx, feats, labels, 100.0, strategy="auto"),
        }
        if B == min(batch_sizes):
            fns["jacfwd"] = lambda: jacfwd_grads(enc, ctx, feats, labels, 100.0, chunk)
        if have_opacus:
            gsm = opacus_module(enc, ctx, 100.0)
            fns["opacus"] = lambda: opacus_per_example_grads(gsm, feats, labels)
        ref = None
        for name, fn in fns.items():
            out: list = []
            peak = peak_mib(lambda: out.append(fn()[1]), dev)  # the first call (also the warm-up)
            ref = out[0] if ref is None else ref  # "vjp" comes first  (B, n_ctx, D)
            rel = float((out[0] - ref).abs().max() / ref.abs().max())
            del out
            t = time_callable(fn, f"{name} B={B}", warmup=0, repeats=repeats, device=dev)
            row = {"strategy": name, "B": B, "median_s": t.median_s, "q25_s": t.q25_s, "q75_s": t.q75_s,
                   "repeats": t.repeats, "peak_mib": peak, "max_rel_diff_vs_vjp": rel,
                   "chunk_size": B if name == "vjp-unchunked" else chunk}
            if name == "auto":
                row["picked"] = grads.choose_strategy(enc, ctx, B)
            rows.append(row)
            print(f"B={B:5d} {name:14s} {t.median_s * 1e3:9.1f} ms  peak {row['peak_mib'] or float('nan'):8.1f} MiB"
                  f"  rel diff {rel:.1e}", flush=True)
    return {"device": device_name(dev), "torch_threads": torch.get_num_threads(), "n_ctx": 16,
            "n_classes": 16, "seq_len": enc.length, "rows_per_pass": enc.rows_per_pass, "E": 64, "P": 16 * enc.width, "auto_chunk": chunk,
            "opacus": have_opacus, "cost_model": {str(k[1:]): v for k, v in grads._COSTS.items()}, "rows": rows}


def table(res: dict[str, Any], command: str) -> str:
    names = list(dict.fromkeys(r["strategy"] for r in res["rows"]))
    Bs = sorted({r["B"] for r in res["rows"]})
    cell = {(r["strategy"], r["B"]): r for r in res["rows"]}
    out = [f"# Per-example prompt gradients vs batch size\n", f"Command: `{command}`\n",
           f"Device: {res['device']}; tiny model, {res['n_classes']} classes, n_ctx {res['n_ctx']} "
           f"(P = {res['P']}, E = {res['E']}), text length {res['seq_len']} ({res.get('rows_per_pass', '?')} token rows "
           "per pass with the shared prefix), automatic chunk "
           f"{res['auto_chunk']}. Median time (ms) / peak memory added (MiB); the machine's 2 cores "
           "were shared with other jobs, so times are noisy.\n",
           "| strategy | " + " | ".join(f"B = {b}" for b in Bs) + " |", "|---" * (len(Bs) + 1) + "|"]
    for n in names:
        cells = []
        for b in Bs:
            r = cell.get((n, b))
            if r is None:
                cells.append("-")
                continue
            mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "?"
            pick = f" ({r['picked']})" if "picked" in r else ""
            cells.append(f"{r['median_s'] * 1e3:.0f} / {mem}{pick}")
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    worst = max(r["max_rel_diff_vs_vjp"] for r in res["rows"])
    out.append(f"\nLargest relative difference of any strategy from vjp: {worst:.1e}.")
    if "opacus" in names:
        out.append("\nOpacus / ours (best of vjp, jacobian) time and memory ratios:\n")
        out.append("| B | time ratio | memory ratio |\n|---|---|---|")
        for b in Bs:
            o = cell[("opacus", b)]
            best = min((cell[(n, b)] for n in ("vjp", "jacobian")), key=lambda r: r["median_s"])
            mr = (o["peak_mib"] / best["peak_mib"]) if o["peak_mib"] and best["peak_mib"] else float("nan")
            out.append(f"| {b} | {o['median_s'] / best['median_s']:.2f} | {mr:.2f} |")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.per_example", description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/microbench")
    args = ap.parse_args(argv)
    if MMAP_ENV not in os.environ and argv is None:  # fixed mmap threshold: see the module doc
        os.execve(sys.executable, [sys.executable, "-m", "bench.per_example", *sys.argv[1:]],
                  {**os.environ, MMAP_ENV: "65536"})
    import torch

    torch.set_num_threads(args.threads)
    res = measure(args.batch_sizes, args.repeats, args.device)
    command = "python -m bench.per_example " + " ".join(sys.argv[1:])
    res["command"] = command.strip()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "per_example.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "per_example.md").write_text(table(res, res["command"]))
    print(f"wrote {out / 'per_example.json'} and {out / 'per_example.md'}")


if __name__ == "__main__":
    main()
