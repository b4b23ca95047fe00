"""The training recipe: read it top to bottom.

setup (data, model, trainable tensors, optimizer, resume) -> zero-shot test -> loop of steps
(dev evaluation, best / last checkpoints, step log) -> final test -> ``results.json``.

The batch of step ``t`` is a pure function of (data seed, t), the optimizer's directions of
(optim seed, t), and the checkpoint holds the trainable tensors, the optimizer state and the lr
schedule's state, so a run resumed after ``kill -9`` ends with exactly the weights of an
uninterrupted run. Data parallel, every rank resumes from the same step or none starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune._validate import unknown_choice
from zotune.bench.record import machine_meta
from zotune.config import Config
from zotune.distributed import DistContext, DistributedError, scalar_reduce
from zotune.fo import FOSGD, HybridOptimizer
from zotune.methods import METHODS, build_optimizer
from zotune.params import without_adapters
from zotune.rng import STREAM_ADAPTER_INIT, derive_seed
from zotune.schedules import make_schedule
from zotune.step import ZOOptimizer
from zotune.train.averaging import IterateAverage
from zotune.train.checkpoint import CheckpointError, copy_weights, find_checkpoint, load_checkpoint, save_checkpoint
from zotune.train.evaluate import check_truncation, evaluate_configured, headline
from zotune.train.logger import RunLogger, log, setup_console_logging, to_json
from zotune.train.head_cache import HeadCache, HeadCacheError
from zotune.train.layer_cache import LayerCache
from zotune.train.objective import make_closure, resolve_objective

LAST, BEST = "ckpt-last", "ckpt-best"
SPLITS = ("train", "dev", "test")


@dataclass
class Setup:
    """Everything a run builds before its first step."""

    cfg: Config
    data: object  # zotune.tasks.TaskData
    loaded: object  # zotune.models.LoadedModel: the model as it trains (adapters included), its kind
    model: torch.nn.Module  # loaded.model
    named: dict
    optimizer: object
    masks: dict | None = None  # name -> the entries a ZO method perturbs (trainable.prefix_values_only)


# ----------------------------------------------------------------------------- setup
def load_data(cfg: Config, splits=SPLITS):
    """The task's data, with only ``splits`` (a subset of train, dev, test) filled in.

    Each split asked for holds the rows a training run's would (when the files hold the rows
    asked for): a split's rows depend on those carved before it from the training file (test,
    then dev, then train; test comes from ``task.eval_file`` instead when there is one), so
    those keep their sizes and the later ones are left empty. The test split alone with an
    eval file reads that file alone.
    """
    from zotune.tasks import SplitSpec, load_task

    wanted = set(splits)
    for name in sorted(wanted - set(SPLITS)):
        raise ValueError(unknown_choice("split", name, SPLITS))
    t = cfg.task
    carve = ("dev", "train") if t.eval_file is not None else ("test", "dev", "train")
    last = max((carve.index(name) for name in wanted if name in carve), default=-1)
    sizes = {name: getattr(t, name) if name in carve[:last + 1] else 0 for name in SPLITS}
    train_file, eval_file = t.train_file, t.eval_file
    if eval_file is not None:
        if "test" not in wanted:
            eval_file = None  # test == 0: dev and train are carved as with the eval file
        else:
            sizes["test"] = t.test
            if last < 0:
                # test alone: load_task takes it as the first rows of the eval file shuffled with
                # split_seed, which is what carving test alone from the eval file's rows gives
                train_file, eval_file = eval_file, None
    split = SplitSpec(train=sizes["train"], dev=sizes["dev"], test=sizes["test"], seed=t.split_seed)
    return load_task(t.name, data_root=t.data_root, split=split, template=t.template,
                     train_file=train_file, eval_file=eval_file, hub=t.hub)


def scheme_options(cfg: Config) -> dict:
    tr = cfg.trainable
    return {
        "full": {},
        "norms": {},
        "final_norm": {},
        "top_layers": {"layers": 1 if tr.top_layers is None else tr.top_layers},
        "lora": {"r": tr.lora_r, "lora_alpha": tr.lora_alpha,
                 **({} if tr.top_layers is None else {"top_layers": tr.top_layers})},
        "prefix": {"num_virtual_tokens": tr.prefix_tokens},
        # rows of the vocabulary's embeddings, as Lester et al. (2021) initialise prompts: peft's
        # default N(0, 1) vectors are about 8x the size of SmolLM2's token embeddings, so eps and lr sized
        # for real embeddings would not move them (as the prefix starts from real activations);
        # trainable.prompt_init_text replaces the sampled rows with a text's
        "prompt": {"num_virtual_tokens": tr.prompt_tokens, "prompt_tuning_init": "SAMPLE_VOCAB",
                   **({} if tr.prompt_init_text is None else {"prompt_init_text": tr.prompt_init_text})},
    }[tr.scheme]


def _starting_point_note(cfg: Config) -> str:
    """Where lr / eps come from when they are the method's starting point for the scheme."""
    from zotune.defaults import starting_point

    try:
        start = starting_point(cfg.optim.method, cfg.trainable.scheme)
    except ValueError:
        return ""
    if (cfg.optim.lr, cfg.optim.eps) != (start.lr, start.eps):
        return ""
    return f" (the starting point for {cfg.optim.method} on {cfg.trainable.scheme}: {start.evidence})"


