"""How large are the entries a run starts to train, per scheme? The scale that sizes eps and lr.

    python benchmarks/trainable_scale.py                   # SmolLM2-135M, every scheme
    python benchmarks/trainable_scale.py --model tiny-llama

A perturbation ``eps`` and a step move an entry by an amount that only means something against
the entry's own size: MeZO's eps 1e-3 is a few percent of a weight, its prefix eps 1e-1 a few
percent of an activation. ``zotune train`` starts a prefix from real activations and a prompt from
rows of the vocabulary's embeddings; this prints the root mean square and median magnitude of the
trained entries at step 0 for each scheme (LoRA: its A factors, B being zero), as
``src/zotune/defaults.py`` uses them, and writes JSON with machine and date.
"""

from __future__ import annotations

import argparse

import torch

from zotune.bench.record import write_record
from zotune.config import load_config
from zotune.estimators.magnitude import magnitude_threshold
from zotune.params import SCHEMES
from zotune.train.loop import build


def scale(model_name: str, scheme: str) -> dict:
    cfg = load_config(None, [f"model.name={model_name}", "task.name=sst2", "task.train=16", "task.dev=0",
                             "task.test=0", f"trainable.scheme={scheme}", "optim.method=mezo"])
    named = build(cfg, splits=("train",)).named
    values = torch.cat([p.detach().float().flatten() for n, p in named.items() if "lora_B" not in n])
    return {"scheme": scheme, "entries": int(sum(p.numel() for p in named.values())),
            "rms": float(values.pow(2).mean().sqrt()),
            "median_abs": magnitude_threshold(values, 0.5, seed=0)}  # Sparse-MeZO's sampled quantile


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--out", default="benchmarks/results/trainable_scale.json")
    args = ap.parse_args(argv)
    rows = [scale(args.model, s) for s in args.schemes.split(",")]
    print(f"\ntrained entries at step 0, {args.model} (zotune train's inits; LoRA: A factors)")
    print("| scheme | entries | rms | median abs |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['entries']:,} | {r['rms']:.4g} | {r['median_abs']:.4g} |")
    return write_record(args.out, {"rows": rows}, model=args.model)


if __name__ == "__main__":
    main()
