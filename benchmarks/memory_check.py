"""Predicted against measured peak memory of one training step, for every method.

    python benchmarks/memory_check.py                          # SmolLM2-135M, batch 16 x 64, float32
    python benchmarks/memory_check.py --seq-lens 64,256,1024 --methods mezo,fo-sgd --batch 2   # Figure 3
    python benchmarks/memory_check.py --scheme norms --out benchmarks/results/memory_check_norms.json

Measured: the model's bytes, plus what the optimizer keeps between steps (state, scratch
buffers), plus the peak of every tensor allocated during the second step (directions, gradients,
activations, temporaries; the first step creates the state lazily), tracked exactly with
:class:`zotune.bench.AllocationTracker` on one thread (device independent: on CPU no allocator
peak exists). Predicted: :func:`zotune.bench.memory_model.predict` (the zotune variant of
ZO-Bench Table 5), from the config alone. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
from pathlib import Path

import torch

import zotune
from zotune.bench.memory_model import predict
from zotune.bench.profile import (
    estimator_buffer_bytes,
    model_bytes,
    optimizer_state_bytes,
    sequential_chunks,
    step_memory,
)
from zotune.params import OWN_TENSOR_SCHEMES

BUILDERS = {
    "inference": None,
    "mezo": lambda m, named: zotune.MeZO(named, lr=1e-9),
    "zo-sgd-momentum": lambda m, named: zotune.ZOSGDMomentum(named, lr=1e-9),
    "zo-adam": lambda m, named: zotune.ZOAdam(named, lr=1e-9),
    "lozo": lambda m, named: zotune.LOZO(named, lr=1e-9),
    "forward-grad": lambda m, named: zotune.ForwardGrad(named, module=m, lr=1e-9),
    "fzoo": lambda m, named: zotune.FZOO(named, lr=1e-9),
    "hizoo": lambda m, named: zotune.HiZOO(named, lr=1e-9),
    "sparse-mezo": lambda m, named: zotune.SparseMeZO(named, lr=1e-9),
    "population": lambda m, named: zotune.PopulationLowRank(named, lr=1e-9),  # members in place, one by one
    "fo-sgd": lambda m, named: zotune.FOSGD([p for _, p in named], lr=1e-9),
    "fo-adam": lambda m, named: zotune.FOAdam([p for _, p in named], lr=1e-9),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-lens", default="64")
    ap.add_argument("--scheme", default="full", choices=sorted(OWN_TENSOR_SCHEMES),
                    help="what trains: all weights, or only the normalisation gains (schemes without an adapter)")
    ap.add_argument("--methods", default=",".join(BUILDERS))
    ap.add_argument("--out", default="benchmarks/results/memory_check.json")
    ap.add_argument("--plot", help="write a figure of peak memory against sequence length here (.png and .svg)")
    args = ap.parse_args(argv)
    from zotune.models import load_model

    loaded = load_model(args.model)
    model = loaded.model
    vocab = model.config.vocab_size
    trained = OWN_TENSOR_SCHEMES[args.scheme](model)  # the same tensors for every method and length
    rows = []
    for seq in [int(s) for s in args.seq_lens.split(",")]:
        ids = torch.randint(0, vocab, (args.batch, seq), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)

        def loss():
            out = model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)
            return torch.nn.functional.cross_entropy(out.logits[:, -1].float(), ids[:, -1])

        for method in args.methods.split(","):
            attn = "eager" if method == "forward-grad" else "sdpa"
            model.set_attn_implementation(attn)
            for name, p in model.named_parameters():
                p.requires_grad_(name in trained)
                p.grad = None
            named = list(trained.items())
            if method == "inference":
                from zotune.bench.profile import AllocationTracker

                with torch.no_grad(), AllocationTracker() as tracker:
                    loss()
                peak = tracker.peak_bytes
                kept = 0
            else:
                opt = BUILDERS[method](model, named)
                with sequential_chunks():  # warm-up: lazily created state exists before the measured step
                    opt.step(loss)
                kept = optimizer_state_bytes(opt) + (estimator_buffer_bytes(opt) if hasattr(opt, "estimator") else 0)
                peak = step_memory(opt, loss).step_peak_bytes
                del opt
            measured = model_bytes(model.parameters()) + kept + peak
            # torch.optim.Adam uses its multi-tensor ("foreach") path only for CUDA tensors
            predicted = predict(args.model, method, scheme=args.scheme, seq_len=seq, batch=args.batch, logits_positions=args.batch,
                                foreach=torch.cuda.is_available()).peak_bytes
            rows.append({"method": method, "scheme": args.scheme, "seq_len": seq, "batch": args.batch, "measured_bytes": measured,
                         "predicted_bytes": predicted, "predicted_over_measured": predicted / measured})
            print(f"{method:>16} seq {seq:>5}: measured {measured / 2**20:8.1f} MiB, predicted "
                  f"{predicted / 2**20:8.1f} MiB ({predicted / measured:.3f})", flush=True)
            gc.collect()
    print("\n| method | scheme | seq len | measured MiB | predicted MiB | predicted / measured |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['scheme']} | {r['seq_len']} | {r['measured_bytes'] / 2**20:,.1f} | "
              f"{r['predicted_bytes'] / 2**20:,.1f} | {r['predicted_over_measured']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "machine": platform.platform(), "torch": torch.__version__, "model": args.model,
                               "device": "cpu", "rows": rows}, indent=2))
    print(f"\nwrote {out}")
    if args.plot:
        plot(rows, args.plot, args.model, args.batch)
    return 0


def plot(rows, path: str, model: str, batch: int) -> None:
    """ZO-Bench Figure 3: peak memory against sequence length, measured (solid) and predicted (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [r for r in rows if r["method"] == method]
        xs = [r["seq_len"] for r in pts]
        line, = ax.plot(xs, [r["measured_bytes"] / 2**20 for r in pts], marker="o", label=f"{method} (measured)")
        ax.plot(xs, [r["predicted_bytes"] / 2**20 for r in pts], ls="--", color=line.get_color(), label=f"{method} (predicted)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory (MiB)")
    ax.set_title(f"{model}, batch {batch}, float32")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    stem = Path(path).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    for ext in (".png", ".svg"):
        fig.savefig(str(stem) + ext, dpi=120)
    print(f"wrote {stem}.png and {stem}.svg")


if __name__ == "__main__":
    raise SystemExit(main())
