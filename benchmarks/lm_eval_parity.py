"""Does an independent harness score an exported model as zotune does? lm-evaluation-harness vs zotune eval.

    python benchmarks/lm_eval_parity.py RUN_DIR                       # sst2 rte boolq cb copa, 200 rows each
    python benchmarks/lm_eval_parity.py RUN_DIR --tasks sst2 --rows 500 --lm-eval-python /tmp/lmeval-venv/bin/python
    python benchmarks/lm_eval_parity.py --markdown benchmarks/results/lm_eval_parity.json   # the table of a saved run

1. ``zotune export RUN_DIR`` writes a plain transformers folder (the checkpoint the run tested).
2. zotune scores each task's carved test rows with the run's checkpoint copied into the base model
   (what ``zotune eval --checkpoint`` does), candidates ranked by summed log-likelihood.
3. lm-evaluation-harness (``lm_eval``, from PyPI, not a zotune dependency: install it in a
   separate environment, e.g. ``python3 -m venv --system-site-packages /tmp/lmeval-venv &&
   /tmp/lmeval-venv/bin/pip install lm-eval``) loads the exported folder with its own ``hf``
   model class and scores the same rows through a task file written here: ``output_type:
   multiple_choice`` over a jsonl of zotune's rendered contexts and candidates, metric ``acc``
   (argmax of the summed log-likelihood).

Prints, per task, both accuracies, the rows whose predictions differ, the largest difference of a
candidate's log-likelihood, and the largest difference of the candidates' scores relative to the
row's first candidate (what decides the ranking); writes JSON with machine and date. The two
differ by design where a context ends in whitespace (RTE's and CB's prompts end in a newline):
lm-eval moves trailing whitespace from the context into every continuation, so its scores add
log p(newline | context) to each candidate of the row, a constant that cannot change a ranking;
zotune keeps the newline in the context. Contexts are not cut
(``--max-length`` is large), since lm-eval does not cut them. Tasks whose candidates differ in
their context (WinoGrande as zotune renders it) do not fit lm-eval's one-context multiple choice
and are skipped with a note; generation tasks likewise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TASKS = ("sst2", "rte", "boolq", "cb", "copa")

# runs in lm-eval's environment: argv = exported folder, task folder, task names (comma), out json, batch size
DRIVER = r"""
import json, sys
import lm_eval
from lm_eval.tasks import TaskManager
folder, include, names, out, batch = sys.argv[1:6]
names = names.split(",")
res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=names,
                              task_manager=TaskManager(include_path=include), batch_size=int(batch),
                              device="cpu", log_samples=True)
result = {}
for name in names:
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    logliks = [[float(r[0] if isinstance(r, (list, tuple)) else r) for r in s["filtered_resps"]] for s in samples]
    result[name] = {"acc": res["results"][name]["acc,none"], "logliks": logliks,
                    "version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}
json.dump(result, open(out, "w"))
"""


def task_file(name: str, rows_path: Path) -> str:
    """An lm-eval task over zotune's rendered rows (``context``, ``choices``, ``label``)."""
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(rows_path))}}}}}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        "doc_to_choice: choices",
        "doc_to_target: label",
        'target_delimiter: ""',  # zotune's candidates carry their own leading space
        "metric_list:",
        "  - metric: acc",
        "",
    ])


def rows_of(examples) -> tuple[list[dict], str | None]:
    """zotune's examples as lm-eval rows, or why they do not fit one-context multiple choice."""
    if examples and examples[0].is_generation:
        return [], "a generation task (lm-eval's multiple_choice scores candidates)"
    rows = []
    for e in examples:
        contexts = {c for c, _ in e.choices}
        if len(contexts) != 1:
            return [], "its candidates differ in their context (lm-eval's multiple_choice has one context)"
        rows.append({"context": e.choices[0][0], "choices": [c for _, c in e.choices], "label": e.label})
    return rows, None


def compare(ours: list[list[float]], theirs: list[list[float]], labels: list[int]) -> dict:
    """Accuracies of both, rows whose argmax differs, and the largest log-likelihood difference."""
    def pred(s):
        return max(range(len(s)), key=s.__getitem__)

    if len(ours) != len(theirs):
        raise ValueError(f"zotune scored {len(ours)} rows, lm-eval {len(theirs)}")
    diff = [i for i, (a, b) in enumerate(zip(ours, theirs)) if pred(a) != pred(b)]
    gap = max((abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a, b)), default=0.0)
    # what ranks the candidates: each candidate's score less the row's first candidate's (a constant
    # per row, such as lm-eval's trailing-whitespace token, cancels)
    relative = max((abs((x - a[0]) - (y - b[0])) for a, b in zip(ours, theirs) for x, y in zip(a, b)), default=0.0)
    n = len(labels)
    return {"n": n,
            "zotune_accuracy": sum(pred(a) == y for a, y in zip(ours, labels)) / n,
            "lm_eval_accuracy": sum(pred(b) == y for b, y in zip(theirs, labels)) / n,
            "rows_predicted_differently": len(diff), "first_differing_rows": diff[:10],
            "max_abs_loglik_difference": gap, "max_abs_relative_loglik_difference": relative}


