"""benchmarks/task_scan.py: the scan reads the grid runs' dev rows, never their test rows."""

from __future__ import annotations

import json

import yaml

from zotune.train.loop import load_data


def write_copa(root, n: int = 60) -> None:
    (root / "COPA").mkdir(parents=True)
    rows = [{"premise": f"premise {i}", "choice1": f"a {i}", "choice2": f"b {i}", "question": "cause",
             "label": i % 2, "idx": i} for i in range(n)]
    (root / "COPA" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_scan_dev_rows_are_disjoint_from_the_grid_runs_test_rows(tmp_path, monkeypatch, benchmark_script):
    write_copa(tmp_path / "data")
    monkeypatch.setenv("ZOTUNE_DATA", str(tmp_path / "data"))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "name": "g", "base": {"model": {"name": "smollm2-135m"}, "task": {"split_seed": 3}},
        "runs": [{"name": "copa-run", "set": {"task.name": "copa", "task.train": 20, "task.dev": 10, "task.test": 20}}],
        "output_dir": str(tmp_path / "runs"), "results": str(tmp_path / "r.jsonl")}))
    scan = benchmark_script("task_scan")
    splits = scan.grid_test_splits(str(grid))
    assert splits == {"copa": (20, 3)}

    from zotune.bench.grid import load_grid, run_config
    g = load_grid(grid)
    run = load_data(run_config(g, g.runs[0]), ("dev", "test"))
    run_test, run_dev = run.test, run.dev
    scanned = load_data(scan.scan_config("copa", 10, None, splits["copa"]), ("dev",)).dev
    key = lambda e: e.choices  # noqa: E731 (each synthetic row's choices are unique)
    assert {key(e) for e in scanned} == {key(e) for e in run_dev}
    assert not {key(e) for e in scanned} & {key(e) for e in run_test}
    # what the scan did before: test=0 made its dev rows the runs' test rows
    leaked = load_data(scan.scan_config("copa", 10, None, (0, 3)), ("dev",)).dev
    assert {key(e) for e in leaked} <= {key(e) for e in run_test}


def test_scan_config_takes_a_template(tmp_path, monkeypatch, benchmark_script):
    write_copa(tmp_path / "data")
    monkeypatch.setenv("ZOTUNE_DATA", str(tmp_path / "data"))
    scan = benchmark_script("task_scan")
    assert scan.scan_config("copa", 10, None, (20, 3)).task.template is None
    cfg = scan.scan_config("copa", 10, None, (20, 3), "mezo")
    assert cfg.task.template == "mezo"
    assert len(load_data(cfg, ("dev",)).dev) == 10
