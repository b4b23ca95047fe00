"""Data-parallel ZO over ``torch.distributed``: the same seed everywhere, all-reduce q scalars.

Launch one process per worker with torchrun; every rank builds the same model and optimizer::

    zotune train recipes/x.yaml                                    # one process
    torchrun --nproc_per_node 2 -m zotune.cli train recipes/x.yaml # two ranks on this machine
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
        --nproc_per_node 8 -m zotune.cli train recipes/x.yaml     # several machines

This module provides the world a run trains in (:class:`DistContext`: rank, number of ranks,
the collectives, timeouts); the entry point that joins it and trains is
:func:`zotune.train.run.run_training`.

Why so little is exchanged: a ZO step's directions come from the run seed, so every rank draws
the same ones without sending them. Each rank measures its slice ``indices[rank::world_size]``
of the global batch of step ``t``, giving the q projected gradients of its shard::

    L_r     = W S_r / N              (S_r: sum of shard r's token losses, N: tokens of the batch)
    c_j^(r) = (L_r(x + eps z_j) - L_r(x - eps z_j)) / (2 eps)
    c_j     = (1 / W) sum_r c_j^(r)                                   (all_reduce SUM, / W)

so ``c_j`` is the projected gradient of the whole batch's token-mean loss ``sum_r S_r / N``
(to within float rounding) whatever the shards' token counts, and all ranks apply the same
update. (Classification losses count examples, which every shard has equally many of.) One
all-reduce of ``q`` float64 scalars per step, ``8 q`` bytes, plus one of the step's token
count (8 bytes) for nll objectives: :attr:`DistContext.bytes_all_reduced` counts them. No
parameter, gradient or direction ever crosses the wire. First-order baselines (``fo-sgd``,
``fo-adam``) and the FO part of the hybrid scheme backpropagate through
:class:`torch.nn.parallel.DistributedDataParallel`, which all-reduces every gradient each step.

Because seeds and the global batch order depend on neither the number of ranks nor on resumes,
a run stopped with W ranks continues the same trajectory with any W' that divides
``train.batch_size`` (to within float rounding). Every rank must find the same checkpoint to
resume from (only rank 0 saves: on several machines put ``train.output_dir`` on a shared file
system or copy ``ckpt-last`` to every node); ranks that find different ones refuse to start.

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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
    """The world this process trains in: its rank, the number of ranks, the collectives the
    training loop needs (:func:`scalar_reduce`, :meth:`all_reduce_sum`, :meth:`all_gather_int`),
    and the timeout they wait for.

    ``backend`` is None for a single process without a process group (no torchrun); every
    collective is then the identity. ``step`` is the 0-based step the training loop is taking
    (it sets it), named in error messages. ``bytes_all_reduced`` counts the payload this rank
    handed to all-reduces (``q * 8`` per step for :func:`scalar_reduce`'s float64 scalars, plus
    8 for the token count of an nll step); ``all_reduces`` counts the calls.
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
    step: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective(self, what: str, run: Callable[[], None], step: int | None = None) -> None:
        """Run one collective; a failure or timeout becomes a :class:`DistributedError`."""
        t0 = time.monotonic()
        try:
            run()
        except RuntimeError as e:
            step = self.step if step is None else step
            waited = time.monotonic() - t0
            raise DistributedError(failure_message(self, what, step, e, waited),
                                   rank=self.rank, step=step, waited_s=waited) from e

    def all_reduce_sum(self, values: torch.Tensor, what: str = "an all-reduce") -> torch.Tensor:
        """The sum over ranks of ``values`` (a new tensor; the input is left alone)."""
        if self.backend is None:
            return values
        buf = values.detach().to(device=self.device, copy=True)
        self._collective(what, lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
        self.bytes_all_reduced += buf.numel() * buf.element_size()
        self.all_reduces += 1
        return buf.to(values.device)

    def all_gather_int(self, value: int, what: str = "an all-gather") -> list[int]:
        """Every rank's ``value``, in rank order."""
        if self.backend is None:
            return [int(value)]
        mine = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        out = [torch.zeros_like(mine) for _ in range(self.world_size)]
        self._collective(what, lambda: dist.all_gather(out, mine))
        return [int(t) for t in out]


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

    ``step_of`` names the step in error messages (default: ``ctx.step`` when the training loop
    sets it, else how many times this reduce ran). Each call adds ``c.numel() *
    c.element_size()`` bytes to ``ctx.bytes_all_reduced``. Without a process group it returns
    the scalars unchanged and counts nothing.
    """
    if ctx.backend is None:
        return lambda c: c
    calls = [0]

    def reduce(c: torch.Tensor) -> torch.Tensor:
        if step_of is not None:
            step = step_of()
        else:
            step = ctx.step if ctx.step is not None else calls[0]
        buf = c.detach().to(device=ctx.device, copy=True)  # (q,), dtype kept: float64 from ZOOptimizer
        ctx._collective("the all-reduce of the projected-gradient scalars",
                        lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM), step)
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


def backend_for(device: str) -> str:
    """The backend for a model on ``device`` (a ``model.device`` string): nccl for CUDA, else gloo."""
    text = str(device).lower()
    if text.startswith("cuda") or (text == "auto" and torch.cuda.is_available()):
        return "nccl"
    return "gloo"


def is_comm_failure(e: BaseException) -> bool:
    """True for the errors a failed collective raises (gloo and DDP report them as RuntimeErrors)."""
    if isinstance(e, dist.DistError):
        return True
    text = str(e).lower()
    return any(h in text for h in _COMM_FAILURE_HINTS)
