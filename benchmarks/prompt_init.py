"""Where does a prompt-tuning run start? Dev answers through the untrained prompt, per init.

    python benchmarks/prompt_init.py [--text "great terrible" --text "Read the text and answer."]
                                     [--task sst2] [--out benchmarks/results/prompt_init_sst2.json]

Why: every MeZO run on SST-2's 10-token prompt started at 0.52 dev accuracy, below the base
model's 0.57, and spent 100-150 steps flat before rising (docs/convergence.md). If the prompt's
init (10 rows sampled from the vocabulary) is what pushes the answers one way, a prompt started
from a text (``trainable.prompt_init_text``) would start where the base model does. This reads
the run's own dev rows only (carved after its test rows, as a run carves them), with the
convergence grid's split, and prints per init: dev accuracy, the share of rows given the
most-predicted answer, and the re-balanced bound of ``task_scan.py`` (the best accuracy a
per-answer offset can give), beside the base model without any prompt.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from zotune.config import load_config
from zotune.lm import choice_logprobs
from zotune.params import without_adapters
from zotune.tasks.metrics import compute_metric
from zotune.train.loop import build

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task_scan import rebalanced  # noqa: E402  (one definition of the re-balanced bound)

ROOT = Path(__file__).resolve().parent.parent
# the convergence grid's split and the MeZO prompt runs' optimizer (nothing here takes a step)
BASE = ["model.name=smollm2-135m", "model.dtype=float32", "task.train=1000", "task.dev=200", "task.test=400",
        "task.max_length=64", "task.split_seed=0", "trainable.scheme=prompt", "optim.method=mezo",
        "optim.lr=3e-3", "optim.eps=1e-2", "train.progress=false"]


def answers(setup, lm) -> dict:
    rows, cfg = list(setup.data.dev), setup.cfg
    with torch.no_grad():
        scores = choice_logprobs(lm, lm.tokenizer, [list(e.choices) for e in rows], batch_size=32,
                                 max_length=cfg.task.max_length, normalize=cfg.task.scoring or "sum")
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]
    out = compute_metric(setup.data.spec.metric, preds, rows)
    out["top_prediction_share"] = collections.Counter(preds).most_common(1)[0][1] / len(preds)
    out["rebalanced_accuracy"] = rebalanced(scores, rows, setup.data.spec.metric)
    out["n"] = len(rows)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the sampled-vocabulary init")
    ap.add_argument("--text", action="append", default=[], help="a prompt_init_text to compare (repeatable)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prompt_init_sst2.json"))
    args = ap.parse_args(argv)
    inits = [(f"vocabulary, seed {s}", [f"optim.seed={s}"]) for s in args.seeds.split(",")]
    inits += [(f"text {t!r}", [f"trainable.prompt_init_text={t}"]) for t in args.text]
    results = []
    print("| start | dev accuracy | top answer share | re-balanced bound |\n|---|---:|---:|---:|")
    for i, (name, extra) in enumerate(inits):
        setup = build(load_config(None, BASE + [f"task.name={args.task}"] + extra))
        if i == 0:
            with without_adapters(setup.loaded) as base:
                results.append({"start": "base model, no prompt", **answers(setup, base)})
        results.append({"start": name, **answers(setup, setup.loaded)})
        for r in results[-2 if i == 0 else -1:]:
            reb = "-" if r["rebalanced_accuracy"] is None else f"{r['rebalanced_accuracy']:.3f}"
            print(f"| {r['start']} | {r['accuracy']:.3f} | {r['top_prediction_share']:.2f} | {reb} |", flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "task": args.task, "config": BASE}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
