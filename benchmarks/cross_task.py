"""Cross-task results: did each tuned run beat zero-shot by more than its test rows' noise?

    zotune bench benchmarks/grids/cross-task.yaml     # the runs (resumable, one process each)
    python benchmarks/cross_task.py                   # table + paired tests -> docs/results.md

Every run of the grid scores each test row with the zero-shot and the tuned model (its
``test_rows.json``); this script compares the two on the same rows with
:func:`zotune.bench.paired.paired_test` (exact McNemar for right / wrong rows, a seeded
sign-flip test for SQuAD-style token F1) and calls a task "moved" when the tuned model is better
with p < 0.05. The per-row scores are copied to ``benchmarks/results/cross-task-rows.json`` so
the table can be rebuilt without the run folders. Writes the table between the
``cross-task`` markers of ``docs/results.md`` and ``benchmarks/results/cross-task-report.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from zotune.bench.paired import paired_test
from zotune.defaults import starting_point
from zotune.train.evaluate import headline

ALPHA = 0.05
FIRST_ORDER = ("fo-sgd", "fo-adam")  # reference runs (can the model learn the task?): never counted as moved
START, END = "<!-- cross-task:start -->", "<!-- cross-task:end -->"
# Runs repeated with more test rows because an earlier run came close: {rerun: earlier run}. The test
# split is carved first from a fixed shuffle, so the rerun's first test rows are the earlier run's;
# the rows after them were scored by nothing before the rerun was chosen. A rerun counts as moved
# only when its paired test on those fresh rows says so too.
RERUNS = {"snli-mezo-prefix-1500": "snli-mezo-prefix"}


def load_records(path: Path) -> dict:
    """The last record of each run (a rerun appends a newer one)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[r["run"]] = r
    return out


def collect_rows(records: dict, stored: dict) -> dict:
    """Each run's per-row scores: from its run folder when present, else from the stored copy."""
    rows = dict(stored)
    for name, r in records.items():
        path = Path(r.get("output_dir", "")) / "test_rows.json"
        if r["status"] == "ok" and path.exists():
            rows[name] = json.loads(path.read_text())
            config = json.loads((path.parent / "config.json").read_text())  # lr / eps as the run resolved them
            rows[name]["optim"] = {k: config["optim"][k] for k in ("lr", "eps")}
    return rows


def fresh_rows_test(rows: dict, rerun: str, earlier: str) -> dict:
    """The paired test of ``rerun`` on its test rows after the ones ``earlier`` had scored."""
    if earlier not in rows:
        raise ValueError(f"{rerun} reruns {earlier}, whose test rows are not kept: its fresh rows cannot be told apart")
    new, old = rows[rerun], rows[earlier]
    n = len(old["zero_shot"])
    if len(new["zero_shot"]) <= n or new["zero_shot"][:n] != old["zero_shot"]:
        raise ValueError(f"{rerun}'s test rows do not start with {earlier}'s {n} rows (the zero-shot scores differ "
                         "or there are no more rows): it is not a rerun on more rows of the same split")
    return {**paired_test(new["zero_shot"][n:], new["tuned"][n:]), "earlier": earlier, "earlier_rows": n}


