"""Pretraining the tiny CLIP, the shipped checkpoint, and the ``dpfpl pretrain`` subcommand."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from dpfpl import pretrain as P
from dpfpl.clip import load_clip
from dpfpl.data.synthetic import load_synthetic
from dpfpl.errors import ConfigError, DpfplError

MODEL = "dpfpl-tiny"

# Measured on the shipped checkpoint with load_synthetic() defaults (also in its sidecar): zero-shot
# ("a photo of a {}.") train 0.552, test 0.568, chance 1/16; test 0.998 without the blue light
# (tint=0); linear probe on frozen image features 0.835. The margins absorb numerical differences
# across torch builds; the weights and the data are fixed.
ZS_MIN, ZS_MAX = 0.45, 0.68


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "tiny.safetensors"
    path = P.pretrain(MODEL, steps=3, batch_size=8, seed=0, out=out, progress=False, evaluate=False)
    return path


def test_pretrain_writes_loadable_checkpoint_and_sidecar(tiny_ckpt):
    assert tiny_ckpt.is_file()
    meta = json.loads(P.sidecar_path(tiny_ckpt).read_text())
    assert meta["format"] == P.FORMAT and meta["model"] == MODEL
    assert meta["sha256"] == P.sha256_file(tiny_ckpt)
    assert meta["recipe"]["steps"] == 3 and meta["recipe"]["batch_size"] == 8 and meta["recipe"]["seed"] == 0
    assert meta["model_config"]["text_cfg"]["context_length"] == 77
    clip = load_clip(MODEL, str(tiny_ckpt))
    ref = load_clip(MODEL, None)
    # the weights were loaded (differ from a random init) and the text tower still works
    a = clip.model.token_embedding.weight
    assert a.shape == ref.model.token_embedding.weight.shape
    feats = clip.model.encode_text(clip.tokenizer(["a photo of a red circle."]))
    assert feats.shape == (1, clip.model.text_projection.shape[1]) and torch.isfinite(feats).all()
    P.verify_checkpoint(tiny_ckpt)


def test_pretrain_deterministic_and_pt_format(tiny_ckpt, tmp_path):
    again = P.pretrain(MODEL, steps=3, batch_size=8, seed=0, out=tmp_path / "again.safetensors",
                       progress=False, evaluate=False)
    assert P.sha256_file(again) == P.sha256_file(tiny_ckpt)
    other = P.pretrain(MODEL, steps=3, batch_size=8, seed=1, out=tmp_path / "other.pt",
                       progress=False, evaluate=False)
    assert P.sha256_file(other) != P.sha256_file(tiny_ckpt)
    load_clip(MODEL, str(other))  # torch.save state dict
    assert json.loads(P.sidecar_path(other).read_text())["sha256"] == P.sha256_file(other)


def test_pretrain_bad_arguments(tmp_path):
    with pytest.raises(ConfigError):
        P.pretrain(MODEL, steps=0, out=tmp_path / "x.safetensors", progress=False)
    with pytest.raises(ConfigError):
        P.pretrain("no-such-model", steps=1, out=tmp_path / "x.safetensors", progress=False)


def test_builtin_checkpoint_verified(tmp_path):
    path = P.builtin_checkpoint(MODEL)
    assert path.suffix == ".safetensors" and path.stat().st_size < 9_000_000
    meta = P.verify_checkpoint(path)
    assert meta["dtype"] == "float16"
    # a corrupted copy is refused with a clear message
    bad = tmp_path / path.name
    shutil.copy(path, bad)
    shutil.copy(P.sidecar_path(path), P.sidecar_path(bad))
    data = bytearray(bad.read_bytes())
    data[-100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DpfplError, match="sha256"):
        P.verify_checkpoint(bad)
    P.sidecar_path(bad).unlink()
    with pytest.raises(DpfplError, match="sidecar"):
        P.verify_checkpoint(bad)


def test_no_builtin_for_other_models():
    with pytest.raises(ConfigError, match="--pretrained PATH") as exc:
        P.builtin_checkpoint("ViT-B-32")
    assert MODEL in str(exc.value)
    with pytest.raises(ConfigError, match="builtin"):
        load_clip("ViT-B-32", "builtin")


def test_cli_defaults_are_the_shipped_recipe():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd")
    P.add_parser(sub)
    args = parser.parse_args(["pretrain"])
    recipe = P.verify_checkpoint(P.builtin_checkpoint(MODEL))["recipe"]
    assert (args.model, args.steps, args.batch_size, args.seed) == (
        MODEL, recipe["steps"], recipe["batch_size"], recipe["seed"])
    assert args.func is P.run


def test_builtin_zero_shot_is_meaningful():
    """Zero-shot is far above chance, and far below what the frozen image features allow."""
    clip = load_clip(MODEL, "builtin")
    ds = load_synthetic()
    acc = P.zero_shot_accuracy(clip.model, clip.tokenizer, ds.classnames, ds.test.images, ds.test.labels)
    chance = 1 / ds.n_classes
    assert acc > chance + 0.3 and ZS_MIN <= acc <= ZS_MAX, acc
    probe = P.linear_probe_accuracy(P.image_features(clip.model, ds.train.images), ds.train.labels,
                                    P.image_features(clip.model, ds.test.images), ds.test.labels)
    assert probe >= 0.75 and probe >= acc + 0.15, (probe, acc)
    # without the domain shift (white light, as in pretraining) zero-shot is near perfect
    white = load_synthetic(n_classes=16, train_per_class=1, test_per_class=10, tint=0.0)
    assert P.zero_shot_accuracy(clip.model, clip.tokenizer, white.classnames, white.test.images,
                                white.test.labels) >= 0.9
    # image_tensor is open_clip's eval preprocessing for images already at 32 px
    pil = torch.stack([clip.preprocess(ds.test.load(i)) for i in range(8)])
    assert torch.allclose(pil, P.image_tensor(ds.test.images[:8], clip.model), atol=1e-6)
    # text features from encode_text_cut equal open_clip's encode_text
    tokens = clip.tokenizer([P.ZERO_SHOT_TEMPLATE.format(c) for c in ds.classnames])
    with torch.no_grad():
        assert torch.allclose(P.encode_text_cut(clip.model, tokens), clip.model.encode_text(tokens), atol=1e-5)
