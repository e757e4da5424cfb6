"""Contrastive pretraining of the tiny CLIP shipped with the package, and the builtin checkpoint.

The suite's embedded default task must mean something on a laptop CPU, so the package ships a tiny
open_clip model (``dpfpl-tiny``, see ``model_configs/``: a small ModifiedResNet image tower, whose
convolutions learn shapes far faster than a ViT of the same cost, and a 2-layer, 64-wide text
transformer with CLIP's standard tokenizer and 77-token context) pretrained from scratch by
:func:`pretrain` with the symmetric InfoNCE loss of CLIP on image-caption pairs drawn fresh at every
step from the procedural world of :mod:`dpfpl.data.synthetic` ("a small red circle on a dark
striped background", ...). The pretraining stream uses seeds disjoint from those of the downstream
task, white light and a milder nuisance distribution; the vocabulary (colours, shapes) is shared,
as natural-image CLIPs share theirs with downstream datasets. The downstream task is lit by a blue
light that pretraining never showed, which is what leaves room between zero-shot accuracy and what
learned prompts reach.

The shipped weights ``assets/<model>.safetensors`` (float16, ~7 MB, most of it the 49408-row token
embedding) were produced by ``dpfpl pretrain`` with its default arguments (1000 steps of 256 pairs,
one CPU thread, about 4 minutes); the sidecar ``assets/<model>.meta.json`` records the recipe, the
library versions, the measured accuracies and the sha256 of the weights file, which
:func:`builtin_checkpoint` verifies before handing the path to open_clip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DpfplError

DEFAULT_MODEL = "dpfpl-tiny"

# The recipe of the shipped asset: ``dpfpl pretrain`` defaults (keep in sync with the asset).
DEFAULT_STEPS = 1000
DEFAULT_BATCH = 256
DEFAULT_SEED = 0
DEFAULT_THREADS = 1  # bitwise reproducible, and immune to CPU oversubscription on busy machines
DEFAULT_LR = 2e-3
DEFAULT_WARMUP = 150
DEFAULT_WD = 0.1

ZERO_SHOT_TEMPLATE = "a photo of a {}."


# ----------------------------------------------------------------------------------------------
# paths and integrity: dpfpl.assets (re-exported here for the pretrain command and its tests)
from .assets import ASSET_DIR, FORMAT, builtin_checkpoint, builtin_models, sha256_file, sidecar_path, verify_checkpoint  # noqa: E402,F401


# ----------------------------------------------------------------------------------------------
# model helpers


def _open_clip():
    from ._compat import open_clip_with_configs

    return open_clip_with_configs()


def image_tensor(images: np.ndarray, model: torch.nn.Module) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W), as open_clip's eval preprocess does
    for images already at the model's resolution (its resize and centre crop are then identities)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean = getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _causal_argmax_tower(model: torch.nn.Module) -> bool:
    mask = getattr(model, "attn_mask", None)
    return (getattr(model, "text_pool_type", None) == "argmax" and mask is not None
            and hasattr(model, "token_embedding") and bool(torch.isinf(mask[0, 1:]).all()))


def encode_text_cut(model: torch.nn.Module, tokens: torch.Tensor, embed=None) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed on the tokens up to the last end-of-text only.

    Exact for a causal text transformer pooled at the EOT token (positions after it cannot change
    the pooled feature), and several times cheaper than the full 77-token context. ``embed``
    replaces ``model.token_embedding`` (pretraining trains only the rows of its vocabulary).
    """
    if not _causal_argmax_tower(model):
        if embed is not None:
            raise ConfigError(f"{type(model).__name__}: pretraining needs a causal text tower pooled at EOT")
        return model.encode_text(tokens)
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = (embed or model.token_embedding)(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


@torch.no_grad()
def image_features(model: torch.nn.Module, images: np.ndarray, batch: int = 512) -> torch.Tensor:
    """L2-normalised image features of uint8 images (N, H, W, 3)."""
    out = [F.normalize(model.encode_image(image_tensor(images[i:i + batch], model)), dim=-1)
           for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def class_text_features(model: torch.nn.Module, tokenizer, classnames: list[str],
                        template: str = ZERO_SHOT_TEMPLATE) -> torch.Tensor:
    tokens = tokenizer([template.format(c) for c in classnames])
    return F.normalize(encode_text_cut(model, tokens), dim=-1)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor,
                          test_y: np.ndarray, l2: float = 1e-3, max_iter: int = 300) -> float:
    """Test accuracy of an L2-regularised multinomial logistic regression (L-BFGS, full batch) on
    frozen features: the usual ceiling proxy for what prompt learning can reach."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(train_x.shape[1], n_classes, generator=gen) * 0.01).requires_grad_(True)
    b = torch.zeros(n_classes, requires_grad=True)
    y = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    scale = 10.0  # features are unit-norm

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(scale * train_x @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = (scale * test_x @ w + b).argmax(dim=-1).numpy()
    return float((pred == np.asarray(test_y)).mean())


def zero_shot_accuracy(model: torch.nn.Module, tokenizer, classnames: list[str], images: np.ndarray,
                       labels: np.ndarray, template: str = ZERO_SHOT_TEMPLATE) -> float:
    """Top-1 accuracy of zero-shot classification with one text template."""
    text = class_text_features(model, tokenizer, classnames, template)
    pred = (image_features(model, images) @ text.T).argmax(dim=-1).numpy()
    return float((pred == np.asarray(labels)).mean())


# ----------------------------------------------------------------------------------------------
# training


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (p.ndim < 2 or "embedding" in name or "ln" in name or "bn" in name
                   or "logit_scale" in name or name.endswith("bias"))
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def _save_weights(state: dict[str, torch.Tensor], out: Path, dtype: torch.dtype) -> None:
    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in state.items()}
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"format": FORMAT})
    else:
        torch.save(state, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)


def pretrain(
    model_name: str = DEFAULT_MODEL,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    seed: int = DEFAULT_SEED,
    out: str | Path = f"{DEFAULT_MODEL}.safetensors",
    progress: bool = True,
    lr: float = DEFAULT_LR,
    warmup: int = DEFAULT_WARMUP,
    weight_decay: float = DEFAULT_WD,
    dtype: str = "float16",
    evaluate: bool = True,
    threads: Optional[int] = DEFAULT_THREADS,
) -> Path:
    """Pretrain ``model_name`` from scratch on the synthetic world; write ``out`` and its sidecar.

    ``out`` ending in ``.safetensors`` is written with safetensors, anything else with
    ``torch.save``; both are state dicts that ``open_clip.create_model_and_transforms(model_name,
    pretrained=out)`` (and ``dpfpl.clip.load_clip``) load. Deterministic in ``seed`` for a given
    torch build and thread count: ``threads`` sets torch's intra-op threads for the run (restored
    afterwards; None keeps the current setting). With ``evaluate`` the sidecar also records the
    zero-shot accuracy on the default synthetic task. Returns the path of the weights.
    """
    if steps < 1 or batch_size < 2:
        raise ConfigError(f"pretrain: steps={steps} must be >= 1 and batch_size={batch_size} >= 2")
    if threads is not None and threads < 1:
        raise ConfigError(f"pretrain: threads={threads} must be >= 1")
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"pretrain: dtype={dtype!r} must be float16 or float32")
    oc = _open_clip()
    if model_name not in oc.list_models():
        raise ConfigError(f"pretrain: unknown model {model_name!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _pretrain(oc, model_name, steps, batch_size, seed, out, progress, lr, warmup,
                         weight_decay, dtype, evaluate)
    finally:
        torch.set_num_threads(threads_before)


def _pretrain(oc, model_name: str, steps: int, batch_size: int, seed: int, out: Path, progress: bool,
              lr: float, warmup: int, weight_decay: float, dtype: str, evaluate: bool) -> Path:
    from .data import synthetic

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = oc.create_model(model_name, pretrained=None)
    model.train()
    tokenizer = oc.get_tokenizer(model_name)
    # Only the token embeddings of the caption vocabulary can receive gradients: train those rows as
    # a small parameter and write them back at the end (the other rows keep their initial values,
    # exactly as with the full table, but without a dense 49408-row gradient and Adam update).
    vocab = torch.unique(tokenizer(synthetic.caption_words()))
    table = model.token_embedding.weight
    lut = torch.full((table.shape[0],), -1, dtype=torch.long)
    lut[vocab] = torch.arange(len(vocab))
    rows = torch.nn.Parameter(table.detach()[vocab].clone())
    table.requires_grad_(False)

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        local = lut[tokens]
        if bool((local < 0).any()):
            bad = sorted(set(tokens[local < 0].tolist()))
            raise DpfplError(f"pretrain: caption tokens {bad} are outside synthetic.caption_words()")
        return F.embedding(local, rows)

    groups = _param_groups(model, weight_decay)
    groups[0]["params"].append(rows)
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    rng = synthetic.pretrain_rng(seed)
    losses: list[float] = []
    labels = torch.arange(batch_size)
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        bar = Progress(TextColumn("pretrain {task.fields[model]}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=Console(stderr=True), transient=False)
        bar.start()
        task = bar.add_task("pretrain", total=steps, model=model_name, loss=float("nan"))
    try:
        for step in range(steps):
            images, captions = synthetic.pretrain_batch(rng, batch_size)
            x = image_tensor(images, model)
            tokens = tokenizer(captions)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr, warmup)
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(encode_text_cut(model, tokens, embed), dim=-1)
            scale = model.logit_scale.exp()
            logits = scale * img @ txt.T
            loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            if bar is not None:
                bar.update(task, advance=1, loss=float(np.mean(losses[-20:])))
    finally:
        if bar is not None:
            bar.stop()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        table[vocab] = rows
    table.requires_grad_(True)
    model.eval()

    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    _save_weights(model.state_dict(), out, torch_dtype)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "model": model_name,
        "model_config": oc.get_model_config(model_name),
        "weights": out.name,
        "dtype": dtype,
        "sha256": sha256_file(out),
        "recipe": {
            "command": (f"dpfpl pretrain --model {model_name} --steps {steps} --batch-size {batch_size} "
                        f"--seed {seed} --threads {torch.get_num_threads()}"),
            "steps": steps, "batch_size": batch_size, "seed": seed, "threads": torch.get_num_threads(),
            "lr": lr, "warmup": warmup,
            "weight_decay": weight_decay, "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6), cosine schedule",
            "loss": "symmetric InfoNCE (CLIP), learnable temperature clamped to <= 100",
            "data": "dpfpl.data.synthetic.pretrain_batch, generator synthetic.pretrain_rng(seed)",
        },
        "final_loss": float(np.mean(losses[-50:])),
        "train_seconds": round(train_s, 1),
        "versions": {"torch": torch.__version__, "open_clip": getattr(oc, "__version__", "?"),
                     "numpy": np.__version__},
    }
    if evaluate:
        meta["zero_shot"] = _evaluate(out, model_name)
    sidecar_path(out).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _evaluate(weights: Path, model_name: str) -> dict[str, Any]:
    """Zero-shot and linear-probe accuracy of the saved weights on the default synthetic task."""
    from .clip import load_clip
    from .data.synthetic import load_synthetic

    clip = load_clip(model_name, str(weights))
    ds = load_synthetic()
    res: dict[str, Any] = {"task": "load_synthetic() defaults", "template": ZERO_SHOT_TEMPLATE,
                           "chance": round(1.0 / ds.n_classes, 4)}
    for split_name in ("train", "test"):
        split = getattr(ds, split_name)
        res[split_name] = round(zero_shot_accuracy(clip.model, clip.tokenizer, ds.classnames,
                                                   split.images, split.labels), 4)
    white = load_synthetic(tint=0.0)
    res["test_tint0"] = round(zero_shot_accuracy(clip.model, clip.tokenizer, white.classnames,
                                                 white.test.images, white.test.labels), 4)
    res["linear_probe_test"] = round(linear_probe_accuracy(
        image_features(clip.model, ds.train.images), ds.train.labels,
        image_features(clip.model, ds.test.images), ds.test.labels), 4)
    return res


# ----------------------------------------------------------------------------------------------
# CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``pretrain`` subcommand; its defaults are the recipe of the shipped asset."""
    p = subparsers.add_parser(
        "pretrain",
        help="pretrain the tiny CLIP on the synthetic world (reproduces the builtin checkpoint)",
        description="Contrastively pretrain a randomly initialised open_clip model on procedurally "
                    "generated image-caption pairs. The defaults are the recipe of the checkpoint "
                    "shipped in dpfpl/assets (--pretrained builtin).")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"open_clip architecture (default {DEFAULT_MODEL})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help=f"pairs per step (default {DEFAULT_BATCH})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of init and data (default {DEFAULT_SEED})")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch CPU threads (default {DEFAULT_THREADS}: bitwise reproducible; more is faster "
                        "on an idle machine but may change the last bits of the weights)")
    p.add_argument("--out", default=None,
                   help="weights file (.safetensors or .pt); a .meta.json sidecar is written next to it "
                        "(default ./<model>.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = args.out or f"{args.model}.safetensors"
    t0 = time.perf_counter()
    path = pretrain(args.model, steps=args.steps, batch_size=args.batch_size, seed=args.seed, out=out,
                    progress=not getattr(args, "no_progress", False), threads=args.threads)
    meta = json.loads(sidecar_path(path).read_text())
    zs = meta.get("zero_shot", {})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 {meta['sha256'][:16]}...) and "
          f"{sidecar_path(path).name} in {time.perf_counter() - t0:.0f} s; final loss {meta['final_loss']:.3f}; "
          f"zero-shot on the synthetic task: train {zs.get('train', float('nan')):.3f}, "
          f"test {zs.get('test', float('nan')):.3f} (chance {zs.get('chance', float('nan')):.3f})")
    return 0
