"""The ``zotune`` command line.

    zotune train RECIPE.yaml [section.field=value ...]   fine-tune, evaluate, checkpoint, resume
    torchrun --nproc_per_node 2 -m zotune.cli train RECIPE.yaml   the same, data parallel
    zotune eval RECIPE.yaml [--checkpoint DIR] [...]     zero-shot (or checkpoint) accuracy
    zotune replay RUN_DIR [--out FILE]                   rebuild tuned weights from the step log
    zotune export RUN_OR_CHECKPOINT --out DIR [--merge]  a transformers / peft folder (no zotune needed)
    zotune tasks [--show NAME]                           list tasks and their templates; print one as YAML
    zotune methods                                       list methods: estimator, rule, capabilities
    zotune tune RECIPE.yaml [--steps N] [...]           pick optim.lr by a short probe on dev rows
    zotune validate RECIPE.yaml [...]                    check a config without loading a model
    zotune bench GRID.yaml [--only a,b]                  run a grid of runs, one process each, resumable
    zotune report RESULTS.jsonl [--out docs/x.md]        markdown tables from grid results
    zotune memory --model M --method X [--seq-len N ...] predicted peak memory (ZO-Bench Table 5)
    zotune study NAME [--dry-run | --report-only] [...] a paper's ablation: runs, table, figure

Overrides (``section.field=value``) may come anywhere on the line, before or after options:
``zotune eval RECIPE.yaml --checkpoint DIR task.test=100``.

An error in what was asked for (a :class:`zotune.errors.ZotuneError`: config, recipe, checkpoint,
data; or a ``ValueError`` / ``FileNotFoundError`` that zotune raises on purpose) is one line on
stderr naming what to fix, with exit status 2; ``--debug`` (or ``ZOTUNE_DEBUG=1``) adds its
traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dis
import json
import os
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

from zotune.errors import ZotuneError

#: subcommands whose positional ``items`` are a recipe and overrides (anywhere on the line)
_WITH_CONFIG = ("train", "eval", "validate", "tune")


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """The one argument that is not ``a.b=c`` is the recipe; the rest are overrides, in order."""
    from zotune.config import ConfigError

    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif not (item.endswith((".yaml", ".yml")) or Path(item).exists()):
            raise ConfigError(f"{item!r} is neither a recipe (.yaml file) nor an override section.field=value")
        elif config is None:
            config = item
        else:
            raise ConfigError(f"unexpected argument {item!r}: one recipe at most; overrides look like section.field=value")
    return config, overrides


def _config(args):
    from zotune.config import load_config

    path, overrides = _split_args(args.items)
    return load_config(path, overrides)


def cmd_train(args) -> int:
    from zotune.train.run import run_training  # plain single-process training without torchrun

    cfg = _config(args)
    results = run_training(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({k: results.get(k) for k in ("zero_shot", "test", "tested_step", "steps")}, default=str))
    return 0


def cmd_eval(args) -> int:
    from zotune.train.checkpoint import CheckpointError, copy_weights, find_checkpoint, read_meta
    from zotune.params import without_adapters
    from zotune.train.loop import build, check_compatible, evaluate_split

    cfg = _config(args)
    if args.checkpoint and find_checkpoint(args.checkpoint) is None:  # before loading the model
        what = "is not a checkpoint (no meta.json and weights.safetensors)" if Path(args.checkpoint).is_dir() \
            else "does not exist"
        raise CheckpointError(f"--checkpoint {args.checkpoint} {what}")
    setup = build(cfg, splits=(args.split,))  # only the split evaluated is read
    if args.checkpoint:
        meta = read_meta(args.checkpoint)
        if meta.get("model_fingerprint") != setup.loaded.fingerprint:
            check_compatible(meta, cfg, setup, Path(args.checkpoint))
        copy_weights(args.checkpoint, setup.named)  # tensor by tensor: no second copy of the weights
    # no checkpoint: zero-shot, the base model without the adapters the recipe's scheme adds
    with nullcontext(setup.loaded) if args.checkpoint else without_adapters(setup.loaded) as lm:
        metrics = evaluate_split(setup, getattr(setup.data, args.split), args.split, lm=lm)
    print(json.dumps({"task": cfg.task.name, "split": args.split, "model": cfg.model.name,
                      "checkpoint": args.checkpoint, **metrics}))
    return 0


def cmd_replay(args) -> int:
    from zotune.train.loop import replay

    print(json.dumps(replay(args.run_dir, args.out)))
    return 0


def cmd_export(args) -> int:
    from zotune.export import export
    from zotune.train.logger import setup_console_logging

    setup_console_logging()
    print(json.dumps(export(args.source, args.out, merge=args.merge, from_log=args.from_log)))
    return 0


def cmd_methods(args) -> int:
    from zotune.methods import METHODS

    width = max(len(name) for name in METHODS) + 1  # the columns line up whatever the longest name
    preset = max(len(m.preset) for m in METHODS.values()) + 1
    for name, m in METHODS.items():
        parts = f"{m.estimator or 'backprop'} + {m.rule}" + (f" ({m.scheme})" if m.scheme != "central" else "")
        print(f"{name:<{width}} zotune.{m.preset:<{preset}} {parts:<40} {', '.join(m.flags())}")
        print(f"{'':<{width}} {m.description}")
    return 0


def cmd_tasks(args) -> int:
    from zotune.tasks import get_task, list_tasks

    if args.show:  # any task (a built-in, or a task file) as a task file to start from
        from zotune.tasks.task_yaml import task_to_yaml

        sys.stdout.write(task_to_yaml(get_task(args.show)))
        return 0
    for name in list_tasks():
        spec = get_task(name)
        templates = ", ".join(spec.templates)
        print(f"{name:<12} metric={spec.metric:<9} templates: {templates} (default {spec.default_template})")
    return 0


def cmd_validate(args) -> int:
    cfg = _config(args)
    print(f"config OK: method {cfg.optim.method}, task {cfg.task.name}, model {cfg.model.name}, "
          f"scheme {cfg.trainable.scheme}, {cfg.train.steps} steps -> {cfg.train.output_dir}")
    return 0


def cmd_tune(args) -> int:
    from zotune.train.tune import probe_lr

    cfg = _config(args)
    def numbers(text, option):
        try:
            return tuple(float(x) for x in text.split(","))
        except ValueError:
            raise ValueError(f"{option} takes comma-separated numbers, e.g. 0.1,1,10; got {text!r}") from None

    given = {}
    if args.factors:
        given["factors"] = numbers(args.factors, "--factors")
    if args.eps_factors:
        given["eps_factors"] = numbers(args.eps_factors, "--eps-factors")
    out = probe_lr(cfg, steps=args.steps, rows=args.rows, rule=args.rule, progress=cfg.train.progress, **given)
    print(f"{'lr':>10}  {'eps':>8}  {'dev loss':>9}  status", file=sys.stderr)
    for r in out["candidates"]:
        loss = "-" if r["dev_loss"] is None else f"{r['dev_loss']:.4f}"
        print(f"{r['lr']:>10.3g}  {r['eps']:>8.3g}  {loss:>9}  {r['status']}", file=sys.stderr)
    print(out["reason"], file=sys.stderr)
    if out["chosen_lr"] is not None:
        print(f"use: optim.lr={out['chosen_lr']:.3g} optim.eps={out['chosen_eps']:.3g}", file=sys.stderr)
        if out["caution"]:
            print(out["caution"], file=sys.stderr)
    print(json.dumps(out, allow_nan=False))
    return 0 if out["chosen_lr"] is not None else 3


def cmd_bench(args) -> int:
    from zotune.bench.grid import load_grid, run_grid

    grid = load_grid(args.grid)
    only = args.only.split(",") if args.only else None
    records = run_grid(grid, only=only, timeout=args.timeout)
    failed = [r["run"] for r in records if r["status"] != "ok"]
    print(json.dumps({"grid": grid.name, "results": str(grid.results), "ran": len(records), "failed": failed}))
    return 1 if failed else 0


def cmd_report(args) -> int:
    from zotune.bench.report import report, write_text_atomic

    text = report(args.results)
    if args.figures:
        from zotune.bench.report import figures, load_records

        for path in figures(load_records(args.results), args.figures):
            print(f"wrote {path}", file=sys.stderr)
    if args.out:
        write_text_atomic(args.out, text)
    print(text)
    return 0


def cmd_memory(args) -> int:
    from zotune.bench.memory_model import main as memory_main

    return memory_main(args.rest)


def cmd_study(args) -> int:
    from zotune.bench.studies import main_args

    return main_args(args)


def _debug_option(parser: argparse.ArgumentParser, default) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="print the traceback of every error, also of a config or file error "
                             "(or set ZOTUNE_DEBUG=1)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zotune", description="Zeroth-order fine-tuning of language models.")
    _debug_option(p, False)
    sub = p.add_subparsers(dest="command", required=True)
    # --debug after the subcommand too (SUPPRESS: it does not undo one given before the subcommand)
    debug = _debug_option(argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)

    def command(name, **kw):
        return sub.add_parser(name, parents=[debug], **kw)

    def with_config(name, help_text, fn):
        sp = command(name, help=help_text)
        sp.add_argument("items", nargs="*", metavar="RECIPE|section.field=value",
                        help="a YAML recipe (optional) and overrides such as optim.lr=1e-5, "
                             "anywhere on the line (also after options)")
        sp.set_defaults(fn=fn)
        return sp

    with_config("train", "fine-tune a model on a task", cmd_train)
    ev = with_config("eval", "evaluate a model (zero-shot, or a checkpoint) on a task", cmd_eval)
    ev.add_argument("--checkpoint", help="a checkpoint folder (e.g. runs/x/ckpt-best)")
    ev.add_argument("--split", choices=("test", "dev", "train"), default="test")
    rp = command("replay", help="rebuild a ZO run's weights from its step log and the base model")
    rp.add_argument("run_dir")
    rp.add_argument("--out", help="write the rebuilt trainable tensors here (safetensors)")
    rp.set_defaults(fn=cmd_replay)
    ex = command("export", help="write a run's tuned model as a transformers (full, merged LoRA) or peft "
                 "(adapters) folder, safetensors only")
    ex.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                    help="a run folder (its tested checkpoint: best dev, else last) or a checkpoint folder in it")
    ex.add_argument("--out", required=True, help="a new (or empty) folder to write")
    ex.add_argument("--merge", action="store_true", help="LoRA: fold the adapters into the weights (a plain model)")
    ex.add_argument("--from-log", action="store_true",
                    help="rebuild the weights from the run's steps.jsonl (replay) instead of a checkpoint")
    ex.set_defaults(fn=cmd_export)
    tk = command("tasks", help="list tasks and templates, or print one as a task file (--show)")
    tk.add_argument("--show", metavar="NAME", help="print task NAME (a built-in or a task file) in the task-file "
                    "YAML format (docs/tasks.md), to copy and edit")
    tk.set_defaults(fn=cmd_tasks)
    from zotune.methods import METHODS

    command("methods", help=f"list the methods optim.method names ({', '.join(METHODS)}): their parts "
            "and capabilities").set_defaults(fn=cmd_methods)
    with_config("validate", "check a config without loading a model", cmd_validate)
    tn = with_config("tune", "a short probe on dev rows that picks optim.lr for this model, task and method", cmd_tune)
    tn.add_argument("--steps", type=int, default=20, help="steps per candidate (default 20)")
    tn.add_argument("--rows", type=int, default=64, help="dev rows the probe scores (default 64)")
    tn.add_argument("--factors", help="comma-separated multiples of optim.lr to try (default 0.1,0.3,1,3,10)")
    tn.add_argument("--eps-factors", help="comma-separated multiples of optim.eps to try with each lr "
                                          "(default 1: eps as set; e.g. 0.1,1,10 tries 3 eps per lr)")
    tn.add_argument("--rule", choices=("one-se", "min"), default="one-se",
                    help="one-se (default): the smallest lr within one standard error of the lowest dev loss; "
                         "min: the lowest dev loss")
    bp = command("bench", help="run a grid of training runs (one process each, resumable)")
    bp.add_argument("grid", help="a grid YAML file")
    bp.add_argument("--only", help="comma-separated run names")
    bp.add_argument("--timeout", type=float, help="seconds per run")
    bp.set_defaults(fn=cmd_bench)
    rep = command("report", help="markdown tables from a grid's results JSONL")
    rep.add_argument("results")
    rep.add_argument("--out", help="also write the markdown here")
    rep.add_argument("--figures", help="write loss curves and accuracy against forward passes (PNG, SVG) here")
    rep.set_defaults(fn=cmd_report)
    mem = command("memory", add_help=False,
                  help="predict peak memory without loading weights (ZO-Bench Table 5); --help for options")
    mem.add_argument("rest", nargs=argparse.REMAINDER)
    mem.set_defaults(fn=cmd_memory)
    from zotune.bench.studies import STUDY_HELP, add_arguments

    st = command("study", help="a study from the papers (alignment, queries, block, hybrid, sparsity, "
                 "lozo-memory): its runs, then its table", description=STUDY_HELP,
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(st)
    st.set_defaults(fn=cmd_study)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; a recipe or an override after an option joins the command's ``items``."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in _WITH_CONFIG:
        # argparse fills a nargs="*" positional from one run of positionals only: collect the
        # runs that follow an option (`eval R.yaml --checkpoint D task.test=8`) in their order
        args.items = list(args.items) + [a for a in extra if not a.startswith("-")]
        extra = [a for a in extra if a.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _raised_on_purpose(e: BaseException) -> bool:
    """``e`` was raised by a ``raise`` statement in zotune's own code (not by Python or a library
    inside it, as an unpacking ``ValueError`` or ``open``'s ``FileNotFoundError`` would be)."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    if not Path(code.co_filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        return False
    return any(i.offset == tb.tb_lasti and i.opname == "RAISE_VARARGS" for i in dis.get_instructions(code))


