"""How much noise do per-example directions take out of a two-point step? Measured, against the prediction.

    python benchmarks/per_example_noise.py [--task sst2] [--steps 40] [--out benchmarks/results/per_example_noise_sst2.json]

Why: MeZO's estimate ``g = c z`` (one direction, the batch's mean loss) has ``E|g|^2 ~ d (G + T / B)``;
with per-example directions (``zotune.evaluation.PerExample``: ``g = (1/B) sum_j c_j z_j``, ``c_j`` from
example ``j``'s own losses) ``E|g|^2 ~ d (G + T) / B``, with ``G`` the squared norm of the mean gradient
and ``T`` the examples' spread (``benchmarks/batch_noise.py`` measures both by backpropagation). Both
have the same expectation, so the ratio of their second moments is how much less a step of one walks
than the other at the same lr: predicted ``(B G + T) / (G + T)``.

This takes ``--steps`` batches at the prefix's starting point (as ``zotune train`` starts it), and on
each the two estimates at lr 0 (nothing moves): ``|g|^2 / d`` is ``c^2`` for MeZO and, for ``B``
directions in ``d`` >> ``B`` entries, ``(1/B^2) sum_j c_j^2`` (the cross terms ``z_j . z_k`` are
``O(sqrt(d))``, a ``1/sqrt(d)`` share). Forward passes only: no backward.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from zotune.bench.record import write_record
from zotune.config import load_config
from zotune.estimators import make_estimator
from zotune.step import ZOOptimizer
from zotune.train.loop import BatchOrder, build
from zotune.train.objective import make_closure, resolve_objective

ROOT = Path(__file__).resolve().parent.parent
TASKS = {"sst2": ["task.train=1000", "task.dev=200", "task.test=400", "task.max_length=64"],
         "rte": ["task.train=1000", "task.dev=200", "task.test=1000"]}
BASE = ["model.dtype=float32", "task.split_seed=0", "trainable.scheme=prefix",
        "optim.lr=1e-2", "optim.eps=1e-1", "train.batch_size=16", "train.progress=false"]


def second_moments(coeffs_shared: list[float], coeffs_per: list[list[float]]) -> dict:
    """``E|g|^2 / d`` of each estimate from its steps' coefficients, and their ratio with its standard error."""
    shared = [c * c for c in coeffs_shared]
    per = [sum(c * c for c in row) / len(row) ** 2 for row in coeffs_per]
    ms, mp = sum(shared) / len(shared), sum(per) / len(per)

    def rel_se(xs, m):
        var = sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)
        return math.sqrt(var / len(xs)) / m

    ratio = ms / mp
    return {"shared": ms, "per_example": mp, "ratio": ratio,
            "ratio_se": ratio * math.sqrt(rel_se(shared, ms) ** 2 + rel_se(per, mp) ** 2)}


def measure(overrides: list[str], steps: int) -> dict:
    cfg = load_config(None, overrides + ["optim.method=mezo"])
    setup = build(cfg)
    named, model = list(setup.named.items()), setup.model
    eps, batch = cfg.optim.eps, cfg.train.batch_size
    shared = ZOOptimizer(named, "gaussian", "sgd", lr=0.0, eps=eps, seed=0, module=model, perturbation="dual")
    per = ZOOptimizer(named, make_estimator("gaussian", queries=batch), "sgd", lr=0.0, eps=eps, seed=1,
                      module=model, perturbation="per_example")
    train = setup.data.train
    device = next(model.parameters()).device
    objective = resolve_objective(cfg, train)
    order = BatchOrder(len(train), batch, cfg.train.data_seed)
    cs, cp = [], []
    for s in range(steps):
        closure = make_closure(setup.loaded, [train[i] for i in order.indices(s)], cfg, device, objective)
        shared.step(closure)
        per.step(closure)
        cs.append(shared.last_record["coeffs"][0])
        cp.append(per.last_record["coeffs"])
    return {"steps": steps, "batch": batch, **second_moments(cs, cp)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=sorted(TASKS), default="sst2")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--model", default="smollm2-135m", help="a model name zotune loads (tests: tiny-llama)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    result = measure(BASE + [f"model.name={args.model}", f"task.name={args.task}"] + TASKS[args.task], args.steps)
    noise = json.loads((ROOT / f"benchmarks/results/batch_noise_{args.task}.json").read_text())
    g, t, b = noise["G"], noise["T"], result["batch"]
    result["predicted_ratio"] = (b * g + t) / (g + t)
    result["predicted_from"] = f"benchmarks/results/batch_noise_{args.task}.json (G {g:.3g}, T {t:.3g})"
    print("| task | batch | steps | E|g|^2/d MeZO | E|g|^2/d per-example | ratio (measured) | ratio (predicted) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.task} | {b} | {result['steps']} | {result['shared']:.4g} | {result['per_example']:.4g} | "
          f"{result['ratio']:.2f} +- {result['ratio_se']:.2f} | {result['predicted_ratio']:.2f} |")
    write_record(args.out or ROOT / f"benchmarks/results/per_example_noise_{args.task}.json", {"task": args.task, **result},
                 argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
