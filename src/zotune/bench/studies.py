"""``zotune study NAME``: the ablations of ZO-Bench and the LOZO slides, each one command.

A study is a definition that expands into a grid of ordinary training runs (run by
:func:`zotune.bench.grid.run_grid`: one process per run, resumable, JSONL results, a crash ends
that run only) and a renderer that turns the results into the paper's table, plus a figure
where the paper has one:

========== ====================================================== ============================
study      what it runs                                           paper
========== ====================================================== ============================
alignment  FO-SGD, ZO-SGD, ZO-Adam x prompt template on / ``none`` ZO-Bench Table 1
queries    ZO-SGD vs Forward-Grad (LoRA) at q = 1, 2, 4, 8        ZO-Bench Figure 2
block      MeZO (q=1), ZO-SGD (q=p), ZO-SGD-Block (p blocks)      ZO-Bench Table 6
hybrid     first k layers ZO, the rest FO, k = 0 .. n             ZO-Bench Table 7
sparsity   ZO-SGD with sparse perturbation masks, 0 .. 90 %       ZO-Bench Table 8
lozo-memory LOZO, LOZO-M, MeZO, MeZO-M, FT-LoRA, FT: peak memory  LOZO slides (OPT-13B table)
========== ====================================================== ============================

Example::

    zotune study hybrid --dry-run                       # the runs, without running them
    zotune study hybrid --steps 100 --test 300          # run (resumes), then print the table
    zotune study hybrid --report-only --out docs/x.md   # the table from the results alone

    from zotune.bench.studies import Options, plan_study, run_study, render
    plan = plan_study("block", Options(model="tiny-llama", steps=2))
    run_study(plan)
    print(render(plan))

Runs are named ``<task>-<setting>-s<seed>``; every setting a run depends on is written into its
record (``overrides``), and a results file already holding a run of that name with other
settings is refused, so a resumed study never mixes runs of two configurations.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zotune._validate import unknown_choice
from zotune.bench.grid import Grid, RunSpec, finished, run_grid, validate_grid
from zotune.bench.report import _md, _metric, _mib, _save, load_records, runs_table, write_text_atomic
from zotune.config import ConfigError, parse_overrides

DEFAULT_MODEL = "smollm2-135m"

# Hyperparameters per (method, scheme), chosen for SmolLM2-135M in short CPU runs (docs/studies.md):
# ZO lr 1e-5 for full tuning (1e-6 barely moves the model in a few hundred steps), LoRA 5e-5 with
# eps 1e-2; FO-SGD 1e-3, FO-Adam 1e-5 (full) / 1e-4 (LoRA). --set optim.lr=... overrides all runs.
HYPER: dict[tuple[str, str], dict] = {
    ("mezo", "full"): {"optim.lr": 1e-5, "optim.eps": 1e-3},
    ("mezo", "lora"): {"optim.lr": 5e-5, "optim.eps": 1e-2},
    ("forward-grad", "lora"): {"optim.lr": 5e-5},
    ("forward-grad", "full"): {"optim.lr": 1e-5},
    ("zo-adam", "full"): {"optim.lr": 1e-5, "optim.eps": 1e-3},
    ("zo-sgd-block", "full"): {"optim.lr": 1e-5, "optim.eps": 1e-3},
    ("zo-sgd-momentum", "full"): {"optim.lr": 1e-6, "optim.eps": 1e-3, "optim.momentum": 0.9},
    ("lozo", "full"): {"optim.lr": 1e-5, "optim.eps": 1e-3, "optim.rank": 2, "optim.interval": 50},
    ("fo-sgd", "full"): {"optim.lr": 1e-3},
    ("fo-adam", "full"): {"optim.lr": 1e-5},
    ("fo-adam", "lora"): {"optim.lr": 1e-4},
}
FO_LR = 1e-3  # hybrid: lr of the first-order part (and of the pure FO-SGD row)


def _title(method: str) -> str:
    """The name the papers' tables give ``method`` (zotune.methods.Method.title)."""
    from zotune.methods import METHODS

    return METHODS[method].title if method in METHODS else method


# ----------------------------------------------------------------------------- options and plan
@dataclass(frozen=True)
class Options:
    """What a user can set for any study (None: the study's default)."""

    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] | None = None
    steps: int | None = None
    batch_size: int | None = None
    train: int | None = None
    test: int | None = None
    max_length: int | None = None
    seeds: tuple[int, ...] = (0,)
    values: tuple[str, ...] | None = None  # the study's swept axis (see each study's ``axis``)
    overrides: tuple[str, ...] = ()  # section.field=value applied to every run, last
    output_dir: str | None = None
    results: str | None = None


@dataclass(frozen=True)
class Layout:
    """What a study needs to know of the model before running it (read without weights)."""

    layers: int  # transformer layers
    blocks: int  # ZO-SGD-Block's parameter blocks when every parameter trains


@dataclass
class Plan:
    """A study resolved against its options: the settings in force and the grid to run."""

    study: Study
    options: Options
    tasks: tuple[str, ...]
    values: tuple
    settings: dict
    layout: Layout | None
    grid: Grid = field(repr=False)


