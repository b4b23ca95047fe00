"""Core costs of every zotune optimizer on a ~100 M parameter Llama-shaped model, on CPU.

    python benchmarks/core_costs.py
    python benchmarks/core_costs.py --layers 2 --methods mezo,zo-adam --out /tmp/core_costs.json

For each method, after one warm-up step (so lazily created state exists), one step is measured:

* memory: the bytes that step allocates, tracked exactly by :class:`zotune.bench.AllocationTracker`
  (device independent; CPU has no allocator peak counter). ``step_peak`` is everything the step
  allocated at once, ``forward_peak`` the peak of one inference forward (``no_grad``) alone, and
  ``extra = step_peak - forward_peak`` what the step costs on top of inference. ``own_peak`` is
  the optimizer's own transients with the closure's allocations left out: the number behind
  "ZO-SGD needs no buffer larger than the largest parameter tensor". The directions are drawn
  between forwards, not during them, so ``step_peak = max(forward_peak, own_peak)`` for two-point
  methods. The tracked step runs on one thread (a dispatch mode sees only its own thread, and
  zotune draws direction chunks on worker threads): with W workers, per-chunk transients are W x.
* what is kept between steps: optimizer state (``opt.state``), as a multiple of the model's
  bytes, and the estimator's buffers (a scratch chunk per thread, LOZO's cached V);
* passes over the parameters per step (regenerations of every leaf's direction) and forward passes;
* median wall and CPU time of a step (chunk workers on, as in training) and of one inference
  forward, the two timed alternately so that the ratio holds on a shared, unevenly loaded
  machine (``--threads 1`` steadies it further where other processes compete for the cores).

Forward-Grad gets eager attention (torch's CPU flash-attention kernel has no forward-mode AD)
and is compared with an eager inference forward; every other method uses SDPA.

The model is built from a config (nothing is downloaded): ``LlamaConfig(vocab_size=32000,
hidden_size=768, intermediate_size=3072, num_hidden_layers=8, heads 12, tied embeddings)``, which
is 100,086,528 parameters in float32; the batch is a fixed random 4 x 32 token batch. Results go
to ``benchmarks/results/core_costs.json`` and a markdown table is printed. ZO-SGD-Block (2
forwards per layer block, 20 per step here) is left out unless asked for with ``--methods``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

import zotune
from zotune._validate import unknown_choice
from zotune.estimators.base import DEFAULT_CHUNK
from zotune.bench.profile import (
    AllocationTracker,
    count_parameter_passes,
    estimator_buffer_bytes,
    model_bytes,
    optimizer_state_bytes,
    peak_rss_bytes,
    Timer,
    Timing,
    sequential_chunks,
    step_memory,
)


class Method(NamedTuple):
    label: str
    make: Callable[[torch.nn.Module], Any]
    # Forward-Grad runs the forward in forward-mode AD, which torch's CPU SDPA (flash) kernel
    # does not implement: it gets eager attention, and its own inference forward to compare with.
    attn: str = "sdpa"


# The learning rates only keep the weights sane: the costs measured here do not depend on them.
METHODS = {
    "mezo": Method("MeZO", lambda m: zotune.MeZO(m.named_parameters(), lr=1e-6)),
    "mezo-q4": Method("MeZO q=4", lambda m: zotune.MeZO(m.named_parameters(), lr=1e-6, queries=4)),
    "zo-sgd-sign": Method("ZO-SGD-Sign", lambda m: zotune.ZOSGDSign(m.named_parameters(), lr=1e-7)),
    "zo-sgd-mmt": Method("ZO-SGD-MMT", lambda m: zotune.ZOSGDMomentum(m.named_parameters(), lr=1e-7)),
    "zo-sgd-cons": Method("ZO-SGD-Cons", lambda m: zotune.ZOSGDConservative(m.named_parameters(), lr=1e-6)),
    "zo-adam": Method("ZO-Adam", lambda m: zotune.ZOAdam(m.named_parameters(), lr=1e-5)),
    "lozo": Method("LOZO r=2", lambda m: zotune.LOZO(m.named_parameters(), lr=1e-6, rank=2)),
    "lozo-m": Method("LOZO-M r=2", lambda m: zotune.LOZO(m.named_parameters(), lr=1e-6, rank=2, momentum=0.9)),
    "forward-grad": Method(
        "Forward-Grad", lambda m: zotune.ForwardGrad(m.named_parameters(), module=m, lr=1e-6), attn="eager"
    ),
    "fo-sgd": Method("FO-SGD", lambda m: zotune.FOSGD(m.parameters(), lr=1e-4)),
    "fo-adam": Method("FO-Adam", lambda m: zotune.FOAdam(m.parameters(), lr=1e-5)),
    "zo-sgd-block": Method(
        "ZO-SGD-Block", lambda m: zotune.ZOOptimizer(m.named_parameters(), estimator="blockwise", lr=1e-6)
    ),
}
DEFAULT_METHODS = [m for m in METHODS if m != "zo-sgd-block"]

MB = 1e6


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="decoder layers (8: 100.1 M parameters)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "core_costs.json")
    p.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, from: {', '.join(METHODS)} (default: all but zo-sgd-block)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed steps and forwards (median)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); "
                   "zotune draws direction chunks on as many worker threads")
    args = p.parse_args(argv)
    # validate everything before the model is built
    errors = []
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    errors += [unknown_choice("method", m, METHODS) for m in args.methods if m not in METHODS]
    for name in ("layers", "repeats", "batch", "seq"):
        if getattr(args, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        errors.append(f"--threads must be >= 0, got {args.threads}")
    if not args.methods:
        errors.append("--methods is empty")
    if errors:
        p.error("\n  ".join(errors))
    return args


def _git_commit() -> str | None:
    """The commit measured (the working tree may differ from it)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def build_model(layers: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # weight init only, before any optimizer exists
    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).float().eval()