def user_error(e: BaseException) -> bool:
    """An error in what the user asked for (one line), rather than a bug (a traceback).

    zotune's own error types (:class:`~zotune.errors.ZotuneError`), and the ``ValueError`` /
    ``FileNotFoundError`` that zotune code raises to name a bad value or a missing file
    (the style for argument checks). Python's and libraries' errors are bugs here.
    """
    from zotune.step import NonFiniteLossError  # derives from RuntimeError only (step.py)

    if isinstance(e, (ZotuneError, NonFiniteLossError)):
        return True
    return isinstance(e, (ValueError, FileNotFoundError)) and _raised_on_purpose(e)


def _debug_env() -> bool:
    return os.environ.get("ZOTUNE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = _debug_env()
    if argv[:1] == ["memory"]:  # its own option parser (zotune.bench.memory_model.main)
        debug = debug or "--debug" in argv
        args = argparse.Namespace(fn=cmd_memory, rest=[a for a in argv[1:] if a != "--debug"])
    else:
        args = parse_args(argv)
        debug = debug or args.debug
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("zotune: interrupted; the last checkpoint is intact (resume with the same command)", file=sys.stderr)
        return 130
    except Exception as e:
        if not user_error(e):
            raise  # a bug: its traceback is what finds it
        if debug:
            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"zotune: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
