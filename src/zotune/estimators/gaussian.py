"""MeZO's randomized gradient estimate (RGE), with q queries (ZO-Bench).

``g = (1/q) * sum_j (L(x + eps z_j) - L(x - eps z_j)) / (2 eps) * z_j`` with ``z_j ~ N(0, I)``
(or Rademacher +-1 entries, which are cheaper to draw and have the same first two moments).
Each leaf's ``z_j`` is regenerated from ``(run seed, step, query j, leaf index)``.
"""

from __future__ import annotations

import torch

from zotune import rng
from zotune._validate import unknown_choice
from zotune.estimators.base import Dense, Direction, Estimator, randn_like_leaf

DISTRIBUTIONS = ("gaussian", "rademacher")


class Gaussian(Estimator):
    """Two-point random direction estimate over all leaves (MeZO; q-query RGE of ZO-Bench).

    Args:
        queries: number ``q`` of directions averaged per step (variance falls roughly as 1/q).
        distribution: ``"gaussian"`` (the papers') or ``"rademacher"`` (random signs).
    """

    name = "gaussian"

    def __init__(self, queries: int = 1, distribution: str = "gaussian") -> None:
        super().__init__(queries)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(unknown_choice("distribution", distribution, DISTRIBUTIONS))
        self.distribution = distribution

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor) -> Dense:
        return Dense(draw(self.run_seed, d.step, d.query, i, p, self.distribution))

    def config(self) -> dict:
        return {**super().config(), "distribution": self.distribution}


def draw(run_seed: int, step: int, query: int, leaf: int, p: torch.Tensor, distribution="gaussian"):
    """Leaf ``leaf``'s dense direction at (step, query), shaped and typed like ``p``."""
    if distribution == "rademacher":
        g = rng.leaf_generator(run_seed, step, query, leaf, rng.STREAM_RADEMACHER, p.device)
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        z = torch.empty(p.shape, dtype=dtype, device=p.device).bernoulli_(0.5, generator=g)
        return z.mul_(2).sub_(1)
    g = rng.leaf_generator(run_seed, step, query, leaf, rng.STREAM_GAUSSIAN, p.device)
    return randn_like_leaf(p, g)
