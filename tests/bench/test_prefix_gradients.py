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