def adapter_init_seed(cfg: Config) -> int:
    """The seed of a run's adapter init: derived from ``optim.seed`` (already part of what a
    resume checks), on a stream of its own."""
    return derive_seed(cfg.optim.seed, STREAM_ADAPTER_INIT)


def load_base(m, device: str | None = None):
    """The recipe's model (``m``: its ``model`` section) as a LoadedModel, before any adapter:
    ``tiny-*`` names are the random test models, anything else goes to :func:`zotune.models.load_model`.
    ``device`` overrides ``m.device`` (export loads on the CPU)."""
    from zotune.models import load_model, resolve_device, resolve_dtype

    device = m.device if device is None else device
    if m.name.startswith("tiny-"):  # random tiny models for tests and smoke runs
        from zotune.testing import tiny_model

        loaded = tiny_model(m.name[len("tiny-"):])
        loaded.model.to(device=resolve_device(device), dtype=resolve_dtype(m.dtype))
        return loaded
    return load_model(m.name, dtype=m.dtype, device=device, gguf_file=m.gguf_file)


def build(cfg: Config, loaded=None, data=None, reduce=None, splits=SPLITS, selected=None) -> Setup:
    """Load data first (bad data fails before the slow model load), then model and optimizer.

    ``splits``: the data splits to load (see :func:`load_data`; an evaluation needs one).
    ``selected``: the ``(loaded, named)`` an earlier :func:`build` of the same model and
    ``trainable`` section chose (its ``Setup.loaded`` and ``Setup.named``), kept instead of choosing
    again: runs that differ only in their optimizer share one model, adapters included."""
    from zotune.params import hybrid_split, prefix_value_masks, select_trainable

    data = data if data is not None else load_data(cfg, splits)
    if selected is not None:
        loaded = selected[0]
    elif loaded is None:
        loaded = load_base(cfg.model)
    if cfg.model.device_map is not None:
        from zotune.models import spread_over_devices

        placed = spread_over_devices(loaded.model, cfg.model.device_map)
        log.info("model spread over devices: %s", sorted({str(v) for v in placed.values()}))
    if METHODS[cfg.optim.method].estimator == "forward" and hasattr(loaded.model, "set_attn_implementation"):
        # torch's fused CPU attention kernels have no forward-mode AD rule
        loaded.model.set_attn_implementation("eager")
    if selected is None:
        loaded, named = select_trainable(loaded, cfg.trainable.scheme, init_seed=adapter_init_seed(cfg),
                                         prefix_init="activations", **scheme_options(cfg))
    else:
        named = selected[1]
    model = loaded.model
    o = cfg.optim
    masks = prefix_value_masks(loaded, named) if cfg.trainable.prefix_values_only else None
    if masks:
        kept = sum(int(m.sum()) for m in masks.values())
        log.info("perturbing the prefix's values only: %d of its %d entries", kept, sum(m.numel() for m in masks.values()))
    if cfg.trainable.zo_layers is not None:
        zo_named, fo_named = hybrid_split(model, named, cfg.trainable.zo_layers)
        zo = build_optimizer(o, zo_named, model, reduce)
        fo = FOSGD(list(fo_named.values()), lr=o.fo_lr or o.lr)
        optimizer = HybridOptimizer(zo, fo) if zo_named else fo
    else:
        streamed = cfg.model.offload != "none"
        optimizer = build_optimizer(o, named, model, reduce, streamed=streamed, masks=masks)
        if streamed:
            from zotune.streamed import StreamedWeights

            where = Path(cfg.model.offload_dir or Path(cfg.train.output_dir) / "offload")
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank streams its own copy
                where = where / f"rank{int(os.environ.get('RANK', '0'))}"
            where = str(where)
            storage = "host" if cfg.model.offload == "host" else "mmap"
            StreamedWeights(model, optimizer, storage=storage, directory=where)
            log.info("streamed weights: %d trained tensors kept in %s", len(named),
                     where if storage == "mmap" else "host memory")
    return Setup(cfg, data, loaded, model, named, optimizer, masks)