@dataclass(frozen=True)
class Study:
    name: str
    source: str  # the paper's table or figure
    question: str
    tasks: tuple[str, ...]  # the paper's tasks
    settings: dict  # defaults of steps, batch_size, train, test
    runs: Callable[[Plan], list[tuple[str, dict, dict]]]  # (name, overrides, labels) per task setting
    render: Callable[[Plan, list[dict]], str]
    axis: str | None = None  # what --values lists
    values: Callable[[Layout | None], tuple] | None = None  # default values
    parse: Callable[[str, Layout | None], Any] | None = None  # one --values item
    figure: Callable[[Plan, list[dict], Path], list[Path]] | None = None
    needs_layout: bool = False


def _check_int(name: str, value, minimum: int) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ValueError(unknown_choice("study", name, STUDIES))
    return STUDIES[name]


def model_layout(model: str) -> Layout:
    """Layers and ZO-SGD-Block blocks of ``model`` (full tuning), from its config alone."""
    import torch

    from zotune.estimators.blockwise import layer_block_key
    from zotune.params import num_layers

    if model.startswith("tiny-"):
        from zotune.testing import tiny_model

        net = tiny_model(model[len("tiny-"):]).model
    else:
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

        from zotune.bench.memory_model import load_config
        from zotune.models import detect_kind

        config = load_config(model)
        auto = AutoModelForMaskedLM if detect_kind(config) == "masked" else AutoModelForCausalLM
        with torch.device("meta"):  # shapes and names only, no memory
            net = auto.from_config(config)
    names = [n for n, p in net.named_parameters() if p.numel() > 0]  # a tied head is listed once
    return Layout(layers=num_layers(net), blocks=len({layer_block_key(n) for n in names}))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))


def plan_study(name: str, options: Options = Options(), layout: Layout | None = None) -> Plan:
    """Validate ``options`` for study ``name`` and expand its grid (nothing runs, no weights load)."""
    from zotune.tasks import get_task

    study = get_study(name)
    o = options
    for arg in ("steps", "batch_size", "train", "max_length"):
        _check_int(f"--{arg.replace('_', '-')}", getattr(o, arg), 1)
    _check_int("--test", o.test, 0)
    if not o.seeds:
        raise ValueError("--seeds needs at least one seed")
    for s in o.seeds:
        _check_int("--seeds", s, 0)
    if len(set(o.seeds)) != len(o.seeds):
        raise ValueError(f"--seeds repeats a seed: {list(o.seeds)}")
    tasks = tuple(o.tasks) if o.tasks else study.tasks
    for t in tasks:
        get_task(t)  # unknown task: 'Did you mean'
    tasks = tuple("".join(c for c in t.lower() if c.isalnum()) for t in tasks)  # "SST-2" -> "sst2"
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"--task repeats a task: {list(tasks)}")
    parse_overrides(list(o.overrides))  # malformed --set: a clear error before anything runs
    if study.needs_layout and layout is None:
        layout = model_layout(o.model)
    if o.values is not None and study.axis is None:
        raise ValueError(f"study {name!r} takes no --values (it has no swept axis)")
    if o.values is not None:
        if not o.values:
            raise ValueError(f"--values needs at least one {study.axis}")
        values = tuple(study.parse(str(v).strip(), layout) for v in o.values)
        if len(set(values)) != len(values):
            raise ValueError(f"--values repeats a value: {list(o.values)}")
    else:
        values = study.values(layout) if study.values else ()
    settings = dict(study.settings)
    settings.update({k: getattr(o, k) for k in ("steps", "batch_size", "train", "test", "max_length")
                     if getattr(o, k) is not None})
    model_part = "" if o.model == DEFAULT_MODEL else "-" + _slug(Path(o.model).name)
    output_dir = Path(o.output_dir or f"runs/studies/{name}{model_part}")
    results = Path(o.results or f"benchmarks/results/studies/{name}{model_part}.jsonl")
    grid = Grid(f"study-{name}", None, [], output_dir, results)
    plan = Plan(study, o, tasks, values, settings, layout, grid)
    runs = []
    zero_shot_done = set()
    for run_name, over, labels in study.runs(plan):
        for seed in o.seeds:
            full = {**_common(plan, labels["task"]), **over, "optim.seed": seed, "train.data_seed": seed}
            full.update(parse_flat(o.overrides))
            # Zero-shot accuracy depends on the model, task, template and test split only (LoRA starts
            # at B = 0, seeds change the optimizer and data order): measure it in the first run of each.
            key = (full["task.name"], full.get("task.template"), full.get("task.split_seed"), full.get("model.dtype"))
            if key in zero_shot_done and "train.eval_at_start" not in full:
                full["train.eval_at_start"] = False
            zero_shot_done.add(key)
            runs.append(RunSpec(f"{run_name}-s{seed}", full, {**labels, "seed": seed}))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"study {name}: run names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    grid.runs = runs
    validate_grid(grid)
    return plan


