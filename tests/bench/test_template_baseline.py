"""benchmarks/template_baseline.py: a tuned run against another template's zero-shot on the same rows."""

from __future__ import annotations

import pytest

from zotune.config import load_config


def _cfg(*extra):
    return load_config(None, ["task.name=snli", "task.train=100", "task.dev=10", "task.test=50", *extra])


def test_runs_carve_the_same_test_rows_only_with_the_same_task_seed_and_test_size(benchmark_script):
    tb = benchmark_script("template_baseline")
    assert tb.same_test_rows(_cfg(), _cfg("task.template=infer", "task.dev=200", "task.train=1000")) is None
    assert "task.test" in tb.same_test_rows(_cfg(), _cfg("task.test=60"))
    assert "task.split_seed" in tb.same_test_rows(_cfg(), _cfg("task.split_seed=1"))
    assert "task.name" in tb.same_test_rows(_cfg(), _cfg("task.name=mnli"))


def test_the_tuned_rows_are_tested_against_the_baselines_zero_shot_rows(benchmark_script):
    tb = benchmark_script("template_baseline")
    rows = {"tuned": {"zero_shot": [0, 0, 0, 0, 0, 0], "tuned": [1, 1, 1, 1, 1, 0]},
            "base": {"zero_shot": [1, 1, 1, 1, 0, 0], "tuned": [0] * 6}}
    configs = {"tuned": _cfg("task.template=infer"), "base": _cfg()}
    r = tb.compare("tuned", "base", rows, configs)
    assert r["mean_a"] == pytest.approx(4 / 6) and r["mean_b"] == pytest.approx(5 / 6) and r["own_zero_shot"] == 0
    assert (r["only_a"], r["only_b"]) == (0, 1) and r["tuned_template"] == "infer" and r["baseline_template"] == "default"
    configs["base"] = _cfg("task.test=60")
    with pytest.raises(SystemExit, match="did not score the same test rows"):
        tb.compare("tuned", "base", rows, configs)
