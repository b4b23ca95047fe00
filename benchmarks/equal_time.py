"""Equal wall time: the best ZO run against FO-Adam, each given the same training seconds.

    zotune bench benchmarks/grids/sst2-equal-time.yaml    # the runs (train.max_seconds each)
    python benchmarks/equal_time.py                       # table -> docs/equal-time.md + JSON

Reads the grid's results (the last record of each run) and each run's ``metrics.jsonl`` and
``test_rows.json``. Every run was tested at its best dev step, so nothing here looks at test
rows to choose anything. Reports, per run: steps, forward passes, training seconds, best dev
accuracy and step, test accuracy, and training's peak resident memory (the process's peak after
the model was loaded, up to the end of training); then the ZO run with the best dev accuracy
(never chosen on test) against FO-Adam: the gap in test points, an exact McNemar test of the two
tuned models on the same test rows, and the ratio of their peak memory; the same for the best
hybrid run (``trainable.zo_layers``: FO-SGD above layer k), kept apart because it backpropagates.
Machine and date are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from zotune.bench.paired import paired_test

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import curve, keep, plot_dev_curves, read_jsonl  # noqa: E402  (one reading and drawing of dev curves)

ROOT = Path(__file__).resolve().parent.parent
FIRST_ORDER = ("fo-sgd", "fo-adam")


def kind_of(method: str, zo_layers: int | None) -> str:
    """First-order, pure zero-order, or ZO-Bench's hybrid (ZO up to layer k, FO-SGD above it):
    a hybrid backpropagates through its top layers, so it never stands for "the best ZO run"."""
    if method in FIRST_ORDER:
        return "first-order"
    return "zero-order" if zo_layers is None else f"hybrid ({zo_layers} ZO layers)"


def summarise(record: dict, archive: Path | None = None, previous: dict | None = None) -> dict:
    """One run's row. Its metrics and test rows are read from its folder and copied into
    ``archive``/NAME, or read from there once the folder is gone; a run whose files were never
    archived keeps the dev curve of the ``previous`` report (run name -> its entry) and has no rows."""
    res = record["results"]
    run_dir = Path(record["output_dir"])
    if archive is not None:
        run_dir = keep(run_dir, archive / record["run"])
    points = curve(run_dir) if (run_dir / "metrics.jsonl").exists() else (previous or {}).get(record["run"], {}).get("points", [])
    rows = run_dir / "test_rows.json"
    peak = res.get("peak_rss_train_bytes") or res.get("peak_rss_bytes")
    return {
        "run": record["run"], "method": res["method"], "scheme": res["scheme"],
        "kind": kind_of(res["method"], record.get("overrides", {}).get("trainable.zo_layers")),
        "steps": res["steps"], "forward_passes": res["forward_passes"],
        "train_seconds": res.get("train_seconds"), "stopped_by_time_budget": res.get("stopped_by_time_budget"),
        "best_dev": res["best_dev"]["value"], "tested_step": res["tested_step"],
        "zero_shot": res["zero_shot"].get("accuracy"), "test": res["test"].get("accuracy"),
        "test_rows": res["test"].get("n"),
        "peak_rss_train_mib": round(peak / 2 ** 20) if peak else None,
        "points": points,
        "rows": json.loads(rows.read_text())["tuned"] if rows.exists() else None,
    }


def best_on_dev(runs: list[dict]) -> dict:
    """The run to compare: the best dev accuracy (then the earlier-listed run), never the test's."""
    return max(runs, key=lambda r: r["best_dev"])


def compare(zo: dict, fo: dict) -> dict:
    """The test gap in points, the memory ratio, and an exact paired test where both runs' rows were kept."""
    if zo["rows"] is None or fo["rows"] is None:
        test = None
    elif len(zo["rows"]) != len(fo["rows"]):
        raise SystemExit(f"{zo['run']} and {fo['run']} were tested on different rows ({len(zo['rows'])} "
                         f"and {len(fo['rows'])}): rerun them with the same task sizes and split seed")
    else:
        test = paired_test(fo["rows"], zo["rows"])
    out = {"zo": zo["run"], "fo": fo["run"], "gap_points": round(100 * (fo["test"] - zo["test"]), 2),
           "paired": test}
    if zo["peak_rss_train_mib"] and fo["peak_rss_train_mib"]:
        out["memory_ratio"] = round(zo["peak_rss_train_mib"] / fo["peak_rss_train_mib"], 3)
    return out


def comparisons(runs: list[dict]) -> tuple[dict | None, dict | None]:
    """(the best pure ZO run against FO-Adam, the best hybrid run against FO-Adam), each None
    without such a run; every side chosen on dev (FO-Adam too, when it ran more than once: on
    another day, this machine's pace differs)."""
    fo = [r for r in runs if r["method"] == "fo-adam"]
    if not fo:
        return None, None
    adam = best_on_dev(fo)
    zo = [r for r in runs if r["kind"] == "zero-order"]
    hybrid = [r for r in runs if r["kind"].startswith("hybrid")]
    return (compare(best_on_dev(zo), adam) if zo else None,
            compare(best_on_dev(hybrid), adam) if hybrid else None)


