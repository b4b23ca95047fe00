"""Is a tuned run better than the *other* prompt's zero-shot? A paired test across two runs of the
cross-task grid that scored the same test rows with different templates.

    python benchmarks/template_baseline.py snli-fzoo-final-norm-cached=snli-fzoo-prefix \
        [--rows benchmarks/results/cross-task-rows.json] [--out benchmarks/results/template_baseline.json]

Why: the head cache needs MNLI's and SNLI's `infer` template (one shared context), whose zero-shot
accuracy differs from the default template's. `benchmarks/cross_task.py` tests a run against its own
prompt's zero-shot; a user who could just pick the better prompt wants the comparison with the best
zero-shot on the same rows too. Two runs score the same rows when they carve them alike: same task,
`split_seed` and test size, no evaluation file (test rows are carved first, so dev and train sizes do
not matter). This checks that from the grid, then runs the paired test of TUNED's tuned rows against
BASELINE's zero-shot rows (the base model, its own template).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from zotune.bench.grid import load_grid, run_config
from zotune.bench.paired import paired_test
from zotune.bench.record import write_record

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "benchmarks/grids/cross-task.yaml"


def same_test_rows(a, b) -> str | None:
    """None when configs ``a`` and ``b`` carve the same test rows, else why not."""
    for key in ("name", "split_seed", "test", "eval_file", "train_file", "data_root"):
        if getattr(a.task, key) != getattr(b.task, key):
            return f"task.{key} differs: {getattr(a.task, key)!r} vs {getattr(b.task, key)!r}"
    if a.task.eval_file is not None:
        return "an evaluation file: its rows are not carved"
    return None


def compare(tuned: str, baseline: str, rows: dict, configs: dict) -> dict:
    for name in (tuned, baseline):
        if name not in rows or name not in configs:
            raise SystemExit(f"{name}: no kept rows or no run of that name in {GRID.name}")
    why = same_test_rows(configs[tuned], configs[baseline])
    if why:
        raise SystemExit(f"{tuned} and {baseline} did not score the same test rows: {why}")
    a, b = rows[baseline]["zero_shot"], rows[tuned]["tuned"]
    test = paired_test(a, b)
    return {"tuned_run": tuned, "tuned_template": configs[tuned].task.template or "default",
            "baseline_run": baseline, "baseline_template": configs[baseline].task.template or "default",
            "own_zero_shot": sum(rows[tuned]["zero_shot"]) / len(a), **test}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pairs", nargs="+", help="TUNED_RUN=BASELINE_RUN")
    ap.add_argument("--rows", default=str(ROOT / "benchmarks/results/cross-task-rows.json"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/template_baseline.json"))
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.rows).read_text())
    grid = load_grid(GRID)
    configs = {run.name: run_config(grid, run) for run in grid.runs}
    results = []
    print("| tuned run (template) | tuned | its own zero-shot | baseline run (template) | baseline zero-shot | "
          "only baseline / only tuned right | p (paired) |\n|---|---:|---:|---|---:|---:|---:|")
    for pair in args.pairs:
        tuned, sep, baseline = pair.partition("=")
        if not sep:
            raise SystemExit(f"{pair!r} is not TUNED_RUN=BASELINE_RUN")
        r = compare(tuned, baseline, rows, configs)
        results.append(r)
        print(f"| {tuned} ({r['tuned_template']}) | {100 * r['mean_b']:.1f} | {100 * r['own_zero_shot']:.1f} | "
              f"{baseline} ({r['baseline_template']}) | {100 * r['mean_a']:.1f} | {r['only_a']} / {r['only_b']} | "
              f"{r['p']:.2g} |")
    write_record(args.out, {"grid": str(GRID.relative_to(ROOT)), "pairs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