def summarise(records: dict, rows: dict, reruns: dict | None = None) -> list[dict]:
    reruns = RERUNS if reruns is None else reruns
    out = []
    for name, r in records.items():
        if r["status"] != "ok" or "test" not in r.get("results", {}):
            continue
        res = r["results"]
        key, tuned = headline(res["test"])
        if name in rows and "tuned" in rows[name]:
            test = paired_test(rows[name]["zero_shot"], rows[name]["tuned"])
            zs = test["mean_a"]  # the rows' mean: the base model's (benchmarks/base_zero_shot.py re-measured older adapter runs)
            optim = rows[name]["optim"]
        else:  # the run folder was lost before its rows were copied: no paired test, never counted as moved
            test = {"p": None, "n": res["sizes"]["test"], "mean_a": None, "mean_b": None}
            zs = headline(res["zero_shot"])[1]
            start = starting_point(res["method"], res["scheme"])  # what the run resolved when its recipe set none
            optim = {"lr": r["overrides"].get("optim.lr", start.lr), "eps": r["overrides"].get("optim.eps", start.eps)}
        out.append({
            "run": name, "task": res["task"], "method": res["method"], "scheme": res["scheme"],
            "lr": optim["lr"], "eps": optim["eps"], "steps": res["steps"],
            # a head-cache run's passes through the model are the trunk's, once; its steps evaluate only the head
            "tested_step": res["tested_step"],
            "forward_passes": res["head_cache"]["trunk_forward_passes"] if "head_cache" in res else res["forward_passes"],
            "head_evaluations": res["forward_passes"] if "head_cache" in res else None,
            "mean_step_seconds": res["mean_step_seconds"], "wall_seconds": r["wall_seconds"],
            "metric": key, "zero_shot": zs, "tuned": tuned, "test_rows": test["n"],
            "paired": test, "moved": test["p"] is not None and test["p"] < ALPHA and test["mean_b"] > test["mean_a"],
            "peak_rss_mib": res["peak_rss_bytes"] / 2 ** 20 if res.get("peak_rss_bytes") else None,
        })
        earlier = reruns.get(name)
        if earlier is not None and "tuned" in rows.get(name, {}):
            fresh = fresh_rows_test(rows, name, earlier)
            out[-1]["fresh_rows"] = fresh
            out[-1]["moved"] = out[-1]["moved"] and fresh["p"] < ALPHA and fresh["mean_b"] > fresh["mean_a"]
    return out


def rerun_lines(summary: list[dict]) -> str:
    """A sentence per rerun: its paired test on the rows the earlier run never scored."""
    lines = []
    for s in summary:
        f = s.get("fresh_rows")
        if f:
            split = f"{f['only_a']} / {f['only_b']} rows only zero-shot / only tuned got right" if "only_a" in f else \
                f"mean F1 diff {100 * (f['mean_b'] - f['mean_a']):+.1f}"
            lines.append(f"{s['run']} reruns {f['earlier']} with more test rows; on the {f['n']:,} rows after "
                         f"{f['earlier']}'s {f['earlier_rows']:,}: zero-shot {100 * f['mean_a']:.1f}, tuned "
                         f"{100 * f['mean_b']:.1f}, {split}, p = {f['p']:.2g}. A rerun counts as moved only when "
                         "these fresh rows say so too.")
    return "\n".join(lines)


def _head_note(s: dict) -> str:
    """How many losses a head-cache run took from its cached rows (none of them a forward pass)."""
    return "" if not s.get("head_evaluations") else f" (trunk, once; then {s['head_evaluations']:,} head-only losses)"