def parse_flat(items: Sequence[str]) -> dict:
    """``["optim.lr=1e-5"]`` -> ``{"optim.lr": 1e-05}`` (values parsed as in ``zotune train``)."""
    return {f"{section}.{k}": v for section, values in parse_overrides(list(items)).items() for k, v in values.items()}


def _common(plan: Plan, task: str) -> dict:
    s = plan.settings
    return {
        "model.name": plan.options.model,
        "task.name": task, "task.train": s["train"], "task.dev": 0, "task.test": s["test"],
        "task.max_length": s.get("max_length") or _task_length(task),
        "train.steps": s["steps"], "train.batch_size": s["batch_size"],
        "train.eval_batch_size": s["batch_size"],  # evaluation's peak memory no larger than a step's
        "train.save_every": s["steps"], "train.log_every": max(1, min(10, s["steps"] // 10)),
        "train.eval_every": 0, "train.tensorboard": False,
    }  # fmt: skip


def _task_length(task: str) -> int:
    """Tokens per example: the task's own default (TaskSpec.max_length, measured on its data)."""
    from zotune.tasks import get_task

    return get_task(task).max_length


def _hyper(method: str, scheme: str = "full") -> dict:
    return {"optim.method": method, "trainable.scheme": scheme, **HYPER.get((method, scheme), {})}


# ----------------------------------------------------------------------------- running
def check_recorded(plan: Plan) -> None:
    """Refuse a results file that holds one of the plan's run names with other settings."""
    path = plan.grid.results
    if not path.exists():
        return
    def trajectory(over: dict) -> dict:  # what changes the run's outcome (not whether it measures zero-shot)
        return {k: v for k, v in json.loads(json.dumps(over)).items() if k != "train.eval_at_start"}

    wanted = {r.name: trajectory(r.overrides) for r in plan.grid.runs}
    for rec in load_records(path):
        name = rec.get("run")
        if rec.get("status") == "ok" and name in wanted and trajectory(rec.get("overrides") or {}) != wanted[name]:
            old, new = trajectory(rec.get("overrides") or {}), wanted[name]
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            raise ValueError(
                f"{path} already holds run {name!r} with other settings ({shown}); pass --results (and "
                f"--output-dir) for this configuration, or delete those records to run it again")


def _summary(rec: dict) -> str:
    text = f"{rec['status']} in {rec['wall_seconds']:.0f} s"
    if rec["status"] != "ok":
        tail = [line for line in (rec.get("stderr_tail") or "").splitlines() if line.strip()]
        return text + (f": {tail[-1][:200]}" if tail else "")
    r = rec.get("results") or {}
    zs, tuned = _metric(r.get("zero_shot")), _metric(r.get("test"))
    if tuned:
        n = (r.get("test") or {}).get("n", "?")
        text += f"; {tuned[0]} {_pct(zs[1]) if zs else '-'} -> {_pct(tuned[1])} % (n={n})"
    if r.get("mean_step_seconds"):
        text += f"; {r['mean_step_seconds']:.2f} s/step"
    if r.get("peak_rss_bytes"):
        text += f"; peak RSS {_mib(r['peak_rss_bytes'])} MiB"
    return text


def run_study(plan: Plan, *, timeout: float | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Run the plan's not-yet-finished runs one after another; one progress line per run."""
    check_recorded(plan)
    done = finished(plan.grid.results)
    n = len(plan.grid.runs)
    records = []
    for k, run in enumerate(plan.grid.runs, 1):
        head = f"[{plan.study.name} {k}/{n}] {run.name}"
        if run.name in done:
            log(f"{head}: done already, skipped")
            continue
        log(f"{head}: running")
        rec = run_grid(plan.grid, only=[run.name], timeout=timeout, log=lambda *_: None)[0]
        log(f"{head}: {_summary(rec)}")
        records.append(rec)
    return records


def dry_run(plan: Plan) -> str:
    """The runs of a plan, one line each (name, then the settings that differ between runs)."""
    runs = plan.grid.runs
    shared = {k: v for k, v in runs[0].overrides.items() if all(r.overrides.get(k) == v for r in runs)}
    lines = [f"study {plan.study.name} ({plan.study.source}): {len(runs)} runs on {plan.options.model}, "
             f"tasks {', '.join(plan.tasks)}",
             "shared: " + " ".join(f"{k}={json.dumps(v)}" for k, v in shared.items())]
    for r in runs:
        own = {k: v for k, v in r.overrides.items() if k not in shared}
        lines.append(f"  {r.name}: " + " ".join(f"{k}={json.dumps(v)}" for k, v in own.items()))
    lines.append(f"runs in {plan.grid.output_dir}/<run>, results appended to {plan.grid.results}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- rendering helpers
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _ok(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("status") == "ok" and r.get("results")]


def _label(rec: dict, key: str, default=None):
    return (rec.get("labels") or {}).get(key, default)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _acc(recs: list[dict], which: str = "test") -> tuple[float | None, int]:
    """Mean metric over runs (seeds) and how many runs it averages."""
    vals = [m[1] for r in recs if (m := _metric((r.get("results") or {}).get(which)))]
    return _mean(vals), len(vals)


def _acc_cell(recs: list[dict], which: str = "test") -> str:
    v, n = _acc(recs, which)
    return _pct(v) + (f" (n={n})" if n > 1 else "")


def _test_n(recs: list[dict]) -> str:
    ns = sorted({(r.get("results") or {}).get("test", {}).get("n") for r in recs} - {None})
    return "/".join(str(n) for n in ns) or "-"


def _per_step(rec: dict, key: str) -> float | None:
    r = rec.get("results") or {}
    v, steps = r.get(key), r.get("steps")
    return v / steps if isinstance(v, (int, float)) and steps else None


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _select(records: list[dict], **labels) -> list[dict]:
    return [r for r in _ok(records) if all(_label(r, k) == v for k, v in labels.items())]


def _memory(rec: dict) -> tuple[int | None, int | None, int | None]:
    """(peak RSS, peak RSS over what the process held after loading the model, CUDA peak) in bytes."""
    r = rec.get("results") or {}
    peak, load = r.get("peak_rss_bytes"), r.get("rss_after_load_bytes")
    return peak, (peak - load if peak and load else None), r.get("cuda_peak_bytes")


def _mean_bytes(recs: list[dict], i: int) -> float | None:
    return _mean([m[i] for r in recs if (m := _memory(r))[i]])


def _header(plan: Plan, records: list[dict]) -> str:
    s = plan.settings
    ok = _ok(records)
    lines = [f"**{plan.study.source}**: {plan.study.question}",
             f"Model {plan.options.model}; tasks {', '.join(plan.tasks)}; {s['steps']} steps of batch "
             f"{s['batch_size']}; {s['train']} training rows; test rows per run: {_test_n(ok)}; "
             f"seeds {', '.join(str(x) for x in plan.options.seeds)}; "
             f"{len(ok)} of {len(plan.grid.runs)} runs finished."]
    return "\n".join(lines)


def _runs_section(plan: Plan, records: list[dict]) -> str:
    ok_or_failed = [r for r in records if r.get("run") in {x.name for x in plan.grid.runs}]
    return "Every run (zero-shot and tuned test metric, cost):\n\n" + runs_table(ok_or_failed)


# ----------------------------------------------------------------------------- alignment (Table 1)
def _alignment_runs(plan: Plan):
    for task in plan.tasks:
        for method in plan.values:
            for aligned in (True, False):
                over = {**_hyper(method), "task.template": None if aligned else "none"}
                tag = "aligned" if aligned else "unaligned"
                yield f"{task}-{method}-{tag}", over, {"task": task, "method": method, "aligned": aligned}


def _alignment_table(plan: Plan, records: list[dict]) -> str:
    header = ["Method"]
    for task in plan.tasks:
        header += [f"{task} ✓", f"{task} ✗", "Difference"]

    def cells(on: float | None, off: float | None) -> list[str]:
        return [_pct(on), _pct(off), _pct(on - off) if on is not None and off is not None else "-"]

    rows = []
    for method in plan.values:
        row = [_title(method)]
        for task in plan.tasks:
            row += cells(_acc(_select(records, task=task, method=method, aligned=True))[0],
                         _acc(_select(records, task=task, method=method, aligned=False))[0])
        rows.append(row)
    row = ["zero-shot (no step)"]
    for task in plan.tasks:
        row += cells(_acc(_select(records, task=task, aligned=True), "zero_shot")[0],
                     _acc(_select(records, task=task, aligned=False), "zero_shot")[0])
    return _md(header, rows + [row])


def _alignment_render(plan: Plan, records: list[dict]) -> str:
    return "\n\n".join([
        _header(plan, records),
        "Tuned test accuracy (%) with (✓) and without (✗) the prompt template (task alignment), and the "
        "model's accuracy before any step:",
        _alignment_table(plan, records),
    ])


def _parse_method(text: str, _layout) -> str:
    from zotune.methods import METHODS

    if text not in METHODS:
        raise ValueError("--values: " + unknown_choice("method", text, METHODS))
    return text


# ----------------------------------------------------------------------------- queries (Figure 2)
QUERY_METHODS = ("mezo", "forward-grad")


def _parse_q(text: str, _layout) -> int:
    try:
        q = int(text)
    except ValueError:
        raise ValueError(f"--values: a query budget q must be an integer >= 1, got {text!r}") from None
    if q < 1:
        raise ValueError(f"--values: a query budget q must be an integer >= 1, got {text!r}")
    return q


def _queries_runs(plan: Plan):
    for task in plan.tasks:
        for method in QUERY_METHODS:
            for q in plan.values:
                over = {**_hyper(method, "lora"), "optim.queries": q}
                yield f"{task}-{method}-q{q}", over, {"task": task, "method": method, "q": q}


def _queries_render(plan: Plan, records: list[dict]) -> str:
    parts = [_header(plan, records), "LoRA fine-tuning, tuned test accuracy (%) against the query budget q "
             "(forward passes and seconds per step measured):"]
    for task in plan.tasks:
        header = ["q"]
        for m in QUERY_METHODS:
            header += [f"{_title(m)} acc", f"{_title(m)} fwd/step", f"{_title(m)} s/step"]
        rows = []
        for q in plan.values:
            row = [str(q)]
            for m in QUERY_METHODS:
                recs = _select(records, task=task, method=m, q=q)
                row += [_acc_cell(recs), _num(_mean([v for r in recs if (v := _per_step(r, "forward_passes"))]), "{:.0f}"),
                        _num(_mean([r["results"]["mean_step_seconds"] for r in recs
                                    if r["results"].get("mean_step_seconds")]))]
            rows.append(row)
        zs, n = _acc(_select(records, task=task), "zero_shot")
        parts += [f"*{task}* (zero-shot {_pct(zs)} %):", _md(header, rows)]
    return "\n\n".join(parts)


def _queries_figure(plan: Plan, records: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(plan.tasks), figsize=(4.5 * len(plan.tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], plan.tasks):
        for m, marker in zip(QUERY_METHODS, "os"):
            pts = [(q, v) for q in plan.values if (v := _acc(_select(records, task=task, method=m, q=q))[0]) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=marker, label=_title(m))
        zs = _acc(_select(records, task=task), "zero_shot")[0]
        if zs is not None:
            ax.axhline(100 * zs, color="gray", linestyle="--", linewidth=1, label="zero-shot")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(plan.values), [str(q) for q in plan.values])
        ax.set_xlabel("queries per step q")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{plan.options.model}, {task}, LoRA")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out / "queries_accuracy_vs_q")


# ----------------------------------------------------------------------------- block (Table 6)
def _block_runs(plan: Plan):
    p = plan.layout.blocks
    for task in plan.tasks:
        yield f"{task}-mezo-q1", {**_hyper("mezo"), "optim.queries": 1}, {"task": task, "row": "mezo", "queries": 1}
        yield (f"{task}-mezo-q{p}", {**_hyper("mezo"), "optim.queries": p},
               {"task": task, "row": "zo-sgd", "queries": p})
        yield f"{task}-block", _hyper("zo-sgd-block"), {"task": task, "row": "block", "queries": p}


def _block_render(plan: Plan, records: list[dict]) -> str:
    p = plan.layout.blocks
    header = ["Optimizer", "Queries / step", "Forward passes / step (measured)", "s/step"] + list(plan.tasks)
    rows = []
    for row, title, q in (("mezo", "MeZO (ZO-SGD, q = 1)", 1), ("zo-sgd", f"ZO-SGD (q = {p})", p),
                          ("block", f"ZO-SGD-Block ({p} blocks)", p)):
        recs = _select(records, row=row)
        fwd = _mean([v for r in recs if (v := _per_step(r, "forward_passes"))])
        secs = _mean([r["results"]["mean_step_seconds"] for r in recs if r["results"].get("mean_step_seconds")])
        rows.append([title, str(q), _num(fwd, "{:.0f}"), _num(secs)]
                    + [_acc_cell(_select(records, row=row, task=t)) for t in plan.tasks])
    rows.append(["zero-shot (no step)", "-", "-", "-"]
                + [_pct(_acc(_select(records, task=t), "zero_shot")[0]) for t in plan.tasks])
    return "\n\n".join([_header(plan, records),
                        f"Tuned test accuracy (%); the model has p = {p} parameter blocks, so ZO-SGD with "
                        f"q = {p} and ZO-SGD-Block cost the same forward passes per step:",
                        _md(header, rows)])


# ----------------------------------------------------------------------------- hybrid (Table 7)
def _hybrid_values(layout: Layout) -> tuple[int, ...]:
    n = layout.layers
    return tuple(sorted({round(n * i / 6) for i in range(7)}))


def _parse_layers(text: str, layout: Layout) -> int:
    try:
        k = int(text)
    except ValueError:
        k = None
    if k is None or not 0 <= k <= layout.layers:
        raise ValueError(f"--values: a number of ZO layers must be an integer in [0, {layout.layers}] "
                         f"(the model has {layout.layers} layers), got {text!r}")
    return k


def _hybrid_runs(plan: Plan):
    n = plan.layout.layers
    for task in plan.tasks:
        for k in plan.values:
            labels = {"task": task, "zo_layers": k}
            if k == 0:  # pure first order: every tensor, embeddings and head included, by FO-SGD
                yield f"{task}-zo0-fo-sgd", {**_hyper("fo-sgd"), "optim.lr": FO_LR}, labels
            elif k == n:  # pure ZO-SGD
                yield f"{task}-zo{k}-mezo", _hyper("mezo"), labels
            else:
                yield (f"{task}-zo{k}", {**_hyper("mezo"), "optim.fo_lr": FO_LR, "trainable.zo_layers": k}, labels)


def _hybrid_rows(plan: Plan, records: list[dict], task: str) -> list[tuple[int, float | None, float | None, float | None, list]]:
    out = []
    for k in plan.values:
        recs = _select(records, task=task, zo_layers=k)
        mem = _mean_bytes(recs, 2) or _mean_bytes(recs, 0)  # CUDA peak when there is one, else peak RSS
        out.append((k, mem, _mean_bytes(recs, 1), _acc(recs)[0], recs))
    return out


def _hybrid_render(plan: Plan, records: list[dict]) -> str:
    n = plan.layout.layers
    cuda = any(_memory(r)[2] for r in _ok(records))
    kind = "CUDA peak" if cuda else "peak RSS"
    parts = [_header(plan, records),
             f"Memory ({kind}, MiB) against tuned test accuracy (%): the first k of {n} layers (and the "
             f"embeddings) by ZO-SGD, the rest by FO-SGD; Δ against pure ZO-SGD (k = {n}):"]
    for task in plan.tasks:
        rows = _hybrid_rows(plan, records, task)
        ref = next(((m, a) for k, m, _, a, _ in rows if k == n), (None, None))
        body = []
        for k, mem, over, acc, recs in rows:
            name = f"{k} (FO-SGD)" if k == 0 else f"{k} (ZO-SGD)" if k == n else str(k)
            dm = _num((mem - ref[0]) / 2**20, "{:,.0f}") if mem is not None and ref[0] is not None else "-"
            da = _num(100 * (acc - ref[1]), "{:.1f}") if acc is not None and ref[1] is not None else "-"
            body.append([name, _num(mem / 2**20 if mem else None, "{:,.0f}"), dm,
                         _num(over / 2**20 if over else None, "{:,.0f}"), _pct(acc), da])
        zs = _acc(_select(records, task=task), "zero_shot")[0]
        parts += [f"*{task}* (zero-shot {_pct(zs)} %):",
                  _md(["ZO layer #", f"Memory ({kind} MiB)", "Δ Memory", "RSS over load MiB", "Accuracy (%)",
                       "Δ Accuracy"], body)]
    return "\n\n".join(parts)


def _hybrid_figure(plan: Plan, records: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    cuda = any(_memory(r)[2] for r in _ok(records))
    fig, axes = plt.subplots(1, len(plan.tasks), figsize=(4.8 * len(plan.tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], plan.tasks):
        pts = [(k, m, a) for k, m, _, a, _ in _hybrid_rows(plan, records, task) if m is not None and a is not None]
        if pts:
            ax.plot([p[1] / 2**20 for p in pts], [100 * p[2] for p in pts], marker="o")
            for k, m, a in pts:
                ax.annotate(f"k={k}", (m / 2**20, 100 * a), textcoords="offset points", xytext=(4, 4), fontsize=8)
        zs = _acc(_select(records, task=task), "zero_shot")[0]
        if zs is not None:
            ax.axhline(100 * zs, color="gray", linestyle="--", linewidth=1, label="zero-shot")
            ax.legend(fontsize=8)
        ax.set_xlabel(("CUDA peak" if cuda else "peak RSS") + " (MiB)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{plan.options.model}, {task}: k layers ZO, rest FO")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out / "hybrid_memory_vs_accuracy")


# ----------------------------------------------------------------------------- sparsity (Table 8)
def _parse_sparsity(text: str, _layout) -> int:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 <= v < 100 or not float(v).is_integer():
        raise ValueError(f"--values: a sparsity is a whole percentage in [0, 100) (20 means 20 %), got {text!r}")
    return int(v)


def _sparsity_runs(plan: Plan):
    for task in plan.tasks:
        for s in plan.values:
            yield f"{task}-sparsity{s}", {**_hyper("mezo"), "optim.sparsity": s / 100}, {"task": task, "sparsity": s}


def _sparsity_render(plan: Plan, records: list[dict]) -> str:
    parts = [_header(plan, records), "ZO-SGD with random layer-wise sparse perturbation masks (magnitude-based "
             "ratios); 0 % is plain ZO-SGD (MeZO). Tuned test accuracy (%):"]
    for task in plan.tasks:
        accs = [_acc_cell(_select(records, task=task, sparsity=s)) for s in plan.values]
        zs = _acc(_select(records, task=task), "zero_shot")[0]
        parts += [f"*{task}* (zero-shot {_pct(zs)} %):",
                  _md(["Sparsity (%)"] + [str(s) for s in plan.values], [["Accuracy (%)"] + accs])]
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- lozo-memory (slides)
# variant -> (method, scheme, extra overrides, title)
LOZO_VARIANTS: dict[str, tuple[str, str, dict, str]] = {
    "lozo": ("lozo", "full", {"optim.momentum": 0.0}, "LOZO"),
    "lozo-m": ("lozo", "full", {"optim.momentum": 0.9}, "LOZO-M"),
    "mezo": ("mezo", "full", {}, "MeZO"),
    "mezo-m": ("zo-sgd-momentum", "full", {}, "MeZO-M"),
    "ft-lora": ("fo-adam", "lora", {}, "FT-LoRA (FO-Adam)"),
    "ft": ("fo-adam", "full", {}, "FT (FO-Adam)"),
}


def _parse_variant(text: str, _layout) -> str:
    if text not in LOZO_VARIANTS:
        raise ValueError("--values: " + unknown_choice("lozo-memory method", text, LOZO_VARIANTS))
    return text


def _lozo_runs(plan: Plan):
    for task in plan.tasks:
        for v in plan.values:
            method, scheme, extra, _ = LOZO_VARIANTS[v]
            yield f"{task}-{v}", {**_hyper(method, scheme), **extra}, {"task": task, "variant": v}


def _predicted(rec: dict) -> tuple[int, int] | None:
    """The memory model's (peak, optimizer state) for a run's method and shape, or None."""
    from zotune.bench.memory_model import predict

    o = rec.get("overrides") or {}
    if str(o.get("model.name", "")).startswith("tiny-"):  # random test models have no config to read
        return None
    try:
        p = predict(o["model.name"], o["optim.method"], o.get("trainable.scheme", "full"),
                    seq_len=o["task.max_length"], batch=o["train.batch_size"],
                    lozo_rank=o.get("optim.rank", 2), momentum=o.get("optim.momentum", 0.0))
    except (KeyError, ValueError, OSError):
        return None
    return p.peak_bytes, p.state_bytes


def _lozo_render(plan: Plan, records: list[dict]) -> str:
    header = ["Method", "peak RSS MiB", "RSS over load MiB", "CUDA peak MiB", "predicted peak MiB",
              "predicted state MiB", "s/step"]
    parts = [_header(plan, records),
             "Peak memory of a few steps (measured: the run's process; predicted: `zotune memory`, the "
             "zotune variant of ZO-Bench Table 5, tensor bytes at batch x max_length tokens):"]
    for task in plan.tasks:
        rows = []
        for v in plan.values:
            recs = _select(records, task=task, variant=v)
            pred = _predicted(recs[0]) if recs else None
            secs = _mean([r["results"]["mean_step_seconds"] for r in recs if r["results"].get("mean_step_seconds")])
            rows.append([LOZO_VARIANTS[v][3]] + [_mib(_mean_bytes(recs, i)) for i in (0, 1, 2)]
                        + [_mib(pred[0]) if pred else "-", _mib(pred[1]) if pred else "-", _num(secs)])
        parts += [f"*{task}*:", _md(header, rows)]
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- registry
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STUDIES: dict[str, Study] = {
    s.name: s
    for s in [
        Study("alignment", "ZO-Bench Table 1",
              "does fine-tuning need the prompt template (task alignment)? FO-SGD, ZO-SGD and ZO-Adam with "
              "the papers' prompt and with the 'none' template",
              ("sst2", "rte"), {"steps": 100, "batch_size": 16, "train": 1000, "test": 500},
              lambda p: list(_alignment_runs(p)), _alignment_render, axis="methods",
              values=lambda _: ("fo-sgd", "mezo", "zo-adam"), parse=_parse_method),
        Study("queries", "ZO-Bench Figure 2",
              "does accuracy rise with the query budget q, and faster for Forward-Grad than for ZO-SGD? "
              "(LoRA fine-tuning)",
              ("sst2",), {"steps": 100, "batch_size": 16, "train": 1000, "test": 500},
              lambda p: list(_queries_runs(p)), _queries_render, axis="q",
              values=lambda _: (1, 2, 4, 8), parse=_parse_q, figure=_queries_figure),
        Study("block", "ZO-Bench Table 6",
              "at equal forward passes per step, does estimating block by block (ZO-SGD-Block) beat "
              "q-query ZO-SGD and MeZO?",
              ("sst2", "winogrande"), {"steps": 100, "batch_size": 16, "train": 1000, "test": 500},
              lambda p: list(_block_runs(p)), _block_render, needs_layout=True),
        Study("hybrid", "ZO-Bench Table 7",
              "how much memory does tuning the first k layers by ZO (the rest by FO) save, and what does "
              "it cost in accuracy?",
              ("sst2",), {"steps": 100, "batch_size": 16, "train": 1000, "test": 500},
              lambda p: list(_hybrid_runs(p)), _hybrid_render, axis="zo-layers",
              values=_hybrid_values, parse=_parse_layers, figure=_hybrid_figure, needs_layout=True),
        Study("sparsity", "ZO-Bench Table 8",
              "do sparse perturbations (a fraction of weights left unperturbed) improve ZO-SGD?",
              ("copa", "sst2"), {"steps": 100, "batch_size": 16, "train": 1000, "test": 500},
              lambda p: list(_sparsity_runs(p)), _sparsity_render, axis="sparsity %",
              values=lambda _: tuple(range(0, 100, 10)), parse=_parse_sparsity),
        Study("lozo-memory", "LOZO slides (memory of LOZO, LOZO-M, MeZO, MeZO-M, FT-LoRA, FT on OPT-13B)",
              "how much memory do LOZO and LOZO-M need against MeZO, MeZO with momentum and FO tuning?",
              ("sst2",), {"steps": 5, "batch_size": 16, "train": 1000, "test": 0},
              lambda p: list(_lozo_runs(p)), _lozo_render, axis="methods",
              values=lambda _: tuple(LOZO_VARIANTS), parse=_parse_variant),
    ]
}


def render(plan: Plan, records: list[dict] | None = None) -> str:
    """The study's markdown: what it is, the paper-shaped table(s), and every run."""
    if records is None:
        if not plan.grid.results.exists():
            raise FileNotFoundError(f"no results at {plan.grid.results}: run `zotune study {plan.study.name}` "
                                    "first, or pass --results")
        records = load_records(plan.grid.results)
    names = {r.name for r in plan.grid.runs}
    records = [r for r in records if r.get("run") in names]
    title = f"### Study `{plan.study.name}`"
    return "\n\n".join([title, plan.study.render(plan, records), _runs_section(plan, records)]) + "\n"


def figures(plan: Plan, out_dir: str | Path, records: list[dict] | None = None) -> list[Path]:
    """The study's figure (PNG and SVG) when the paper has one; [] otherwise."""
    if plan.study.figure is None:
        return []
    records = load_records(plan.grid.results) if records is None else records
    names = {r.name for r in plan.grid.runs}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return plan.study.figure(plan, [r for r in records if r.get("run") in names], out)


# ----------------------------------------------------------------------------- command line
STUDY_HELP = "\n".join(
    ["Run one study from the papers (each run in its own process, resumable), then print its table.", ""]
    + [f"  {s.name:<12} {s.source}: {s.question}" for s in STUDIES.values()]
    + ["", "Examples:", "  zotune study hybrid --dry-run", "  zotune study queries --values 1,2,4 --steps 60",
       "  zotune study block --report-only --out docs/block.md"])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", help="one of: " + ", ".join(STUDIES))
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name, folder or alias (default {DEFAULT_MODEL})")
    p.add_argument("--task", help="task, or comma-separated tasks (default: the paper's)")
    p.add_argument("--values", help="the study's swept axis, comma-separated: alignment: methods; queries: q; "
                                    "hybrid: ZO layer counts; sparsity: percentages; lozo-memory: "
                                    f"{', '.join(LOZO_VARIANTS)}")
    p.add_argument("--steps", type=int, help="training steps per run")
    p.add_argument("--batch-size", type=int, help="examples per step")
    p.add_argument("--train", type=int, help="training rows sampled per task")
    p.add_argument("--test", type=int, help="test rows per task (0: no evaluation)")
    p.add_argument("--max-length", type=int, help="tokens per example (default per task, e.g. sst2 64)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (optim.seed and train.data_seed)")
    p.add_argument("--set", action="append", default=[], metavar="section.field=value",
                   help="an override applied to every run, e.g. --set optim.lr=2e-5 (repeatable)")
    p.add_argument("--output-dir", help="run folders go here (default runs/studies/NAME)")
    p.add_argument("--results", help="results JSONL (default benchmarks/results/studies/NAME.jsonl)")
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--figures", help="folder for the figure (PNG and SVG; default OUTPUT_DIR/figures)")
    p.add_argument("--timeout", type=float, help="seconds per run")
    p.add_argument("--dry-run", action="store_true", help="print the runs without running them")
    p.add_argument("--report-only", action="store_true", help="render from existing results, run nothing")


def _split(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(x.strip() for x in text.split(",") if x.strip())


def options_from_args(args: argparse.Namespace) -> Options:
    seeds = []
    for s in _split(args.seeds) or ():
        try:
            seeds.append(int(s))
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    return Options(model=args.model, tasks=_split(args.task), steps=args.steps, batch_size=args.batch_size,
                   train=args.train, test=args.test, max_length=args.max_length, seeds=tuple(seeds),
                   values=_split(args.values), overrides=tuple(args.set), output_dir=args.output_dir,
                   results=args.results)


def main_args(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """``zotune study``: plan, then dry-run, report, or run and report. Exit 1 if a run failed."""
    if args.dry_run and args.report_only:
        raise ValueError("--dry-run and --report-only exclude each other")
    try:
        plan = plan_study(args.name, options_from_args(args))
    except ConfigError as e:
        raise ValueError(f"study {args.name}: {e}") from None
    if args.dry_run:
        log(dry_run(plan))
        return 0
    failed = []
    if not args.report_only:
        records = run_study(plan, timeout=args.timeout, log=lambda line: print(line, file=sys.stderr, flush=True))
        failed = [r["run"] for r in records if r["status"] != "ok"]
    text = render(plan)
    fig_dir = Path(args.figures) if args.figures else plan.grid.output_dir / "figures"
    for path in figures(plan, fig_dir):
        print(f"wrote {path}", file=sys.stderr)
    if args.out:
        write_text_atomic(args.out, text)
    log(text)
    if failed:
        print(f"zotune study {plan.study.name}: {len(failed)} run(s) failed: {', '.join(failed)} "
              f"(their stderr is in {plan.grid.results}; run the command again to retry them)", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["Layout", "Options", "Plan", "STUDIES", "Study", "dry_run", "figures", "get_study", "model_layout",
           "plan_study", "render", "run_study"]