# ----------------------------------------------------------------------------- data order
class BatchOrder:
    """Step ``t``'s examples: positions ``t*B .. t*B+B-1`` of an endless sequence of seeded
    permutations (one per epoch). Independent of resumes and of the number of workers."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        if n == 0:
            raise ValueError("the training split is empty: raise task.train or check the data file")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, self.n)
            out.append(self._perm(epoch)[pos])
        return out


# ----------------------------------------------------------------------------- helpers
def _rss_bytes() -> int | None:
    """Current resident set size (Linux), None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _page_in(model) -> None:
    """Touch every page of the weights: checkpoints are memory-mapped and paged in lazily, at
    the first forward, which would otherwise count the model itself as a cost of training."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            if t.device.type == "cpu" and t.numel():
                step = max(1, 4096 // t.element_size())
                t.detach().reshape(-1)[::step].sum()


def _reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS counter (VmHWM) afresh (Linux >= 4.0), so that the peak
    measured later leaves out the load's transient; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_since_reset() -> int | None:
    """VmHWM in bytes (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_json(data, indent=2, default=str))
    os.replace(tmp, path)


def _meta(cfg: Config, setup: Setup, step: int, extra: dict | None = None) -> dict:
    return {  # save_checkpoint writes it as strict JSON (a non-finite dev score becomes null)
        "step": step,
        "config_fingerprint": cfg.fingerprint(),
        "model": setup.loaded.name,
        "model_fingerprint": setup.loaded.fingerprint,
        "method": cfg.optim.method,
        "scheme": cfg.trainable.scheme,
        **(extra or {}),
    }


def check_compatible(meta: dict, cfg: Config, setup: Setup, where: Path) -> None:
    """Refuse a checkpoint written by another model or another trajectory-defining config."""
    if meta.get("model_fingerprint") != setup.loaded.fingerprint:
        raise CheckpointError(
            f"{where} was written for model {meta.get('model')!r} {meta.get('model_fingerprint')}, "
            f"not {setup.loaded.name!r} {setup.loaded.fingerprint}; use another train.output_dir "
            "or train.resume=false (the old checkpoint is left untouched)"
        )
    if meta.get("config_fingerprint") != cfg.fingerprint():
        raise CheckpointError(
            f"{where} was written with a different config (fingerprint {meta.get('config_fingerprint')} "
            f"vs {cfg.fingerprint()}: model, task, optim, trainable, batch size or data seed changed); "
            "use another train.output_dir or train.resume=false (the old checkpoint is left untouched)"
        )


