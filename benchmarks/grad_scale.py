"""How large is the gradient a ZO method estimates? The scale that maps one method's lr to another's.

    python benchmarks/grad_scale.py                                  # quickstart recipe, 3 batches
    python benchmarks/grad_scale.py recipes/quickstart-sst2.yaml --batches 5 task.name=rte

MeZO's step is ``lr * c * z`` with ``c ~ g.z``, so its length is about ``lr ||g|| sqrt(d)``; FZOO's
normalised coefficients are O(1), so its step is about ``lr sqrt(d / N)``. The two take steps of
the same length when ``lr_fzoo ~ lr_mezo ||g|| sqrt(N)``: this script measures ``||g||`` (one
backward per batch, on the recipe's training batches and objective) and prints that ratio, which
is where an lr sweep for a normalised method should be centred. Writes JSON with machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch

from zotune.config import load_config
from zotune.train.loop import BatchOrder, build, make_closure, resolve_objective


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", default="recipes/quickstart-sst2.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--queries", type=int, default=8, help="N of the normalised method (FZOO's default 8)")
    ap.add_argument("--out", default="benchmarks/results/grad_scale.json")
    args = ap.parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    setup = build(cfg)
    model, named = setup.model, setup.named
    device = next(model.parameters()).device
    objective = resolve_objective(cfg, setup.data.train)
    order = BatchOrder(len(setup.data.train), cfg.train.batch_size, cfg.train.data_seed)
    d = sum(p.numel() for p in named.values())
    rows = []
    for s in range(args.batches):
        batch = [setup.data.train[i] for i in order.indices(s)]
        closure = make_closure(setup.loaded, batch, cfg, device, objective)
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with torch.enable_grad():
            loss = closure()
            loss.backward()
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in named.values() if p.grad is not None))
        rows.append({"batch": s, "loss": float(loss), "grad_norm": norm, "seconds": round(time.perf_counter() - t0, 2)})
        print(f"batch {s}: loss {float(loss):.4f}  ||g|| {norm:.3f}")
    model.zero_grad(set_to_none=True)
    mean_norm = sum(r["grad_norm"] for r in rows) / len(rows)
    ratio = mean_norm * math.sqrt(args.queries)
    print(f"\nd = {d:,} trained values; mean ||g|| = {mean_norm:.3f}")
    print(f"same step length: lr_normalised(N={args.queries}) ~ {ratio:.1f} x lr_mezo "
          f"(e.g. MeZO lr {cfg.optim.lr:g} -> {cfg.optim.lr * ratio:.2g})")
    out = {"recipe": args.recipe, "overrides": args.overrides, "model": cfg.model.name, "task": cfg.task.name,
           "scheme": cfg.trainable.scheme, "trained_values": d, "batches": rows, "mean_grad_norm": mean_norm,
           "queries": args.queries, "lr_ratio_normalised_to_mezo": ratio,
           "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
           "date": datetime.date.today().isoformat(), "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
