"""How far has a MeZO run's prefix walked from its start, and is it the random walk of its noise?

    python benchmarks/prefix_drift.py RUN_DIR [RUN_DIR ...] [--out benchmarks/results/prefix_drift.json]

Why: a MeZO step moves the trained entries by ``lr c z``, with c the projected gradient the step
log keeps and z a Gaussian direction of d entries, so ``||step||^2 ~ lr^2 c^2 d``. Almost all of z is
orthogonal to the gradient, and independent draws add up like a random walk: after k steps the
entries are ``sqrt(sum lr^2 c^2 d)`` away from where they started, growing with every step whether or
not the loss improves. Prefix runs on SST-2 peak on dev and then drift back towards chance; if the
measured distance of the best and last checkpoints from the start equals the random walk's, the
drift is the noise piling up, and what keeps it small (a lower lr, fewer steps, an lr that decays)
is what keeps a run near its peak. For each run this rebuilds the prefix's start from the run's
``config.json`` (``zotune train`` starts it from real tokens' keys and values, seeded), reads
``steps.jsonl`` and the checkpoints' weights and step, and prints both distances side by side.
Single-query Gaussian methods only (``mezo``: one coefficient a step).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from zotune.bench.record import write_record
from zotune.config import from_dict
from zotune.train.loop import build

ROOT = Path(__file__).resolve().parent.parent


def walk_distances(steps: list[dict], d: int) -> list[float]:
    """After each step k (1-based index k - 1), ``sqrt(sum_{j<=k} lr_j^2 c_j^2 d)``; a skipped step adds nothing."""
    out, total = [], 0.0
    for s in steps:
        if len(s["coeffs"]) != 1 or len(s["lrs"]) != 1:
            raise ValueError(f"step {s['step']}: {len(s['coeffs'])} coefficients; only one-query runs are a single walk")
        if not s.get("skipped"):
            total += (s["lrs"][0] * s["coeffs"][0]) ** 2 * d
        out.append(math.sqrt(total))
    return out


def start_of(run: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((run / "config.json").read_text())
    if config["optim"]["method"] != "mezo":
        raise ValueError(f"{run}: method {config['optim']['method']!r}; the walk is MeZO's (one Gaussian direction a step)")
    cfg = from_dict(config)
    cfg.task.dev = cfg.task.test = 0
    setup = build(cfg, splits=("train",))
    return config, {k: p.detach().clone() for k, p in setup.named.items()}


def measure(run: Path) -> dict:
    config, start = start_of(run)
    d = sum(p.numel() for p in start.values())
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines() if line.strip()]
    walk = walk_distances(steps, d)
    checkpoints = []
    for name in ("ckpt-best", "ckpt-last"):
        if not (run / name / "weights.safetensors").exists():
            continue
        step = json.loads((run / name / "meta.json").read_text())["step"]
        weights = load_file(str(run / name / "weights.safetensors"))
        moved = math.sqrt(sum(float((weights[k] - p).square().sum()) for k, p in start.items()))
        checkpoints.append({"checkpoint": name, "step": step, "distance": moved,
                            "random_walk": walk[step - 1] if step else 0.0})
    return {"run": run.name, "lr": config["optim"]["lr"], "batch_size": config["train"]["batch_size"],
            "average_decay": config["train"].get("average_decay", 0.0), "entries": d,
            "start_norm": math.sqrt(sum(float(p.square().sum()) for p in start.values())), "checkpoints": checkpoints}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prefix_drift.json"))
    args = ap.parse_args(argv)
    results = [measure(r) for r in args.runs]
    print("| run | lr | batch | start norm | checkpoint | step | distance from start | random walk |")
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for r in results:
        for c in r["checkpoints"]:
            print(f"| {r['run']} | {r['lr']:g} | {r['batch_size']} | {r['start_norm']:.1f} | {c['checkpoint']} | "
                  f"{c['step']} | {c['distance']:.1f} | {c['random_walk']:.1f} |")
    write_record(args.out, {"runs": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