def agree_on_start(world: DistContext, start: int, out: Path) -> None:
    """Refuse to start unless every rank found the same step to resume from.

    Only rank 0 saves, so on several machines without a shared file system the other nodes
    find no checkpoint: they would start at step 0 while rank 0 continues at step k, each
    training on another trajectory. Raised on every rank (they all see the same steps)."""
    steps = world.all_gather_int(start, "the all-gather of the step each rank resumes from")
    if len(set(steps)) > 1:
        found = ", ".join(f"rank {r}: " + (f"step {k}" if k else "no checkpoint (step 0)") for r, k in enumerate(steps))
        raise DistributedError(
            f"rank {world.rank} of {world.world_size}: the ranks found different checkpoints in "
            f"train.output_dir={str(out)!r} ({found}), so they would train different trajectories; "
            "nothing was changed. Only rank 0 saves: put train.output_dir on a file system every node "
            f"shares, or copy rank 0's {out / LAST} to the same path on every node, then run the same "
            "command again (or start afresh on every node with another output_dir).",
            rank=world.rank, step=None,
        )


@contextmanager
def averaged(average: IterateAverage | None):
    """The iterate average in the weights' place for the block (nothing without one)."""
    if average is None:
        yield
    else:
        with average.swapped():
            yield


def _run_state(opt, average: IterateAverage | None) -> dict:
    """What a resume needs besides the weights: the optimizer's state, and the average's when there is one."""
    return opt.state_dict() if average is None else {"optimizer": opt.state_dict(), "average": average.state_dict()}


def _split_state(saved: dict | None, average: IterateAverage | None, where: Path) -> tuple[dict | None, dict | None]:
    """The inverse of :func:`_run_state` (the config fingerprint says whether the run averages)."""
    if average is None:
        return saved, None
    if not isinstance(saved, dict) or "average" not in saved or "optimizer" not in saved:
        raise CheckpointError(f"{where} has no iterate average although its config has train.average_decay "
                              "(a damaged checkpoint?)")
    return saved["optimizer"], saved["average"]


def _settle(opt) -> None:
    """Apply a deferred update (streamed weights) before the weights are read."""
    flush = getattr(opt, "flush", None)
    if flush is not None:
        flush()


class ModelLosses:
    """Where a run's losses come from by default: a forward pass of the model per loss (the
    other sources are :class:`~zotune.train.head_cache.HeadCache` and
    :class:`~zotune.train.layer_cache.LayerCache`, with the same two methods)."""

    def __init__(self, setup: Setup, lm, device, objective: str, world: DistContext) -> None:
        self.setup, self.lm, self.device, self.objective, self.world = setup, lm, device, objective, world

    def closure(self, indices):
        """The closure the optimizer calls for training rows ``indices`` (this rank's share of them)."""
        world, train_rows = self.world, self.setup.data.train
        batch = [train_rows[i] for i in indices[world.rank::world.world_size]]
        return make_closure(self.lm, batch, self.setup.cfg, self.device, self.objective, world)

    def evaluate(self, split: str, examples, metric: str) -> dict:
        return evaluate_split(self.setup, examples, split)


def build_head_cache(setup: Setup, objective: str, world: DistContext | None = None, progress: bool = False,
                     device="cpu") -> HeadCache | LayerCache:
    """``train.head_cache``: what the frozen trunk gives the trained top (the final norm's inputs, or
    the first trained layer's) for the train and dev rows, from one pass of the trunk."""
    if world is not None and world.world_size > 1:
        raise HeadCacheError("train.head_cache runs on one process (a step costs about a millisecond; "
                             "there is nothing to split across ranks)")
    if objective != "classification":
        raise HeadCacheError(f"train.head_cache scores candidates; this task trains with the {objective!r} objective")
    cfg = setup.cfg
    if cfg.trainable.scheme == "final_norm":
        cache = HeadCache(setup.loaded, list(setup.named.values()), cfg.task.max_length)
    else:
        cache = LayerCache(setup.loaded, setup.named, cfg, device, objective, setup.data.spec.metric)
    # in training batches, so its forward passes count as a run's others do
    cache.add("train", setup.data.train, cfg.train.batch_size, progress)
    if setup.data.dev and cfg.train.eval_every:
        cache.add("dev", setup.data.dev, cfg.train.batch_size, progress)
    return cache


