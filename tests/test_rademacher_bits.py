"""Rademacher directions drawn from random bits: one random 64-bit word gives 64 signs.

Checks the definition (element ``e`` of a chunk is ``-1`` exactly where bit ``e % 64`` of the
chunk's random word ``e // 64`` is set), the values in every float dtype, balance and
independence (seeded, so deterministic), regeneration, chunk tails and thread independence.
"""

from __future__ import annotations

import pytest
import torch

import zotune
from zotune import rng
from zotune.estimators import Direction, Gaussian
from zotune.estimators.gaussian import draw, draw_leaf

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def signs(n, *, seed=0, step=0, query=0, leaf=0, chunk=0, dtype=torch.float32):
    return draw(seed, step, query, leaf, chunk, n, torch.zeros(1, dtype=dtype), "rademacher")


def words_of(seed, step, query, leaf, chunk, count):
    """The chunk's random 64-bit words, drawn as the definition says (full 64-bit range)."""
    g = rng.generator(rng.derive_seed(seed, rng.STREAM_RADEMACHER, step, query, leaf, chunk))
    return [int(w) & ((1 << 64) - 1) for w in torch.empty(count, dtype=torch.int64).random_(-2**63, None, generator=g)]


@pytest.mark.parametrize("n", [0, 1, 16, 32, 63, 64, 65, 200, 1000])
def test_each_sign_is_one_bit_of_a_random_64_bit_word(n):
    words = words_of(3, 5, 1, 2, 4, -(-n // 64))
    expected = [-1.0 if (words[e // 64] >> (e % 64)) & 1 else 1.0 for e in range(n)]
    assert signs(n, seed=3, step=5, query=1, leaf=2, chunk=4).tolist() == expected


@pytest.mark.parametrize("dtype", FLOATS)
def test_values_are_exactly_plus_or_minus_one_in_the_leaf_dtype(dtype):
    z = signs(1000, dtype=dtype)
    assert z.dtype == dtype and z.shape == (1000,)
    assert set(z.tolist()) == {-1.0, 1.0}
    # the same signs whatever the dtype: the dtype only decides how they are written
    assert torch.equal(z.float(), signs(1000))


def test_signs_are_balanced_at_every_bit_position():
    n = 1 << 16
    z = signs(n, seed=11).double()
    assert abs(z.mean()) < 4 / n**0.5  # 4 standard deviations
    by_bit = z.view(-1, 64).mean(0)  # each bit position of the words on its own: 1024 draws each
    assert by_bit.abs().max() < 4.5 / (n // 64) ** 0.5
    # neighbours, and the two 32-bit halves of a word, are uncorrelated
    for lag in (1, 32, 64):
        assert abs((z[:-lag] * z[lag:]).mean()) < 4 / n**0.5, lag


def test_directions_regenerate_exactly_and_differ_across_step_query_leaf_chunk_and_seed():
    n = 1 << 14
    base = dict(seed=1, step=2, query=3, leaf=4, chunk=5)
    z = signs(n, **base)
    assert torch.equal(z, signs(n, **base))
    for key in base:
        other = signs(n, **{**base, key: base[key] + 1})
        assert abs((z * other).mean()) < 4 / n**0.5, key  # independent, not merely different


def test_a_chunk_tail_is_the_prefix_of_the_whole_words():
    # 100 and 36 are not multiples of 64: the last word is cut, its first bits are kept
    full = signs(128, leaf=7)
    assert torch.equal(signs(100, leaf=7), full[:100])
    assert torch.equal(signs(36, leaf=7), full[:36])


def test_leaf_not_a_multiple_of_64_is_drawn_chunk_by_chunk():
    p = torch.zeros(10, 13)  # 130 elements in chunks of 100 and 30
    whole = draw_leaf(2, 1, 0, 0, p, chunk_size=100, distribution="rademacher")
    assert whole.shape == p.shape
    assert torch.equal(whole.view(-1)[:100], draw(2, 1, 0, 0, 0, 100, p, "rademacher"))
    assert torch.equal(whole.view(-1)[100:], draw(2, 1, 0, 0, 1, 30, p, "rademacher"))
    est = Gaussian(distribution="rademacher", chunk_size=100)
    est.bind(["w"], [p], run_seed=2)
    assert torch.equal(est.full_direction(Direction(1, 0), 0, p), whole)


def test_draw_writes_into_the_buffer_it_is_given():
    out = torch.full((70,), 7.0, dtype=torch.bfloat16)
    z = draw(0, 0, 0, 0, 0, 70, out, "rademacher", out=out)
    assert z.data_ptr() == out.data_ptr()
    assert torch.equal(z.float(), signs(70))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_perturbation_is_the_same_whatever_the_chunk_threading(monkeypatch, dtype):
    shapes = [(37, 11), (130,), (5,)]
    results = []
    for threads, parallel in (("1", False), ("2", True), ("2", False)):
        monkeypatch.setenv("ZOTUNE_THREADS", threads)
        params = [torch.zeros(s, dtype=dtype) for s in shapes]
        est = Gaussian(distribution="rademacher", chunk_size=100)
        est.bind([f"p{i}" for i in range(len(params))], params, run_seed=9)
        est.parallel_chunks = parallel
        est.perturb_(params, Direction(4, 1), 0.5)
        results.append(params)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert all(set(p.view(-1).tolist()) == {-0.5, 0.5} for p in results[0])


def test_mezo_with_rademacher_directions_moves_along_the_signs():
    # one step on L(x) = c . x: the estimate is (c . z) z, exactly, for z = +-1
    c = torch.tensor([0.5, -2.0, 1.0, 0.25, 3.0], dtype=torch.float64)
    x = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = zotune.MeZO([("x", x)], lr=0.1, eps=1e-3, seed=6, distribution="rademacher")
    opt.step(lambda: c @ x)
    z = draw_leaf(6, 0, 0, 0, x.detach(), distribution="rademacher")
    torch.testing.assert_close(x.detach(), -0.1 * (c @ z) * z, rtol=1e-9, atol=1e-12)