def table(summary: list[dict]) -> str:
    lines = ["| run | task | scheme | method | lr | steps (tested) | forward passes | run time (s) | metric | zero-shot | "
             "tuned | test rows | rows only zero-shot / only tuned got right | p (paired) | moved |",
             "|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for s in summary:
        p = s["paired"]
        if p["p"] is None:
            split, pval = "rows not kept (run folder lost)", "-"
        else:
            split = f"{p['only_a']} / {p['only_b']}" if "only_a" in p else f"mean F1 diff {100 * (p['mean_b'] - p['mean_a']):+.1f}"
            pval = f"{p['p']:.2g}"
        lines.append(
            f"| {s['run']} | {s['task']} | {s['scheme']} | {s['method']} | {s['lr']:g} | {s['steps']} ({s['tested_step']}) | "
            f"{s['forward_passes']:,}{_head_note(s)} | {s['wall_seconds']:,.0f} | {s['metric']} | {100 * s['zero_shot']:.1f} | "
            f"{100 * s['tuned']:.1f} | {s['test_rows']} | {split} | {pval} | {'yes' if s['moved'] else 'no'} |")
    return "\n".join(lines)


def scan_table(path: Path) -> str:
    """The zero-shot dev scan (benchmarks/task_scan.py) as a table, or "" if it was not run."""
    if not path.exists():
        return ""
    scan = json.loads(path.read_text())
    lines = ["| task | dev rows | zero-shot dev | most-predicted choice | most common label | re-balanced (upper bound) |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in scan["tasks"]:
        metric = f"F1 {100 * t['f1']:.1f}" if "f1" in t else f"{100 * t['accuracy']:.1f}"
        pct = lambda k: f"{100 * t[k]:.0f} %" if t.get(k) is not None else "-"  # noqa: E731
        reb = f"{100 * t['rebalanced_accuracy']:.1f}" if t.get("rebalanced_accuracy") is not None else "-"
        name = t["task"] + (f" ({t['template']})" if t.get("template") and t["template"] != "zotune" else "")
        lines.append(f"| {name} | {t['n']} | {metric} | {pct('top_prediction_share')} | {pct('top_label_share')} | {reb} |")
    m = scan["meta"]
    where = (f"the dev rows after each task's test split as `{m['grid']}` carves it" if m.get("grid") else
             "its first rows with test=0, which for tasks without an evaluation file are the runs' test rows: rerun it")
    return "\n".join(lines) + f"\n\n{m['model']}, {m['date'][:10]}, `python benchmarks/task_scan.py`: {where}."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results/cross-task.jsonl")
    ap.add_argument("--rows", default="benchmarks/results/cross-task-rows.json")
    ap.add_argument("--report", default="benchmarks/results/cross-task-report.json")
    ap.add_argument("--doc", default="docs/results.md")
    ap.add_argument("--scan", default="benchmarks/results/task_scan.json")
    a = ap.parse_args()
    records = load_records(Path(a.results))
    rows_path = Path(a.rows)
    rows = collect_rows(records, json.loads(rows_path.read_text()) if rows_path.exists() else {})
    rows_path.write_text(json.dumps(rows))
    summary = summarise(records, rows)
    text = table(summary)
    reruns = rerun_lines(summary)
    if reruns:
        text += "\n\n" + reruns
    moved = sorted({f"{s['task']} ({s['scheme']})" for s in summary if s["moved"] and s["method"] not in FIRST_ORDER})
    # by run: one task can have several first-order references (another method, a longer budget)
    references = sorted(f"{s['task']} ({s['run']}): {'moved' if s['moved'] else 'not moved'}"
                        for s in summary if s["method"] in FIRST_ORDER)
    print(text)
    print(f"\nmoved by ZO (p < {ALPHA}): {', '.join(moved) or 'none'}")
    if references:
        print(f"first-order references: {'; '.join(references)}")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "alpha": ALPHA}
    Path(a.report).write_text(json.dumps({"meta": meta, "runs": summary, "moved": moved,
                                              "first_order_references": references}, indent=2))
    doc = Path(a.doc)
    body = doc.read_text() if doc.exists() else ""
    if START in body and END in body:
        head, rest = body.split(START, 1)
        body = head + START + "\n" + text + f"\n\nMoved by ZO (tuned better than zero-shot on the same rows, p < {ALPHA}): " \
            + (", ".join(moved) or "none") + ".\n"
        if references:
            body += ("\nFirst-order rows are references, not counted: can the model learn the task at all in a "
                     "few minutes? " + "; ".join(references) + ".\n")
        scan = scan_table(Path(a.scan))
        if scan:
            body += ("\nWhat a short run can move: the base model on each task's dev rows. A short ZO run first "
                     "re-balances the answers; the re-balanced accuracy (the best constant offset per choice, "
                     "fitted on these same rows, so an optimistic bound) says how much that alone gives.\n\n"
                     + scan + "\n")
        body += END + rest.split(END, 1)[1]
        doc.write_text(body)
    else:
        print(f"(no {START} ... {END} markers in {doc}: the table was not written there)")


if __name__ == "__main__":
    main()
