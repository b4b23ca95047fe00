"""Dev accuracy against the summed learning rate: how far along the gradient did each run go?

    python benchmarks/summed_lr.py [--out benchmarks/results/summed_lr_sst2.json] [--figure docs/figures/summed_lr_sst2.png]

Why: a two-point step's expectation is the gradient (``E[g] = grad L`` for Gaussian directions,
per-example ones included), so ZO-SGD with lrs ``lr_t`` moves, on average, as far along the
gradient flow as FO-SGD with the same ``sum_t lr_t``; the rest of a ZO step is noise. Plotting
both against that sum separates the two: where a ZO curve lies on FO-SGD's, the estimate's noise
costs nothing and the run was short of gradient flow; where it lies below, the noise is the limit.
FO-Adam has no such axis (its step is ~lr per entry whatever the gradient) and is left out.

Reads the runs' kept metrics (``benchmarks/results/<grid>-metrics/<run>/metrics.jsonl``, written by
``benchmarks/convergence.py`` and ``benchmarks/equal_time.py``) and their ``lr`` (logged every
``train.log_every`` steps: the sum is integrated with the trapezoid rule between the logged values,
exact for a constant lr). Prints, per run, dev accuracy at the last evaluation whose summed lr is
at most each of ``--at`` (blank when the run had not come within 3/4 of it), and writes JSON with the
machine and date.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from zotune.bench.grid import load_grid

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence import plot_dev_curves, read_jsonl  # noqa: E402  (one reading and drawing of dev curves)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: (grid, run): the prefix runs of SST-2 with a plain SGD step (ZO estimates and FO-SGD), and MeZO / FO-SGD on all
#: weights and on the prompt for the same comparison at their own scale
RUNS = (
    ("sst2-convergence", "fo-sgd-prefix-lr0.1"), ("sst2-convergence", "fo-sgd-prefix-lr1"),
    ("sst2-convergence", "fo-sgd-prefix-lr3"),
    ("sst2-convergence", "fo-sgd-prefix-lr10"),
    ("sst2-convergence", "mezo-prefix-lr3e-3"), ("sst2-convergence", "mezo-prefix-lr1e-2"),
    ("sst2-convergence", "mezo-prefix-lr3e-2"), ("sst2-convergence", "mezo-prefix-lr3e-2-seed1"),
    ("sst2-convergence", "mezo-prefix-lr3e-2-seed2"),
    ("sst2-convergence", "per-example-prefix-lr3e-2"), ("sst2-convergence", "per-example-prefix-lr3e-2-seed1"),
    ("sst2-convergence", "per-example-prefix-lr3e-2-seed2"), ("sst2-convergence", "per-example-prefix-lr6e-2"),
    ("sst2-equal-time", "mezo-prefix-lr2e-2-cos30min"), ("sst2-equal-time", "mezo-prefix-lr0.01-avg0.99"),
    ("sst2-equal-time", "per-example-prefix-lr3e-2-cos30min"),
    ("sst2-convergence", "fo-sgd-lr1e-3"), ("sst2-convergence", "mezo-lr1e-5"), ("sst2-convergence", "mezo-lr3e-5"),
    ("sst2-convergence", "mezo-lr3e-5-seed1"), ("sst2-convergence", "mezo-lr3e-5-seed2"),
    ("sst2-convergence", "fo-sgd-prompt-lr5e-2"), ("sst2-convergence", "fo-sgd-prompt-lr0.5"),
    ("sst2-convergence", "mezo-prompt-lr1e-3"), ("sst2-convergence", "mezo-prompt-lr3e-3"),
    ("sst2-convergence", "mezo-prompt-lr3e-3-seed1"), ("sst2-convergence", "mezo-prompt-lr3e-3-seed2"),
    ("sst2-convergence", "mezo-prompt-lr1e-2"), ("sst2-convergence", "mezo-prompt-lr3e-2"),
)
AT = (1, 2, 5, 10, 20, 50, 100)


def summed_lr_curve(rows: list[dict], start_lr: float) -> list[dict]:
    """Dev points ``{step, summed_lr, dev_accuracy}`` of one run's metrics rows. The lr of the steps
    between two logged steps is taken linear between the logged values (``start_lr`` at step 0)."""
    logged = sorted({r["step"]: r["lr"] for r in rows if "lr" in r and "loss" in r}.items())
    knots = [(0, float(start_lr))] + [(s, float(lr)) for s, lr in logged if s > 0]
    cumulative = {0: 0.0}
    total = 0.0
    for (s0, a), (s1, b) in zip(knots, knots[1:]):
        total += (a + b) / 2 * (s1 - s0)
        cumulative[s1] = total
    points = []
    for r in rows:
        if r.get("phase") == "dev" and r["step"] in cumulative and r.get("dev/accuracy") is not None:
            points.append({"step": r["step"], "summed_lr": round(cumulative[r["step"]], 6),
                           "dev_accuracy": r["dev/accuracy"]})
    return points


def dev_at(points: list[dict], at: float) -> float | None:
    """Dev accuracy of the last point with summed lr <= ``at``, if that point reached 3/4 of ``at``."""
    before = [p for p in points if p["summed_lr"] <= at * (1 + 1e-9)]
    if not before or before[-1]["summed_lr"] < 0.75 * at:
        return None
    return before[-1]["dev_accuracy"]


def grid_overrides(grid: str) -> dict[str, dict]:
    return {r.name: r.overrides for r in load_grid(ROOT / "benchmarks" / "grids" / f"{grid}.yaml").runs}


def measure(at=AT, scheme: str | None = None) -> list[dict]:
    """Each of :data:`RUNS` (``scheme``'s only, if given) with kept metrics: its dev points on the summed lr."""
    results, out = RESULTS, []
    grids: dict[str, dict] = {}
    for grid, name in RUNS:
        path = results / f"{grid}-metrics" / name / "metrics.jsonl"
        if not path.exists():
            print(f"skipped {grid}/{name}: no kept metrics at {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
            continue
        overrides = grids.setdefault(grid, grid_overrides(grid)).get(name)
        if overrides is None:
            raise SystemExit(f"{name!r} is not a run of benchmarks/grids/{grid}.yaml")
        if scheme is not None and overrides.get("trainable.scheme", "full") != scheme:
            continue
        rows = read_jsonl(path)
        points = summed_lr_curve(rows, overrides["optim.lr"])
        out.append({"grid": grid, "run": name, "method": overrides["optim.method"],
                    "scheme": overrides.get("trainable.scheme", "full"), "lr": overrides["optim.lr"],
                    "points": points, "dev_at": {f"{a:g}": dev_at(points, a) for a in at},
                    "best_dev": max((p["dev_accuracy"] for p in points), default=None),
                    "summed_lr_end": points[-1]["summed_lr"] if points else None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--at", default=",".join(str(a) for a in AT), help="summed lrs to read dev accuracy at")
    ap.add_argument("--scheme", default=None, help="only the runs of this trainable scheme (prefix, full, prompt)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/summed_lr_sst2[_SCHEME].json")
    ap.add_argument("--figure", default=None, help="default docs/figures/summed_lr_sst2[_SCHEME].png; '' for none")
    args = ap.parse_args(argv)
    tag = f"_{args.scheme}" if args.scheme else ""
    out = args.out or str(RESULTS / f"summed_lr_sst2{tag}.json")
    figure = str(ROOT / "docs" / "figures" / f"summed_lr_sst2{tag}.png") if args.figure is None else args.figure
    try:
        at = tuple(float(a) for a in args.at.split(",") if a)
    except ValueError:
        raise SystemExit(f"--at takes comma-separated numbers, got {args.at!r}") from None
    if not at or any(a <= 0 for a in at):
        raise SystemExit(f"--at takes positive numbers, got {args.at!r}")
    runs = measure(at=at, scheme=args.scheme)
    if not runs:
        raise SystemExit("no run with kept metrics: run benchmarks/convergence.py and benchmarks/equal_time.py first")
    head = " | ".join(f"{a:g}" for a in at)
    print(f"| run | method | scheme | lr | summed lr at the end | best dev | dev at summed lr {head} |")
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(at))
    for r in runs:
        cells = " | ".join("" if r["dev_at"][f"{a:g}"] is None else f"{r['dev_at'][f'{a:g}']:.3f}" for a in at)
        print(f"| {r['run']} | {r['method']} | {r['scheme']} | {r['lr']:g} | {r['summed_lr_end']:.3g} | "
              f"{r['best_dev']:.3f} | {cells} |")
    from zotune.bench.record import write_record

    write_record(out, {"at": list(at), "scheme": args.scheme, "runs": runs})
    # the figure: one seed of each setting, and no diverged run, so the lines can be told apart
    curves = {r["run"]: r["points"] for r in runs
              if r["points"] and not r["run"].endswith(("-seed1", "-seed2")) and r["best_dev"] > 0.65}
    if figure and curves:
        if plot_dev_curves(curves, "summed_lr", "summed lr (gradient flow time, log)",
                           f"SST-2{' ' + args.scheme if args.scheme else ''}: dev accuracy against the summed lr",
                           Path(figure), log_x=True):
            print(f"wrote {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
