"""Data-parallel ZO over ``torch.distributed``: the same seed everywhere, all-reduce q scalars.

Launch one process per worker with torchrun; every rank builds the same model and optimizer::

    zotune train recipes/x.yaml                                    # one process
    torchrun --nproc_per_node 2 -m zotune.cli train recipes/x.yaml # two ranks on this machine
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
        --nproc_per_node 8 -m zotune.cli train recipes/x.yaml     # several machines

Why so little is exchanged: a ZO step's directions come from the run seed, so every rank draws
the same ones without sending them. Each rank measures its slice ``indices[rank::world_size]``
of the global batch of step ``t``, giving the q projected gradients of its shard::

    c_j^(r) = (L_r(x + eps z_j) - L_r(x - eps z_j)) / (2 eps)        (L_r: mean loss of shard r)
    c_j     = (1 / W) sum_r c_j^(r)                                   (all_reduce SUM, / W)

and, shards being equal in size, ``c_j`` is the projected gradient of the whole batch (to
within float rounding), so all ranks apply the same update. One all-reduce of ``q`` float64
scalars per step, ``8 q`` bytes: :attr:`DistContext.bytes_all_reduced` counts them. No
parameter, gradient or direction ever crosses the wire. First-order baselines (``fo-sgd``,
``fo-adam``) and the FO part of the hybrid scheme backpropagate through
:class:`torch.nn.parallel.DistributedDataParallel`, which all-reduces every gradient each step.

Because seeds and the global batch order depend on neither the number of ranks nor on resumes,
a run stopped with W ranks continues the same trajectory with any W' that divides
``train.batch_size`` (to within float rounding: each rank's loss is a mean over its shard).

Failures: the process group is created with a timeout (:data:`DEFAULT_TIMEOUT_S`, or
``ZOTUNE_DIST_TIMEOUT_S``). With gloo, ``all_reduce``, ``barrier``, ``broadcast``,
``all_gather_object``, ``async_op`` waits and DDP's gradient all-reduce all raise once a peer
has not answered within the timeout (verified with torch 2.13 CPU); a peer that exits fails an
``all_reduce`` at once ("Connection reset by peer"); the rendezvous of ``init_process_group``
fails after the timeout with a store error. zotune turns a failed collective into a
:class:`DistributedError` naming the rank and the step. Only rank 0 evaluates and saves, so the
timeout must exceed the longest dev evaluation and checkpoint save (the other ranks wait for
rank 0 at the next step's all-reduce). NCCL is chosen for CUDA models but was not exercised
here (no GPU); torch documents that its watchdog enforces the timeout by aborting the process.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from zotune.errors import ZotuneError

DEFAULT_TIMEOUT_S = 1800.0
BACKENDS = ("gloo", "nccl")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# gloo reports peer failures as plain RuntimeErrors; these fragments identify them
_COMM_FAILURE_HINTS = ("gloo", "nccl", "timed out", "connection reset", "connection closed", "connection refused")


class DistributedError(ZotuneError, RuntimeError):
    """A collective failed or timed out: another rank died or hung.

    Attributes: ``rank`` (this process), ``step`` (0-based, as in ``steps.jsonl``; None if
    unknown), ``waited_s`` (seconds spent in the failed collective).
    """

    def __init__(self, message: str, *, rank: int, step: int | None, waited_s: float | None = None) -> None:
        super().__init__(message)
        self.rank, self.step, self.waited_s = rank, step, waited_s


@dataclass
class DistContext:
    """Where this process sits in the job, and what its scalar all-reduces have sent.

    ``backend`` is None for a single process without a process group (no torchrun).
    ``bytes_all_reduced`` counts the payload this rank handed to :func:`scalar_reduce`'s
    all-reduces (``q * 8`` per step for float64 scalars); ``all_reduces`` counts the calls.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout_s: float | None = None
    owns_group: bool = False  # init_from_env created the process group (shutdown destroys it)
    bytes_all_reduced: int = 0
    all_reduces: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env, name: str) -> int:
    value = env.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name} must be an integer, got {value!r} "
                         "(launch with torchrun)") from None