def evaluate_split(setup: Setup, examples, split: str = "evaluation", lm=None) -> dict:
    """Evaluate ``examples`` as the recipe says (batch size, length, scoring), naming ``split`` in warnings."""
    return evaluate_split_rows(setup, examples, split, lm)[0]


def evaluate_split_rows(setup: Setup, examples, split: str = "evaluation", lm=None) -> tuple[dict, list[float]]:
    """:func:`evaluate_split` and each row's score (for paired tests); ``lm``: another view of
    the model (the base model without its adapters) instead of the model as it trains."""
    _settle(setup.optimizer)
    return evaluate_configured(lm or setup.loaded, setup.cfg, examples, setup.data.spec.metric,
                               f"{setup.data.spec.name} {split}")


TEST_ROWS = "test_rows.json"


def _save_test_rows(out: Path, key: str, scores: list[float]) -> None:
    """Keep each test row's score under ``key`` ("zero_shot", "tuned") in ``out/test_rows.json``,
    so zero-shot and tuned models can be compared row by row (a resumed run keeps its zero-shot)."""
    path = out / TEST_ROWS
    rows = json.loads(path.read_text()) if path.exists() else {}
    rows[key] = scores
    _write_json_atomic(path, rows)


# ----------------------------------------------------------------------------- the run
step_clock = time.perf_counter  # times each step (a test replaces it with a clock of its own)


class TimeBudget:
    """``train.max_seconds``: training seconds spent so far (earlier sessions' from the checkpoint).

    Only the steps' own time counts (what the convergence benchmark's seconds axis counts), so
    runs with different evaluation schedules get the same budget. With several ranks, rank 0's
    clock decides, so all ranks stop after the same step.
    """

    def __init__(self, max_seconds: float, trained: float = 0.0, world: DistContext | None = None) -> None:
        self.max_seconds, self.trained, self.world = float(max_seconds), float(trained), world

    def spent(self) -> bool:
        return self.max_seconds > 0 and self.trained >= self.max_seconds

    def add(self, seconds: float) -> bool:
        """Count one step's ``seconds``; True once the budget is spent."""
        self.trained += seconds
        if self.max_seconds <= 0:
            return False
        if self.world is not None and self.world.world_size > 1:  # every rank takes rank 0's count (ms)
            ms = self.world.all_gather_int(round(self.trained * 1000), "the all-gather of the time budget")[0]
            self.trained = ms / 1000
        return self.spent()


