"""benchmarks/per_example_noise.py: the second moments of the two estimates from their coefficients."""

import pytest


def test_second_moments_and_their_ratio(benchmark_script):
    pn = benchmark_script("per_example_noise")
    # MeZO: |g|^2 / d = c^2; per-example with B directions: (1/B^2) sum_j c_j^2
    out = pn.second_moments([2.0, -2.0], [[1.0, 1.0], [1.0, -1.0]])
    assert out["shared"] == 4.0 and out["per_example"] == pytest.approx(0.5)
    assert out["ratio"] == pytest.approx(8.0) and out["ratio_se"] == pytest.approx(0.0)
    noisy = pn.second_moments([1.0, 3.0], [[1.0, 1.0], [1.0, 1.0]])
    assert noisy["ratio"] == pytest.approx(10.0) and noisy["ratio_se"] > 0