def markdown(result: dict) -> str:
    """The table of a saved run, for docs/ (never typed by hand)."""
    lines = [f"lm-eval {result['lm_eval_version']} against zotune {result['zotune_version']}, torch {result['torch']}, "
             f"{result['date']}; run `{Path(result['run']).name}` (checkpoint `{Path(result['checkpoint']).name}`), "
             f"scoring: {result['scoring']} log-likelihood, contexts never cut", "",
             "| task | rows | zotune accuracy | lm-eval accuracy | rows predicted differently "
             "| max abs. log-lik. difference | max abs. difference relative to the row's first candidate |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in result["tasks"].items():
        lines.append(f"| {name} | {c['n']} | {100 * c['zotune_accuracy']:.1f} % | {100 * c['lm_eval_accuracy']:.1f} % "
                     f"| {c['rows_predicted_differently']} | {c['max_abs_loglik_difference']:.2e} "
                     f"| {c['max_abs_relative_loglik_difference']:.2e} |")
    lines += [f"\nskipped: {name} ({why})" for name, why in result["skipped"].items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--markdown"]:
        print(markdown(json.loads(Path(argv[1]).read_text())))
        return {}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder (or a checkpoint folder in one) of a full fine-tuning run "
                                "(or: --markdown JSON prints the table of a saved run)")
    ap.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    ap.add_argument("--rows", type=int, default=200, help="carved test rows per task (the run's split_seed)")
    ap.add_argument("--max-length", type=int, default=2048, help="zotune's context limit: large, so nothing is cut")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lm-eval-python", default=os.environ.get("LM_EVAL_PYTHON", "/tmp/lmeval-venv/bin/python"),
                    help="a python that imports lm_eval and zotune's torch / transformers")
    ap.add_argument("--work", default=None, help="folder for the export and task files (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse lm-eval's scores saved in --work by an earlier run of the same rows")
    ap.add_argument("--out", default="benchmarks/results/lm_eval_parity.json")
    args = ap.parse_args(argv)

    import torch

    import zotune
    from zotune.config import from_dict
    from zotune.export import export, find_source
    from zotune.lm import choice_logprobs
    from zotune.train.checkpoint import copy_weights
    from zotune.train.loop import build, load_data

    check = subprocess.run([args.lm_eval_python, "-c", "import lm_eval"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"--lm-eval-python {args.lm_eval_python} cannot import lm_eval: {check.stderr.strip()[-300:]}\n"
                 "install it apart from zotune: python3 -m venv --system-site-packages /tmp/lmeval-venv && "
                 "/tmp/lmeval-venv/bin/pip install lm-eval")
    work = Path(args.work or tempfile.mkdtemp(prefix="lm-eval-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = work / "exported"
    info = json.loads((folder / "export_info.json").read_text()) if (folder / "export_info.json").exists() \
        else export(args.run, folder)
    if info["format"] != "transformers":
        sys.exit(f"{args.run} exports as {info['format']!r}: this comparison loads a plain model folder "
                 "(full fine-tuning, or a LoRA run with --merge)")
    source = find_source(args.run)
    run_cfg = json.loads((source.run_dir / "config.json").read_text())

    # zotune's side: the base model with the checkpoint's tensors copied in (zotune eval --checkpoint)
    first = dict(run_cfg, task=dict(run_cfg["task"], name=args.tasks[0], test=args.rows, max_length=args.max_length))
    setup = build(from_dict(first), splits=("test",))
    copy_weights(source.checkpoint, setup.named)
    loaded = setup.loaded

    tasks, skipped, labels, ours = [], {}, {}, {}
    for name in args.tasks:
        cfg = from_dict(dict(run_cfg, task=dict(run_cfg["task"], name=name, test=args.rows, dev=0, train=0,
                                                 max_length=args.max_length, template=None, scoring=None)))
        examples = load_data(cfg, ("test",)).test
        rows, why = rows_of(examples)
        if why:
            skipped[name] = why
            print(f"{name}: skipped, {why}")
            continue
        key = f"zotune_parity_{name}"
        (work / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (work / f"{key}.yaml").write_text(task_file(key, work / f"{key}.jsonl"))
        ours[key] = choice_logprobs(loaded, loaded.tokenizer, [list(e.choices) for e in examples],
                                    batch_size=args.batch_size, max_length=args.max_length, normalize="sum")
        labels[key] = [r["label"] for r in rows]
        tasks.append((name, key))
        print(f"{name}: zotune scored {len(rows)} rows")

    (work / "zotune_scores.json").write_text(json.dumps(ours))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out_json = work / "lm_eval_scores.json"
    theirs = json.loads(out_json.read_text()) if args.reuse and out_json.exists() else {}
    if any(k not in theirs for _, k in tasks):
        subprocess.run([args.lm_eval_python, "-c", DRIVER, str(folder), str(work), ",".join(k for _, k in tasks),
                        str(out_json), str(args.batch_size)], check=True, env=env)
        theirs = json.loads(out_json.read_text())
    else:
        print(f"lm-eval's scores of these rows reused from {out_json} (--reuse)")

    table = {}
    print(f"\n{'task':8} {'rows':>5} {'zotune acc':>11} {'lm-eval acc':>12} {'differ':>7} {'max |dlogp|':>12} "
          f"{'relative':>9}")
    for name, key in tasks:
        c = compare(ours[key], theirs[key]["logliks"], labels[key])
        c["lm_eval_reported_acc"] = theirs[key]["acc"]
        table[name] = c
        print(f"{name:8} {c['n']:5d} {100 * c['zotune_accuracy']:10.1f}% {100 * c['lm_eval_accuracy']:11.1f}% "
              f"{c['rows_predicted_differently']:7d} {c['max_abs_loglik_difference']:12.2e} "
              f"{c['max_abs_relative_loglik_difference']:9.2e}")
    version = subprocess.run([args.lm_eval_python, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                             capture_output=True, text=True).stdout.strip()
    result = {"run": str(source.run_dir), "checkpoint": str(source.checkpoint), "export": info,
              "tasks": table, "skipped": skipped, "rows_per_task": args.rows, "max_length": args.max_length,
              "scoring": "sum", "lm_eval_version": version, "zotune_version": zotune.__version__,
              "torch": torch.__version__, "machine": platform.platform(), "processor": platform.processor(),
              "cpus": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
