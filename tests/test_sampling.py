"""Statistical tests of dpfpl.sampling.BatchSampler: Poisson batches have binomial sizes and include
every example with marginal rate q = B / n; shuffled epochs use every example exactly once."""

from __future__ import annotations

import math

import torch

from dpfpl.sampling import BatchSampler

N, B, T = 200, 20, 2000  # examples, expected batch size, batches drawn
Q = B / N


def _poisson_batches(seed: int = 0) -> list[torch.Tensor]:
    s = BatchSampler(N, B, "poisson", torch.Generator().manual_seed(seed))
    return [s.next() for _ in range(T)]


def test_poisson_batch_sizes_are_binomial():
    sizes = torch.tensor([len(b) for b in _poisson_batches()], dtype=torch.float64)
    # each size ~ Binomial(N, Q): mean N Q = 20, variance N Q (1 - Q) = 18 (fixed-size batches: 0)
    var = N * Q * (1 - Q)
    assert abs(sizes.mean().item() - N * Q) < 5 * math.sqrt(var / T)
    # the sample variance of T binomial draws has sd ~ var * sqrt(2 / T) (normal approximation)
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / T)
    assert len(set(sizes.tolist())) >= 10 and sizes.min() < B - 5 and sizes.max() > B + 5


def test_poisson_marginal_inclusion_rate_is_q_for_every_example():
    batches = _poisson_batches(1)
    counts = torch.zeros(N, dtype=torch.float64)
    for b in batches:
        assert len(set(b.tolist())) == len(b) and (b >= 0).all() and (b < N).all()  # a set of indices
        counts[b] += 1
    # each example's count ~ Binomial(T, Q): mean 200, sd ~13.4; all within 5 sd
    sd = math.sqrt(T * Q * (1 - Q))
    assert ((counts - T * Q).abs() < 5 * sd).all(), counts
    # the pooled rate is q within its binomial tolerance
    assert abs(counts.sum().item() / (N * T) - Q) < 5 * math.sqrt(Q * (1 - Q) / (N * T))


def test_poisson_inclusions_are_independent_of_the_previous_batch():
    """Being in batch t does not change the chance of being in batch t+1 (no without-replacement
    cycling): the overlap of consecutive batches is ~ N Q^2 per step."""
    batches = _poisson_batches(2)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(batches, batches[1:]))
    pairs = N * (T - 1)
    assert abs(overlap / pairs - Q * Q) < 5 * math.sqrt(Q * Q * (1 - Q * Q) / pairs)


def test_shuffle_epochs_cover_every_example_once():
    n, bs = 23, 5
    s = BatchSampler(n, bs, "shuffle", torch.Generator().manual_seed(0))
    perms = []
    for epoch in range(1, 4):
        assert s.epochs_started_by(5) == 1
        batches = [s.next() for _ in range(5)]  # ceil(23 / 5) = 5 batches per epoch
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        ids = torch.cat(batches)
        assert sorted(ids.tolist()) == list(range(n))  # every example exactly once
        assert s.epochs == epoch
        perms.append(ids.tolist())
    assert perms[0] != perms[1] != perms[2]  # a new permutation each epoch


def test_sampler_state_round_trip_continues_the_same_batches():
    for mode in ("poisson", "shuffle"):
        g = torch.Generator().manual_seed(5)
        s = BatchSampler(30, 4, mode, g)
        for _ in range(3):
            s.next()
        state, gstate = s.state_dict(), g.get_state()
        want = [s.next().tolist() for _ in range(10)]
        g2 = torch.Generator()
        g2.set_state(gstate)
        s2 = BatchSampler(30, 4, mode, g2)
        s2.load_state_dict(state)
        assert [s2.next().tolist() for _ in range(10)] == want
