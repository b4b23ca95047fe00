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
    warm, floor = _checked(name, warmup_steps, min_ratio)
    total = check_int("total_steps", total_steps)
    if warm > total:
        raise ValueError(f"warmup_steps ({warm}) must not exceed total_steps ({total})")

    def f(step: int) -> float:
        if warm and step < warm:
            return _ramp(step, warm)
        return _decay(name, (step - warm) / max(1, total - warm), floor)

    return f


def _checked(name: str, warmup_steps: int, min_ratio: float) -> tuple[int, float]:
    """A schedule's name, warmup and floor checked: (warmup_steps, min_ratio)."""
    if name not in SCHEDULES:
        raise ValueError(unknown_choice("schedule", name, SCHEDULES))
    return (check_int("warmup_steps", warmup_steps, minimum=0),
            check_range("min_ratio", min_ratio, 0.0, 1.0, high_inclusive=True))


def _ramp(step: int, warm: int) -> float:
    """Warmup's multiplier at ``step``: linear from 1 / warm to 1, then 1."""
    return min(1.0, (step + 1) / warm) if warm else 1.0


def _decay(name: str, frac: float, floor: float) -> float:
    """The schedule's multiplier once ``frac`` (clipped to [0, 1]) of its span has passed."""
    frac = min(1.0, max(0.0, frac))
    if name == "constant":
        return 1.0
    if name == "linear":
        return floor + (1.0 - floor) * (1.0 - frac)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


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

    def step(self, seconds: float | None = None) -> None:
        """Move to the next step's lr (call after ``optimizer.step``). ``seconds``, the training
        seconds spent so far, is read by a schedule over time (:class:`TimedLRSchedule`) only."""
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


class TimedLRSchedule(LRSchedule):
    """A schedule whose decay follows the training seconds spent out of a time budget, not the
    steps: with ``train.max_seconds`` a run's step count depends on the machine's pace, so a
    decay over a guessed ``train.steps`` ends early on a fast day (the rest of the budget at
    the floor) or never finishes on a slow one. The lr of step ``t``, taken after ``s`` seconds:

        lr_i(t) = base_lr_i * min(1, (t + 1) / warmup_steps) * decay(s / total_seconds)

    with ``decay`` the constant / linear / cosine shape of :func:`lr_multiplier` (warmup still
    counted in steps, its seconds inside the budget). The seconds come from the caller
    (``step(seconds=...)``: the loop passes its budget's count, rank 0's on every rank), so a
    run resumed from its checkpoint goes on with the lr it had; the lrs depend on the machine's
    timing, which the step log records (a replay reads them from there).

    The state is plain numbers: ``{"base_lrs": [...], "step": t, "seconds": s}``.
    """

    def __init__(self, optimizer, name: str, total_seconds: float, warmup_steps: int = 0,
                 min_ratio: float = 0.0) -> None:
        self.warmup, self.floor = _checked(name, warmup_steps, min_ratio)
        if isinstance(total_seconds, bool) or not isinstance(total_seconds, (int, float)) or not total_seconds > 0:
            raise ValueError(f"total_seconds must be > 0 (the time budget the decay spans), got {total_seconds!r}")
        self.name, self.total_seconds = name, float(total_seconds)
        self.seconds = 0.0
        super().__init__(optimizer, self._at)

    def _at(self, step: int) -> float:
        return _ramp(step, self.warmup) * _decay(self.name, self.seconds / self.total_seconds, self.floor)

    def step(self, seconds: float | None = None) -> None:
        """Move to the next step's lr, ``seconds`` being the training seconds spent so far."""
        if seconds is None:
            raise ValueError("a schedule over training seconds needs them: call step(seconds=...) "
                             "with the seconds spent so far")
        if seconds < self.seconds:
            raise ValueError(f"the training seconds went back from {self.seconds:g} to {seconds:g}")
        self.seconds = float(seconds)
        super().step()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        """Restore the base lrs, the step and the seconds, and set that point's lr on the groups."""
        try:
            seconds = float(state["seconds"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("not a TimedLRSchedule state_dict (needs base_lrs, step and seconds): "
                             f"{state!r}") from None
        if not seconds >= 0:
            raise ValueError(f"schedule state seconds must be >= 0, got {seconds!r}")
        self.seconds = seconds
        super().load_state_dict(state)


def make_schedule(optimizer, name: str = "constant", total_steps: int = 1, warmup_steps: int = 0,
                  min_ratio: float = 0.0, total_seconds: float = 0.0) -> LRSchedule:
    """:class:`LRSchedule` over ``optimizer`` with :func:`lr_multiplier`'s schedule ``name``
    spanning ``total_steps``; with ``total_seconds`` > 0, a :class:`TimedLRSchedule` spanning
    that many training seconds instead."""
    if total_seconds:
        return TimedLRSchedule(optimizer, name, total_seconds, warmup_steps, min_ratio)
    return LRSchedule(optimizer, lr_multiplier(name, total_steps, warmup_steps, min_ratio))
