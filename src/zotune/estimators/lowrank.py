"""LOZO's low-rank gradient estimate (LGE) with lazily resampled V.

For each 2-D leaf ``X`` (m x n) the perturbation is ``eps * U V^T`` with ``U`` (m x r) drawn
fresh every step and query, and ``V`` (n x r) drawn once every ``interval`` (LOZO's ``nu``)
steps. The gradient estimate is ``c * U V^T / r`` where ``c = (L+ - L-) / (2 eps)``: it has rank
at most ``r``. Leaves that are not matrices (biases, norm weights) use a dense Gaussian ``z``.

``U`` comes from ``(run seed, step, query, leaf)`` and ``V`` from ``(run seed, step // interval,
leaf)``, so the direction used by the update is by construction the one whose loss difference
was measured, on resample steps too.
"""

from __future__ import annotations

import torch

from zotune import rng
from zotune._validate import check_int
from zotune.estimators.base import DEFAULT_CHUNK, Dense, Direction, Estimator, LowRank, randn_like_leaf
from zotune.estimators.gaussian import draw


class MatrixFactors:
    """Low-rank factors for the 2-D leaves, dense chunks for the others: the leaf layout LOZO and
    the population estimator share (an :class:`Estimator` mixin; ``self.rank`` caps each factor)."""

    def is_matrix(self, i: int) -> bool:
        return len(self.shapes[i]) == 2

    def factored(self, i: int) -> bool:
        return self.is_matrix(i)

    def num_chunks(self, i: int) -> int:
        # a matrix's U V^T is applied whole with addmm_ (no temp): no need to chunk it
        return 1 if self.is_matrix(i) else super().num_chunks(i)

    def target(self, p: torch.Tensor, i: int, k: int) -> torch.Tensor:
        return p if self.is_matrix(i) else super().target(p, i, k)

    def leaf_rank(self, i: int) -> int:
        m, n = self.shapes[i]
        return min(self.rank, m, n)


class LowRankEstimator(MatrixFactors, Estimator):
    """LOZO's low-rank two-point estimate (Chen et al., "Enhancing Zeroth-order Fine-tuning
    for Language Models with Low-rank Structures").

    Args:
        rank: ``r``, the rank of each matrix's perturbation (capped at ``min(m, n)``).
        interval: ``nu``, the number of steps between resamples of ``V``.
        queries: directions averaged per step; they share ``V`` and differ in ``U``.
    """

    name = "lowrank"
    provides = frozenset({"shared_subspace"})

    def __init__(self, rank: int = 2, interval: int = 50, queries: int = 1, chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(queries, chunk_size)
        self.rank = check_int("rank", rank)
        self.interval = check_int("interval", interval)
        self._v_cache: dict[int, tuple[int, torch.Tensor]] = {}

    def bind(self, names, params, run_seed) -> None:
        super().bind(names, params, run_seed)
        self._v_cache.clear()

    def period(self, step: int) -> int:
        """Index ``k`` of the V in use at ``step`` (V is resampled when ``step % interval == 0``)."""
        return step // self.interval

    def v(self, i: int, period: int, p: torch.Tensor) -> torch.Tensor:
        """Leaf ``i``'s ``V`` (n x r) of ``period``; cached for the current period only."""
        cached = self._v_cache.get(i)
        if cached is not None and cached[0] == period:
            return cached[1]
        g = rng.leaf_generator(self.run_seed, period, 0, i, rng.STREAM_LOWRANK_V, p.device)
        v = randn_like_leaf(p, g, (self.shapes[i][1], self.leaf_rank(i)))
        if cached is None or period > cached[0]:
            self._v_cache[i] = (period, v)
        return v

    def u(self, d: Direction, i: int, p: torch.Tensor) -> torch.Tensor:
        """Leaf ``i``'s ``U`` (m x r), fresh for every (step, query)."""
        g = rng.leaf_generator(self.run_seed, d.step, d.query, i, rng.STREAM_LOWRANK_U, p.device)
        return randn_like_leaf(p, g, (self.shapes[i][0], self.leaf_rank(i)))

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None):
        if not self.is_matrix(i):
            a, b = self.ranges[i][k]
            return Dense(draw(self.run_seed, d.step, d.query, i, k, b - a, p, out=out))
        k = self.period(d.step)
        return LowRank(self.u(d, i, p), self.v(i, k, p), k)

    def grad_scale(self, i: int) -> float:
        return 1.0 / self.leaf_rank(i) if self.is_matrix(i) else 1.0

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank, "interval": self.interval}
