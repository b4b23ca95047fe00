"""benchmarks/cross_task.py: the paired table from a grid's records and each run's test rows."""

from __future__ import annotations

import json
import sys

import pytest


def record(run, out_dir, task, zs, tuned, metric="accuracy"):
    res = {"task": task, "method": "fzoo", "scheme": "full", "steps": 56, "tested_step": 42, "forward_passes": 504,
           "mean_step_seconds": 7.5, "zero_shot": {metric: zs, "n": 4}, "test": {metric: tuned, "n": 4},
           "peak_rss_bytes": 2 ** 30}
    return {"run": run, "status": "ok", "wall_seconds": 480.0, "overrides": {},
            "output_dir": str(out_dir), "results": res}


def build_report(cross, tmp_path, monkeypatch, results, doc, text):
    """Run the script on ``results`` into ``doc`` (holding ``text``); return its JSON report."""
    doc.write_text(text)
    argv = ["cross_task.py", "--results", str(results), "--rows", str(tmp_path / "rows.json"),
            "--report", str(tmp_path / "report.json"), "--doc", str(doc), "--scan", str(tmp_path / "none.json")]
    monkeypatch.setattr(sys, "argv", argv)
    cross.main()
    return json.loads((tmp_path / "report.json").read_text())


def test_table_marks_a_task_moved_only_when_the_paired_test_says_so(tmp_path, monkeypatch, benchmark_script):
    cross = benchmark_script("cross_task")
    moved_dir, flat_dir = tmp_path / "a", tmp_path / "b"
    for d in (moved_dir, flat_dir):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"optim": {"lr": 1e-3, "eps": 1e-3, "method": "fzoo"}}))
    # 12 rows right only after tuning: p = 2 / 2^12; 1 against 2: p = 1
    (moved_dir / "test_rows.json").write_text(json.dumps({"zero_shot": [0] * 12 + [1] * 4, "tuned": [1] * 16}))
    (flat_dir / "test_rows.json").write_text(json.dumps({"zero_shot": [1, 0, 0, 1], "tuned": [0, 1, 1, 1]}))
    results = tmp_path / "r.jsonl"
    results.write_text("\n".join(json.dumps(r) for r in [
        record("sst2-fzoo-full", moved_dir, "sst2", 0.25, 1.0), record("rte-fzoo-full", flat_dir, "rte", 0.5, 0.75),
        {"run": "copa-fzoo-full", "status": "failed"},
        {**record("wic-fo-adam", moved_dir, "wic", 0.25, 1.0),
         "results": {**record("x", moved_dir, "wic", 0.25, 1.0)["results"], "method": "fo-adam"}}]) + "\n")
    doc = tmp_path / "results.md"
    report = build_report(cross, tmp_path, monkeypatch, results, doc, f"intro\n{cross.START}\nold\n{cross.END}\ntail\n")
    by_run = {r["run"]: r for r in report["runs"]}
    assert by_run["sst2-fzoo-full"]["moved"] and by_run["sst2-fzoo-full"]["paired"]["p"] < 0.001
    assert not by_run["rte-fzoo-full"]["moved"] and report["moved"] == ["sst2 (full)"]
    # a first-order run is a reference: its own test says it moved, but it is not a ZO result
    assert by_run["wic-fo-adam"]["moved"] and report["first_order_references"] == ["wic (wic-fo-adam): moved"]
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("tail\n") and "old" not in text
    assert "| sst2-fzoo-full | sst2 | full | fzoo | 0.001 | 56 (42) | 504 | 480 | accuracy | 25.0 | 100.0 | 16 | 0 / 12 |" in text
    # the rows are kept: the table rebuilds without the run folders
    (moved_dir / "test_rows.json").unlink()
    cross.main()
    assert json.loads((tmp_path / "report.json").read_text())["moved"] == ["sst2 (full)"]


def test_a_run_whose_rows_were_lost_is_listed_but_never_counted_as_moved(tmp_path, monkeypatch, benchmark_script):
    cross = benchmark_script("cross_task")
    r = record("rte-fzoo-full", tmp_path / "gone", "rte", 0.5, 0.75)
    r["results"]["sizes"] = {"test": 300}
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(r) + "\n")
    doc = tmp_path / "results.md"
    report = build_report(cross, tmp_path, monkeypatch, results, doc, f"{cross.START}\n{cross.END}\n")
    (run,) = report["runs"]
    assert run["paired"]["p"] is None and not run["moved"] and report["moved"] == []
    assert run["lr"] == 1e-3  # FZOO's starting point on all weights: the recipe set none
    assert "| rte-fzoo-full | rte | full | fzoo | 0.001 | 56 (42) | 504 | 480 | accuracy | 50.0 | 75.0 | 300 | " \
           "rows not kept (run folder lost) | - | no |" in doc.read_text()


