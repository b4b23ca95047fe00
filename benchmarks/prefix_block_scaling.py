"""Is the prefix's plateau SGD's geometry, and would a per-block step size lift it? First-order
probes on SmolLM2-135M's 5-token prefix, SST-2 (the convergence grid's split and loss).

    python benchmarks/prefix_block_scaling.py [--steps 100] [--rules sgd,block-rms,block-adam,adam]

Why: ZO-SGD's expected step is SGD's. FO-SGD with the exact batch gradient on this prefix sits at
0.80 dev where FO-Adam reaches 0.855 (``fo-sgd-prefix-*`` and ``fo-adam-prefix-*`` in
``benchmarks/grids/sst2-convergence.yaml``), and the prefix's gradient RMS differs ~30x between its
blocks (keys against values, layer to layer: ``benchmarks/results/prefix_gradients_sst2.json``).
A ZO estimate cannot see a per-entry second moment (its noise is the same in every entry), but it
can see a per-block one. So this compares, each for ``--steps`` steps of 16 rows from the same
start and batch order (backpropagation, for the measurement only):

* ``sgd``: ``x -= lr g`` (FO-SGD);
* ``block-rms``: ``x_b -= lr g_b / sqrt(v_b)``, ``v_b`` an EMA (0.99) of the block's mean squared
  gradient: SGD with one step size per block (layer x keys / values, 60 blocks), no momentum;
* ``block-adam``: Adam with ``v`` shared per block (Adam-mini's idea), momentum 0.9;
* ``adam``: Adam (FO-Adam).

It prints dev accuracy every ``--eval-every`` steps per rule and writes JSON with machine and date.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from zotune.bench.record import write_record
from zotune.config import load_config
from zotune.train.loop import build, evaluate_split
from zotune.train.objective import make_closure, resolve_objective

ROOT = Path(__file__).resolve().parent.parent
BASE = ["model.name=smollm2-135m", "model.dtype=float32", "task.name=sst2", "task.train=1000", "task.dev=200",
        "task.test=400", "task.max_length=64", "task.split_seed=0", "trainable.scheme=prefix",
        "optim.method=fo-sgd", "optim.lr=1.0", "train.batch_size=16", "train.eval_batch_size=32", "train.progress=false"]
RULES = ("sgd", "block-rms", "block-adam", "adam")
DEFAULT_LR = {"sgd": 3.0, "block-rms": 1e-2, "block-adam": 1e-2, "adam": 1e-2}


class BlockScaledStep:
    """One update rule over the prefix table viewed as ``(tokens, layers, 2, width)``: blocks are
    (layer, key / value). ``beta1`` 0 is no momentum; ``per_entry`` keeps Adam's per-entry ``v``."""

    def __init__(self, table: torch.Tensor, layers: int, lr: float, *, beta1: float, beta2: float,
                 per_entry: bool, normalise: bool, eps: float = 1e-8) -> None:
        self.table, self.layers, self.lr = table, layers, lr
        self.beta1, self.beta2, self.per_entry, self.normalise, self.eps = beta1, beta2, per_entry, normalise, eps
        self.m = torch.zeros_like(table)
        self.v = torch.zeros_like(table) if per_entry else torch.zeros(layers, 2)
        self.t = 0

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.layers, 2, -1)

    @torch.no_grad()
    def __call__(self, grad: torch.Tensor) -> None:
        self.t += 1
        if not self.normalise:
            self.table -= self.lr * grad
            return
        self.m.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
        square = grad.square() if self.per_entry else self._blocks(grad).square().mean(dim=(0, 3))
        self.v.mul_(self.beta2).add_(square, alpha=1 - self.beta2)
        m_hat = self.m / (1 - self.beta1 ** self.t) if self.beta1 else self.m
        v_hat = self.v / (1 - self.beta2 ** self.t)
        if self.per_entry:
            self.table -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
        else:
            scale = 1.0 / (v_hat.sqrt() + self.eps)
            self._blocks(self.table).sub_(self.lr * self._blocks(m_hat) * scale[None, :, :, None])


