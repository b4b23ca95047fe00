"""Paired tests between a base and a tuned model on the same rows."""

import math

import pytest

from zotune.bench.paired import mcnemar_exact, paired_test, sign_flip


def rows(only_a, only_b, both=0, neither=0):
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    return a, b


def test_mcnemar_is_the_two_sided_binomial_tail_of_the_discordant_rows():
    a, b = rows(23, 59, both=209, neither=109)  # the SST-2 quickstart's counts (docs/results.md)
    out = mcnemar_exact(a, b)
    assert (out["only_a"], out["only_b"], out["n"]) == (23, 59, 400)
    tail = sum(math.comb(82, i) for i in range(24)) / 2 ** 82
    assert out["p"] == pytest.approx(2 * tail) and out["p"] == pytest.approx(8.7e-5, rel=0.02)
    assert mcnemar_exact(b, a)["p"] == out["p"]  # symmetric
    assert mcnemar_exact(*rows(0, 0, both=5))["p"] == 1.0  # no discordant row: no evidence
    assert mcnemar_exact(*rows(0, 5))["p"] == pytest.approx(2 / 32)  # 5 of 5 one way
    assert mcnemar_exact(*rows(3, 3))["p"] == 1.0


def test_sign_flip_tracks_the_size_of_a_graded_shift_and_is_seeded():
    a = [0.2, 0.5, 0.1, 0.4] * 25
    same = sign_flip(a, a, resamples=500)
    assert same["p"] == 1.0
    up = sign_flip(a, [x + 0.3 for x in a], resamples=500)
    assert up["p"] == pytest.approx(1 / 501)  # no sign pattern matches a shift every row agrees on
    noisy = [x + (0.3 if i % 2 else -0.28) for i, x in enumerate(a)]
    p = sign_flip(a, noisy, resamples=2000, seed=3)["p"]
    assert p > 0.3 and p == sign_flip(a, noisy, resamples=2000, seed=3)["p"]


def test_paired_test_picks_the_exact_test_for_right_wrong_rows():
    assert paired_test(*rows(2, 9))["test"] == "mcnemar-exact"
    assert paired_test([0.5, 1.0], [1.0, 1.0], resamples=10)["test"] == "sign-flip"


def test_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match="same rows: 2 against 3"):
        paired_test([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="no rows"):
        mcnemar_exact([], [])
    with pytest.raises(ValueError, match="use sign_flip"):
        mcnemar_exact([0.5], [1])
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        sign_flip([0.5], [1.0], resamples=0)
