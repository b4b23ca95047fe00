"""benchmarks/summed_lr.py: dev accuracy against the summed lr (the gradient flow a run went)."""

from __future__ import annotations

import json

import pytest


def _rows(lrs: dict[int, float], dev: dict[int, float]) -> list[dict]:
    rows = [{"step": 0, "phase": "zero-shot", "test/accuracy": 0.5}]
    for s, lr in lrs.items():
        rows.append({"step": s, "loss": 0.5, "lr": lr, "step_time": 1.0, "forward_passes": 2 * s})
        if s in dev:
            rows.append({"step": s, "phase": "dev", "dev/accuracy": dev[s]})
    return rows


def test_a_constant_lr_sums_to_lr_times_steps(benchmark_script):
    sl = benchmark_script("summed_lr")
    points = sl.summed_lr_curve(_rows({10: 0.01, 20: 0.01, 30: 0.01}, {10: 0.6, 30: 0.7}), 0.01)
    assert points == [{"step": 10, "summed_lr": 0.1, "dev_accuracy": 0.6},
                      {"step": 30, "summed_lr": 0.3, "dev_accuracy": 0.7}]


def test_a_decaying_lr_is_integrated_between_the_logged_values(benchmark_script):
    """Linear decay 0.02 -> 0 over 100 steps, logged every 50: the trapezoid is exact (sum 1.0)."""
    sl = benchmark_script("summed_lr")
    points = sl.summed_lr_curve(_rows({50: 0.01, 100: 0.0}, {50: 0.6, 100: 0.65}), 0.02)
    assert [p["summed_lr"] for p in points] == [pytest.approx(0.75), pytest.approx(1.0)]


def test_dev_at_reads_the_last_point_within_the_sum_and_not_a_distant_one(benchmark_script):
    sl = benchmark_script("summed_lr")
    points = [{"step": 1, "summed_lr": 1.0, "dev_accuracy": 0.6}, {"step": 2, "summed_lr": 4.0, "dev_accuracy": 0.7},
              {"step": 3, "summed_lr": 9.0, "dev_accuracy": 0.8}]
    assert sl.dev_at(points, 5) == 0.7  # 4.0 <= 5 and within 3/4 of it
    assert sl.dev_at(points, 10) == 0.8
    assert sl.dev_at(points, 20) is None  # the run ended at 9: not within 3/4 of 20
    assert sl.dev_at(points, 0.5) is None


def test_runs_on_kept_metrics_and_writes_json(tmp_path, monkeypatch, benchmark_script, capsys):
    sl = benchmark_script("summed_lr")
    kept = tmp_path / "sst2-convergence-metrics" / "fo-sgd-prefix-lr1"
    kept.mkdir(parents=True)
    kept.joinpath("metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in _rows({10: 1.0, 20: 1.0}, {10: 0.67, 20: 0.76})) + "\n")
    monkeypatch.setattr(sl, "RESULTS", tmp_path)
    monkeypatch.setattr(sl, "RUNS", (("sst2-convergence", "fo-sgd-prefix-lr1"), ("sst2-convergence", "mezo-lr1e-5")))
    out = tmp_path / "s.json"
    assert sl.main(["--at", "10,20", "--out", str(out), "--figure", ""]) == 0
    with pytest.raises(SystemExit, match="no run with kept metrics"):  # the one run is a prefix run
        sl.main(["--scheme", "full", "--out", str(tmp_path / "full.json"), "--figure", ""])
    data = json.loads(out.read_text())
    (run,) = data["runs"]  # mezo-lr1e-5 has no kept metrics here: skipped, said so
    assert run["method"] == "fo-sgd" and run["scheme"] == "prefix" and run["lr"] == 1.0
    assert run["dev_at"] == {"10": 0.67, "20": 0.76} and run["summed_lr_end"] == 20
    assert "date" in data["meta"]
    printed = capsys.readouterr().out
    assert "skipped sst2-convergence/mezo-lr1e-5" in printed and "| fo-sgd-prefix-lr1 |" in printed


def test_bad_arguments_are_refused(benchmark_script, tmp_path):
    sl = benchmark_script("summed_lr")
    with pytest.raises(SystemExit, match="comma-separated numbers"):
        sl.main(["--at", "ten", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="positive"):
        sl.main(["--at", "0,5", "--out", str(tmp_path / "x.json")])


def test_no_kept_metrics_is_an_error_that_says_what_to_run(benchmark_script, tmp_path, monkeypatch):
    sl = benchmark_script("summed_lr")
    monkeypatch.setattr(sl, "RESULTS", tmp_path)
    with pytest.raises(SystemExit, match="run benchmarks/convergence.py"):
        sl.main(["--out", str(tmp_path / "x.json"), "--figure", ""])
