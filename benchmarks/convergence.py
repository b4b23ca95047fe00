"""Which method learns fastest for a budget: dev accuracy against forward passes and seconds.

    zotune bench benchmarks/grids/sst2-convergence.yaml      # the runs (resumable, one process each)
    python benchmarks/convergence.py [--grid benchmarks/grids/sst2-convergence.yaml]

Reads the grid's results and every run's ``metrics.jsonl``; for each method picks the learning
rate whose run reached the best dev accuracy (the sweep is on dev; test accuracy is only read
for the run that dev chose, from the best-dev checkpoint that the run itself tested); reports
the forward passes and training seconds each chosen run needed to first reach the reference
method's (MeZO's) final dev accuracy, for that lr and, where it differs and has other seeds, for the
lr that reached the target soonest on the sweep's seed. Forward passes are counted in the grid's batch
(``base.train.batch_size``): a run with a batch of 4 rows makes a quarter of a pass per forward. Prints a markdown table, writes JSON beside the grid's
results and figures under ``docs/figures/``. Machine and date are recorded with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_against_zero_shot(run_dir: Path) -> dict | None:
    """Paired test of the run's tested checkpoint against the base model on the same test rows
    (exact McNemar; :func:`zotune.bench.paired.paired_test`), or None when the rows were not kept."""
    path = run_dir / "test_rows.json"
    if not path.exists():
        return None
    from zotune.bench.paired import paired_test

    rows = json.loads(path.read_text())
    test = paired_test(rows["zero_shot"], rows["tuned"])
    return {"p": test["p"], "n": test["n"], "better": test["mean_b"] > test["mean_a"]}


def keep(run_dir: Path, kept: Path) -> Path:
    """Copy a run's ``metrics.jsonl`` and ``test_rows.json`` into ``kept`` (runs/ is not committed,
    so a report can be made again from the repository alone); the folder to read: the run's while
    it exists, else the copy."""
    for name in ("metrics.jsonl", "test_rows.json"):
        if (run_dir / name).exists():
            kept.mkdir(parents=True, exist_ok=True)
            (kept / name).write_text((run_dir / name).read_text())
    return run_dir if (run_dir / "metrics.jsonl").exists() else kept


def passes(count: int | None, rows_per_pass: float) -> int | float | None:
    """Forward passes counted in the grid's batch (an int when whole, as in the tables)."""
    if count is None:
        return None
    x = round(count * rows_per_pass, 2)
    return int(x) if x == int(x) else x


def curve(run_dir: Path, rows_per_pass: float = 1.0) -> list[dict]:
    """Dev points of one run: step, forward passes, cumulative training seconds, dev accuracy.
    ``rows_per_pass``: the run's batch over the grid's, so that a forward pass counts the rows it
    ran (4 rows are a quarter of a pass of 16: comparing passes of unequal batches would flatter the
    smaller one)."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = {r["step"]: r for r in rows if "loss" in r}
    points, seconds, last_step = [], 0.0, 0
    for step in sorted(train):
        r = train[step]
        seconds += r["step_time"] * (step - last_step)
        last_step = step
        train[step] = {**r, "seconds": seconds}
    for r in rows:
        if r.get("phase") != "dev":
            continue
        t = train.get(r["step"])
        if t is None:
            continue
        points.append({"step": r["step"], "forward_passes": passes(t["forward_passes"], rows_per_pass),
                       "seconds": round(t["seconds"], 1),
                       "dev_accuracy": r.get("dev/accuracy")})
    return points


def method_label(overrides: dict) -> str:
    """A method on adapters is its own row ("fzoo (prefix)"), and a prefix of another length, one
    perturbed on its values only, or a run with its own batch size its own again ("mezo (prefix,
    1 token)", "mezo (prefix, values only)", "mezo (prefix, batch 4)"), and so is one with an lr schedule
    or evaluated on its iterate average ("mezo (prefix, cosine over 333 steps)", "mezo (prefix, average
    0.9)"): runs with one label share the lr choice and the seed rows."""
    label = overrides["optim.method"]
    scheme = overrides.get("trainable.scheme", "full")
    parts = [] if scheme == "full" else [scheme]
    tokens = overrides.get("trainable.prefix_tokens")
    if tokens is not None:
        parts.append(f"{tokens} token{'s' if tokens != 1 else ''}")
    if overrides.get("trainable.prefix_values_only"):
        parts.append("values only")
    if "train.batch_size" in overrides:
        parts.append(f"batch {overrides['train.batch_size']}")
    if overrides.get("optim.schedule", "constant") != "constant":
        parts.append(f"{overrides['optim.schedule']} over {overrides['train.steps']} steps")
    if overrides.get("train.average_decay"):
        parts.append(f"average {overrides['train.average_decay']:g}")
    return f"{label} ({', '.join(parts)})" if parts else label


