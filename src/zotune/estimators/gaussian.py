"""MeZO's randomized gradient estimate (RGE), with q queries (ZO-Bench).

``g = (1/q) * sum_j (L(x + eps z_j) - L(x - eps z_j)) / (2 eps) * z_j`` with ``z_j ~ N(0, I)``
(or Rademacher +-1 entries: the same first two moments, and about three times cheaper to draw,
since 8 signs come from one random byte). Each chunk of each leaf's ``z_j`` is regenerated from
``(run seed, step, query j, leaf index, chunk index)``.
"""

from __future__ import annotations

import torch

from zotune import rng
from zotune._validate import unknown_choice
from zotune.estimators.base import DEFAULT_CHUNK, Dense, Direction, Estimator

DISTRIBUTIONS = ("gaussian", "rademacher")
_SHIFTS: dict[torch.device, torch.Tensor] = {}


class Gaussian(Estimator):
    """Two-point random direction estimate over all leaves (MeZO; q-query RGE of ZO-Bench).

    Args:
        queries: number ``q`` of directions averaged per step (variance falls roughly as 1/q).
        distribution: ``"gaussian"`` (the papers') or ``"rademacher"`` (random signs).
        chunk_size: elements per independently seeded chunk of a direction.
    """

    name = "gaussian"

    def __init__(self, queries: int = 1, distribution: str = "gaussian", chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(queries, chunk_size)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(unknown_choice("distribution", distribution, DISTRIBUTIONS))
        self.distribution = distribution
        self.parallel_chunks = distribution == "gaussian"  # measured: see for_each_chunk

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None) -> Dense:
        a, b = self.ranges[i][k]
        return Dense(draw(self.run_seed, d.step, d.query, i, k, b - a, p, self.distribution, out))

    def config(self) -> dict:
        return {**super().config(), "distribution": self.distribution}


def draw(run_seed: int, step: int, query: int, leaf: int, chunk: int, n: int, p: torch.Tensor,
         distribution: str = "gaussian", out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk ``chunk`` (``n`` elements, flat) of leaf ``leaf``'s direction at (step, query),
    in ``p``'s dtype and device; written into ``out`` when given."""
    dtype = p.dtype if p.dtype.is_floating_point else torch.float32
    if out is None:
        out = torch.empty(n, dtype=dtype, device=p.device)
    if distribution == "rademacher":
        g = rng.generator(rng.derive_seed(run_seed, rng.STREAM_RADEMACHER, step, query, leaf, chunk), p.device)
        shifts = _SHIFTS.get(p.device)
        if shifts is None:
            shifts = _SHIFTS[p.device] = torch.arange(8, dtype=torch.uint8, device=p.device)
        random_bytes = torch.empty((n + 7) // 8, dtype=torch.uint8, device=p.device).random_(0, 256, generator=g)
        bits = (random_bytes.unsqueeze(1) >> shifts).bitwise_and_(1).view(-1)[:n]
        return out.copy_(bits).mul_(2).sub_(1)
    g = rng.generator(rng.derive_seed(run_seed, rng.STREAM_GAUSSIAN, step, query, leaf, chunk), p.device)
    return out.normal_(generator=g)


def draw_leaf(run_seed: int, step: int, query: int, leaf: int, p: torch.Tensor,
              chunk_size: int = DEFAULT_CHUNK, distribution: str = "gaussian") -> torch.Tensor:
    """Leaf ``leaf``'s whole direction, shaped like ``p``: its chunks drawn one after another."""
    n = p.numel()
    parts = [draw(run_seed, step, query, leaf, k, min(chunk_size, n - a), p, distribution)
             for k, a in enumerate(range(0, n, chunk_size))]
    return torch.cat(parts).view(p.shape) if parts else torch.empty_like(p)