def train(cfg: Config, *, world: DistContext | None = None, setup: Setup | None = None,
          train_model=None, head_cache: HeadCache | None = None) -> dict:
    """Run ``cfg`` to the end (or resume it) and return the results dict.

    Data parallel (``world``: see :mod:`zotune.distributed`; None: one process): every rank
    builds the same model and optimizer, takes its slice ``indices[rank::world_size]`` of each
    global batch, and the optimizer's ``reduce`` averages the projected-gradient scalars, so all
    ranks apply the same update; rank 0 alone evaluates, logs and saves. ``train_model`` is the
    module the closure runs (a DDP wrapper for first-order methods); by default the model itself.
    ``head_cache``: a :class:`~zotune.train.head_cache.HeadCache` of this setup's rows, built
    before (a sweep over runs of one model and data); None: ``train.head_cache`` builds one.
    """
    world = world if world is not None else DistContext()
    world_size, is_main = world.world_size, world.is_main
    setup_console_logging(logging.INFO if is_main else logging.WARNING)  # rank 0 alone narrates
    t = cfg.train
    out = Path(t.output_dir)
    if t.batch_size % world_size:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by the number of ranks ({world_size})")
    setup = setup or build(cfg, reduce=scalar_reduce(world) if world.backend is not None else None)
    _page_in(setup.model)
    peak_resettable = _reset_peak_rss()
    rss_after_load = _rss_bytes()
    model, opt = setup.model, setup.optimizer
    # the model the closure runs (a DDP wrapper for first-order methods), with the kind decided at load
    forward_lm = setup.loaded if train_model is None else setup.loaded.with_module(train_model)
    device = next(model.parameters()).device
    logger = RunLogger(out, tensorboard=t.tensorboard, enabled=is_main)
    trainable = setup.named
    # the lr of step k is base * multiplier(k); made before any resume, from the configured lrs
    schedule = make_schedule(opt, cfg.optim.schedule, t.steps, cfg.optim.warmup_steps,
                             total_seconds=t.max_seconds if cfg.optim.schedule_over == "seconds" else 0.0)
    average = IterateAverage(trainable, t.average_decay) if t.average_decay else None

    start, results, trained_before = 0, {}, 0.0
    found = find_checkpoint(out / LAST) if t.resume else None
    if found is not None:
        tensors, opt_state, meta = load_checkpoint(found, map_location=device)
        check_compatible(meta, cfg, setup, found)
        start = int(meta["step"])
        opt_state, average_state = _split_state(opt_state, average, found)
    agree_on_start(world, start, out)
    if found is not None:
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(tensors[name])
        opt.load_state_dict(opt_state)  # restores the groups' lr as it was scheduled: the schedule resets it
        if average is not None:
            average.load_state_dict(average_state)
        schedule.load_state_dict(meta.get("schedule") or {"base_lrs": schedule.base_lrs, "step": start})
        if schedule.last_step != start:
            raise CheckpointError(f"{found}: the lr schedule is at step {schedule.last_step}, the checkpoint "
                                  f"at step {start} (a damaged checkpoint?)")
        results = meta.get("results", {})
        trained_before = float(meta.get("train_seconds", 0.0))
        logger.truncate_after(start)
        log.info("resumed from %s at step %d", found, start)
    elif is_main:
        if not t.resume and ((out / LAST).exists() or (out / "steps.jsonl").exists()):
            raise CheckpointError(f"{out} already holds a run: pass train.resume=true or use another output_dir")
        # resume=true but no checkpoint yet (killed before the first save): start again from scratch
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / "config.json", cfg.to_dict())
        for f in ("metrics.jsonl", "steps.jsonl"):
            (out / f).unlink(missing_ok=True)

    sizes = setup.data.sizes
    log.info("task %s (%s template): %s; method %s, scheme %s, %d trainable tensors (%.1f M values)",
             cfg.task.name, setup.data.template, sizes, cfg.optim.method, cfg.trainable.scheme,
             len(trainable), sum(p.numel() for p in trainable.values()) / 1e6)
    if is_main and setup.data.train:  # training rows cut from the left are said once, as evaluation says its own
        cut = check_truncation(setup.loaded.tokenizer, setup.data.train, cfg.task.max_length,
                               name=f"{setup.data.spec.name} train", kind=setup.loaded.kind)
        results["train_truncation"] = cut.metrics()

    if start == 0 and t.eval_at_start and setup.data.test and is_main:
        t0 = time.time()
        with without_adapters(setup.loaded) as base:  # zero-shot: the base model, whatever the scheme adds
            zs, zs_rows = evaluate_split_rows(setup, setup.data.test, "test", lm=base)
        _save_test_rows(out, "zero_shot", zs_rows)
        results["zero_shot"] = zs
        log.info("zero-shot test: %s (%.0f s)", zs, time.time() - t0)
        logger.metrics(0, phase="zero-shot", **{f"test/{k}": v for k, v in zs.items()})

    order = BatchOrder(len(setup.data.train), t.batch_size, t.data_seed)
    objective = resolve_objective(cfg, setup.data.train)
    log.info("training objective: %s", objective)
    budget = TimeBudget(t.max_seconds, trained_before, world)
    if t.head_cache:
        cache = head_cache or build_head_cache(setup, objective, world, is_main and t.progress, device)
        budget.add(cache.seconds)  # the trunk's pass is training time, spent again by a resumed run
        results["head_cache"] = {"seconds": round(cache.seconds, 1), "trunk_forward_passes": cache.forward_passes,
                                 "rows": cache.rows}
        losses = cache
    elif head_cache is not None:
        raise HeadCacheError("a head cache was given to a run whose config has train.head_cache: false")
    else:
        losses = ModelLosses(setup, forward_lm, device, objective, world)
    log.info("optim: %s, lr %g, eps %g%s", cfg.optim.method, cfg.optim.lr, cfg.optim.eps,
             _starting_point_note(cfg))
    if average is not None:
        log.info("evaluating an average of the trained tensors (train.average_decay=%g: ~%.0f steps' window)",
                 t.average_decay, 1 / (1 - t.average_decay))
    best = results.get("best_dev") or {"value": None, "step": None}  # value None: no dev evaluation yet
    if best["value"] is not None and not math.isfinite(best["value"]):  # -inf, written by older versions
        best = {**best, "value": None}
    progress = None
    if is_main and t.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.steps, initial=start, desc="train", dynamic_ncols=True)
    run_t0, step_times = time.time(), []
    end = start  # the last step done
    for step in range(start, t.steps):
        if budget.spent():  # a run resumed after its budget was spent trains no further
            break
        world.step = step  # named in the errors of failed collectives
        lr = opt.param_groups[0]["lr"]
        closure = losses.closure(order.indices(step))
        t0 = step_clock()
        loss = float(opt.step(closure))
        if average is not None:
            average.update()
        step_times.append(step_clock() - t0)
        done = end = step + 1
        out_of_time = budget.add(step_times[-1])
        schedule.step(seconds=budget.trained)
        last = done == t.steps or out_of_time
        record = getattr(opt, "last_record", None)
        if record is not None and isinstance(opt, ZOOptimizer):
            logger.step_record(record)
        if done % t.log_every == 0 or last:
            recent = step_times[-t.log_every:]
            logger.metrics(done, loss=loss, lr=lr, step_time=sum(recent) / len(recent),
                           forward_passes=getattr(opt, "forward_passes", None))
        if progress is not None:
            progress.set_postfix(loss=f"{loss:.4f}", fwd=getattr(opt, "forward_passes", "-"),
                                 s_step=f"{step_times[-1]:.2f}")
            progress.update(1)
        # a run cut short by its budget is evaluated where it stops, so its last steps count
        if t.eval_every and (done % t.eval_every == 0 or out_of_time) and setup.data.dev and is_main:
            with averaged(average):  # the best checkpoint holds what was evaluated
                dev = losses.evaluate("dev", setup.data.dev, setup.data.spec.metric)
                key, value = headline(dev)
                logger.metrics(done, phase="dev", **{f"dev/{k}": v for k, v in dev.items()})
                log.info("step %d dev %s", done, dev)
                if best["value"] is None or value > best["value"]:
                    best = {"value": value, "step": done, "metric": key}
                    _settle(opt)
                    save_checkpoint(out / BEST, trainable, None, _meta(cfg, setup, done, {"dev": dev}))
        if is_main and (done % t.save_every == 0 or last):
            _settle(opt)
            results["best_dev"] = best
            save_checkpoint(out / LAST, trainable, _run_state(opt, average),
                            _meta(cfg, setup, done, {"results": results, "schedule": schedule.state_dict(),
                                                     "train_seconds": budget.trained}))
        if out_of_time:
            log.info("time budget spent: %.0f training seconds (train.max_seconds=%g) after step %d of %d",
                     budget.trained, t.max_seconds, done, t.steps)
            break
    if progress is not None:
        progress.close()

    _settle(opt)
    # training's own peak (dev evaluations included), before the test phase below
    peak_train = _peak_rss_since_reset() if peak_resettable else None
    if average is not None:  # the last checkpoint keeps the weights themselves; the test reads the average
        average.apply()
    if best["step"] is not None and best["step"] != end:
        copy_weights(out / BEST, trainable)  # tensor by tensor: no second copy of the weights
        log.info("testing the best dev checkpoint (step %d)", best["step"])
    final = {}
    if setup.data.test and is_main:
        final, final_rows = evaluate_split_rows(setup, setup.data.test, "test")
        _save_test_rows(out, "tuned", final_rows)
    streamer = getattr(getattr(opt, "deferred", None), "streamer", None)  # StreamedWeights (model.offload)
    if streamer is not None:  # scratch space: the checkpoint holds the weights
        streamer.remove_files()
    results.update({
        "test": final,
        "tested_step": best["step"] or end,
        "best_dev": best,
        "steps": end,
        "steps_configured": t.steps,
        "stopped_by_time_budget": end < t.steps and budget.spent(),
        "train_seconds": round(budget.trained, 1),
        "start_step": start,
        "train_seconds_this_session": round(time.time() - run_t0, 1),
        "mean_step_seconds": round(sum(step_times) / len(step_times), 4) if step_times else None,
        "forward_passes": getattr(opt, "forward_passes", None),
        "sizes": sizes,
        # CPU memory: the process's peak resident set after the model was loaded (the counter
        # is reset then, so the load's transient is left out), the same up to the end of
        # training (before the test phase), what it held once loaded (the difference is the
        # cost of training itself), and the peak including the load;
        # CUDA: the allocator's peak
        "peak_rss_bytes": (_peak_rss_since_reset() if peak_resettable else None)
        or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_train_bytes": peak_train,
        "peak_rss_with_load_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_load_bytes": rss_after_load,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "task": cfg.task.name,
        "method": cfg.optim.method,
        "scheme": cfg.trainable.scheme,
        "model": setup.loaded.name,
        # step seconds compare only on the same CPU and software (transformers is not pinned)
        "machine": machine_meta(),
    })
    if is_main:
        _write_json_atomic(out / "results.json", results)
        logger.metrics(end, phase="test", **{f"test/{k}": v for k, v in final.items()})
        zs = results.get("zero_shot", {})
        log.info("test %s (zero-shot %s)", final, zs)
    logger.close()
    return results


