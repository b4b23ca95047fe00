"""benchmarks/head_cache_sweep.py: its run list and the dev curves it reads from a run's metrics."""

from __future__ import annotations

import json

import pytest


def test_runs_parse_as_method_and_lr_and_bad_ones_say_why(benchmark_script):
    sweep = benchmark_script("head_cache_sweep")
    assert sweep.parse_runs("mezo:0.3, zo-adam:1e-2,") == [("mezo", 0.3), ("zo-adam", 0.01)]
    with pytest.raises(SystemExit, match="not METHOD:LR"):
        sweep.parse_runs("mezo")
    with pytest.raises(SystemExit, match="not a number"):
        sweep.parse_runs("mezo:fast")
    with pytest.raises(SystemExit, match="at least one"):
        sweep.parse_runs(" , ")


def test_the_dev_curve_is_the_headline_metric_at_each_dev_evaluation(tmp_path, benchmark_script):
    sweep = benchmark_script("head_cache_sweep")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "phase": "zero-shot", "test/accuracy": 0.5},
        {"step": 10, "loss": 0.7},
        {"step": 10, "phase": "dev", "dev/accuracy": 0.6, "dev/n": 20},
        {"step": 20, "phase": "dev", "dev/f1a": 0.4, "dev/n": 20},  # MultiRC's headline when there is no accuracy
    ]) + "\n")
    assert sweep.dev_curve(metrics) == [(10, 0.6), (20, 0.4)]


@pytest.mark.parametrize("scheme", ["final_norm", "top_layers", "lora"])
def test_a_sweep_of_each_cached_scheme_writes_its_runs_with_their_dev_curves(tmp_path, benchmark_script, scheme):
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    if not data.is_dir():
        pytest.skip("shared data not found beside the repo")
    sweep = benchmark_script("head_cache_sweep")
    out = tmp_path / "sweep.json"
    eps = "1e-2" if scheme == "final_norm" else "1e-3"
    assert sweep.main(["--task", "sst2", "--runs", "mezo:1e-2,fo-sgd:1e-2", "--steps", "4", "--eval-every", "2",
                       "--out", str(out), "--set", "model.name=tiny-llama", f"task.data_root={data}",
                       "task.train=16", "task.dev=8", "task.test=8", "task.max_length=32",
                       f"trainable.scheme={scheme}", f"optim.eps={eps}"]
                      + (["trainable.top_layers=1"] if scheme == "lora" else [])) == 0
    record = json.loads(out.read_text())
    result = record.get("result", record)
    assert [r["method"] for r in result["runs"]] == ["mezo", "fo-sgd"] and result["finished"] is True
    assert all([s for s, _ in r["curve"]] == [2, 4] for r in result["runs"])
    assert result["dev_zero_shot"]["n"] == 8
