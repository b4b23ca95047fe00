"""benchmarks/batch_noise.py: the full gradient's G and the examples' spread T, and what they predict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_noise_terms_are_unbiased_estimates_from_sums(benchmark_script):
    bn = benchmark_script("batch_noise")
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(50, 7, generator=gen)  # 50 per-example gradients
    mean = g.mean(0)
    want_t = float((g - mean).square().sum(1).sum() / 49)
    want_g = float(mean.square().sum()) - want_t / 50
    got_g, got_t = bn.noise_terms(g.sum(0), float(g.square().sum()), 50)
    assert got_t == pytest.approx(want_t, rel=1e-5) and got_g == pytest.approx(want_g, rel=1e-4)
    # the estimate of G is unbiased: examples = a fixed g plus zero-mean noise, averaged over draws
    true = torch.tensor([1.0, -2.0, 0.5])
    draws = [bn.noise_terms(*(lambda x: (x.sum(0), float(x.square().sum())))(true + 3 * torch.randn(8, 3, generator=gen)), 8)
             for _ in range(4000)]
    assert sum(d[0] for d in draws) / len(draws) == pytest.approx(float(true.square().sum()), rel=0.05)
    assert sum(d[1] for d in draws) / len(draws) == pytest.approx(27.0, rel=0.05)  # 3 entries x 3^2
    with pytest.raises(ValueError, match="at least 2 rows"):
        bn.noise_terms(g[0], float(g[0].square().sum()), 1)


def test_the_predicted_gain_and_lr_follow_b_g_plus_t(benchmark_script):
    bn = benchmark_script("batch_noise")
    assert bn.per_row_gain(1.0, 8.0, 16) == 1.0 and bn.lr_ratio(1.0, 8.0, 16) == 1.0
    assert bn.per_row_gain(1.0, 8.0, 4) == pytest.approx(24 / 12)      # (16 G + T) / (4 G + T)
    assert bn.lr_ratio(1.0, 8.0, 4) == pytest.approx(1.5 / 3.0)        # (G + T / 16) / (G + T / 4)
    assert bn.per_row_gain(1.0, 0.0, 4) == pytest.approx(4.0)          # no spread: 16 / B
    assert bn.per_row_gain(1e-9, 1.0, 4) == pytest.approx(1.0, rel=1e-6)  # spread alone: batch does not matter


def test_main_measures_per_example_gradients_on_a_tiny_model(tmp_path, monkeypatch, benchmark_script):
    bn = benchmark_script("batch_noise")
    monkeypatch.setattr(bn, "BASE", [b for b in bn.BASE if not b.startswith("model.")] + ["model.name=tiny-llama",
                                                                                          f"task.data_root={DATA}"])
    monkeypatch.setitem(bn.TASKS, "sst2", ["task.train=16", "task.dev=4", "task.test=4", "task.max_length=48"])
    out = tmp_path / "n.json"
    assert bn.main(["--task", "sst2", "--rows", "6", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == 6 and data["T"] > 0 and [b["batch"] for b in data["batches"]] == [1, 2, 4, 8, 16]
    assert data["batches"][-1]["per_row_gain_vs_16"] == pytest.approx(1.0)
    assert data["meta"]["config"][-4:] == ["task.train=16", "task.dev=4", "task.test=4", "task.max_length=48"]
    with pytest.raises(ValueError, match="training split has 16 rows"):
        bn.main(["--task", "sst2", "--rows", "40", "--out", str(out)])


def test_full_weights_and_the_per_example_noise_reduction(tmp_path, monkeypatch, benchmark_script):
    bn = benchmark_script("batch_noise")
    monkeypatch.setattr(bn, "BASE", [b for b in bn.BASE if not b.startswith("model.")] + ["model.name=tiny-llama",
                                                                                          f"task.data_root={DATA}"])
    monkeypatch.setitem(bn.TASKS, "sst2", ["task.train=16", "task.dev=4", "task.test=4", "task.max_length=48"])
    monkeypatch.setattr(bn, "ROOT", tmp_path)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    assert bn.main(["--task", "sst2", "--scheme", "full", "--rows", "6"]) == 0
    data = json.loads((tmp_path / "benchmarks/results/batch_noise_sst2_full.json").read_text())
    assert data["scheme"] == "full" and "trainable.scheme=full" in data["meta"]["config"]
    g, t = data["G"], data["T"]
    assert data["per_example_noise_reduction_16"] == pytest.approx((16 * g + t) / (g + t))