def make_rule(name: str, table: torch.Tensor, layers: int, lr: float) -> BlockScaledStep:
    if name == "sgd":
        return BlockScaledStep(table, layers, lr, beta1=0.0, beta2=0.0, per_entry=False, normalise=False)
    if name == "block-rms":
        return BlockScaledStep(table, layers, lr, beta1=0.0, beta2=0.99, per_entry=False, normalise=True)
    if name == "block-adam":
        return BlockScaledStep(table, layers, lr, beta1=0.9, beta2=0.999, per_entry=False, normalise=True)
    if name == "adam":
        return BlockScaledStep(table, layers, lr, beta1=0.9, beta2=0.999, per_entry=True, normalise=True)
    raise SystemExit(f"unknown rule {name!r}; choose from {', '.join(RULES)}")


def run_rule(name: str, lr: float, steps: int, eval_every: int, seed: int) -> dict:
    cfg = load_config(None, BASE)
    setup = build(cfg)
    (table,) = setup.named.values()
    layers = setup.loaded.model.peft_config[setup.loaded.model.active_adapter].num_layers
    rule = make_rule(name, table, layers, lr)
    objective = resolve_objective(cfg, setup.data.train)
    order = torch.randperm(len(setup.data.train), generator=torch.Generator().manual_seed(seed)).tolist()
    bs, curve, start = cfg.train.batch_size, [], time.perf_counter()
    for step in range(1, steps + 1):
        at = ((step - 1) * bs) % (len(order) - bs + 1)
        rows = [setup.data.train[i] for i in order[at:at + bs]]
        table.grad = None
        with torch.enable_grad():
            loss = make_closure(setup.loaded, rows, cfg, "cpu", objective)()
            loss.backward()
        rule(table.grad)
        if step % eval_every == 0:
            with torch.no_grad():
                dev = evaluate_split(setup, setup.data.dev, "dev")["accuracy"]
            curve.append({"step": step, "loss": float(loss), "dev_accuracy": dev,
                          "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name:>10} lr {lr:g} step {step:4d}  loss {float(loss):.3f}  dev {dev:.3f}", flush=True)
    best = max(curve, key=lambda r: r["dev_accuracy"]) if curve else None
    return {"rule": name, "lr": lr, "steps": steps, "curve": curve,
            "best_dev": best["dev_accuracy"] if best else None, "best_step": best["step"] if best else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated, of: " + ", ".join(RULES))
    ap.add_argument("--lr", action="append", default=[], metavar="RULE=LR", help="an lr other than the default")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/prefix_block_scaling_sst2.json"))
    args = ap.parse_args(argv)
    lrs = dict(DEFAULT_LR)
    for item in args.lr:
        rule, _, value = item.partition("=")
        if rule not in RULES or not value:
            raise SystemExit(f"--lr takes RULE=LR with RULE one of {', '.join(RULES)}; got {item!r}")
        lrs[rule] = float(value)
    rules = [r for r in args.rules.split(",") if r]
    for r in rules:
        if r not in RULES:
            raise SystemExit(f"unknown rule {r!r}; choose from {', '.join(RULES)}")
    out = Path(args.out)
    done = json.loads(out.read_text())["runs"] if out.exists() else []
    for r in rules:
        if any(d["rule"] == r and d["lr"] == lrs[r] and d["steps"] == args.steps for d in done):
            continue  # resumable: a finished (rule, lr, steps) is kept
        done.append(run_rule(r, lrs[r], args.steps, args.eval_every, args.seed))
        write_record(out, {"config": BASE, "seed": args.seed, "runs": done})
    print("\n| rule | lr | best dev (step) | dev at the end |\n|---|---:|---:|---:|")
    for d in done:
        print(f"| {d['rule']} | {d['lr']:g} | {d['best_dev']:.3f} ({d['best_step']}) | {d['curve'][-1]['dev_accuracy']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
