"""benchmarks/prefix_gradients.py: per-layer key / value RMS of a prefix and of its gradient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_the_values_share_is_measured_per_layer_from_real_batches(tmp_path, monkeypatch, benchmark_script):
    pg = benchmark_script("prefix_gradients")
    monkeypatch.setattr(pg, "BASE", [b for b in pg.BASE if not b.startswith(("model.", "task.train", "task.dev",
                                                                              "task.test", "task.max", "train.batch"))]
                        + ["model.name=tiny-llama", f"task.data_root={DATA}", "task.train=16", "task.dev=4",
                           "task.test=4", "task.max_length=48", "train.batch_size=4"])
    out = tmp_path / "g.json"
    assert pg.main(["--batches", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["layer"] for r in data["layers"]] == [0, 1]  # tiny-llama's two layers
    assert all(r["key_grad_rms"] > 0 and r["value_grad_rms"] > 0 for r in data["layers"])
    assert 0 < data["values_share_of_squared_gradient"] < 1
    assert data["values_only_signal_gain"] == pytest.approx(2 * data["values_share_of_squared_gradient"])
    assert data["batches"] == 2 and data["batch_size"] == 4


def test_one_batch_gives_the_rms_and_share_of_that_batchs_gradient(monkeypatch, benchmark_script):
    """Checked against a backward pass made here: the gradient's RMS per layer and the values'
    share of its squared norm (a mean of squares, not squared again)."""

    from zotune.config import load_config
    from zotune.train.loop import build
    from zotune.train.objective import make_closure, resolve_objective

    pg = benchmark_script("prefix_gradients")
    over = [b for b in pg.BASE if not b.startswith(("model.", "task.train", "task.dev", "task.test", "task.max",
                                                    "train.batch"))] + [
        "model.name=tiny-llama", f"task.data_root={DATA}", "task.train=16", "task.dev=4", "task.test=4",
        "task.max_length=48", "train.batch_size=4"]
    got = pg.measure(over, 1)
    cfg = load_config(None, over)
    setup = build(cfg)
    (table,) = setup.named.values()
    make_closure(setup.loaded, setup.data.train[:4], cfg, "cpu", resolve_objective(cfg, setup.data.train))().backward()
    g = table.grad.view(table.shape[0], 2, 2, -1)  # tiny-llama: 2 layers, key then value
    for layer in (0, 1):
        assert got["layers"][layer]["key_grad_rms"] == pytest.approx(float(g[:, layer, 0].square().mean().sqrt()), rel=1e-4)
        assert got["layers"][layer]["value_grad_rms"] == pytest.approx(float(g[:, layer, 1].square().mean().sqrt()), rel=1e-4)
    share = float(g[:, :, 1].square().sum() / g.square().sum())
    assert got["values_share_of_squared_gradient"] == pytest.approx(share, rel=1e-4)