def _rows(zs, tuned):
    return {"zero_shot": zs, "tuned": tuned, "optim": {"lr": 1e-2, "eps": 0.1}}


def test_a_rerun_counts_as_moved_only_when_its_fresh_rows_say_so(benchmark_script):
    cross = benchmark_script("cross_task")
    earlier = _rows([0, 1, 0, 1], [1, 1, 0, 1])
    # the rerun's first 4 rows are the earlier run's; tuning wins on all 12 rows after them: p = 2 / 2^12
    strong = _rows(earlier["zero_shot"] + [0] * 12, [1] * 16)
    # the gain is all in the earlier rows: significant over 16 + 12 rows, nothing on the fresh 12
    front = _rows([0] * 12 + [1, 0, 1, 0] * 3, [1] * 12 + [1, 0, 1, 0] * 3)
    front_earlier = _rows(front["zero_shot"][:12], [1] * 12)
    records = {name: record(name, "gone", "snli", 0.25, 1.0) for name in ("a", "a-more", "b", "b-more")}
    rows = {"a": earlier, "a-more": strong, "b": front_earlier, "b-more": front}
    summary = {s["run"]: s for s in cross.summarise(records, rows, reruns={"a-more": "a", "b-more": "b"})}
    fresh = summary["a-more"]["fresh_rows"]
    assert (fresh["n"], fresh["only_b"], fresh["earlier_rows"]) == (12, 12, 4) and fresh["p"] == 2 / 2 ** 12
    assert summary["a-more"]["moved"]
    assert summary["b-more"]["paired"]["p"] < 0.05 and summary["b-more"]["fresh_rows"]["p"] == 1.0
    assert not summary["b-more"]["moved"]  # the whole split says moved, the fresh rows do not
    assert "fresh_rows" not in summary["a"]
    assert "a-more reruns a with more test rows; on the 12 rows after a's 4: zero-shot 0.0, tuned 100.0, " \
           "0 / 12 rows only zero-shot / only tuned got right" in cross.rerun_lines(list(summary.values()))


def test_a_rerun_on_other_rows_is_refused(benchmark_script):
    cross = benchmark_script("cross_task")
    rows = {"a": _rows([0, 1], [1, 1]), "a-more": _rows([1, 1, 0], [1, 1, 1])}  # its first rows score otherwise
    with pytest.raises(ValueError, match="do not start with a's 2 rows"):
        cross.fresh_rows_test(rows, "a-more", "a")
    with pytest.raises(ValueError, match="no more rows"):
        cross.fresh_rows_test({"a": rows["a"], "a-more": rows["a"]}, "a-more", "a")
    with pytest.raises(ValueError, match="reruns a, whose test rows are not kept"):
        cross.fresh_rows_test({"a-more": rows["a-more"]}, "a-more", "a")


def test_a_head_cache_run_counts_its_trunk_passes_and_names_its_head_only_losses(tmp_path, monkeypatch,
                                                                                   benchmark_script):
    cross = benchmark_script("cross_task")
    d = tmp_path / "a"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"optim": {"lr": 1.0, "eps": 1e-2, "method": "mezo"}}))
    (d / "test_rows.json").write_text(json.dumps({"zero_shot": [0] * 12 + [1] * 4, "tuned": [1] * 16}))
    rec = record("rte-mezo-final-norm-cached", d, "rte", 0.25, 1.0)
    rec["results"].update({"scheme": "final_norm", "forward_passes": 40000,
                           "head_cache": {"seconds": 300.0, "trunk_forward_passes": 76, "rows": {"train": 1000, "dev": 200}}})
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(rec) + "\n")
    doc = tmp_path / "results.md"
    report = build_report(cross, tmp_path, monkeypatch, results, doc, f"{cross.START}\n{cross.END}\n")
    run = report["runs"][0]
    assert run["forward_passes"] == 76 and run["head_evaluations"] == 40000
    assert "| 76 (trunk, once; then 40,000 head-only losses) |" in doc.read_text()
