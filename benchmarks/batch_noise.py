"""Which batch size makes a two-point ZO step go furthest per training row? Measured from
per-example gradients at the prefix's starting point.

    python benchmarks/batch_noise.py [--task sst2] [--scheme prefix|full] [--rows 128] [--out ...json]

Why: a two-point estimate with a Gaussian direction in d entries has variance ~ d E||g_B||^2, and
``E||g_B||^2 = G + T / B`` (G = ||g||^2 of the full-data gradient, T = the trace of the per-example
gradients' covariance). With the best lr, the loss falls per step by ~ G^2 / (2 L d (G + T / B)),
so per training row (divide by B) by ~ G^2 / (2 L d (B G + T)): smaller batches are never worse
per row, and are up to 16 / B times better than batch 16 when B G >> T. The gain of batch B over
batch 16 per row is ``(16 G + T) / (B G + T)`` and the best lr changes by ``(G + T / 16) / (G + T / B)``.
This backpropagates once per row (for the measurement only; no ZO run does) through SmolLM2-135M
with its 5-token prefix started from real tokens' keys and values, as ``zotune train`` starts it,
over ``--rows`` training rows one at a time, and estimates G and T without bias:
``T ~ sum ||g_i - mean||^2 / (N - 1)`` and ``G ~ ||mean||^2 - T / N``. ``--scheme full`` measures
the same for all weights. It also prints what per-example directions (one per example of a batch of
16: ``zotune.PerExampleMeZO``, ``zotune.PerExampleLowRank``) gain over one shared direction at the same
forward passes: their noise is lower by ``(16 G + T) / (G + T)`` (``zotune.evaluation.PerExample``).
Writes benchmarks/results/batch_noise_TASK.json (``_TASK_SCHEME`` for another scheme than the prefix).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from zotune.bench.record import write_record
from zotune.config import load_config
from zotune.train.loop import build
from zotune.train.objective import make_closure, resolve_objective

ROOT = Path(__file__).resolve().parent.parent
# the splits and lengths of the runs these numbers are for (convergence grid; cross-task grid)
TASKS = {"sst2": ["task.train=1000", "task.dev=200", "task.test=400", "task.max_length=64"],
         "rte": ["task.train=1000", "task.dev=100", "task.test=1000"]}
BASE = ["model.name=smollm2-135m", "model.dtype=float32", "task.split_seed=0",
        "optim.method=fo-sgd", "optim.lr=1e-2", "train.batch_size=1", "train.progress=false"]
BATCHES = (1, 2, 4, 8, 16)


def noise_terms(sum_g: torch.Tensor, sum_sq: float, n: int) -> tuple[float, float]:
    """Unbiased (G, T) from the sum of n per-example gradients and the sum of their squared norms."""
    if n < 2:
        raise ValueError(f"need at least 2 rows to separate the mean from the spread, got {n}")
    mean_sq = float((sum_g / n).square().sum())
    spread = (sum_sq - n * mean_sq) / (n - 1)
    return mean_sq - spread / n, spread


def per_row_gain(g: float, t: float, batch: int, ref: int = 16) -> float:
    """How much further a best-lr step of ``batch`` rows goes per row than one of ``ref`` rows."""
    return (ref * g + t) / (batch * g + t)


def lr_ratio(g: float, t: float, batch: int, ref: int = 16) -> float:
    """The best lr at ``batch`` as a multiple of the best lr at ``ref``."""
    return (g + t / ref) / (g + t / batch)


def measure(overrides: list[str], rows: int) -> dict:
    cfg = load_config(None, overrides)
    setup = build(cfg)
    params = list(setup.named.values())
    objective = resolve_objective(cfg, setup.data.train)
    examples = setup.data.train[:rows]
    if len(examples) < rows:
        raise ValueError(f"--rows {rows} but the training split has {len(examples)} rows")
    sum_g = [torch.zeros_like(p) for p in params]
    sum_sq = 0.0
    for example in examples:
        for p in params:
            p.grad = None
        make_closure(setup.loaded, [example], cfg, "cpu", objective)().backward()
        sum_sq += sum(float(p.grad.square().sum()) for p in params)
        for s, p in zip(sum_g, params):
            s += p.grad
    g, t = noise_terms(torch.cat([s.flatten() for s in sum_g]), sum_sq, rows)
    return {"rows": rows, "G": g, "T": t, "T_over_G": t / g if g > 0 else None,
            "per_example_noise_reduction_16": (16 * g + t) / (g + t),
            "batches": [{"batch": b, "per_row_gain_vs_16": per_row_gain(g, t, b), "lr_ratio_vs_16": lr_ratio(g, t, b)}
                        for b in BATCHES]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2", choices=sorted(TASKS))
    ap.add_argument("--scheme", default="prefix", choices=("prefix", "full"))
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/batch_noise_TASK.json")
    args = ap.parse_args(argv)
    overrides = BASE + [f"trainable.scheme={args.scheme}", f"task.name={args.task}"] + TASKS[args.task]
    result = measure(overrides, args.rows)
    print(f"{args.task}, {args.rows} rows: G = ||g||^2 = {result['G']:.3g}, T = {result['T']:.3g}, "
          f"T / G = {result['T_over_G'] if result['T_over_G'] is None else round(result['T_over_G'], 1)}; "
          f"per-example directions (batch 16): noise / {result['per_example_noise_reduction_16']:.2f}")
    print("| batch | progress per row vs batch 16 | best lr vs batch 16 |\n|---:|---:|---:|")
    for b in result["batches"]:
        print(f"| {b['batch']} | {b['per_row_gain_vs_16']:.2f} | {b['lr_ratio_vs_16']:.2f} |")
    suffix = "" if args.scheme == "prefix" else f"_{args.scheme}"
    write_record(args.out or ROOT / f"benchmarks/results/batch_noise_{args.task}{suffix}.json",
                 {"task": args.task, "scheme": args.scheme, **result}, config=overrides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
