"""``zotune bench``: run a grid of training runs, each in its own process, resumably.

A grid file is YAML::

    # zotune bench benchmarks/grids/example.yaml
    name: example
    base: {model: {name: smollm2-135m}, train: {steps: 100}}   # or base: recipes/x.yaml
    grid:                                   # cartesian product of section.field values
      task.name: [sst2, rte]
      optim.method: [mezo, lozo]
    runs:                                   # and/or explicit runs (name + overrides)
      - {name: mezo-lora-sst2, set: {trainable.scheme: lora, optim.lr: 1.0e-4}}
    seeds: [0]                              # optim.seed and train.data_seed
    output_dir: runs/bench/example          # each run in output_dir/<run name>
    results: benchmarks/results/example.jsonl

One process per run, so a crash or an out-of-memory kill ends that run only: it is recorded
with its status and the tail of its stderr, and the grid goes on. Runs already recorded as
``ok`` in the results file are skipped, so re-running the command resumes the grid.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from zotune.config import ConfigError, load_config, read_yaml_mapping


@dataclass
class RunSpec:
    name: str
    overrides: dict = field(default_factory=dict)  # "section.field" -> value
    labels: dict = field(default_factory=dict)  # recorded with the run (what a study's table groups by)


@dataclass
class Grid:
    name: str
    base: dict | str | None
    runs: list[RunSpec]
    output_dir: Path
    results: Path


def _slug(value) -> str:
    return str(value).replace("/", "_").replace(" ", "")


def load_grid(path: str | Path) -> Grid:
    """Read and expand a grid file; every run's config is validated before anything runs."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"grid file not found: {p}")
    data = read_yaml_mapping(p, "name, base, runs, ...")
    unknown = set(data) - {"name", "base", "grid", "runs", "seeds", "output_dir", "results"}
    if unknown:
        raise ConfigError(f"{p}: unknown keys {sorted(unknown)}")
    name = data.get("name", p.stem)
    seeds = data.get("seeds", [None])
    runs: list[RunSpec] = []
    axes = data.get("grid") or {}
    if axes:
        keys = list(axes)
        for values in itertools.product(*(axes[k] if isinstance(axes[k], list) else [axes[k]] for k in keys)):
            over = dict(zip(keys, values))
            runs.append(RunSpec("-".join(f"{_slug(v)}" for v in values), over))
    for entry in data.get("runs") or []:
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{p}: each entry of runs needs a name, got {entry!r}")
        runs.append(RunSpec(str(entry["name"]), dict(entry.get("set") or {})))
    if not runs:
        raise ConfigError(f"{p}: no runs (give a grid or a runs list)")
    expanded = []
    for run in runs:
        for seed in seeds:
            over = dict(run.overrides)
            suffix = ""
            if seed is not None:
                over.setdefault("optim.seed", seed)
                over.setdefault("train.data_seed", seed)
                suffix = f"-s{seed}"
            expanded.append(RunSpec(run.name + suffix, over))
    names = [r.name for r in expanded]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"{p}: run names repeat: {sorted(dupes)}")
    grid = Grid(name, data.get("base"), expanded, Path(data.get("output_dir", f"runs/bench/{name}")),
                Path(data.get("results", f"benchmarks/results/{name}.jsonl")))
    validate_grid(grid)
    return grid


def validate_grid(grid: Grid) -> None:
    """Build every run's config; raise one ``ConfigError`` listing the problems of all runs."""
    errors = []
    for run in grid.runs:
        try:
            run_config(grid, run)
        except ConfigError as e:
            errors.append(f"run {run.name}: {e}")
    if errors:
        raise ConfigError("\n".join(errors))


def _override_list(grid: Grid, run: RunSpec) -> tuple[str | None, list[str]]:
    items = []
    base_path = None
    if isinstance(grid.base, str):
        base_path = grid.base
    elif isinstance(grid.base, dict):
        for section, values in grid.base.items():
            for k, v in (values or {}).items():
                items.append(f"{section}.{k}={json.dumps(v)}")
    items += [f"{k}={json.dumps(v)}" for k, v in run.overrides.items()]
    items.append(f"train.output_dir={grid.output_dir / run.name}")
    return base_path, items


def run_config(grid: Grid, run: RunSpec):
    base_path, items = _override_list(grid, run)
    return load_config(base_path, items)


def finished(results: Path) -> set[str]:
    """Names of runs recorded as ok in the results file."""
    done = set()
    if results.exists():
        for line in results.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("status") == "ok":
                done.add(rec["run"])
    return done


def run_grid(grid: Grid, *, only: list[str] | None = None, timeout: float | None = None, log=print) -> list[dict]:
    """Run every not-yet-finished run of ``grid`` in its own process; append a record per run."""
    grid.results.parent.mkdir(parents=True, exist_ok=True)
    done = finished(grid.results)
    records = []
    todo = [r for r in grid.runs if (only is None or r.name in only)]
    for k, run in enumerate(todo, 1):
        if run.name in done:
            log(f"[{k}/{len(todo)}] {run.name}: done already, skipped")
            continue
        base_path, items = _override_list(grid, run)
        cmd = [sys.executable, "-m", "zotune.cli", "train"] + ([base_path] if base_path else []) + items
        cmd += ["train.progress=false"]
        log(f"[{k}/{len(todo)}] {run.name}: running")
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "ok" if proc.returncode == 0 else ("killed" if proc.returncode < 0 else "failed")
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            status = "timeout"
        rec = {"run": run.name, "grid": grid.name, "status": status, "returncode": proc.returncode,
               "wall_seconds": round(time.time() - t0, 1), "overrides": run.overrides,
               "output_dir": str(grid.output_dir / run.name)}
        if run.labels:
            rec["labels"] = run.labels
        results_file = grid.output_dir / run.name / "results.json"
        if status == "ok" and results_file.exists():
            rec["results"] = json.loads(results_file.read_text())
        if status != "ok":
            rec["stderr_tail"] = (err or "")[-2000:]
        with open(grid.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        log(f"[{k}/{len(todo)}] {run.name}: {status} in {rec['wall_seconds']} s")
        records.append(rec)
    return records