def measure(name: str, model, closure, initial_state, forward_peak: int, repeats: int) -> dict:
    """Warm-up step (counting parameter passes), one tracked step, then ``repeats`` timed steps
    alternating with ``repeats`` timed inference forwards."""
    method = METHODS[name]
    model.load_state_dict(initial_state)
    opt = method.make(model)
    zo = isinstance(opt, zotune.ZOOptimizer)
    passes = None
    with sequential_chunks():  # step 1, on this thread, so that its scratch exists before step 2
        if zo:
            passes = count_parameter_passes(opt, closure)
        else:
            opt.step(closure)
    before = opt.forward_passes
    mem = step_memory(opt, closure)  # step 2, tracked (on one thread, so every op is seen)
    forwards = opt.forward_passes - before
    state = optimizer_state_bytes(opt)
    # forwards and steps interleaved, so that both medians come from the same stretch of time
    # on a shared machine (a neighbour's burst slows OpenMP GEMMs several-fold while it lasts)
    fwd, step = [], []
    with torch.no_grad():
        closure()  # warm-up forward
    for _ in range(repeats):
        with torch.no_grad(), Timer() as t:
            closure()
        fwd.append(t)
        with Timer() as t:
            opt.step(closure)  # chunk workers on, as in training
        step.append(t)
    fwd, step = _medians(fwd), _medians(step)
    buffers = estimator_buffer_bytes(opt)  # now including every worker thread's scratch
    leaves = [p for p in model.parameters()]
    mbytes, largest = model_bytes(leaves), max(p.numel() * p.element_size() for p in leaves)
    extra = mem.step_peak_bytes - forward_peak
    row = {
        "method": name,
        "label": method.label,
        "attention": method.attn,
        "forward_passes_per_step": opt.forward_passes_per_step,
        "forward_passes_measured": forwards,
        "parameter_passes_per_step": passes,
        "step_peak_bytes": mem.step_peak_bytes,
        "forward_peak_bytes": forward_peak,
        "extra_bytes": extra,
        "own_peak_bytes": mem.own_peak_bytes,
        "retained_bytes": mem.retained_bytes,
        "largest_leaf_bytes": largest,
        "own_peak_over_largest_leaf": mem.own_peak_bytes / largest,
        "extra_over_largest_leaf": extra / largest,
        "extra_over_model": extra / mbytes,
        "state_bytes": state,
        "state_over_model": state / mbytes,
        "estimator_buffer_bytes": buffers,
        "step_seconds": step.seconds,
        "step_cpu_seconds": step.cpu_seconds,
        "step_seconds_all": step.all_seconds,
        "forward_seconds_all": fwd.all_seconds,
        "forward_seconds": fwd.seconds,
        "forward_cpu_seconds": fwd.cpu_seconds,
        "step_over_forward": step.seconds / fwd.seconds,
        "step_over_forward_cpu": step.cpu_seconds / fwd.cpu_seconds,
    }
    for p in leaves:
        p.grad = None
    del opt
    gc.collect()
    return row


