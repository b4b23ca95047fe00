"""``zotune train``: join the world (one process, or the ranks torchrun started), build, train.

    zotune train recipes/x.yaml                                    # one process
    torchrun --nproc_per_node 2 -m zotune.cli train recipes/x.yaml # two ranks on this machine

:mod:`zotune.distributed` provides the world (rank, number of ranks, collectives, timeouts);
:func:`zotune.train.loop.train` is the recipe every rank runs.
"""

from __future__ import annotations

import os

from zotune.distributed import (
    DistributedError,
    backend_for,
    failure_message,
    init_from_env,
    is_comm_failure,
    scalar_reduce,
    shutdown,
    timeout_from_env,
    wrap_ddp,
)
from zotune.train.loop import build, train


def uses_backprop(cfg) -> bool:
    """True when some trainable tensor is updated by backpropagation (FO methods, hybrid)."""
    from zotune.methods import METHODS

    method = METHODS.get(cfg.optim.method)
    return (method is not None and method.family == "fo") or cfg.trainable.zo_layers is not None


def run_training(cfg, *, timeout_s: float | None = None) -> dict:
    """``zotune train``, under torchrun or not: join the job, build, and train data-parallel.

    Every rank builds the same model and optimizer (ZO: with
    :func:`~zotune.distributed.scalar_reduce` as ``reduce``); FO methods and the hybrid scheme
    train through :func:`~zotune.distributed.wrap_ddp`. Rank 0 alone evaluates, logs and saves
    (see :func:`zotune.train.loop.train`). Without ``WORLD_SIZE`` in the environment this is a
    plain single-process run. Returns the results dict on every rank (evaluations are rank 0's
    only). A failed collective raises :class:`~zotune.distributed.DistributedError` naming the
    rank and the step.
    """
    from zotune.config import ConfigError
    from zotune.methods import METHODS

    method = METHODS.get(cfg.optim.method)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and method is not None and not method.data_parallel:
        raise ConfigError(f"optim.method {cfg.optim.method!r} is not safe under data parallel (the registry's "
                          "data_parallel flag): its ranks would not agree on a step; run it in one process")
    if "WORLD_SIZE" in os.environ and str(cfg.model.device).lower().startswith("cuda:"):
        raise ValueError(f"model.device={cfg.model.device!r} under torchrun: use model.device=cuda "
                         "(each rank takes cuda:LOCAL_RANK)")
    world = init_from_env(backend=backend_for(cfg.model.device), timeout_s=timeout_s or timeout_from_env())
    if world.backend is None:
        return train(cfg)
    try:
        setup = build(cfg, reduce=scalar_reduce(world))
        train_model = wrap_ddp(setup.model, world) if uses_backprop(cfg) else None
        return train(cfg, world=world, setup=setup, train_model=train_model)
    except DistributedError:
        raise
    except RuntimeError as e:
        if not is_comm_failure(e):
            raise
        raise DistributedError(
            failure_message(world, "a collective (DDP gradient all-reduce or parameter broadcast)", world.step, e),
            rank=world.rank, step=world.step,
        ) from e
    finally:
        shutdown(world)
