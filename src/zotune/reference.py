"""MeZO's Algorithm 1 exactly as the paper writes it: the plain reference for the fast path.

Four passes over the parameters per step (perturb +eps, perturb -2eps, restore +eps, update),
the direction regenerated from the same seeded source as :class:`zotune.MeZO`, so both give the
same weights up to float rounding (the fast path fuses the restore into the update). Kept
simple on purpose: tests check the fast path against it, and the benchmark times both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from zotune.estimators.gaussian import draw_leaf


def _perturb(params: Sequence[torch.Tensor], seed: int, step: int, scale: float) -> None:
    for i, p in enumerate(params):
        z = draw_leaf(seed, step, 0, i, p)
        p.data = p.data + scale * z


@torch.no_grad()
def mezo_step(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], torch.Tensor],
    step: int,
    *,
    lr: float,
    eps: float,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> float:
    """One step of MeZO Algorithm 1; returns the projected gradient ``c``.

    ``weight_decay`` applies to tensors with more than one dimension, as zotune does.
    """
    _perturb(params, seed, step, eps)
    loss_plus = float(loss_fn())
    _perturb(params, seed, step, -2 * eps)
    loss_minus = float(loss_fn())
    projected_grad = (loss_plus - loss_minus) / (2 * eps)
    _perturb(params, seed, step, eps)
    for i, p in enumerate(params):
        z = draw_leaf(seed, step, 0, i, p)
        decay = weight_decay if p.dim() > 1 else 0.0
        p.data = p.data - lr * (projected_grad * z + decay * p.data)
    return projected_grad
