"""The grid runner (one process per run, skip finished, record crashes) and the report tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from zotune.bench.grid import load_grid, run_grid
from zotune.bench.report import load_records, pivot_table, report, runs_table
from zotune.config import ConfigError

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def write_grid(tmp_path: Path, runs: list[dict]) -> Path:
    grid = {
        "name": "t",
        "base": {
            "model": {"name": "tiny-llama"},
            "task": {"name": "sst2", "train": 16, "dev": 0, "test": 8, "data_root": str(DATA), "max_length": 32},
            "train": {"steps": 2, "batch_size": 4, "tensorboard": False},
            "optim": {"lr": 1.0e-3},
        },
        "runs": runs,
        "output_dir": str(tmp_path / "runs"),
        "results": str(tmp_path / "results.jsonl"),
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")
def test_grid_records_crashes_skips_finished_runs_and_resumes(tmp_path):
    path = write_grid(tmp_path, [
        {"name": "ok", "set": {"optim.method": "mezo"}},
        {"name": "crash", "set": {"task.train_file": str(tmp_path / "missing.tsv")}},
    ])
    grid = load_grid(path)
    first = run_grid(grid, log=lambda *_: None)
    assert [(r["run"], r["status"]) for r in first] == [("ok", "ok"), ("crash", "failed")]
    assert "missing.tsv" in first[1]["stderr_tail"]
    assert first[0]["results"]["test"]["n"] == 8
    # the crashed run's input is fixed: re-running skips "ok" and retries "crash"
    (tmp_path / "missing.tsv").write_text("sentence\tlabel\n" + "".join(f"a fine film {i}\t1\n" for i in range(30)))
    second = run_grid(load_grid(path), log=lambda *_: None)
    assert [(r["run"], r["status"]) for r in second] == [("crash", "ok")]
    records = load_records(tmp_path / "results.jsonl")
    assert sorted(r["run"] for r in records) == ["crash", "ok"] and all(r["status"] == "ok" for r in records)
    text = report(tmp_path / "results.jsonl")
    assert "| ok | sst2 | mezo | full | 2 |" in text


def test_grid_is_validated_whole_before_running(tmp_path):
    path = write_grid(tmp_path, [
        {"name": "a", "set": {"optim.method": "mezzo"}},
        {"name": "b", "set": {"train.steps": 0}},
    ])
    with pytest.raises(ConfigError) as e:
        load_grid(path)
    assert "run a:" in str(e.value) and "Did you mean 'mezo'" in str(e.value)
    assert "run b:" in str(e.value) and "train.steps must be an integer >= 1" in str(e.value)


def test_grid_expands_axes_and_seeds(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({
        "base": {"model": {"name": "tiny-llama"}},
        "grid": {"optim.method": ["mezo", "lozo"], "task.name": ["sst2", "rte"]},
        "seeds": [0, 1],
        "output_dir": str(tmp_path / "o"), "results": str(tmp_path / "r.jsonl"),
    }))
    grid = load_grid(path)
    assert len(grid.runs) == 8
    assert grid.runs[0].name == "mezo-sst2-s0" and grid.runs[0].overrides["optim.seed"] == 0


def test_report_tables_from_records(tmp_path):
    recs = []
    for method, scheme, acc in [("mezo", "full", 0.70), ("mezo", "lora", 0.65), ("lozo", "full", 0.72)]:
        recs.append({"run": f"{method}-{scheme}", "status": "ok", "results": {
            "task": "sst2", "method": method, "scheme": scheme, "steps": 10,
            "zero_shot": {"accuracy": 0.5, "n": 100}, "test": {"accuracy": acc, "n": 100},
            "peak_rss_bytes": 3 * 2**30, "rss_after_load_bytes": 2 * 2**30, "forward_passes": 20,
            "mean_step_seconds": 1.5}})
    recs.append({"run": "broken", "status": "failed", "stderr_tail": "boom"})
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    records = load_records(path)
    table = runs_table(records)
    assert "| mezo-full | sst2 | mezo | full | 10 | 50.0 | 70.0 | accuracy | 100 |" in table
    assert "| 3,072 | 1,024 | ok |" in table and "| broken |" in table and "failed" in table
    pivot = pivot_table(records, "method", "scheme")
    assert pivot.splitlines()[0] == "| method \\ scheme | full | lora |"
    assert "| mezo | 70.0 | 65.0 |" in pivot and "| lozo | 72.0 | - |" in pivot
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        load_records(path)


def test_report_figures_are_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)))
    rec = {"run": "r", "status": "ok", "output_dir": str(run), "results": {
        "task": "sst2", "method": "mezo", "scheme": "full", "test": {"accuracy": 0.7}, "forward_passes": 10}}
    from zotune.bench.report import figures

    paths = figures([rec], tmp_path / "figs")
    assert sorted(p.name for p in paths) == ["accuracy_vs_forward_passes.png", "accuracy_vs_forward_passes.svg",
                                            "loss_curves.png", "loss_curves.svg"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_grid_that_is_not_valid_yaml_or_not_a_mapping_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nruns:\n - {name: a\n")  # an unclosed flow mapping
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_grid(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- name: a\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping of name, base, runs, ..., got list"):
        load_grid(listed)


def test_bench_command_reports_a_broken_grid_in_one_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nruns:\n - {name: a\n")
    done = subprocess.run([sys.executable, "-m", "zotune.cli", "bench", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "not valid YAML" in done.stderr and "Traceback" not in done.stderr