def _medians(timers: list[Timer]) -> Timing:
    wall = [t.seconds for t in timers]
    return Timing(statistics.median(wall), statistics.median(t.cpu_seconds for t in timers), wall)


def table(rows: list[dict]) -> str:
    head = (
        "| method | fwd/step | param passes | state (x model) | est. buffers MB | step peak MB "
        "| extra MB (x model) | own peak MB (x largest leaf) | step s | step/fwd (wall, CPU) |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        passes = "-" if r["parameter_passes_per_step"] is None else f"{r['parameter_passes_per_step']:.2f}"
        lines.append(
            f"| {r['label']} | {r['forward_passes_per_step']} | {passes} | {r['state_over_model']:.3f} "
            f"| {r['estimator_buffer_bytes'] / MB:.1f} | {r['step_peak_bytes'] / MB:.1f} "
            f"| {r['extra_bytes'] / MB:.1f} ({r['extra_over_model']:.3f}) "
            f"| {r['own_peak_bytes'] / MB:.1f} ({r['own_peak_over_largest_leaf']:.2f}) "
            f"| {r['step_seconds']:.2f} | {r['step_over_forward']:.1f}, {r['step_over_forward_cpu']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args.layers, args.seed)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    mbytes = model_bytes(params)
    largest_name, largest = max(
        ((n, p.numel() * p.element_size()) for n, p in model.named_parameters()), key=lambda x: x[1]
    )
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    print(
        f"model: {n_params:,} parameters ({mbytes / MB:.1f} MB float32), largest leaf {largest_name} "
        f"{largest / MB:.1f} MB; batch {args.batch} x {args.seq}; {torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    forward_peaks: dict[str, int] = {}  # attention implementation -> inference forward's peak bytes

    def inference_forward_peak(attn: str) -> int:
        model.set_attn_implementation(attn)
        if attn not in forward_peaks:
            with torch.no_grad(), AllocationTracker() as tr:
                closure()
            forward_peaks[attn] = tr.peak_bytes
            print(f"inference forward ({attn}): peak {tr.peak_bytes / MB:.1f} MB", file=sys.stderr)
        return forward_peaks[attn]

    forward_peak = inference_forward_peak("sdpa")
    rows = []
    for k, name in enumerate(args.methods, 1):
        t = time.perf_counter()
        peak = inference_forward_peak(METHODS[name].attn)
        rows.append(measure(name, model, closure, initial_state, peak, args.repeats))
        r = rows[-1]
        print(f"[{k}/{len(args.methods)}] {name}: step {r['step_seconds']:.2f} s, forward "
              f"{r['forward_seconds']:.2f} s ({time.perf_counter() - t:.0f} s)", file=sys.stderr)

    result = {
        "benchmark": "core_costs",
        "command": " ".join(["python", "benchmarks/core_costs.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "zotune_threads_env": os.environ.get("ZOTUNE_THREADS"),
        },
        "zotune": {"version": zotune.__version__, "commit": _git_commit(), "chunk_size": DEFAULT_CHUNK},
        "model": {
            "config": "LlamaForCausalLM(vocab 32000, hidden 768, intermediate 3072, heads 12, tied)",
            "layers": args.layers,
            "parameters": n_params,
            "bytes": mbytes,
            "largest_leaf": largest_name,
            "largest_leaf_bytes": largest,
            "dtype": "float32",
        },
        "batch": {"size": args.batch, "seq": args.seq},
        "forward_peak_bytes": forward_peaks,
        "repeats": args.repeats,
        "rows": rows,
        "wall_seconds": time.perf_counter() - t0,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{n_params:,} parameters, model {mbytes / MB:.1f} MB, largest leaf ({largest_name}) "
          f"{largest / MB:.1f} MB; inference forward peak {forward_peak / MB:.1f} MB\n")
    print(table(rows))
    print(
        "\nstate = opt.state; est. buffers = tensors the estimator keeps between steps (a scratch "
        "chunk per thread, LOZO's V); extra = step peak - inference forward peak (transient, "
        "measured on one thread); own peak = the optimizer's transients alone (closure "
        "allocations excluded), compared with the largest leaf. Two-point methods draw directions "
        "between forwards, so their step peak is max(forward, own), not the sum. step/fwd: the "
        "step's median time over a forward's, timed alternately, in wall and in CPU time."
    )
    print(f"\nwrote {args.out} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
