"""Re-measure the zero-shot test rows of finished adapter runs with the base model.

    python benchmarks/base_zero_shot.py runs/bench/cross-task/copa-fzoo-prefix [...]

Until 2026-12-03 a run measured "zero-shot" through its adapters; a prefix started from real
activations changes what the model computes before any step (as if real tokens came first), so
those runs' baseline was not the base model's. ``zotune train`` now measures the base model
(:func:`zotune.params.without_adapters`); this script brings older run folders in line: it
rebuilds each run's test split from its ``config.json``, scores the base model on it and
writes the rows as ``zero_shot`` in ``test_rows.json`` (the old rows kept as
``zero_shot_through_adapters``), and the metrics into ``results.json`` and the grid records are
left alone (``benchmarks/cross_task.py`` reads the rows). A run already measured this way is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zotune.config import from_dict
from zotune.params import without_adapters
from zotune.train.loop import build, evaluate_split_rows

OLD = "zero_shot_through_adapters"


def remeasure(run: Path) -> dict | None:
    rows_path = run / "test_rows.json"
    rows = json.loads(rows_path.read_text())
    config = json.loads((run / "config.json").read_text())
    if config["trainable"]["scheme"] == "full" or OLD in rows:
        return None
    setup = build(from_dict(config), splits=("test",))
    with without_adapters(setup.loaded) as base:
        metrics, scores = evaluate_split_rows(setup, setup.data.test, "test", lm=base)
    if len(scores) != len(rows["zero_shot"]):
        raise SystemExit(f"{run}: {len(scores)} test rows now, {len(rows['zero_shot'])} in the run")
    rows[OLD], rows["zero_shot"] = rows["zero_shot"], scores
    tmp = rows_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows))
    tmp.replace(rows_path)
    return metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args(argv)
    for run in args.runs:
        metrics = remeasure(run)
        print(f"{run}: " + ("skipped (full weights, or measured already)" if metrics is None
                            else f"base-model zero-shot {json.dumps(metrics)}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