def first_reaching(points: list[dict], target: float) -> dict | None:
    for p in points:
        if p["dev_accuracy"] is not None and p["dev_accuracy"] >= target:
            return p
    return None


def fastest_to_target(runs: list[dict], target: float, base_seed: int) -> dict[str, dict]:
    """Each method's lr (base seed's runs) that first reached ``target`` in the fewest forward
    passes (ties: fewer seconds). The best-dev rule answers "which lr ends highest"; this one
    answers "which lr gets there soonest", the question of a small budget."""
    fastest: dict[str, tuple] = {}
    for r in runs:
        hit = first_reaching(r["points"], target) if r["seed"] == base_seed else None
        if hit is None:
            continue
        key = (hit["forward_passes"], hit["seconds"])
        if r["method"] not in fastest or key < fastest[r["method"]][0]:
            fastest[r["method"]] = (key, r)
    return {m: r for m, (_, r) in fastest.items()}


def against_reference(runs: list[dict], ref: list[dict], target: float, fwd_share: float = 1 / 3,
                      seconds_share: float = 0.5) -> dict:
    """Each run's forward passes and seconds to ``target`` as shares of the reference runs' whole
    budget (issue 10: reach MeZO's 250-step accuracy with at most a third of its forward passes
    and half its wall time). The reference budget is the mean over its runs (seeds)."""
    fwd = statistics.mean(r["forward_passes"] for r in ref)
    secs = statistics.mean(r["points"][-1]["seconds"] for r in ref)
    per_seed = []
    for r in runs:
        hit = first_reaching(r["points"], target)
        f = hit["forward_passes"] / fwd if hit else None
        t = hit["seconds"] / secs if hit else None
        per_seed.append({"seed": r["seed"], "fwd_share": f, "seconds_share": t,
                         "met": hit is not None and f <= fwd_share + 1e-12 and t <= seconds_share + 1e-12})
    return {"reference_forward_passes": fwd, "reference_seconds": round(secs, 1), "per_seed": per_seed,
            "met_seeds": sum(x["met"] for x in per_seed), "seeds": len(per_seed)}


