"""A population of low-rank directions, each member its own copy of the batch in one forward.

In the spirit of EGGROLL (Sarkar et al., 2025, "Evolution Strategies at the Hyperscale":
low-rank perturbations of a whole population evaluated in batched forwards) and GRZO (2026: a
different perturbation per example of the batch). Per step, member ``k = 1..N`` perturbs every
matrix ``X`` (m x n) by ``eps E_k``, ``E_k = U_k V_k^T`` with ``U_k`` (m x r) and ``V_k`` (n x r)
both drawn fresh from ``(run seed, step, k, leaf)``, and every other tensor (biases, norms) by a
dense Gaussian ``z_k``. With ``perturbation="dual"`` (:class:`zotune.evaluation.Copies`) the
members are copies of the batch in ONE forward: copy ``k``'s ``nn.Linear`` output gets the side
term ``eps (x V_k) U_k^T`` (an ``nn.Embedding``'s ``eps U_k[ids] V_k^T``), so no weight is written
and no member's weight is ever materialised; the small dense tensors are perturbed per copy.

Coefficients come from the scheme (central: ``c_k = (L(x + eps E_k) - L(x - eps E_k)) / (2 eps)``
on ``2N`` copies; FZOO's one-sided normalised: ``c_k = (L(x + eps E_k) - L(x)) / sigma`` on
``N + 1``), and the update, regenerated from the seeds, is::

    X <- X - lr (1/N) sum_k c_k U_k V_k^T / r

written as one rank-``N r`` product ``[c_1 U_1 ... c_N U_N] [V_1 ... V_N]^T`` (no m x n temporary).
No state: nothing model-sized is kept between steps.
"""

from __future__ import annotations

import torch

from zotune import rng
from zotune._validate import check_int
from zotune.estimators.base import DEFAULT_CHUNK, Dense, Direction, Estimator, LowRank, randn_like_leaf
from zotune.estimators.gaussian import draw
from zotune.estimators.lowrank import MatrixFactors


class PopulationLowRank(MatrixFactors, Estimator):
    """``N = queries`` members per step, each a rank-``r`` direction ``U_k V_k^T`` per matrix.

    Args:
        queries: the population size ``N`` (copies of the batch per step: ``2N`` central, ``N + 1`` one-sided).
        rank: ``r``, the rank of each member's perturbation of a matrix (capped at ``min(m, n)``).
    """

    name = "population_lowrank"
    side_terms_only = True

    def __init__(self, queries: int = 8, rank: int = 1, chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(queries, chunk_size)
        self.rank = check_int("rank", rank)

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None):
        if not self.is_matrix(i):
            a, b = self.ranges[i][k]
            return Dense(draw(self.run_seed, d.step, d.query, i, k, b - a, p, out=out))
        m, n = self.shapes[i]
        r = self.leaf_rank(i)
        gu = rng.leaf_generator(self.run_seed, d.step, d.query, i, rng.STREAM_LOWRANK_U, p.device)
        gv = rng.leaf_generator(self.run_seed, d.step, d.query, i, rng.STREAM_POPULATION_V, p.device)
        return LowRank(randn_like_leaf(p, gu, (m, r)), randn_like_leaf(p, gv, (n, r)), d.step)

    def grad_scale(self, i: int) -> float:
        return 1.0 / self.leaf_rank(i) if self.is_matrix(i) else 1.0

    def config(self) -> dict:
        return {**super().config(), "rank": self.rank}
