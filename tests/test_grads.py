"""Per-example gradient strategies (vjp, jacobian, auto): exact against a per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dpfpl import grads
from dpfpl.config import RunConfig
from dpfpl.errors import ConfigError
from dpfpl.grads import batch_ctx_grad, choose_strategy, per_example_ctx_grads
from dpfpl.text import PromptTextEncoder

from .conftest import CLASSNAMES

SCALE = 50.0


@pytest.fixture(scope="module")
def enc(tiny_clip):
    return PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4)


def _batch(B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.nn.functional.normalize(torch.randn(B, 64, generator=g), dim=-1)  # (B, E)
    labels = torch.randint(0, len(CLASSNAMES), (B,), generator=g)  # (B,)
    ctx = torch.randn(4, 64, generator=g) * 0.02  # (n_ctx, D)
    return ctx, feats, labels


def _loop(enc, ctx, feats, labels):
    out = [batch_ctx_grad(enc, ctx, feats[i:i + 1], labels[i:i + 1], SCALE) for i in range(len(labels))]
    return torch.tensor([l for l, _ in out]), torch.stack([g for _, g in out])  # (B,), (B, n_ctx, D)


@pytest.mark.parametrize("chunk", [None, 3])
@pytest.mark.parametrize("strategy", ["vjp", "jacobian"])
def test_strategies_equal_per_example_loop(enc, strategy, chunk):
    ctx, feats, labels = _batch(7)
    ref_l, ref_G = _loop(enc, ctx, feats, labels)
    losses, G = per_example_ctx_grads(enc, ctx, feats, labels, SCALE, strategy=strategy, chunk_size=chunk)
    assert G.shape == (7, 4, 64) and losses.shape == (7,)
    assert torch.allclose(losses, ref_l, atol=1e-5)
    assert (G - ref_G).abs().max() <= 1e-5 * ref_G.abs().max()


def test_jacobian_is_the_text_jacobian(enc):
    """J[c, e] = d f_txt[c, e] / d ctx, checked against torch.func.jacrev on the shared context."""
    ctx, _, _ = _batch(1)
    with sdpa_kernel(SDPBackend.MATH):
        txt, J = grads._jacobian(enc, ctx, chunk=5)  # (C, E), (C, E, n_ctx, D)
        ref = torch.func.jacrev(enc)(ctx)  # (C, E, n_ctx, D)
    assert torch.allclose(txt, enc(ctx), atol=1e-6)
    assert (J - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_auto_uses_vjp_up_to_E_without_measuring(enc, monkeypatch):
    monkeypatch.setattr(grads, "_COSTS", {})
    ctx, _, _ = _batch(1)
    assert choose_strategy(enc, ctx, 64) == "vjp"  # B <= E = 64: jacobian needs >= E pullbacks
    assert grads._COSTS == {}


def test_auto_follows_the_cost_model(enc, monkeypatch):
    """cost_vjp = B b_v, cost_jac = E b_j + B m: with b_v = 1, b_j = 2, m = 0.5, jacobian wins iff
    B > 4E = 256."""
    monkeypatch.setattr(grads, "_measure",
                        lambda enc, ctx: {"pullback": 1.0, "pullback_jacobian": 2.0, "product": 0.5})
    monkeypatch.setattr(grads, "_COSTS", {})
    ctx, _, _ = _batch(1)
    assert choose_strategy(enc, ctx, 256) == "vjp"
    assert choose_strategy(enc, ctx, 257) == "jacobian"
    assert len(grads._COSTS) == 1  # measured once, cached for the shape


def test_defaults_and_validation(enc, monkeypatch):
    monkeypatch.setattr(grads, "DEFAULTS", dict(grads.DEFAULTS))
    ctx, feats, labels = _batch(3)
    calls = []
    monkeypatch.setattr(grads, "_jacobian_grads", lambda *a: calls.append(a[-1]) or (None, None))
    grads.set_per_example_defaults(strategy="jacobian", chunk_size=2)
    per_example_ctx_grads(enc, ctx, feats, labels, SCALE)
    assert calls == [2]
    with pytest.raises(ValueError, match="not one of"):
        per_example_ctx_grads(enc, ctx, feats, labels, SCALE, strategy="loop")
    losses, G = per_example_ctx_grads(enc, ctx, feats[:0], labels[:0], SCALE)
    assert losses.shape == (0,) and G.shape == (0, 4, 64)


def test_config_field():
    assert RunConfig().train.per_example_grads == "auto"
    assert RunConfig().update({"per_example_grads": "jacobian"}).validate().train.per_example_grads == "jacobian"
    with pytest.raises(ConfigError, match="per_example_grads"):
        RunConfig().update({"per_example_grads": "loop"}).validate()