def timeout_from_env(default: float = DEFAULT_TIMEOUT_S) -> float:
    """``ZOTUNE_DIST_TIMEOUT_S`` if set, else ``default``."""
    text = os.environ.get("ZOTUNE_DIST_TIMEOUT_S")
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"ZOTUNE_DIST_TIMEOUT_S must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"ZOTUNE_DIST_TIMEOUT_S must be > 0, got {text!r}")
    return value


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, env=None) -> DistContext:
    """Join the job that torchrun describes in the environment, or run alone.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without
    ``WORLD_SIZE`` this is a single process: no process group, ``world_size == 1``.
    ``backend`` defaults to nccl when CUDA is available, else gloo; with nccl each rank takes
    ``cuda:LOCAL_RANK`` as its current device. Collectives that wait longer than ``timeout_s``
    raise (see the module docstring). If a default process group already exists, the context
    describes it and :func:`shutdown` leaves it alone.

    Example (single process)::

        >>> ctx = init_from_env(env={})
        >>> (ctx.rank, ctx.world_size, ctx.backend)
        (0, 1, None)
    """
    env = os.environ if env is None else env
    if backend is not None and backend not in BACKENDS:
        from zotune._validate import unknown_choice

        raise ValueError(unknown_choice("backend", backend, BACKENDS))
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        local_rank = int(env.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend, timeout_s)
    if "WORLD_SIZE" not in env:
        device = torch.device("cpu")
        return DistContext(0, 1, 0, device, None, timeout_s)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set but this torch build has no torch.distributed")
    rank, world_size = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local_rank = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                         "(torchrun --nproc_per_node N -m zotune.cli train RECIPE.yaml)")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK ({rank}) must be in [0, WORLD_SIZE={world_size})")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs CUDA; use backend='gloo' on CPU")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    timeout = datetime.timedelta(seconds=timeout_s)
    t0 = time.monotonic()
    try:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    except RuntimeError as e:  # DistStoreError / DistNetworkError: the rendezvous did not complete
        raise DistributedError(
            f"rank {rank} of {world_size}: could not join the process group at "
            f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} within {timeout_s:g} s ({_first_line(e)}). "
            "Check that every rank was started and that MASTER_ADDR is reachable, then run the same command again.",
            rank=rank, step=None, waited_s=time.monotonic() - t0,
        ) from e
    return DistContext(rank, world_size, local_rank, device, backend, timeout_s, owns_group=True)


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        ctx.owns_group = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def failure_message(ctx: DistContext, what: str, step: int | None, cause: BaseException,
                    waited_s: float | None = None) -> str:
    """The one message every collective failure gives: who, when, why, and how to resume."""
    at = f"step {step} (0-based, as in steps.jsonl)" if step is not None else "an unknown step"
    after = f" after {waited_s:.1f} s" if waited_s is not None else ""
    return (
        f"rank {ctx.rank} of {ctx.world_size}: {what} failed at {at}{after}: {_first_line(cause)}. "
        f"Another rank has probably died or hung (a live rank answers within the timeout, "
        f"{ctx.timeout_s:g} s); see its log. The last checkpoint "
        "(train.output_dir/ckpt-last) is intact: resume with the same command. Any number of ranks that "
        "divides train.batch_size continues the same trajectory (to within float rounding): seeds and "
        "the global batch order do not depend on the number of ranks."
    )


