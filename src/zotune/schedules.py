"""Learning-rate schedules as multipliers of the base lr, for ``torch.optim.lr_scheduler.LambdaLR``.

ZOOptimizer is a ``torch.optim.Optimizer``, so any torch scheduler works; these are the ones the
papers use (MeZO: constant; ZO-Bench: constant / linear), plus cosine, each with linear warmup.
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
