"""benchmarks/prompt_init.py: dev answers through an untrained prompt, per init, beside the base model."""

from __future__ import annotations

import json

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_each_init_is_scored_on_the_runs_dev_rows_beside_the_base_model(tmp_path, monkeypatch, benchmark_script):
    pi = benchmark_script("prompt_init")
    monkeypatch.setattr(pi, "BASE", [b for b in pi.BASE if not b.startswith(("model.", "task.train", "task.dev", "task.test", "task.max"))] + [
        "model.name=tiny-llama", f"task.data_root={DATA}", "task.train=8", "task.dev=12", "task.test=8",
        "task.max_length=48", "trainable.prompt_tokens=3"])
    out = tmp_path / "p.json"
    assert pi.main(["--seeds", "0,1", "--text", "It was", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    starts = [r["start"] for r in data["results"]]
    assert starts == ["base model, no prompt", "vocabulary, seed 0", "vocabulary, seed 1", "text 'It was'"]
    for r in data["results"]:
        assert r["n"] == 12 and 0.0 <= r["accuracy"] <= 1.0
        assert r["accuracy"] <= r["rebalanced_accuracy"] + 1e-9  # zero offsets are among the bound's
        assert r["top_prediction_share"] >= 0.5  # two answers: the top one has at least half the rows
    assert data["meta"]["task"] == "sst2"
    assert "task.split_seed=0" in data["meta"]["config"]
    with pytest.raises(SystemExit):
        pi.main(["--bogus"])
