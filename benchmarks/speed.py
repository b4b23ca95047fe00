"""Speed close to the limit: ZO step time against the time of its two forward passes.

    python benchmarks/speed.py                       # SmolLM2-135M, float32, batch 16 x 64 tokens, CPU
    python benchmarks/speed.py --model tiny-llama --repeats 3

A two-point ZO step cannot be cheaper than its two forward passes, so for each method this
prints ``step time / (2 x forward time)`` measured in the same process at the same batch (round
robin over the methods; best of the rounds, and the median of the per-round ratios), with a
breakdown: forward passes, direction generation (drawing every chunk of every direction the step
draws), and the rest (parameter writes, rule arithmetic), plus the speed-up over the plain
reference of MeZO's Algorithm 1 (``zotune.reference.mezo_step``). Targets (issue 4): MeZO
<= 1.15, LOZO <= 1.05, and >= 1.3x faster than the reference. Writes JSON next to the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import zotune
from zotune.estimators import Direction
from zotune.reference import mezo_step


def load(name: str):
    if name.startswith("tiny-"):
        from zotune.testing import tiny_model

        return tiny_model(name[5:]).model
    from zotune.models import load_model

    return load_model(name).model


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (lazily created state, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generation_time(opt, repeats: int) -> float:
    """Time to draw every chunk of every direction one step draws (4q - 1 in place: +eps, -2eps,
    restore, the last restore fused into the update; 3q for swap; 2q for dual)."""
    est = opt.estimator
    leaves = opt.leaves
    dirs = est.directions(opt.steps_taken)
    if opt.perturbation in ("swap", "side"):  # +eps, -eps, update
        draws = 3 * len(dirs)
    elif opt.perturbation == "dual":  # both halves from one draw, update
        draws = 2 * len(dirs)
    else:  # +eps, -2eps, restore (the last one fused into the update)
        draws = 4 * len(dirs) - 1
    draws = max(draws, 1)

    def draw_all():
        from zotune.estimators.base import for_each_chunk

        items = [(i, p, k) for i, p in enumerate(leaves) for k in range(est.num_chunks(i))]

        def one(item):
            i, p, k = item
            t = est.target(p, i, k)
            est.leaf_direction(dirs[0], i, p, k, out=est.scratch(t.numel(), p))

        for _ in range(draws):
            for_each_chunk(one, items, leaves[0].device, est.parallel_chunks)

    return median_time(draw_all, repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/speed.json")
    ap.add_argument("--methods", default="mezo,mezo-dual,mezo-rademacher,mezo-rademacher-dual,mezo-swap,"
                                         "lozo,lozo-side,lozo-dual,lozo-m,lozo-m-side,zo-adam,reference")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = load(args.model)
    model.requires_grad_(False)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def loss(copies: int = 1):
        # the training loss's cost: all positions through the network, logits for the last one;
        # copies=2 (perturbation="dual"): the batch twice over in one forward, one loss per copy
        x, m = ids.repeat(copies, 1), mask.repeat(copies, 1)
        out = model(input_ids=x, attention_mask=m, logits_to_keep=1, use_cache=False)
        per_row = torch.nn.functional.cross_entropy(out.logits[:, -1].float(), x[:, -1], reduction="none")
        per_copy = per_row.view(copies, -1).mean(1)
        return per_copy[0] if copies == 1 else per_copy

    with torch.no_grad():
        forward = median_time(loss, args.repeats)
    named = list(model.named_parameters())
    builders = {
        "mezo": lambda: zotune.MeZO(named, lr=1e-9),
        "mezo-rademacher": lambda: zotune.ZOOptimizer(named, "rademacher", "sgd", lr=1e-9),
        "mezo-swap": lambda: zotune.MeZO(named, lr=1e-9, module=model, perturbation="swap"),
        "mezo-dual": lambda: zotune.MeZO(named, lr=1e-9, module=model, perturbation="dual"),
        "mezo-rademacher-dual": lambda: zotune.ZOOptimizer(named, "rademacher", "sgd", lr=1e-9, module=model,
                                                           perturbation="dual"),
        "lozo": lambda: zotune.LOZO(named, lr=1e-9),
        "lozo-side": lambda: zotune.LOZO(named, lr=1e-9, module=model, perturbation="side"),
        "lozo-m-side": lambda: zotune.LOZO(named, lr=1e-9, momentum=0.9, module=model, perturbation="side"),
        "lozo-dual": lambda: zotune.LOZO(named, lr=1e-9, module=model, perturbation="dual"),
        "lozo-m": lambda: zotune.LOZO(named, lr=1e-9, momentum=0.9),
        "zo-adam": lambda: zotune.ZOAdam(named, lr=1e-9),
    }
    rows = []
    ref_step = None

    def fwd():
        with torch.no_grad():
            loss()

    # Round robin: every round times one forward then one step of *each* method, so a machine
    # whose load changes during the run slows every method alike. Headline: best of the rounds
    # (min step / (2 x min forward): the least disturbed timings), beside the median ratio.
    names = args.methods.split(",")
    params = [p for _, p in named]
    counter = iter(range(10**6))
    steppers = {}
    for name in names:
        if name == "reference":
            steppers[name] = lambda: mezo_step(params, loss, next(counter), lr=1e-9, eps=1e-3)
        else:
            opt = builders[name]()
            steppers[name] = (lambda o: lambda: o.step(loss))(opt)
            steppers[name].opt = opt
    timings = {n: {"step": [], "fwd": []} for n in names}
    for rnd in range(args.repeats + 1):  # round 0 warms up (lazy state, caches)
        for name in names:
            t0 = time.perf_counter()
            fwd()
            t1 = time.perf_counter()
            steppers[name]()
            t2 = time.perf_counter()
            if rnd:
                timings[name]["fwd"].append(t1 - t0)
                timings[name]["step"].append(t2 - t1)
        print(f"  round {rnd}/{args.repeats} done", file=sys.stderr)
    for name in names:
        st, fw = timings[name]["step"], timings[name]["fwd"]
        row = {"method": "reference (MeZO Alg. 1)" if name == "reference" else name,
               "step_s": min(st), "forward_s": 2 * min(fw), "ratio": min(st) / (2 * min(fw)),
               "median_ratio": statistics.median(s_ / (2 * f_) for s_, f_ in zip(st, fw)),
               "step_s_all": st, "forward_s_all": fw}
        if name == "reference":
            ref_step = min(st)
        else:
            gen = generation_time(steppers[name].opt, args.repeats)
            row.update(generation_s=gen, other_s=max(0.0, min(st) - 2 * min(fw) - gen))
        rows.append(row)
    for r in rows:
        if ref_step:
            r["speedup_vs_reference"] = ref_step / r["step_s"]
    print(f"\nforward (batch {args.batch} x {args.seq_len} tokens, {args.model}): {forward:.3f} s\n")
    print("| method | step s | step / 2 fwd (best) | median ratio | 2 fwd s | direction gen s | other s | x faster than reference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['step_s']:.3f} | {r['ratio']:.3f} | {r['median_ratio']:.3f} | {r.get('forward_s', 2 * forward):.3f} | "
              f"{r.get('generation_s', float('nan')):.3f} | {r.get('other_s', float('nan')):.3f} | "
              f"{r.get('speedup_vs_reference', float('nan')):.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu",
        "model": args.model, "batch": args.batch, "seq_len": args.seq_len, "forward_s": forward, "rows": rows,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
