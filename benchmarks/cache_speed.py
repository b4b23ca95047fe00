"""How much cheaper is a loss with ``train.head_cache``? Side by side, in one process: the same
batch's loss from the whole model and from the cache, for each cached scheme.

    python benchmarks/cache_speed.py [--task sst2] [--schemes final_norm,top_layers,lora4] [--repeats 20]

For each scheme it builds the run (SmolLM2-135M, float32), caches the first ``--rows`` training rows,
then times ``--repeats`` losses of one training batch (16 rows) without the cache (a forward of
the model) and with it, alternating the two so both see the same machine state, and checks that
the two losses agree. ``lora4`` is LoRA in the last 4 layers (``trainable.top_layers=4``). Prints
a table (ms a loss, ratio) and writes benchmarks/results/cache_speed.json with machine and date.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from zotune.bench.record import write_record
from zotune.config import load_config
from zotune.distributed import DistContext
from zotune.train.loop import ModelLosses, build, build_head_cache, resolve_objective

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = {"final_norm": ["trainable.scheme=final_norm", "optim.eps=1e-2"],
           "top_layers": ["trainable.scheme=top_layers", "optim.eps=1e-3"],
           "lora4": ["trainable.scheme=lora", "trainable.top_layers=4", "optim.eps=1e-2"]}


def time_losses(closures: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each closure's loss, ``repeats`` times, the closures taken in turn."""
    out = {name: [] for name in closures}
    with torch.no_grad():
        for name, closure in closures.items():  # one call each first: lazy initialisation is not timed
            closure()
        for _ in range(repeats):
            for name, closure in closures.items():
                t0 = time.perf_counter()
                closure()
                out[name].append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--rows", type=int, default=64, help="training rows to cache")
    ap.add_argument("--set", nargs="*", default=[], help="more config overrides")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_speed.json"))
    args = ap.parse_args(argv)
    unknown = [s for s in args.schemes.split(",") if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"--schemes: unknown {unknown}; known: {', '.join(SCHEMES)}")
    base = ["model.name=smollm2-135m", "model.dtype=float32", f"task.name={args.task}", f"task.train={args.rows}",
            "task.dev=0", "task.test=0", "task.max_length=64", "train.batch_size=16", "train.head_cache=true",
            "train.progress=false", "train.tensorboard=false", "optim.method=mezo"] + args.set
    rows, loaded = [], None
    print("| scheme | trained entries | ms a loss, model | ms a loss, cache | ratio | loss difference |\n"
          "|---|---:|---:|---:|---:|---:|", flush=True)
    for scheme in args.schemes.split(","):
        cfg = load_config(None, base + SCHEMES[scheme])
        setup = build(cfg)  # a fresh model each scheme: LoRA wraps it
        objective = resolve_objective(cfg, setup.data.train)
        cache = build_head_cache(setup, objective)
        indices = list(range(16))
        closures = {"model": ModelLosses(setup, setup.loaded, "cpu", objective, DistContext()).closure(indices),
                    "cache": cache.closure(indices)}
        with torch.no_grad():
            diff = abs(float(closures["model"]()) - float(closures["cache"]()))
        seconds = time_losses(closures, args.repeats)
        model_ms, cache_ms = (1000 * statistics.median(seconds[k]) for k in ("model", "cache"))
        entries = sum(p.numel() for p in setup.named.values())
        row = {"scheme": scheme, "trained_entries": entries, "model_ms": round(model_ms, 2),
               "cache_ms": round(cache_ms, 2), "ratio": round(model_ms / cache_ms, 1), "loss_difference": diff,
               "cache_seconds": round(cache.seconds, 1), "cached_rows": args.rows}
        rows.append(row)
        print(f"| {scheme} | {entries:,} | {model_ms:.1f} | {cache_ms:.2f} | {model_ms / cache_ms:.1f}x | {diff:.1e} |",
              flush=True)
        del setup, cache, closures
    write_record(args.out, {"task": args.task, "repeats": args.repeats, "batch_size": 16, "rows": rows}, config=base)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
