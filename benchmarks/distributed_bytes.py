"""Bytes on the wire and time per step: data-parallel ZO (MeZO) against FO DDP (FO-SGD).

    python benchmarks/distributed_bytes.py                    # 2 gloo ranks on this machine, ~23M-param LLaMA
    python benchmarks/distributed_bytes.py --hidden 192 --layers 2 --steps 3   # quicker

Starts two ranks of itself the way torchrun does (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
MASTER_PORT; gloo, one thread each), each holding a seeded random LLaMA and its half
``tokens[rank::2]`` of a global batch, and times ``--steps`` steps of each method after one
warm-up step (median over steps of the slower rank).

Bytes are the payload each rank hands to all-reduce per step:
- MeZO: counted by :func:`zotune.distributed.scalar_reduce` (``ctx.bytes_all_reduced``): q float64.
- FO-SGD under DDP: the gradient size, ``sum(p.numel() for trainable p) * 4`` (DDP all-reduces
  every float32 gradient once per step), cross-checked by a DDP comm hook that counts the bytes
  of the buckets it is handed.
A ring all-reduce moves about ``2 (W - 1) / W`` times the payload in and out of each rank.
"all-reduce alone" times one all_reduce of a buffer of that size between the two ranks.
Prints a table and writes ``benchmarks/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq, tie_word_embeddings=True, initializer_range=0.02,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.eval()


def timed_steps(opt, closure, steps: int) -> list[float]:
    import torch.distributed as dist

    opt.step(closure)  # warm-up: lazily built state, allocator
    times = []
    for _ in range(steps):
        dist.barrier()  # start together: a step's time includes waiting for the slower rank
        t0 = time.perf_counter()
        opt.step(closure)
        times.append(time.perf_counter() - t0)
    return times


def all_reduce_time(numel: int, dtype: torch.dtype, repeats: int) -> float:
    import torch.distributed as dist

    buf = torch.zeros(numel, dtype=dtype)
    dist.all_reduce(buf)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from zotune.distributed import init_from_env, scalar_reduce, shutdown, wrap_ddp
    from zotune.fo import FOSGD
    from zotune.step import ZOOptimizer

    torch.set_num_threads(1)
    ctx = init_from_env(backend="gloo", timeout_s=600)
    try:
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
        shard = tokens[ctx.rank::ctx.world_size]  # (batch / W, seq)
        rows = []

        # --- MeZO: q scalars per step
        model = build_model(args)
        named = dict(model.named_parameters())
        numel = sum(p.numel() for p in named.values())
        opt = ZOOptimizer(list(named.items()), "gaussian", "sgd", lr=1e-6, eps=1e-3, seed=0,
                          reduce=scalar_reduce(ctx))
        with torch.no_grad():
            times = timed_steps(opt, lambda: model(input_ids=shard, labels=shard).loss, args.steps)
        steps_done = args.steps + 1
        rows.append({
            "method": "MeZO (ZO data parallel)", "bytes_per_step": ctx.bytes_all_reduced // steps_done,
            "bytes_counted_by": "ctx.bytes_all_reduced (scalar_reduce)", "median_step_s": statistics.median(times),
            "all_reduce_alone_s": all_reduce_time(1, torch.float64, 20),
        })
        del opt, model, named

        # --- FO-SGD under DDP: every gradient per step
        model = build_model(args)
        params = [p for p in model.parameters() if p.requires_grad]
        grad_bytes = sum(p.numel() for p in params) * 4
        ddp = wrap_ddp(model, ctx)
        hooked = {"bytes": 0}

        def counting_allreduce(state, bucket):
            state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(hooked, counting_allreduce)
        opt = FOSGD(params, lr=1e-4)
        times = timed_steps(opt, lambda: ddp(input_ids=shard, labels=shard).loss, args.steps)
        rows.append({
            "method": "FO-SGD (DDP)", "bytes_per_step": grad_bytes,
            "bytes_counted_by": "sum(grad numel) * 4", "comm_hook_bytes_per_step": hooked["bytes"] // steps_done,
            "median_step_s": statistics.median(times),
            "all_reduce_alone_s": all_reduce_time(grad_bytes // 4, torch.float32, 3),
        })

        # the slower rank's median is the step time of the job
        step_times = torch.tensor([r["median_step_s"] for r in rows], dtype=torch.float64)
        dist.all_reduce(step_times, op=dist.ReduceOp.MAX)
        for r, t in zip(rows, step_times.tolist()):
            r["median_step_s"] = t
        if ctx.rank == 0:
            Path(args.out).write_text(json.dumps({"params": numel, "rows": rows}))
    finally:
        shutdown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per method (after one warm-up step)")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.batch % args.world_size:
        raise SystemExit(f"--batch ({args.batch}) must be divisible by --world-size ({args.world_size})")

    load_before = os.getloadavg()[0]  # other work on the machine skews the times, not the bytes
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        argv = [sys.executable, __file__, "--worker", "--out", str(out)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("out", "worker")]
        procs = []
        for r in range(args.world_size):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(args.world_size), "LOCAL_RANK": str(r),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
                   "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen(argv, env=env))
        codes = [proc.wait() for proc in procs]
        if any(codes):
            raise SystemExit(f"a rank failed: exit codes {codes}")
        measured = json.loads(out.read_text())

    rows = measured["rows"]
    result = {
        "benchmark": "distributed_bytes",
        "command": " ".join(["python benchmarks/distributed_bytes.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "backend": "gloo (127.0.0.1, loopback)", "threads_per_rank": 1,
                    "load_average_1min_before_after": [load_before, os.getloadavg()[0]]},
        "world_size": args.world_size,
        "model": {"arch": "random LLaMA", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "params": measured["params"]},
        "batch": {"global": args.batch, "per_rank": args.batch // args.world_size, "seq": args.seq},
        "steps_timed": args.steps,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    print(f"{args.world_size} gloo ranks, random LLaMA {measured['params'] / 1e6:.1f}M params, "
          f"global batch {args.batch} x {args.seq} tokens")
    print("| method | bytes all-reduced / step / rank | counted by | median step (s) | that all-reduce alone (s) |")
    print("|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['bytes_per_step']:,} | {r['bytes_counted_by']} | "
              f"{r['median_step_s']:.3f} | {r['all_reduce_alone_s']:.5f} |")
    fo = rows[-1]
    print(f"DDP comm hook saw {fo['comm_hook_bytes_per_step']:,} bytes / step; ratio FO / ZO bytes: "
          f"{fo['bytes_per_step'] / rows[0]['bytes_per_step']:,.0f}")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
