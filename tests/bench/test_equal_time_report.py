"""benchmarks/equal_time.py: the equal-time table, the paired ZO / FO-Adam comparison, the memory ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml


def fake_run(root: Path, name: str, method: str, scheme: str, tuned: list[int], peak_mib: int,
             best_dev: float = 0.8, overrides: dict | None = None) -> dict:
    run = root / name
    run.mkdir(parents=True)
    metrics = [{"step": 10, "loss": 0.5, "step_time": 2.0, "forward_passes": 90},
               {"step": 10, "phase": "dev", "dev/accuracy": 0.7},
               {"step": 20, "loss": 0.4, "step_time": 3.0, "forward_passes": 180},
               {"step": 20, "phase": "dev", "dev/accuracy": 0.8}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    (run / "test_rows.json").write_text(json.dumps({"zero_shot": [0] * len(tuned), "tuned": tuned}))
    res = {"method": method, "scheme": scheme, "steps": 20, "forward_passes": 180, "train_seconds": 50.0,
           "stopped_by_time_budget": True, "best_dev": {"value": best_dev, "step": 20}, "tested_step": 20,
           "zero_shot": {"accuracy": 0.0}, "test": {"accuracy": sum(tuned) / len(tuned), "n": len(tuned)},
           "peak_rss_train_bytes": peak_mib * 2 ** 20}
    return {"run": name, "status": "ok", "output_dir": str(run), "results": res, "overrides": overrides or {}}


def report_of(et, tmp_path: Path, records: list[dict], monkeypatch) -> tuple[dict, Path]:
    """Write ``records`` as a grid's results, run the report on them: (its JSON, its page's path)."""
    results = tmp_path / "r.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "eq", "results": str(results)}))
    out, report = tmp_path / "eq.md", tmp_path / "eq.json"
    monkeypatch.setattr(sys, "argv", ["equal_time.py"])
    assert et.main(["--grid", str(grid), "--out", str(out), "--report", str(report),
                    "--figures", str(tmp_path / "fig")]) == 0
    return json.loads(report.read_text()), out


def test_report_compares_the_best_zo_run_with_fo_adam_on_the_same_rows(tmp_path, monkeypatch, benchmark_script):
    et = benchmark_script("equal_time")
    records = [fake_run(tmp_path, "zo", "fzoo", "prefix", [1] * 12 + [0] * 8, 1000),
               fake_run(tmp_path, "zo-worse", "mezo", "full", [1] * 4 + [0] * 16, 1100),
               fake_run(tmp_path, "fo", "fo-adam", "full", [1] * 20, 4000)]
    data, out = report_of(et, tmp_path, records, monkeypatch)
    c = data["comparison"]
    assert c["zo"] == "zo" and c["fo"] == "fo"
    assert c["gap_points"] == 40.0  # 100 % against 60 %
    assert c["paired"]["n"] == 20 and c["paired"]["p"] == pytest.approx(2 / 2 ** 8)  # 8 rows only FO gets right
    assert c["memory_ratio"] == 0.25
    zo = next(r for r in data["runs"] if r["run"] == "zo")
    assert [p["seconds"] for p in zo["points"]] == [20.0, 50.0]  # 10 steps x 2 s, then 10 x 3 s
    assert "40.0 points ahead" in out.read_text()


def test_runs_tested_on_different_rows_are_refused(tmp_path, benchmark_script):
    et = benchmark_script("equal_time")
    zo = et.summarise(fake_run(tmp_path, "zo", "fzoo", "prefix", [1, 0], 1000))
    fo = et.summarise(fake_run(tmp_path, "fo", "fo-adam", "full", [1, 1, 1], 4000))
    with pytest.raises(SystemExit, match="different rows"):
        et.compare(zo, fo)


def test_the_zo_run_compared_is_chosen_on_dev_never_on_test(tmp_path, benchmark_script):
    et = benchmark_script("equal_time")
    better_on_test = et.summarise(fake_run(tmp_path, "a", "fzoo", "prefix", [1] * 18 + [0] * 2, 1000, best_dev=0.7))
    better_on_dev = et.summarise(fake_run(tmp_path, "b", "fzoo", "prefix", [1] * 10 + [0] * 10, 1000, best_dev=0.75))
    tied_later = et.summarise(fake_run(tmp_path, "c", "mezo", "full", [1] * 20, 1000, best_dev=0.75))
    assert et.best_on_dev([better_on_test, better_on_dev, tied_later])["run"] == "b"


def test_a_hybrid_run_is_compared_apart_from_the_pure_zo_runs(tmp_path, monkeypatch, benchmark_script):
    """A hybrid (trainable.zo_layers: FO-SGD above layer k) reports as its own kind: it never stands
    for "the best ZO run", however high its dev accuracy, and gets its own line against FO-Adam."""
    et = benchmark_script("equal_time")
    records = [fake_run(tmp_path, "zo", "mezo", "prefix", [1] * 12 + [0] * 8, 1000, best_dev=0.7),
               fake_run(tmp_path, "hyb", "mezo", "full", [1] * 19 + [0] * 1, 2000, best_dev=0.9,
                        overrides={"trainable.zo_layers": 20}),
               fake_run(tmp_path, "fo", "fo-adam", "full", [1] * 18 + [0] * 2, 4000)]
    data, out = report_of(et, tmp_path, records, monkeypatch)
    assert data["comparison"]["zo"] == "zo" and data["comparison"]["gap_points"] == 30.0
    h = data["hybrid_comparison"]
    assert h["zo"] == "hyb" and h["gap_points"] == -5.0 and h["memory_ratio"] == 0.5
    assert {r["run"]: r["kind"] for r in data["runs"]} == {"zo": "zero-order", "hyb": "hybrid (20 ZO layers)",
                                                          "fo": "first-order"}
    text = out.read_text()
    assert "FO-Adam is 30.0 points ahead" in text
    assert "5.0 points ahead of FO-Adam" in text


def test_without_a_hybrid_run_there_is_no_hybrid_comparison(tmp_path, benchmark_script):
    et = benchmark_script("equal_time")
    runs = [et.summarise(fake_run(tmp_path, "zo", "mezo", "prefix", [1, 0], 1000)),
            et.summarise(fake_run(tmp_path, "fo", "fo-adam", "full", [1, 1], 4000))]
    assert et.comparisons(runs)[1] is None


def test_a_run_whose_folder_is_gone_is_read_from_the_archive_or_the_previous_report(tmp_path, monkeypatch,
                                                                                    benchmark_script):
    """runs/ is not committed: the report copies each run's files beside the results and reads them
    from there once the folder is gone; older runs that were never copied keep the previous report's
    curve, and a paired test made while both runs' rows existed is kept rather than dropped."""
    import shutil

    et = benchmark_script("equal_time")
    records = [fake_run(tmp_path, "zo", "mezo", "prefix", [1] * 12 + [0] * 8, 1000),
               fake_run(tmp_path, "fo", "fo-adam", "full", [1] * 20, 4000)]
    first, out = report_of(et, tmp_path, records, monkeypatch)
    report = tmp_path / "eq.json"
    args = ["--grid", str(tmp_path / "g.yaml"), "--out", str(out), "--report", str(report),
            "--figures", str(tmp_path / "fig")]
    assert (tmp_path / "r-metrics" / "zo" / "test_rows.json").exists()
    shutil.rmtree(tmp_path / "zo")  # the run folder is gone: the archived copy stands in
    assert et.main(args) == 0
    assert json.loads(report.read_text())["comparison"] == first["comparison"]
    shutil.rmtree(tmp_path / "r-metrics" / "fo")  # never archived: the curve and the paired test of the last report
    shutil.rmtree(tmp_path / "fo")
    assert et.main(args) == 0
    again = json.loads(report.read_text())
    assert again["comparison"] == first["comparison"]
    fo = next(r for r in again["runs"] if r["run"] == "fo")
    assert fo["points"] == next(r for r in first["runs"] if r["run"] == "fo")["points"]
    report.unlink()  # with no earlier report either: the gap and memory ratio, no paired test
    assert et.main(args) == 0
    c = json.loads(report.read_text())["comparison"]
    assert c["paired"] is None and c["gap_points"] == 40.0
    assert "no paired test" in out.read_text()


def test_the_fo_adam_run_compared_is_chosen_on_dev_too(tmp_path, benchmark_script):
    et = benchmark_script("equal_time")
    runs = [et.summarise(fake_run(tmp_path, "zo", "mezo", "prefix", [1, 0], 1000, best_dev=0.7)),
            et.summarise(fake_run(tmp_path, "fo-a", "fo-adam", "full", [1, 1], 4000, best_dev=0.8)),
            et.summarise(fake_run(tmp_path, "fo-b", "fo-adam", "full", [1, 0], 4000, best_dev=0.85))]
    assert et.comparisons(runs)[0]["fo"] == "fo-b"
