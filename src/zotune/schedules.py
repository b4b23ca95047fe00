"""Learning-rate schedules: multipliers of the base lr, and :class:`LRSchedule`, the
checkpointed scheduler the training loop steps and saves.

ZOOptimizer is a ``torch.optim.Optimizer``, so any torch scheduler works too (the multipliers
fit ``torch.optim.lr_scheduler.LambdaLR``); these are the ones the papers use (MeZO: constant;
ZO-Bench: constant / linear), plus cosine, each with linear warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from zotune._validate import check_int, check_range, unknown_choice

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(
    name: str = "constant", total_steps: int = 1, warmup_steps: int = 0, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """``step -> multiplier``: ramps linearly from 0 to 1 over ``warmup_steps``, then stays at 1
    (constant), falls linearly to ``min_ratio`` at ``total_steps`` (linear), or follows a half
    cosine to ``min_ratio`` (cosine).

    >>> f = lr_multiplier("linear", total_steps=10, warmup_steps=0)
    >>> f(0), f(5), f(10)
    (1.0, 0.5, 0.0)
    """
    if name not in SCHEDULES:
        raise ValueError(unknown_choice("schedule", name, SCHEDULES))
    total = check_int("total_steps", total_steps)
    warm = check_int("warmup_steps", warmup_steps, minimum=0)
    if warm > total:
        raise ValueError(f"warmup_steps ({warm}) must not exceed total_steps ({total})")
    floor = check_range("min_ratio", min_ratio, 0.0, 1.0, high_inclusive=True)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if name == "constant":
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if name == "linear":
            return floor + (1.0 - floor) * (1.0 - frac)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


class LRSchedule:
    """A checkpointed learning-rate scheduler: the lr of param group ``i`` at step ``t`` (0-based) is

        lr_i(t) = base_lr_i * multiplier(t)

    with ``base_lr_i`` the group's lr when the schedule was made. The contract of
    ``torch.optim.lr_scheduler.LambdaLR`` (construction sets step 0's lr, ``step()`` after each
    optimizer step sets the next one, ``state_dict()`` / ``load_state_dict()``), for any
    optimizer with ``param_groups``: a ``torch.optim.Optimizer`` or zotune's
    :class:`~zotune.fo.HybridOptimizer`. The groups are looked up at every call, never kept, so
    an optimizer's ``load_state_dict`` (which replaces its group dicts and restores the lr they
    had, already scheduled) does not disturb it: load the optimizer, then the schedule.

    The state is plain numbers (JSON): ``{"base_lrs": [...], "step": t}``.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> s = LRSchedule(opt, lr_multiplier("linear", total_steps=4))
    >>> s.step(); s.step(); opt.param_groups[0]["lr"], s.state_dict()
    (0.5, {'base_lrs': [1.0], 'step': 2})
    """

    def __init__(self, optimizer, multiplier: Callable[[int], float]) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise ValueError(f"optimizer must have param_groups, got {type(optimizer).__name__}")
        if not callable(multiplier):
            raise ValueError(f"multiplier must be a callable step -> float, got {multiplier!r}")
        self.optimizer, self.multiplier = optimizer, multiplier
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_step = 0  # the step whose lr the groups hold
        self._set()

    def _set(self) -> None:
        m = self.multiplier(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * m

    def step(self) -> None:
        """Move to the next step's lr (call after ``optimizer.step``)."""
        self.last_step += 1
        self._set()

    def get_last_lr(self) -> list[float]:
        """The lr of each group at the current step."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore the base lrs and the step, and set that step's lr on the groups."""
        try:
            base_lrs, step = [float(x) for x in state["base_lrs"]], int(state["step"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"not an LRSchedule state_dict (needs base_lrs and step): {state!r}") from None
        groups = len(self.optimizer.param_groups)
        if len(base_lrs) != groups:
            raise ValueError(f"schedule state has {len(base_lrs)} base lrs but the optimizer has {groups} param groups")
        if step < 0:
            raise ValueError(f"schedule state step must be >= 0, got {step}")
        self.base_lrs, self.last_step = base_lrs, step
        self._set()


def make_schedule(optimizer, name: str = "constant", total_steps: int = 1, warmup_steps: int = 0,
                  min_ratio: float = 0.0) -> LRSchedule:
    """:class:`LRSchedule` over ``optimizer`` with :func:`lr_multiplier`'s schedule ``name``."""
    return LRSchedule(optimizer, lr_multiplier(name, total_steps, warmup_steps, min_ratio))
