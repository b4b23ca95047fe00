"""Forward time of a training batch before and after the LM-head fix, side by side in one process.

    python benchmarks/head_speed.py                       # SmolLM2-135M, SST-2, every scheme
    python benchmarks/head_speed.py --schemes prompt --repeats 9

transformers hands the LM head the last positions (``logits_to_keep``) as a strided view, and for a
frozen head (the adapter schemes) ``F.linear`` on it runs a batched matmul against the weight expanded per
row; ``zotune.lm.contiguous_head`` makes those rows contiguous. Prompt tuning also used to run
right padded through peft's forward (which drops position ids), so its head ran over every column;
it now runs left padded with explicit positions (``zotune.lm._prompt_tuned_inputs``). "before"
reproduces the old code paths in this process (the hook replaced by a no-op; for prompt tuning, the
model's forward arguments without ``position_ids``, which selects the right-padded path); "after"
is the library as it is. The two alternate (ABAB...) so a drifting machine shares its drift. Prints
a table and writes JSON with machine and date.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch

import zotune.lm
from zotune.bench.record import write_record
from zotune.config import load_config
from zotune.train.loop import build, make_closure, resolve_objective


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(scheme: str, args) -> dict:
    cfg = load_config(None, [f"model.name={args.model}", "task.name=sst2", f"task.train={args.batch}", "task.dev=0",
                             "task.test=0", "task.max_length=64", f"train.batch_size={args.batch}",
                             f"trainable.scheme={scheme}", "optim.method=mezo"])
    setup = build(cfg, splits=("train",))
    examples = setup.data.train[:args.batch]
    objective = resolve_objective(cfg, examples)
    after_lm = setup.loaded
    before_lm = after_lm
    if after_lm.adapter == "PROMPT_TUNING":
        before_lm = dataclasses.replace(after_lm, forward_args=after_lm.forward_args - {"position_ids"})
    after = make_closure(after_lm, examples, cfg, "cpu", objective)
    before = make_closure(before_lm, examples, cfg, "cpu", objective)
    real_head = zotune.lm.contiguous_head

    def run_before():
        zotune.lm.contiguous_head = lambda model: contextlib.nullcontext()
        try:
            return before()
        finally:
            zotune.lm.contiguous_head = real_head

    with torch.no_grad():
        loss_before, loss_after = float(run_before()), float(after())  # warm-up, and the same loss
        times = {"before": [], "after": []}
        for _ in range(args.repeats):
            times["before"] += _time(run_before, 1)
            times["after"] += _time(after, 1)
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    return {"scheme": scheme, "before_s": round(b, 4), "after_s": round(a, 4), "speedup": round(b / a, 3),
            "loss_before": loss_before, "loss_after": loss_after, "repeats": args.repeats,
            "times": {k: [round(x, 4) for x in v] for k, v in times.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--schemes", default="full,lora,prefix,prompt")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/head_speed.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = [measure(s, args) for s in args.schemes.split(",")]
    print(f"\nforward of one SST-2 training batch ({args.batch} rows, {args.model}, {torch.get_num_threads()} threads), "
          f"median of {args.repeats}")
    print("| scheme | before (s) | after (s) | speed-up | loss before | loss after |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['before_s']:.3f} | {r['after_s']:.3f} | {r['speedup']:.2f}x "
              f"| {r['loss_before']:.5f} | {r['loss_after']:.5f} |")
    return write_record(args.out, {"rows": rows}, model=args.model, batch=args.batch)


if __name__ == "__main__":
    main()
