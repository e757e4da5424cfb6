"""Text path, factorisation, gradient reconstruction, per-example gradients, client isolation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpfpl import lowrank
from dpfpl.engine import Engine
from dpfpl.grads import batch_ctx_grad, per_example_ctx_grads
from dpfpl.errors import ConfigError
from dpfpl.text import PromptTextEncoder, text_tower

from .conftest import CLASSNAMES


@pytest.mark.parametrize("cut", [True, False])
def test_text_path_equals_encode_text(tiny_clip, cut):
    """Context = token embeddings of "a photo of a" reproduces encode_text of the full phrase."""
    enc = PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4, cut=cut)
    phrase_tokens = tiny_clip.tokenizer(["a photo of a"])[0, 1:5]
    ctx = enc.tower.token_embedding(phrase_tokens)  # (4, D)
    ours = enc(ctx)
    ref = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer([f"a photo of a {c}." for c in CLASSNAMES])), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert enc.length == (int(tiny_clip.tokenizer([f"X X X X {c}." for c in CLASSNAMES]).argmax(-1).max()) + 1 if cut else 77)


def test_cut_shortens_sequence(tiny_clip):
    assert PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=16, cut=True).length < 30


def test_factorisation_invariants():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(16, 64, generator=g) * 0.02
    for k in (1, 4, 8, 16):
        u, v, r = lowrank.power_factorize(p, k, g)
        assert u.shape == (16, k) and v.shape == (64, k)
        assert torch.allclose(u.T @ u, torch.eye(k), atol=1e-5)
        assert torch.allclose(v.T @ v, torch.eye(k), atol=1e-5)
        assert torch.allclose(u @ v.T + r, p, atol=1e-7)
    with pytest.raises(ValueError, match="rank"):
        lowrank.power_factorize(p, 17, g)


def test_gradient_reconstruction_matches_autograd_projection(tiny_clip):
    """Carrier grads from G equal autograd's grads of u, v; the rebuilt gradient is the tangent
    projection u u^T G + G v v^T - u u^T G v v^T (paper Eq. 4 with the right sign, no /10)."""
    torch.manual_seed(0)
    enc = PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4)
    p_G, p_L = torch.randn(4, enc.width) * 0.02, torch.randn(4, enc.width) * 0.02
    u0, v0, r = lowrank.power_factorize(p_L, 2, torch.Generator().manual_seed(1))
    u, v = u0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
    feats = F.normalize(torch.randn(6, 64), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    loss = F.cross_entropy(50 * feats @ enc(p_G + u @ v.T + r).T, labels)
    gu_auto, gv_auto = torch.autograd.grad(loss, (u, v))
    _, G = batch_ctx_grad(enc, p_G + p_L, feats, labels, 50.0)
    gu, gv = lowrank.carrier_grads(G, u0, v0)
    assert (gu - gu_auto).norm() / gu_auto.norm() < 1e-4 and (gv - gv_auto).norm() / gv_auto.norm() < 1e-4
    rebuilt = lowrank.rebuild_grad(gu, gv, u0, v0)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(rebuilt, lowrank.tangent_projection(G, u0, v0)) < 1e-5
    # a projection: idempotent, and removes the part of G outside the tangent space
    assert rel(lowrank.tangent_projection(rebuilt, u0, v0), rebuilt) < 1e-5
    wrong = gu @ v0.T + u0 @ gv.T + u0 @ (u0.T @ gu) @ v0.T  # the public code's sign
    assert rel(wrong, rebuilt) > 1e-2


def test_per_example_gradients_match_loop(tiny_clip):
    torch.manual_seed(0)
    enc = PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4)
    ctx = torch.randn(4, enc.width) * 0.02
    feats = F.normalize(torch.randn(5, 64), dim=-1)
    labels = torch.tensor([0, 3, 3, 7, 1])
    losses, G = per_example_ctx_grads(enc, ctx, feats, labels, 30.0)
    loop = torch.stack([batch_ctx_grad(enc, ctx, feats[i:i + 1], labels[i:i + 1], 30.0)[1] for i in range(5)])
    assert G.shape == (5, 4, enc.width)
    assert (G - loop).norm() / loop.norm() < 1e-4
    _, Gm = batch_ctx_grad(enc, ctx, feats, labels, 30.0)
    assert (G.mean(0) - Gm).norm() / Gm.norm() < 1e-5


def test_nores_truncates_local_prompt_to_rank_k(tiny_clip, tiny_dataset, make_cfg):
    e = Engine(make_cfg(method="dpfpl-nores", rounds=1, local_steps=1), clip=tiny_clip, dataset=tiny_dataset)
    c = e.clients[0]
    p0 = c.local["p_L"].detach().clone()
    assert torch.linalg.matrix_rank(p0, atol=1e-6) == 4  # initialised full rank (n_ctx=4 > rank 2)
    view = e.method.local_view(c.local, c.gen, e.server.p_G)
    assert torch.linalg.matrix_rank(c.local["p_L"].detach(), atol=1e-6) == 2
    # the state became the rank-k projection u u^T p0 v v^T of the old state (its residual is dropped),
    # and the forward uses exactly that state
    projected = view.u @ (view.u.T @ p0 @ view.v) @ view.v.T
    assert torch.allclose(c.local["p_L"], projected, atol=1e-6)
    assert torch.equal(view.context(), c.local["p_L"].detach())
    assert (p0 - projected).norm() > 1e-3 * p0.norm()


def test_clients_never_share_state(tiny_clip, tiny_dataset, make_cfg):
    """A step of client 0 leaves client 1's prompts, momentum and generator untouched, and no
    tensor or optimiser is shared between clients."""
    e = Engine(make_cfg(method="fedotp", momentum=0.9), clip=tiny_clip, dataset=tiny_dataset)
    a, b = e.clients
    assert a.opt is not b.opt and a.local["p_L"].data_ptr() != b.local["p_L"].data_ptr()
    b.step(e.server.p_G)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.state_dict().items() if k != "opt"}
    mom_before = b.opt.state_dict()["state"][0]["momentum_buffer"].clone()
    for _ in range(3):
        a.step(e.server.p_G)
    after = b.state_dict()
    assert torch.equal(after["local"]["p_L"], before["local"]["p_L"])
    assert torch.equal(after["gen"], before["gen"])
    assert torch.equal(b.opt.state_dict()["state"][0]["momentum_buffer"], mom_before)
    assert not torch.equal(a.opt.state_dict()["state"][0]["momentum_buffer"], mom_before)


def test_random_init_model_is_seeded_and_leaves_global_rng():
    """``pretrained=none`` builds the same weights in every process (init_seed), without touching
    the caller's RNG stream."""
    from dpfpl.clip import load_clip

    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_clip("dpfpl-tiny", None, "cpu")
    after = torch.rand(3)
    b = load_clip("dpfpl-tiny", "none", "cpu")
    c = load_clip("dpfpl-tiny", None, "cpu", init_seed=1)
    wa, wb, wc = (next(m.model.parameters()) for m in (a, b, c))
    assert torch.equal(before, after) and torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_every_make_target_the_docs_name_exists():
    """`make X` in README.md / results READMEs / the Makefile's .PHONY line: each X has a rule (a target removed
    by accident left `make external-audits` documented but failing)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    makefile = (root / "Makefile").read_text()
    rules = set(re.findall(r"^([A-Za-z0-9_.-]+):", makefile, re.M))
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    docs = "\n".join(p.read_text() for p in [root / "README.md", *root.glob("results/*/README.md")])
    named = set(re.findall(r"`make ([a-z][a-z0-9-]*)", docs))
    assert named and phony <= rules and named <= rules, (phony - rules, named - rules)


@pytest.mark.parametrize("cut", [True, False])
def test_shared_prefix_equals_the_full_sequences(tiny_clip, cut):
    """dpfpl.prefix: the context positions run once for all classes give the same features, batch
    gradients and per-example gradients as the tower on every class's full sequence (float order)."""
    shared = PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4, cut=cut)
    full = PromptTextEncoder(tiny_clip, CLASSNAMES, n_ctx=4, cut=cut, share_prefix=False)
    assert shared.shares_prefix and not full.shares_prefix
    C, L = len(CLASSNAMES), shared.length
    assert shared.rows_per_pass == 5 + C * (L - 5) and full.rows_per_pass == C * L
    g = torch.Generator().manual_seed(3)
    ctx = torch.randn(4, shared.width, generator=g) * 0.02
    assert torch.allclose(shared(ctx), full(ctx), atol=1e-6)
    stacked = torch.randn(3, 4, shared.width, generator=g) * 0.02  # (K, n_ctx, D)
    assert torch.allclose(shared.forward_stacked(stacked), full.forward_stacked(stacked), atol=1e-6)
    per_class = torch.randn(C, 4, shared.width, generator=g) * 0.02  # no shared prefix: the full path
    assert torch.equal(shared(per_class), full(per_class))
    feats = F.normalize(torch.randn(6, 64, generator=g), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    _, Gs = batch_ctx_grad(shared, ctx, feats, labels, 50.0)
    _, Gf = batch_ctx_grad(full, ctx, feats, labels, 50.0)
    assert (Gs - Gf).norm() / Gf.norm() < 1e-5
    _, Ps = per_example_ctx_grads(shared, ctx, feats, labels, 50.0, strategy="vjp")
    _, Pf = per_example_ctx_grads(full, ctx, feats, labels, 50.0, strategy="vjp")
    assert (Ps - Pf).norm() / Pf.norm() < 1e-5


def test_shared_prefix_block_math_with_layer_scale_and_heads():
    """shared_prefix_states equals open_clip's own Transformer (LayerScale, 4 heads, 3 layers) at the
    suffix positions, for G = 2 contexts and C = 5 classes."""
    from dpfpl._compat import import_open_clip
    from dpfpl.prefix import shared_prefix_states, supports_prefix_sharing

    oc = import_open_clip()
    torch.manual_seed(0)
    tower = oc.transformer.TextTransformer(context_length=12, vocab_size=100, width=32, heads=4, layers=3,
                                           ls_init_value=0.5, output_dim=16).eval()
    assert supports_prefix_sharing(tower) is None
    G, C, Lp, L = 2, 5, 7, 12
    pos = tower.positional_embedding[:L]
    prefix = torch.randn(G, Lp, 32) + pos[:Lp]  # (G, Lp, D)
    suffix = torch.randn(C, L - Lp, 32) + pos[Lp:]  # (C, Ls, D)
    full = torch.cat([prefix[:, None].expand(G, C, Lp, 32), suffix.expand(G, C, L - Lp, 32)], dim=2)  # (G, C, L, D)
    with torch.no_grad():
        ref = tower.transformer(full.reshape(G * C, L, 32), attn_mask=tower.attn_mask).reshape(G, C, L, 32)
        got = shared_prefix_states(tower, prefix, suffix.expand(G, C, L - Lp, 32), tower.attn_mask)
    assert torch.allclose(got, ref[:, :, Lp:], atol=1e-5)


def test_prefix_sharing_is_refused_where_it_cannot_hold(tiny_clip):
    """A tower without a causal mask shares nothing (its prefix states depend on the class); asking
    for sharing there is an error, not a silent fallback."""
    import copy

    clip = copy.copy(tiny_clip)
    clip.model = copy.deepcopy(tiny_clip.model)
    text_tower(clip.model).attn_mask = None
    assert not PromptTextEncoder(clip, CLASSNAMES, n_ctx=4, cut=False).shares_prefix
    with pytest.raises(ConfigError, match="share_prefix=True is impossible: the text transformer is not causal"):
        PromptTextEncoder(clip, CLASSNAMES, n_ctx=4, cut=False, share_prefix=True)
