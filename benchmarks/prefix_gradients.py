"""Where does a prefix's gradient sit? Per layer, the RMS of the prefix's keys and values and of
their gradient, from real SST-2 batches at the prefix's starting point.

    python benchmarks/prefix_gradients.py [--batches 8] [--out benchmarks/results/prefix_gradients_sst2.json]

Why: a two-point estimate's variance grows with the number of entries it perturbs, so ZO learns
faster per forward pass when it perturbs only the entries that carry the gradient. This backpropagates
(once, for the measurement; no ZO run does) through SmolLM2-135M with its 5-token prefix started
from real tokens' keys and values, as ``zotune train`` starts it, over ``--batches`` training
batches of 16 rows (the convergence grid's split and loss), and prints per layer the keys' and values'
RMS and gradient RMS (the root of the mean squared gradient over batches), then the values' share of
the gradient's squared norm and the gain a values-only perturbation would have in the estimate's
signal per perturbed entry (share / fraction of entries). ``trainable.prefix_values_only`` acts on it.
"""
from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from zotune.config import load_config
from zotune.train.loop import build
from zotune.train.objective import make_closure, resolve_objective

ROOT = Path(__file__).resolve().parent.parent
BASE = ["model.name=smollm2-135m", "model.dtype=float32", "task.name=sst2", "task.train=1000", "task.dev=200",
        "task.test=400", "task.max_length=64", "task.split_seed=0", "trainable.scheme=prefix",
        "optim.method=fo-adam", "optim.lr=1e-2", "train.batch_size=16", "train.progress=false"]


def measure(overrides: list[str], batches: int) -> dict:
    cfg = load_config(None, overrides)
    setup = build(cfg)
    (table,) = setup.named.values()
    layers = setup.loaded.model.peft_config[setup.loaded.model.active_adapter].num_layers
    n, width = table.shape
    square = torch.zeros_like(table)
    bs = cfg.train.batch_size
    objective = resolve_objective(cfg, setup.data.train)
    for b in range(batches):
        rows = setup.data.train[b * bs:(b + 1) * bs]
        table.grad = None
        make_closure(setup.loaded, rows, cfg, "cpu", objective)().backward()
        square += table.grad.square()
    mean_square = (square / batches).view(n, layers, 2, -1)  # per entry, over the batches
    p = table.detach().view(n, layers, 2, -1).square().mean(dim=(0, 3)).sqrt()  # per layer, key / value
    g = mean_square.mean(dim=(0, 3)).sqrt()
    energy = mean_square.sum(dim=(0, 3))
    share = float(energy[:, 1].sum() / energy.sum())
    return {"layers": [{"layer": i, "key_rms": float(p[i, 0]), "value_rms": float(p[i, 1]),
                        "key_grad_rms": float(g[i, 0]), "value_grad_rms": float(g[i, 1])} for i in range(layers)],
            "values_share_of_squared_gradient": share, "values_fraction_of_entries": 0.5,
            "values_only_signal_gain": share / 0.5, "batches": batches, "batch_size": bs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prefix_gradients_sst2.json"))
    args = ap.parse_args(argv)
    result = measure(BASE, args.batches)
    print("| layer | key RMS | value RMS | key grad RMS | value grad RMS |\n|---:|---:|---:|---:|---:|")
    for r in result["layers"]:
        print(f"| {r['layer']} | {r['key_rms']:.3f} | {r['value_rms']:.3f} | {r['key_grad_rms']:.2e} | "
              f"{r['value_grad_rms']:.2e} |")
    print(f"\nvalues: {100 * result['values_share_of_squared_gradient']:.1f} % of the squared gradient in 50 % of "
          f"the entries (signal per perturbed entry x{result['values_only_signal_gain']:.2f} when only they are perturbed)")
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "config": BASE}
    Path(args.out).write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
