"""Streamed weights (ZO2-style) against the plain in-place mode: peak memory and step time.

    python benchmarks/streamed_memory.py                      # SmolLM2-135M, float32, batch 16 x 64, CPU
    python benchmarks/streamed_memory.py --model tiny-llama --steps 3

Each mode runs in its own process (so peaks do not mix). On the CPU the "device" is the
process's own memory: anonymous resident memory (``RssAnon``, sampled every 2 ms), which is
what the model's tensors, activations and temporaries occupy. Streamed weights live in
memory-mapped files instead (``RssFile``: page cache the kernel may drop and reread at any
time), so they leave the anonymous peak. Reported both ways, plus the step time and the bytes
brought in per step. Writes JSON next to the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Sampler:
    """Peak of RssAnon / RssFile, sampled on a thread while a block runs."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak_anon, self.peak_file = period, 0, 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.period)

    def sample(self) -> None:
        self.peak_anon = max(self.peak_anon, status_kib("RssAnon"))
        self.peak_file = max(self.peak_file, status_kib("RssFile"))

    def __enter__(self):
        self.sample()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.sample()


def child(args) -> dict:
    import zotune
    from zotune.streamed import StreamedWeights

    torch.manual_seed(0)
    if args.model.startswith("tiny-"):
        from zotune.testing import tiny_model

        model = tiny_model(args.model[5:]).model
    else:
        from zotune.models import load_model

        model = load_model(args.model).model
    model.requires_grad_(False)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    def loss(copies: int = 1):
        x = ids.repeat(copies, 1)
        out = model(input_ids=x, logits_to_keep=1, use_cache=False)
        per_row = torch.nn.functional.cross_entropy(out.logits[:, -1].float(), x[:, -1], reduction="none")
        per_copy = per_row.view(copies, -1).mean(1)
        return per_copy[0] if copies == 1 else per_copy

    named = list(model.named_parameters())
    streamed = None
    tmp = tempfile.TemporaryDirectory(prefix="zotune-bench-")
    if args.mode == "inference":
        opt = None
    elif args.mode == "plain":
        opt = zotune.MeZO(named, lr=1e-9)
    else:
        opt = zotune.MeZO(named, lr=1e-9, module=model, perturbation="dual", defer_update=True)
        streamed = StreamedWeights(model, opt, storage="mmap", directory=tmp.name)
    anon_before = status_kib("RssAnon")
    times = []
    with torch.no_grad(), Sampler() as s:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            if opt is None:
                loss()
            else:
                opt.step(loss)
            times.append(time.perf_counter() - t0)
        brought_in = streamed.bytes_in if streamed is not None else 0
        if opt is not None:
            opt.flush()
    trained = sum(p.numel() * p.element_size() for _, p in named)
    result = {
        "mode": args.mode,
        "anon_after_setup_mib": anon_before / 1024,
        "peak_anon_mib": s.peak_anon / 1024,
        "peak_file_mib": s.peak_file / 1024,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "trained_mib": trained / 2**20,
    }
    if streamed is not None:
        result["bytes_in_per_step_mib"] = brought_in / args.steps / 2**20  # the final flush not counted
        streamed.close()
    tmp.cleanup()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/streamed_memory.json")
    ap.add_argument("--mode", choices=["inference", "plain", "streamed"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for mode in ("inference", "plain", "streamed"):
        cmd = [sys.executable, __file__, "--mode", mode, "--model", args.model, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"  {mode}: done", file=sys.stderr)
    base = rows[0]["peak_anon_mib"]
    print(f"\n{args.model}, float32, batch {args.batch} x {args.seq_len}, MeZO, {args.steps} steps per mode\n")
    print("| mode | peak anonymous MiB | vs inference | peak file-backed MiB | step s | MiB brought in / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_anon_mib']:.1f} | {r['peak_anon_mib'] / base:.3f} | "
              f"{r['peak_file_mib']:.1f} | {r['step_s']:.3f} | {r.get('bytes_in_per_step_mib', float('nan')):.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
        "torch": torch.__version__, "model": args.model, "batch": args.batch, "seq_len": args.seq_len,
        "steps": args.steps, "rows": rows,
    }, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
