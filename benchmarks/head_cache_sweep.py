"""Which method and lr train the final norm (or the top layers) furthest on a task's dev rows? A
sweep that runs the trunk once (``train.head_cache``) and then every (method, lr) as a real
``zotune train`` run.

    python benchmarks/head_cache_sweep.py --task rte --runs mezo:0.1,mezo:1,zo-adam:0.01 \
        [--steps 20000] [--eval-every 1000] [--set task.dev=200 ...] [--out benchmarks/results/head_cache_sweep_rte.json]
    # the last layer and the final norm instead of the final norm alone:
    python benchmarks/head_cache_sweep.py --task sst2 --runs fzoo:1e-3 --set trainable.scheme=top_layers optim.eps=1e-3

Why: with the trunk cached a step costs about a millisecond, so the lr and the number of steps of
a final-norm run can be chosen on dev by trying them, instead of guessing from a 30-step probe.
Each run starts from the model's own final norm, sees the same batches (``train.data_seed``), and
reads dev accuracy from the cache every ``--eval-every`` steps (the same predictions as the model's:
tests/train/test_head_cache.py). Only dev rows are read: the test split is not loaded. Prints one
row per run (best dev, its step, last dev, seconds) and writes them with every dev curve to JSON.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from zotune.bench.record import write_record
from zotune.config import load_config
from zotune.train.evaluate import headline
from zotune.train.loop import build, build_head_cache, resolve_objective, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import read_jsonl  # noqa: E402  (one reader of the runs' JSONL files)

ROOT = Path(__file__).resolve().parent.parent
# the splits of the cross-task grid's runs (benchmarks/grids/cross-task.yaml), so dev is their dev
TASKS = {"sst2": ["task.train=1000", "task.dev=200", "task.test=400", "task.max_length=64"],
         "rte": ["task.train=1000", "task.dev=200", "task.test=1000"],
         "wsc": ["task.train=304", "task.dev=50", "task.test=200"],
         "multirc": ["task.train=1000", "task.dev=200", "task.test=500"],
         "cb": ["task.train=150", "task.dev=24", "task.test=76"],
         "snli": ["task.train=1000", "task.dev=200", "task.test=500", "task.template=infer"],
         "mnli": ["task.train=1000", "task.dev=200", "task.test=500", "task.template=infer"],
         "wic": ["task.train=1000", "task.dev=100", "task.test=500"],
         "copa": ["task.train=250", "task.dev=50", "task.test=100"],
         "winogrande": ["task.train=4000", "task.dev=300", "task.test=2000"]}
BASE = ["model.name=smollm2-135m", "model.dtype=float32", "task.split_seed=0", "trainable.scheme=final_norm",
        "train.head_cache=true", "train.batch_size=16", "train.eval_at_start=false", "train.progress=false",
        "train.tensorboard=false", "optim.eps=1e-2", "optim.seed=0"]


def parse_runs(text: str) -> list[tuple[str, float]]:
    """``"mezo:0.1,zo-adam:1e-2"`` -> [("mezo", 0.1), ("zo-adam", 0.01)]."""
    runs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        method, sep, lr = item.partition(":")
        if not sep:
            raise SystemExit(f"--runs: {item!r} is not METHOD:LR")
        try:
            runs.append((method, float(lr)))
        except ValueError:
            raise SystemExit(f"--runs: the lr of {item!r} is not a number") from None
    if not runs:
        raise SystemExit("--runs: give at least one METHOD:LR")
    return runs


def dev_curve(metrics_file: Path) -> list[tuple[int, float]]:
    """(step, the run's headline dev metric) at each dev evaluation of a run's metrics.jsonl."""
    dev = [r for r in read_jsonl(metrics_file) if r.get("phase") == "dev"]
    return [(int(r["step"]), headline({k[4:]: v for k, v in r.items() if k.startswith("dev/")})[1]) for r in dev]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True, choices=sorted(TASKS))
    ap.add_argument("--runs", required=True, help="METHOD:LR,... (e.g. mezo:0.3,zo-adam:0.01)")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides for every run")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/head_cache_sweep_TASK.json")
    args = ap.parse_args(argv)
    common = BASE + [f"task.name={args.task}"] + TASKS[args.task] + [
        f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", f"train.log_every={args.eval_every}",
        f"train.save_every={args.steps}"] + args.set
    runs = parse_runs(args.runs)
    first = load_config(None, common + [f"optim.method={runs[0][0]}", f"optim.lr={runs[0][1]}"])
    setup = build(first, splits=("train", "dev"))
    data = setup.data._replace(test=[])  # the test rows are carved (they decide dev's) but never read
    if not setup.data.dev:
        raise SystemExit("the sweep reads dev accuracy: set task.dev > 0")
    cache = build_head_cache(setup, resolve_objective(first, setup.data.train), progress=True)
    start = {n: p.detach().clone() for n, p in setup.named.items()}
    zero_shot = cache.evaluate("dev", setup.data.dev, setup.data.spec.metric)
    rows = []
    print(f"{args.task}: dev zero-shot {zero_shot}; trunk cached in {cache.seconds:.0f} s "
          f"({cache.forward_passes} forward passes)", flush=True)
    print("| method | lr | best dev | at step | last dev | seconds |\n|---|---:|---:|---:|---:|---:|", flush=True)
    for method, lr in runs:
        cfg = load_config(None, common + [f"optim.method={method}", f"optim.lr={lr}"])
        with torch.no_grad():
            for n, p in setup.named.items():
                p.copy_(start[n])
        run_setup = build(cfg, data=data, selected=(setup.loaded, setup.named))  # the cache's model, adapters included
        with tempfile.TemporaryDirectory() as tmp:
            cfg.train.output_dir = tmp
            t0 = time.time()
            train(cfg, setup=run_setup, head_cache=cache)
            seconds = time.time() - t0
            curve = dev_curve(Path(tmp) / "metrics.jsonl")
        best_step, best = max(curve, key=lambda c: (c[1], -c[0]))
        row = {"method": method, "lr": lr, "best_dev": best, "best_step": best_step, "last_dev": curve[-1][1],
               "seconds": round(seconds, 1), "curve": curve}
        rows.append(row)
        print(f"| {method} | {lr:g} | {best:.3f} | {best_step} | {curve[-1][1]:.3f} | {seconds:.0f} |", flush=True)
        # after every run, so a sweep stopped half way keeps the runs it finished
        write_record(args.out or ROOT / f"benchmarks/results/head_cache_sweep_{args.task}.json",
                     {"task": args.task, "dev_zero_shot": zero_shot, "cache_seconds": round(cache.seconds, 1),
                      "trunk_forward_passes": cache.forward_passes, "steps": args.steps, "runs": rows,
                      "finished": len(rows) == len(runs)}, config=common)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
