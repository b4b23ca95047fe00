"""Zero-shot scan of the tasks on their carved dev rows: where can a short ZO run move?

    python benchmarks/task_scan.py [--tasks sst2,cb,mnli:infer,...] [--dev 100] [--grid benchmarks/grids/cross-task.yaml]
                                   [--out benchmarks/results/task_scan.json]

Why: a few hundred ZO steps mostly re-balance the model's answers before they teach it the
task, so a task whose zero-shot model answers one choice for nearly every row, while the labels
are balanced, has room to move; one already at its label balance needs real learning. This
reads only dev rows (never test) with the base model and prints, per task: dev accuracy, the
share of rows given the most-predicted choice, the share of the most common label, the
accuracy after the best per-choice offset of the scores (a constant added to each choice's
log-likelihood, fitted on the same dev rows: an upper bound on what re-balancing alone can
give, the first thing a short ZO run learns), and the seconds the scan took (a proxy for each
task's forward cost). Generation tasks (SQuAD, DROP)
report EM / F1 and the mean answer length in words.

Splits carve test first, then dev, so the scan carves each task's test split with the size and
seed of that task's first run in ``--grid`` (tasks not in it: the config's default test size)
and reads the dev rows after it: the runs' own dev rows, never their test rows.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import platform
import time
from datetime import datetime, timezone

import torch

from zotune.bench.grid import load_grid, run_config
from zotune.config import Config, load_config
from zotune.lm import choice_logprobs, generate
from zotune.models import load_model
from zotune.tasks.metrics import compute_metric
from zotune.train.loop import load_data

DEFAULT = "sst2,cb,rte,wsc,wic,copa,winogrande,snli,mnli,squad"


def rebalanced(scores: list[list[float]], rows, metric: str) -> float | None:
    """Best dev accuracy over per-choice offsets (first choice fixed at 0; a grid of offsets
    for tasks whose rows all have 2 or 3 choices), or None for other tasks."""
    widths = {len(s) for s in scores}
    if len(widths) != 1 or widths.pop() not in (2, 3):
        return None
    k = len(scores[0])
    grid = [x / 4 for x in range(-80, 81)]  # -20 .. 20 nats in steps of 0.25
    best = 0.0
    for offsets in itertools.product(grid, repeat=k - 1):
        shift = (0.0, *offsets)
        preds = [max(range(k), key=lambda j: s[j] + shift[j]) for s in scores]
        best = max(best, compute_metric(metric, preds, rows)["accuracy"])
    return best


def grid_test_splits(path: str) -> dict[str, tuple[int, int]]:
    """Per task, the (test size, split seed) of the grid's first run of it."""
    grid = load_grid(path)
    out: dict[str, tuple[int, int]] = {}
    for run in grid.runs:
        cfg = run_config(grid, run)
        out.setdefault(cfg.task.name, (cfg.task.test, cfg.task.split_seed))
    return out


def scan_config(task: str, dev: int, max_length: int | None, test_split: tuple[int, int] | None,
                template: str | None = None) -> Config:
    """The scan's config: ``dev`` rows carved after a test split of ``test_split`` = (size, seed),
    rendered with ``template`` (default: the task's)."""
    default = Config().task
    test, seed = test_split or (default.test, default.split_seed)
    over = [f"task.name={task}", f"task.dev={dev}", f"task.test={test}", f"task.split_seed={seed}", "task.train=0"]
    if max_length:
        over.append(f"task.max_length={max_length}")
    if template:
        over.append(f"task.template={template}")
    return load_config(None, over)


def scan(task: str, dev: int, loaded, max_length: int | None, test_split: tuple[int, int] | None,
         template: str | None = None) -> dict:
    cfg = scan_config(task, dev, max_length, test_split, template)
    test, seed = cfg.task.test, cfg.task.split_seed
    data = load_data(cfg, ("dev",))
    rows, spec = list(data.dev), data.spec
    t0 = time.time()
    with torch.no_grad():
        if rows[0].is_generation:
            preds = generate(loaded, loaded.tokenizer, [e.prompt for e in rows], batch_size=8,
                             max_length=cfg.task.max_length)
            out = compute_metric(spec.metric, preds, rows)
            out["answer_words"] = sum(len(p.split()) for p in preds) / len(preds)
            out["examples"] = [{"pred": p, "gold": list(e.answers)[:2]} for p, e in list(zip(preds, rows))[:5]]
        else:
            scores = choice_logprobs(loaded, loaded.tokenizer, [list(e.choices) for e in rows], batch_size=32,
                                     max_length=cfg.task.max_length, normalize=cfg.task.scoring or "sum")
            preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
            out = compute_metric(spec.metric, preds, rows)
            out["rebalanced_accuracy"] = rebalanced(scores, rows, spec.metric)
            labels = [e.label for e in rows if not isinstance(e.label, (list, tuple, set))]
            out["top_prediction_share"] = collections.Counter(preds).most_common(1)[0][1] / len(preds)
            if labels:
                out["top_label_share"] = collections.Counter(labels).most_common(1)[0][1] / len(labels)
    out.update({"task": task, "template": cfg.task.template or spec.default_template, "n": len(rows), "max_length": cfg.task.max_length, "test_rows_skipped": test,
                "split_seed": seed, "seconds": round(time.time() - t0, 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=DEFAULT, help="comma-separated TASK or TASK:TEMPLATE (e.g. mnli:infer)")
    ap.add_argument("--dev", type=int, default=100)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-length", action="append", default=[], metavar="TASK=N",
                    help="a shorter max_length for a task (e.g. squad=384)")
    ap.add_argument("--grid", default="benchmarks/grids/cross-task.yaml",
                    help="the runs whose test rows the scan must not read (their test size and split seed)")
    ap.add_argument("--out", default="benchmarks/results/task_scan.json")
    a = ap.parse_args()
    lengths = dict(x.split("=") for x in a.max_length)
    splits = grid_test_splits(a.grid)
    loaded = load_model(a.model, dtype="float32")
    results = []
    print("| task | dev rows | metric | top prediction share | top label share | re-balanced accuracy | s |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    for entry in a.tasks.split(","):
        task, _, template = entry.partition(":")
        r = scan(task, a.dev, loaded, int(lengths[task]) if task in lengths else None, splits.get(task), template or None)
        results.append(r)
        metric = ", ".join(f"{k} {100 * r[k]:.1f}" for k in ("accuracy", "f1a", "em", "f1") if k in r)
        extra = f" ({r['answer_words']:.1f} words)" if "answer_words" in r else ""
        top_p = f"{100 * r['top_prediction_share']:.0f} %" if "top_prediction_share" in r else "-"
        top_l = f"{100 * r['top_label_share']:.0f} %" if "top_label_share" in r else "-"
        reb = f"{100 * r['rebalanced_accuracy']:.1f}" if r.get("rebalanced_accuracy") is not None else "-"
        print(f"| {entry} | {r['n']} | {metric}{extra} | {top_p} | {top_l} | {reb} | {r['seconds']} |", flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
            "cpus": torch.get_num_threads(), "torch": torch.__version__, "model": a.model, "dev_rows": a.dev,
            "grid": a.grid}
    with open(a.out, "w") as f:
        json.dump({"meta": meta, "tasks": results}, f, indent=2)


if __name__ == "__main__":
    main()