def scalar_reduce(
    ctx: DistContext, step_of: Callable[[], int | None] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ``reduce`` for :class:`~zotune.step.ZOOptimizer`: the mean over ranks of the step's
    q projected-gradient scalars (shape ``(q,)``, float64), by one ``all_reduce(SUM) / W``.

    ``step_of`` names the step in error messages (default: how many times this reduce ran).
    Each call adds ``c.numel() * c.element_size()`` bytes to ``ctx.bytes_all_reduced``. Without a
    process group it returns the scalars unchanged and counts nothing.
    """
    if ctx.backend is None:
        return lambda c: c
    calls = [0]

    def reduce(c: torch.Tensor) -> torch.Tensor:
        buf = c.detach().to(device=ctx.device, copy=True)  # (q,), dtype kept: float64 from ZOOptimizer
        t0 = time.monotonic()
        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        except RuntimeError as e:
            step = step_of() if step_of is not None else calls[0]
            waited = time.monotonic() - t0
            raise DistributedError(
                failure_message(ctx, "the all-reduce of the projected-gradient scalars", step, e, waited),
                rank=ctx.rank, step=step, waited_s=waited,
            ) from e
        ctx.bytes_all_reduced += buf.numel() * buf.element_size()
        ctx.all_reduces += 1
        calls[0] += 1
        return (buf / ctx.world_size).to(c.device)

    return reduce


class ZotuneDDP(DistributedDataParallel):
    """DDP that still answers :mod:`zotune.lm`'s questions about the model it wraps.

    ``zotune.lm`` inspects ``model.get_base_model()`` (which forward arguments it takes:
    ``position_ids``, ``logits_to_keep``; causal or masked) and ``active_peft_config`` (prompt
    learning); without these a DDP wrapper would hide them and, e.g., LLaMA would get no
    ``position_ids`` with left padding. Forward passes still go through DDP.
    """

    def get_base_model(self) -> torch.nn.Module:
        inner = self.module
        return inner.get_base_model() if hasattr(inner, "get_base_model") else inner

    @property
    def active_peft_config(self):
        return getattr(self.module, "active_peft_config", None)


def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> ZotuneDDP:
    """Wrap ``model`` for first-order training: each backward all-reduces (averages) every
    gradient of the parameters that require one at wrapping time.

    Buffers are synced once at wrapping, not at every forward (all ranks built the same model),
    so the ZO passes of the hybrid scheme send nothing.
    """
    if ctx.backend is None:
        raise ValueError("wrap_ddp needs a process group: launch with torchrun")
    device_ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return ZotuneDDP(model, device_ids=device_ids, forward_sync_buffers=False)


def uses_backprop(cfg) -> bool:
    """True when some trainable tensor is updated by backpropagation (FO methods, hybrid)."""
    from zotune.methods import METHODS

    method = METHODS.get(cfg.optim.method)
    return (method is not None and method.family == "fo") or cfg.trainable.zo_layers is not None


def _backend_for(device: str) -> str:
    text = str(device).lower()
    if text.startswith("cuda") or (text == "auto" and torch.cuda.is_available()):
        return "nccl"
    return "gloo"


def _resume_step(cfg) -> int:
    """The step the run will resume from (0 for a fresh run); used only in error messages."""
    from zotune.train.checkpoint import find_checkpoint
    from zotune.train.loop import LAST

    if not cfg.train.resume:
        return 0
    found = find_checkpoint(Path(cfg.train.output_dir) / LAST)
    try:
        return int(json.loads((found / "meta.json").read_text())["step"]) if found else 0
    except (OSError, ValueError, KeyError):
        return 0


def _current_step(optimizer, start: int) -> int | None:
    """The 0-based step an optimizer is taking (for error messages)."""
    from zotune.fo import HybridOptimizer
    from zotune.step import ZOOptimizer

    if isinstance(optimizer, ZOOptimizer):
        return optimizer.steps_taken  # restored from the checkpoint on resume
    if isinstance(optimizer, HybridOptimizer):
        optimizer = optimizer.fo
    taken = getattr(optimizer, "forward_passes", None)  # FO: steps taken in this session
    return None if taken is None else start + taken


def _is_comm_failure(e: BaseException) -> bool:
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(h in text for h in _COMM_FAILURE_HINTS)


def run_training(cfg, *, timeout_s: float | None = None) -> dict:
    """``zotune train`` under torchrun: join the job, build, and train data-parallel.

    Every rank builds the same model and optimizer (ZO: with :func:`scalar_reduce` as
    ``reduce``); FO methods and the hybrid scheme train through :func:`wrap_ddp`. Rank 0 alone
    evaluates, logs and saves (see :func:`zotune.train.loop.train`). Without ``WORLD_SIZE`` in
    the environment this is a plain single-process run. Returns the results dict on every rank
    (evaluations are rank 0's only).
    """
    from zotune.train.loop import build, train

    if "WORLD_SIZE" in os.environ and str(cfg.model.device).lower().startswith("cuda:"):
        raise ValueError(f"model.device={cfg.model.device!r} under torchrun: use model.device=cuda "
                         "(each rank takes cuda:LOCAL_RANK)")
    ctx = init_from_env(backend=_backend_for(cfg.model.device), timeout_s=timeout_s or timeout_from_env())
    if ctx.backend is None:
        return train(cfg)
    start = _resume_step(cfg)
    holder: dict = {}
    reduce = scalar_reduce(ctx, step_of=lambda: _current_step(holder.get("optimizer"), start))
    try:
        setup = build(cfg, reduce=reduce)
        holder["optimizer"] = setup.optimizer
        train_model = wrap_ddp(setup.model, ctx) if uses_backprop(cfg) else None
        return train(cfg, reduce=reduce, rank=ctx.rank, world_size=ctx.world_size, setup=setup,
                     train_model=train_model)
    except DistributedError:
        raise
    except RuntimeError as e:
        if not _is_comm_failure(e):
            raise
        step = _current_step(holder.get("optimizer"), start)
        raise DistributedError(
            failure_message(ctx, "a collective (DDP gradient all-reduce or parameter broadcast)", step, e),
            rank=ctx.rank, step=step,
        ) from e
    finally:
        shutdown(ctx)