# ----------------------------------------------------------------------------- replay
def _nan_for_null(record: dict) -> dict:
    """A step record as the optimizer wrote it: the log writes its non-finite numbers (the
    coefficients and loss of a skipped step) as null."""
    nan = float("nan")
    out = dict(record)
    for key in ("coeffs", "aux"):
        if key in out:
            out[key] = [nan if x is None else x for x in out[key]]
    if "loss" in out and out["loss"] is None:
        out["loss"] = nan
    return out


def replay(run_dir: str | Path, out_path: str | Path | None = None) -> dict:
    """Rebuild a ZO run's tuned weights from its base model and ``steps.jsonl`` alone.

    Compares them with the run's last checkpoint when there is one; writes them to ``out_path``
    (safetensors of the trainable tensors) when given.
    """
    from safetensors.torch import save_file

    from zotune.config import from_dict

    setup_console_logging()
    run = Path(run_dir)
    if not (run / "config.json").is_file() or not (run / "steps.jsonl").is_file():
        raise FileNotFoundError(f"{run} is not a zotune run folder (needs config.json and steps.jsonl)")
    cfg = from_dict(json.loads((run / "config.json").read_text()))
    setup = build(cfg)
    opt = setup.optimizer
    if not isinstance(opt, ZOOptimizer):
        raise ValueError(f"replay needs a pure ZO run; {cfg.optim.method} with this scheme keeps no step log")
    records = [_nan_for_null(json.loads(line)) for line in (run / "steps.jsonl").read_text().splitlines()
               if line.strip()]
    for k, rec in enumerate(records):
        if rec["step"] != k:
            raise ValueError(f"{run / 'steps.jsonl'} line {k + 1}: step {rec['step']}, expected {k}")
        opt.replay(rec)
    report = {"steps": len(records)}
    found = find_checkpoint(run / LAST)
    if found is not None:
        tensors, _, meta = load_checkpoint(found)
        if int(meta["step"]) == len(records):
            diffs = [float((p.detach().cpu() - tensors[n]).abs().max()) for n, p in setup.named.items()]
            report["max_abs_diff_vs_checkpoint"] = max(diffs) if diffs else 0.0
            report["bitwise_equal"] = all(torch.equal(p.detach().cpu(), tensors[n]) for n, p in setup.named.items())
    if out_path is not None:
        save_file({n: p.detach().contiguous().cpu() for n, p in setup.named.items()}, str(out_path))
        report["written"] = str(out_path)
    return report
