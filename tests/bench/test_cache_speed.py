"""benchmarks/cache_speed.py: model and cache give the same loss, and the record says how fast each was."""

from __future__ import annotations

import json

import pytest

from tiny_runs import DATA  # tests/ is on the path (its conftest)


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")
def test_the_speed_record_has_both_timings_and_equal_losses(tmp_path, benchmark_script):
    speed = benchmark_script("cache_speed")
    out = tmp_path / "speed.json"
    assert speed.main(["--schemes", "final_norm,top_layers", "--repeats", "2", "--rows", "16", "--out", str(out),
                       "--set", "model.name=tiny-llama", f"task.data_root={DATA}", "task.max_length=32"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["scheme"] for r in rows] == ["final_norm", "top_layers"]
    for r in rows:
        assert r["model_ms"] > 0 and r["cache_ms"] > 0 and r["loss_difference"] < 1e-4
        assert r["ratio"] == pytest.approx(r["model_ms"] / r["cache_ms"], rel=0.1)


def test_unknown_schemes_are_named(benchmark_script):
    with pytest.raises(SystemExit, match="unknown"):
        benchmark_script("cache_speed").main(["--schemes", "final_norm,everything"])