def gap_words(points: float) -> str:
    return f"FO-Adam is {points} points ahead" if points >= 0 else f"it is {-points} points ahead of FO-Adam"


def comparison_line(what: str, c: dict) -> str:
    p = c["paired"]
    test = (f"on the same {p['n']} test rows (exact McNemar p = {p['p']:.2g})" if p else
            "on the same test rows (one run's rows were not kept: no paired test)")
    return (f"{what}, `{c['zo']}`, against `{c['fo']}`: {gap_words(c['gap_points'])} {test}; its peak memory is "
            f"{c.get('memory_ratio', 'n/a')} of FO-Adam's.")


def last_dev(run: dict) -> str:
    """The dev accuracy where the run stopped (beside its best: did it keep learning?)."""
    return f"{run['points'][-1]['dev_accuracy']:.3f}" if run["points"] else "-"


def page(grid: dict, runs: list[dict], comparison: dict | None, meta: dict, hybrid: dict | None = None) -> str:
    lines = [
        "# Equal wall time: ZO against FO-Adam", "",
        f"Generated by `python benchmarks/equal_time.py` from `zotune bench {grid['path']}` "
        f"({meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, {meta['date']}). "
        "Each run trains until its training seconds (the steps' own time; dev evaluations and "
        "checkpoints are left out) reach `train.max_seconds`, and is tested at its best dev step. "
        "Peak memory is the process's peak resident set during training, after the model was loaded.", "",
        "| run | method | kind | scheme | steps | forward passes | training s | best dev | tested step | last dev | "
        "zero-shot test | test | peak RSS (MiB) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r['run']} | {r['method']} | {r['kind']} | {r['scheme']} | {r['steps']} | {r['forward_passes']} | "
                     f"{r['train_seconds']} | {r['best_dev']:.3f} | {r['tested_step']} | {last_dev(r)} | {r['zero_shot']:.4f} | "
                     f"{r['test']:.4f} | {r['peak_rss_train_mib']} |")
    if comparison:
        lines += ["", comparison_line("The pure ZO run with the best dev accuracy", comparison)]
    if hybrid:
        lines += ["", comparison_line("The hybrid run with the best dev accuracy (ZO-Bench's Table 7: FO-SGD "
                                      "backpropagates through the layers above the ZO ones, so it is not pure ZO)", hybrid)]
    lines += ["", f"![dev accuracy vs training seconds](figures/{grid['name']}-seconds.png)", ""]
    return "\n".join(lines)


def figure(grid: dict, runs: list[dict], fig_dir: Path) -> None:
    series = {f"{r['run']} ({r['method']}, {r['scheme']})": r["points"] for r in runs}
    plot_dev_curves(series, "seconds", "training seconds", f"{grid['name']}: SmolLM2-135M",
                    fig_dir / f"{grid['name']}-seconds.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="benchmarks/grids/sst2-equal-time.yaml")
    ap.add_argument("--out", default=str(ROOT / "docs/equal-time.md"))
    ap.add_argument("--report", default=str(ROOT / "benchmarks/results/sst2-equal-time-report.json"))
    ap.add_argument("--figures", default=str(ROOT / "docs/figures"))
    args = ap.parse_args(argv)
    grid = {**yaml.safe_load(Path(args.grid).read_text()), "path": args.grid}
    records = {r["run"]: r for r in read_jsonl(Path(grid["results"]))}  # a rerun's record replaces the older
    report = Path(args.report)
    old = json.loads(report.read_text()) if report.exists() else {}
    previous = {r["run"]: r for r in old.get("runs", [])}
    archive = ROOT / grid["results"].replace(".jsonl", "-metrics")
    runs = [summarise(r, archive, previous) for r in records.values() if r["status"] == "ok"]
    if not runs:
        raise SystemExit(f"no finished run in {grid['results']}: run `zotune bench {args.grid}` first")
    comparison, hybrid = comparisons(runs)
    # a paired test made while both runs' rows existed outlives the rows
    for c, was in ((comparison, old.get("comparison")), (hybrid, old.get("hybrid_comparison"))):
        if c and was and c["paired"] is None and (c["zo"], c["fo"]) == (was["zo"], was["fo"]):
            c["paired"] = was["paired"]
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    text = page(grid, runs, comparison, meta, hybrid)
    print(text)
    Path(args.out).write_text(text)
    Path(args.report).write_text(json.dumps(
        {"meta": meta, "runs": [{k: v for k, v in r.items() if k != "rows"} for r in runs],
         "comparison": comparison, "hybrid_comparison": hybrid}, indent=2))
    figure(grid, runs, Path(args.figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
