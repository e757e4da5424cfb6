"""Opacus' functorch per-sample path gives the same per-example prompt gradients as ours
(bench-only extra: skipped without opacus, ``pip install -e .[bench]``)."""

from __future__ import annotations

import pytest
import torch

from dpfpl.grads import per_example_ctx_grads
from dpfpl.text import PromptTextEncoder

from .conftest import CLASSNAMES

pytest.importorskip("opacus")


@pytest.mark.parametrize("strategy", ["vjp", "jacobian"])
def test_opacus_functorch_equals_ours(tiny_clip, strategy):
    from bench.opacus_prompt import opacus_module, opacus_per_example_grads

    enc = PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4)
    g = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(6, 64, generator=g), dim=-1)  # (B, E)
    labels = torch.randint(0, len(CLASSNAMES), (6,), generator=g)
    ctx = torch.randn(4, 64, generator=g) * 0.02  # (n_ctx, D)
    losses, G = per_example_ctx_grads(enc, ctx, feats, labels, 50.0, strategy=strategy)
    gsm = opacus_module(enc, ctx, 50.0)
    o_losses, o_G = opacus_per_example_grads(gsm, feats, labels)
    assert o_G.shape == G.shape == (6, 4, 64)
    assert torch.allclose(o_losses, losses, atol=1e-5)
    assert (o_G - G).abs().max() <= 1e-5 * G.abs().max()
    assert [n for n, _ in gsm.named_parameters()] == ["_module.ctx"]  # only the context is trained