def plot_dev_curves(series: dict[str, list[dict]], x_key: str, x_label: str, title: str, path: Path,
                    hline: tuple[float, str] | None = None, log_x: bool = False) -> bool:
    """Dev accuracy against ``x_key`` of each labelled curve, as a PNG; False without matplotlib.

    One drawing for every benchmark page that plots dev curves (convergence, equal time, summed lr).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # more curves than the 10 colours of the cycle: each further ten get their own line style, and the
    # legend goes beside the axes, where it cannot cover the curves
    many = len(series) > 10
    fig, ax = plt.subplots(figsize=(12, 6) if many else (6, 4))
    styles = ("-", "--", ":", "-.")
    for k, (label, points) in enumerate(series.items()):
        ax.plot([p[x_key] for p in points], [p["dev_accuracy"] for p in points], marker=".", label=label,
                linestyle=styles[(k // 10) % len(styles)])
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=0.8, label=hline[1])
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("dev accuracy")
    ax.set_title(title)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=str(ROOT / "benchmarks/grids/sst2-convergence.yaml"))
    ap.add_argument("--reference", default="mezo", help="method whose final dev accuracy is the target")
    ap.add_argument("--figures", default=str(ROOT / "docs/figures"))
    ap.add_argument("--out", default=str(ROOT / "docs/convergence.md"), help="markdown page to (re)write")
    args = ap.parse_args(argv)
    grid = yaml.safe_load(Path(args.grid).read_text())
    results = {r["run"]: r for r in read_jsonl(ROOT / grid["results"]) if r.get("status") == "ok"}
    archive = ROOT / grid["results"].replace(".jsonl", "-metrics")
    base_seed = (grid.get("base", {}).get("optim") or {}).get("seed", 0)
    base_batch = (grid.get("base", {}).get("train") or {}).get("batch_size", 16)
    runs = []
    for spec in grid["runs"]:
        r = results.get(spec["name"])
        if r is None:
            continue
        kept = archive / spec["name"]
        rows_per_pass = spec["set"].get("train.batch_size", base_batch) / base_batch
        pts = curve(keep(ROOT / r["output_dir"], kept), rows_per_pass)
        res = r["results"]
        runs.append({
            "run": spec["name"], "method": method_label(spec["set"]),
            "lr": spec["set"]["optim.lr"],
            "seed": spec["set"].get("optim.seed", base_seed),
            "points": pts,
            "best_dev": max((p["dev_accuracy"] for p in pts), default=None),
            "final_dev": pts[-1]["dev_accuracy"] if pts else None,
            "test": res.get("test", {}).get("accuracy"), "zero_shot_test": res.get("zero_shot", {}).get("accuracy"),
            "tested_step": res.get("tested_step"),
            "forward_passes": passes(res.get("forward_passes"), rows_per_pass),
            "mean_step_seconds": res.get("mean_step_seconds"), "paired": test_against_zero_shot(kept),
            # training's own peak where the run recorded it; older runs only have the whole run's,
            # which includes re-reading the best-dev checkpoint before the test (marked)
            "peak_rss_mib": round((res.get("peak_rss_train_bytes") or res.get("peak_rss_bytes") or 0) / 2**20),
            "peak_rss_whole_run": res.get("peak_rss_train_bytes") is None,
        })
    chosen: dict[str, dict] = {}
    for r in runs:  # each method's lr chosen on dev, by the sweep (the base seed's runs)
        if r["best_dev"] is None or r["seed"] != base_seed:
            continue
        if r["method"] not in chosen or r["best_dev"] > chosen[r["method"]]["best_dev"]:
            chosen[r["method"]] = r
    tried = {m: sorted({r["lr"] for r in runs if r["method"] == m and r["seed"] == base_seed and r["best_dev"] is not None})
             for m in chosen}  # one lr: not swept, the method's starting point as run
    ref = chosen.get(args.reference)
    target = ref["final_dev"] if ref else None
    table = []
    for method, r in chosen.items():
        hit = first_reaching(r["points"], target) if target is not None else None
        table.append({
            "method": method, "lr": r["lr"], "lrs_tried": tried[method], "best_dev": r["best_dev"],
            "final_dev": r["final_dev"],
            "test_of_best_dev": r["test"], "zero_shot_test": r["zero_shot_test"],
            "forward_passes_run": r["forward_passes"], "mean_step_seconds": r["mean_step_seconds"],
            "peak_rss_mib": r["peak_rss_mib"], "peak_rss_whole_run": r["peak_rss_whole_run"],
            "forward_passes_to_target": hit["forward_passes"] if hit else None,
            "seconds_to_target": hit["seconds"] if hit else None,
        })
    # the chosen lr of each method again with other seeds (directions and batch order): spread
    seeds = []
    for method, r in chosen.items():
        same = [x for x in runs if x["method"] == method and x["lr"] == r["lr"]]
        if len(same) < 2:
            continue
        tests = [x["test"] for x in same if x["test"] is not None]
        hits = [first_reaching(x["points"], target) if target is not None else None for x in same]
        seeds.append({
            "method": method, "lr": r["lr"], "seeds": [x["seed"] for x in same],
            "test_mean": statistics.mean(tests), "test_sd": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            "best_dev": [x["best_dev"] for x in same],
            "forward_passes_to_target": [h["forward_passes"] if h else None for h in hits],
            "seconds_to_target": [h["seconds"] if h else None for h in hits],
        })
    budget = []  # the first target: each method's seeds against the reference's whole budget
    if ref is not None:
        ref_runs = [x for x in runs if x["method"] == args.reference and x["lr"] == ref["lr"] and x["points"]]
        for method, r in chosen.items():
            same = [x for x in runs if x["method"] == method and x["lr"] == r["lr"] and x["points"]]
            budget.append({"method": method, "lr": r["lr"], **against_reference(same, ref_runs, target)})
    # the same target with each method's soonest lr, where that is not the best-dev lr and has seeds
    budget_fastest = []
    if ref is not None:
        for method, r in fastest_to_target(runs, target, base_seed).items():
            same = [x for x in runs if x["method"] == method and x["lr"] == r["lr"] and x["points"]]
            if r["lr"] != chosen[method]["lr"] and len(same) > 1:
                budget_fastest.append({"method": method, "lr": r["lr"], **against_reference(same, ref_runs, target)})
    out = {
        "grid": grid["name"], "reference": args.reference, "target_dev_accuracy": target, "seeds": seeds,
        "against_reference_budget": budget, "against_reference_budget_fastest_lr": budget_fastest,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "date": datetime.date.today().isoformat(), "table": table, "runs": runs,
    }
    json_path = ROOT / grid["results"].replace(".jsonl", "-report.json")
    json_path.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n")
    lines = [f"Target: {args.reference}'s final dev accuracy, {target}", "",
             "| method | lr (chosen on dev) | lrs tried | best dev | final dev | test (best-dev ckpt) | zero-shot test | "
             "fwd to target | s to target | s / step | peak RSS MiB |", "|---" * 11 + "|"]
    for t in table:
        lines.append(f"| {t['method']} | {t['lr']:g} | {', '.join(f'{x:g}' for x in t['lrs_tried'])} | {t['best_dev']} | {t['final_dev']} | {t['test_of_best_dev']} | "
                     f"{t['zero_shot_test']} | {t['forward_passes_to_target']} | {t['seconds_to_target']} | "
                     f"{t['mean_step_seconds']} | {t['peak_rss_mib']}{' *' if t['peak_rss_whole_run'] else ''} |")
    if any(t["peak_rss_whole_run"] for t in table):
        lines += ["", "\\* the whole run's peak: recorded before runs kept training's own peak apart, so it includes "
                  "reading the best-dev checkpoint back for the test (a second copy of the weights, since fixed) "
                  "when the best dev step was not the last"]
    if seeds:
        lines += ["", "The chosen lr with other seeds (`optim.seed` and `train.data_seed`; same data splits): test "
                  "accuracy mean +- sd, and per seed the forward passes and seconds to the target (None: not reached)", "",
                  "| method | lr | seeds | test mean +- sd | best dev per seed | fwd to target per seed | "
                  "s to target per seed |", "|---" * 7 + "|"]
        for x in seeds:
            lines.append(f"| {x['method']} | {x['lr']:g} | {len(x['seeds'])} | {x['test_mean']:.4f} +- {x['test_sd']:.4f} | "
                         f"{x['best_dev']} | {x['forward_passes_to_target']} | {x['seconds_to_target']} |")
    share = lambda v: "not reached" if v is None else f"{v:.2f}"  # noqa: E731
    if budget:
        b0 = budget[0]
        lines += ["", f"Against {args.reference}'s whole run ({b0['reference_forward_passes']:g} forward passes, "
                  f"{b0['reference_seconds']:g} training seconds, the mean over its seeds): forward passes and seconds "
                  "to the target as shares of it, per seed; the target (issue 10) is at most 1/3 of the forward "
                  "passes and 1/2 of the seconds", "",
                  "| method | lr | fwd share per seed | seconds share per seed | seeds meeting both |", "|---" * 5 + "|"]
        for b in budget:
            lines.append(f"| {b['method']} | {b['lr']:g} | {', '.join(share(x['fwd_share']) for x in b['per_seed'])} | "
                         f"{', '.join(share(x['seconds_share']) for x in b['per_seed'])} | {b['met_seeds']} of {b['seeds']} |")
    if budget_fastest:
        lines += ["", "The same shares for a method's lr that reached the target in the fewest forward passes on "
                  f"seed {base_seed} (where that is not its best-dev lr): the choice is made on seed {base_seed}'s dev "
                  "curve, so only the other seeds are fresh evidence", "",
                  "| method | lr (soonest on dev) | fwd share per seed | seconds share per seed | seeds meeting both |",
                  "|---" * 5 + "|"]
        for b in budget_fastest:
            lines.append(f"| {b['method']} | {b['lr']:g} | {', '.join(share(x['fwd_share']) for x in b['per_seed'])} | "
                         f"{', '.join(share(x['seconds_share']) for x in b['per_seed'])} | {b['met_seeds']} of {b['seeds']} |")
    lines += ["", "All runs of the sweep. p: exact McNemar test of the tested checkpoint against the base model on "
              "the same test rows (- : the run's folder was gone before its test rows were archived beside its "
              "metrics, from 2026-12-04 on)", "",
              "| run | seed | best dev | final dev | test | zero-shot test | p (paired) | forward passes | s / step |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        pv = "-" if r["paired"] is None else f"{r['paired']['p']:.2g}"
        lines.append(f"| {r['run']} | {r['seed']} | {r['best_dev']} | {r['final_dev']} | {r['test']} | "
                     f"{r['zero_shot_test']} | {pv} | {r['forward_passes']} | {r['mean_step_seconds']} |")
    print("\n".join(lines))
    print(f"\n{out['machine']}, {out['date']}; JSON: {json_path.relative_to(ROOT)}")
    page = [
        "# Which method learns fastest: SST-2 convergence", "",
        "Generated by `python benchmarks/convergence.py` from the runs of",
        f"`zotune bench {Path(args.grid).relative_to(ROOT)}` (resumable; a rerun adds the missing runs).",
        f"Machine: {out['machine']}; date {out['date']}. The grid runs one run at a time, each in its own",
        "process, and nothing else is meant to run beside it: seconds are each run's training seconds (the",
        "sum of its step times; dev evaluations excluded), so they compare across methods only when the",
        "runs had the machine to themselves (`s / step` in the table shows a disturbed run). The grid was",
        "run over several sessions, and the machine's speed differed between them (the same MeZO prefix",
        "step took 0.95 s on 2026-12-03 and 2.2 s on 2026-12-04): compare a run's `s / step` with",
        "the same method's other runs before reading its seconds against another session's.",
        "", "Each method's lr is the one whose run reached the best dev accuracy (200 dev rows carved from",
        "SST-2/train.tsv), among the lrs tried (a single one: the method ran at its starting point in",
        "`src/zotune/defaults.py`, not swept); test accuracy (400 rows) is that of the run's own best-dev checkpoint. Forward",
        "passes: what the optimizer counts, in batches of the grid's size (16 rows: a run with `batch 4` in its",
        "label makes a quarter of one per forward); a first-order step (forward and backward) counts as one.",
        "A label's `average D`: dev and test read the run's iterate average (`train.average_decay: D`).",
        "Peak RSS: the process's peak resident memory after the model was loaded.", "",
        *lines, "",
        f"![dev accuracy vs forward passes](figures/{grid['name']}-forward_passes.png)",
        f"![dev accuracy vs seconds](figures/{grid['name']}-seconds.png)", "",
    ]
    Path(args.out).write_text("\n".join(page))
    fig_dir = Path(args.figures)
    hline = (target, f"{args.reference} final dev") if target is not None else None
    series = {f"{method} (lr {r['lr']:g})": r["points"] for method, r in chosen.items()}
    for x_key, label in (("forward_passes", "forward passes"), ("seconds", "training seconds")):
        plot_dev_curves(series, x_key, label, f"{grid['name']}: SmolLM2-135M",
                        fig_dir / f"{grid['name']}-{x_key}.png", hline=hline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
