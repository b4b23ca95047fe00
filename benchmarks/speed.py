"""Speed close to the limit: a ZO step's time against the time of its two forward passes.

    python benchmarks/speed.py                       # SmolLM2-135M, float32, batch 16 x 64 tokens, CPU
    python benchmarks/speed.py --model tiny-llama --repeats 3
    python benchmarks/speed.py --markdown benchmarks/results/speed.json   # the table of a saved run

A two-point ZO step cannot be cheaper than its two forward passes, so for each method this
prints ``step time / (2 x forward time)``, measured in one process on one batch, round robin
over the methods (each round times one forward, then one step, of every method in turn, so a
change of load hits all alike); headline: the best step over the best forward of the rounds,
beside the median of the per-round ratios. The loss is the one a user trains a classification
task with (``zotune.lm.choice_loss``: two candidate label words scored at the last position, the
closure of ``zotune.train.objective``), not a plain LM loss.

Baselines: ``algorithm-1``, MeZO's Algorithm 1 transcribed literally (the global RNG reset with
``torch.manual_seed(s)`` before each of four passes over the parameters, one ``torch.randn`` per
parameter: +eps, -2 eps, +eps, update), and ``reference``, zotune's own plain reference module
(``zotune.reference.mezo_step``). Optional peers, timed when importable (never dependencies of
zotune; ``--peer-path`` adds a folder to ``sys.path``, e.g. one made with ``pip install --no-deps
--target DIR mezo torchzero``): ``mezo-package`` (``mezo.update`` from PyPI's ``mezo``) and
``torchzero`` (``tz.m.MeZO`` with Gaussian directions).

Targets (issue 9): MeZO (Gaussian) <= 1.15, MeZO with Rademacher directions drawn from random
bits <= 1.05, and zotune's MeZO >= 1.5x faster per step than the literal Algorithm 1.
Writes JSON (machine, date, torch version, every timing) next to the table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import zotune
from zotune.lm import Batch, ChoiceBatch, choice_loss
from zotune.reference import mezo_step

DEFAULT_METHODS = "mezo,mezo-rademacher,lozo,mezo-dual,reference,algorithm-1,mezo-package,torchzero"
#: method -> (largest step / (2 x forward) it should take, what the number is)
RATIO_TARGETS = {"mezo": 1.15, "mezo-rademacher": 1.05}
SPEEDUP_TARGET = ("mezo", "algorithm-1", 1.5)  # zotune's MeZO at least 1.5x faster than Algorithm 1
LABELS = {
    "mezo": "MeZO (Gaussian, in place)",
    "mezo-rademacher": "MeZO, Rademacher directions from random bits",
    "mezo-swap": "MeZO, `perturbation=\"swap\"`",
    "mezo-dual": "MeZO, `perturbation=\"dual\"`",
    "mezo-rademacher-dual": "MeZO, Rademacher, `perturbation=\"dual\"`",
    "lozo": "LOZO r = 2 (in place)",
    "lozo-side": "LOZO r = 2, `perturbation=\"side\"`",
    "lozo-dual": "LOZO r = 2, `perturbation=\"dual\"`",
    "lozo-m": "LOZO-M r = 2",
    "lozo-m-side": "LOZO-M r = 2, `perturbation=\"side\"`",
    "zo-adam": "ZO-Adam",
    "per-example-lowrank": "per-example low-rank r = 2 (one member per example, batched side terms)",
    "per-example-lowrank-per-copy": "per-example low-rank r = 2, each plain layer run once per example and copy",
    "population-dual": "population low-rank N = 8, r = 2, `dual` (16 copies), batched side terms",
    "population-dual-per-copy": "population low-rank N = 8, r = 2, `dual`, each plain layer run once per copy",
    "reference": "zotune.reference (plain reference module)",
    "algorithm-1": "MeZO Algorithm 1, literal (global seed, randn per parameter, 4 passes)",
    "mezo-package": "`mezo` package (PyPI), `mezo.update`",
    "torchzero": "torchzero `tz.m.MeZO` (Gaussian)",
}


def load(name: str):
    if name.startswith("tiny-"):
        from zotune.testing import tiny_model

        return tiny_model(name[5:])
    from zotune.models import load_model

    return load_model(name)  # a LoadedModel: scoring reads its kind from it


def classification_batch(vocab: int, batch: int, seq_len: int) -> ChoiceBatch:
    """``batch`` rows of ``seq_len`` random tokens, each scored on two candidate label tokens at
    its last position (as SST-2's "great" / "terrible" are): the batch of a classification run."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    candidates = torch.randint(0, vocab, (batch, 2), generator=g)
    gold = torch.randint(0, 2, (batch,), generator=g)
    cont = torch.zeros(batch, seq_len, dtype=torch.bool)
    cont[:, -1] = True
    ids[:, -1] = candidates[torch.arange(batch), gold]
    labels = torch.where(cont, ids, torch.full_like(ids, -100))
    rows = Batch(ids, torch.ones_like(ids), cont, labels, torch.full((batch,), seq_len), kind="causal")
    return ChoiceBatch(rows, 2, candidates, gold)


def per_copy(opt):
    """``opt`` with each plain layer run once per copy (or example) instead of once with batched side terms."""
    opt.evaluation.perturbation.batch_side_terms = False
    return opt


def algorithm_1_step(params, loss_fn, seed: int, *, lr: float, eps: float) -> float:
    """One step of MeZO's Algorithm 1 as the paper writes it (no weight decay).

    ``PerturbParameters(theta, eps, s)``: reset the random number generator with seed ``s``, then
    for each parameter ``z ~ N(0, 1)`` and ``theta_i <- theta_i + eps z``; called with eps, -2 eps
    and eps; then the generator is reset once more and each parameter moves by
    ``-lr * projected_grad * z``. The adds are in place (the paper's code writes
    ``param.data = param.data + ...``, which also allocates a copy: slower, so not the baseline).
    """

    def perturb(scale: float) -> None:
        torch.manual_seed(seed)
        for p in params:
            p.data.add_(torch.randn(p.shape, dtype=p.dtype, device=p.device), alpha=scale * eps)

    with torch.no_grad():
        perturb(1)
        loss_plus = float(loss_fn())
        perturb(-2)
        loss_minus = float(loss_fn())
        perturb(1)
        projected_grad = (loss_plus - loss_minus) / (2 * eps)
        torch.manual_seed(seed)
        for p in params:
            p.data.add_(torch.randn(p.shape, dtype=p.dtype, device=p.device), alpha=-lr * projected_grad)
    return projected_grad


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (lazily created state, caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def generation_time(opt, repeats: int) -> float | None:
    """Time to draw every chunk of every direction one step draws (4q - 1 in place: +eps, -2eps,
    restore, the last restore fused into the update; 3q for swap and side; 2q for dual); None
    when the optimizer does not expose what this needs."""
    est, leaves, mode = opt.estimator, getattr(opt, "leaves", None), getattr(opt, "perturbation", None)
    if leaves is None or mode is None:
        return None
    dirs = est.directions(getattr(opt, "steps_taken", 0))
    q = len(dirs)
    draws = {"swap": 3 * q, "side": 3 * q, "dual": 2 * q}.get(mode, 4 * q - 1)
    from zotune.estimators.base import for_each_chunk

    items = [(i, p, k) for i, p in enumerate(leaves) for k in range(est.num_chunks(i))]

    def one(item):
        i, p, k = item
        t = est.target(p, i, k)
        est.leaf_direction(dirs[0], i, p, k, out=est.out_buffer(t, i, p))

    def draw_all():
        for _ in range(max(draws, 1)):
            for_each_chunk(one, items, leaves[0].device, est.parallel_chunks)

    return median_time(draw_all, repeats)


def peer_steppers(model, cb, named, lr: float, eps: float) -> tuple[dict, dict]:
    """Steppers of the optional peers that import, and why the others are missing."""
    from zotune.models import as_loaded

    steppers, missing = {}, {}
    counter = iter(range(10**9))
    lm = as_loaded(model)  # the peers hand the module back; zotune's loss needs its kind, read once here
    try:
        mezo = importlib.import_module("mezo")
        steppers["mezo-package"] = lambda: mezo.update(
            model, cb, lambda m, b: choice_loss(lm, b), eps, lr, next(counter),
            learnable_parameters=lambda m: [p for _, p in named])
    except Exception as e:  # noqa: BLE001 -- a peer that fails to import is reported, not fatal
        missing["mezo-package"] = f"{type(e).__name__}: {e}"
    try:
        tz = importlib.import_module("torchzero")
        opt = tz.Optimizer([p for _, p in named], tz.m.MeZO(h=eps, distribution="gaussian"), tz.m.LR(lr))

        def closure(backward=True):
            return choice_loss(lm, cb)

        def step():  # torchzero steps only the tensors that require grad; nothing else here needs it
            for p in opt.param_groups[0]["params"]:
                p.requires_grad_(True)
            try:
                opt.step(closure)
            finally:
                for p in opt.param_groups[0]["params"]:
                    p.requires_grad_(False)

        steppers["torchzero"] = step
    except Exception as e:  # noqa: BLE001
        missing["torchzero"] = f"{type(e).__name__}: {e}"
    return steppers, missing


def markdown(result: dict) -> str:
    """The table of one run (a JSON written by this script), in Markdown."""
    lines = [f"{result['model']}, batch {result['batch']} x {result['seq_len']} tokens, {result['dtype']}, "
             f"{result['device']}, {result['cpu_threads']} threads, torch {result['torch']}, {result['date']}; "
             f"{result['rounds']} rounds; best forward {result['forward_s']:.3f} s",
             "",
             "| method | step s | step / 2 fwd (best) | median ratio | target | direction gen s | other s "
             "| x faster than Algorithm 1 | x faster than reference |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    num = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    for r in result["rows"]:
        target = r.get("target")
        goal = "" if target is None else f"<= {target}: {'met' if r['ratio'] <= target else '**not met**'}"
        lines.append(f"| {r['label']} | {r['step_s']:.3f} | {r['ratio']:.3f} | {r['median_ratio']:.3f} | {goal} | "
                     f"{num(r.get('generation_s'), '.3f')} | {num(r.get('other_s'), '.3f')} | "
                     f"{num(r.get('speedup_vs_algorithm_1'), '.2f')} | {num(r.get('speedup_vs_reference'), '.2f')} |")
    s = result.get("speedup_target")
    if s:
        verdict = "met" if s["value"] is not None and s["value"] >= s["target"] else "**not met**"
        lines += ["", f"{s['method']} over {s['baseline']}: {num(s['value'], '.2f')}x (target >= {s['target']}: {verdict})"]
    for name, why in result.get("missing", {}).items():
        lines.append(f"- {name}: not timed ({why})")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    ap.add_argument("--out", default="benchmarks/results/speed.json")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from: {', '.join(LABELS)}")
    ap.add_argument("--peer-path", default=None, help="a folder to put on sys.path for the optional peers")
    ap.add_argument("--markdown", metavar="JSON", default=None, help="print the table of a saved run and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    names = [n for n in args.methods.split(",") if n]
    unknown = [n for n in names if n not in LABELS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; available: {', '.join(LABELS)}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.peer_path:
        sys.path.insert(0, args.peer_path)

    torch.manual_seed(0)
    lm = load(args.model)
    model = lm.model
    model.requires_grad_(False)
    cb = classification_batch(model.config.vocab_size, args.batch, args.seq_len)

    def loss(copies: int = 1, per_example: bool = False):  # zotune.train.objective's closure, classification
        return choice_loss(lm, cb, copies=copies, per_example=per_example)

    named = list(model.named_parameters())
    params = [p for _, p in named]
    lr, eps = 1e-9, 1e-3
    builders = {
        "mezo": lambda: zotune.MeZO(named, lr=lr, eps=eps),
        "mezo-rademacher": lambda: zotune.MeZO(named, lr=lr, eps=eps, distribution="rademacher"),
        "mezo-swap": lambda: zotune.MeZO(named, lr=lr, eps=eps, module=model, perturbation="swap"),
        "mezo-dual": lambda: zotune.MeZO(named, lr=lr, eps=eps, module=model, perturbation="dual"),
        "mezo-rademacher-dual": lambda: zotune.MeZO(named, lr=lr, eps=eps, distribution="rademacher",
                                                    module=model, perturbation="dual"),
        "lozo": lambda: zotune.LOZO(named, lr=lr, eps=eps),
        "lozo-side": lambda: zotune.LOZO(named, lr=lr, eps=eps, module=model, perturbation="side"),
        "lozo-dual": lambda: zotune.LOZO(named, lr=lr, eps=eps, module=model, perturbation="dual"),
        "lozo-m": lambda: zotune.LOZO(named, lr=lr, eps=eps, momentum=0.9),
        "lozo-m-side": lambda: zotune.LOZO(named, lr=lr, eps=eps, momentum=0.9, module=model, perturbation="side"),
        "zo-adam": lambda: zotune.ZOAdam(named, lr=lr, eps=eps),
        "per-example-lowrank": lambda: zotune.PerExampleLowRank(named, lr=lr, eps=eps, batch_size=args.batch,
                                                                module=model),
        "per-example-lowrank-per-copy": lambda: per_copy(zotune.PerExampleLowRank(
            named, lr=lr, eps=eps, batch_size=args.batch, module=model)),
        "population-dual": lambda: zotune.PopulationLowRank(named, lr=lr, eps=eps, module=model),
        "population-dual-per-copy": lambda: per_copy(zotune.PopulationLowRank(named, lr=lr, eps=eps, module=model)),
    }
    counter = iter(range(10**9))
    steppers, opts = {}, {}
    peers, missing = peer_steppers(model, cb, named, lr, eps) if {"mezo-package", "torchzero"} & set(names) else ({}, {})
    for name in names:
        if name == "reference":
            steppers[name] = lambda: mezo_step(params, loss, next(counter), lr=lr, eps=eps)
        elif name == "algorithm-1":
            steppers[name] = lambda: algorithm_1_step(params, loss, next(counter), lr=lr, eps=eps)
        elif name in builders:
            opts[name] = opt = builders[name]()
            steppers[name] = (lambda o: lambda: o.step(loss))(opt)
        elif name in peers:
            steppers[name] = peers[name]
    names = [n for n in names if n in steppers]

    def fwd():
        with torch.no_grad():
            loss()

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

    rows = []
    for name in names:
        st, fw = timings[name]["step"], timings[name]["fwd"]
        row = {"method": name, "label": LABELS[name], "step_s": min(st), "forward_s": 2 * min(fw),
               "ratio": min(st) / (2 * min(fw)),
               "median_ratio": statistics.median(s_ / (2 * f_) for s_, f_ in zip(st, fw)),
               "target": RATIO_TARGETS.get(name), "step_s_all": st, "forward_s_all": fw}
        if name in opts:
            gen = generation_time(opts[name], args.repeats)
            row.update(generation_s=gen, other_s=None if gen is None else max(0.0, min(st) - 2 * min(fw) - gen))
        rows.append(row)
    best = {r["method"]: r["step_s"] for r in rows}
    for r in rows:
        for base, key in (("algorithm-1", "speedup_vs_algorithm_1"), ("reference", "speedup_vs_reference")):
            if base in best:
                r[key] = best[base] / r["step_s"]
    method, baseline, target = SPEEDUP_TARGET
    speedup = best[baseline] / best[method] if method in best and baseline in best else None
    forward = min(f for n in names for f in timings[n]["fwd"])
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": "cpu", "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "model": args.model, "batch": args.batch, "seq_len": args.seq_len, "rounds": args.repeats,
        "loss": "classification: zotune.lm.choice_loss, 2 candidates at the last position",
        "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "forward_s": forward, "rows": rows, "missing": missing,
        "speedup_target": {"method": method, "baseline": baseline, "target": target, "value": speedup},
    }
    print()
    print(markdown(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
