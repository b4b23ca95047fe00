"""Sparse perturbation masks (ZO-Bench Sec. 5, Table 8), wrapping any estimator.

Layer-wise sparsity ratios come from magnitude pruning: a global threshold ``tau`` is chosen so
that a fraction ``sparsity`` of all weights have ``|w| < tau``; leaf ``l``'s ratio ``s_l`` is the
fraction of its own weights below ``tau``. Every step draws, per leaf, a fresh random mask that
keeps each entry with probability ``1 - s_l`` (regenerated from the seed, never stored), and the
inner estimator's direction is multiplied by it: ``z' = m * z``. Fewer perturbed coordinates
lower the estimate's variance; a moderate ratio (about 20 %) helped in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zotune import rng
from zotune._validate import check_range
from zotune.estimators.base import Dense, DenseWrapper, Direction, Estimator, to_dense

_SAMPLE = 1 << 20  # elements sampled to estimate the global magnitude threshold


class Sparse(DenseWrapper):
    """Masks another estimator's directions with random layer-wise sparse masks.

    Args:
        inner: the dense estimator whose directions are masked (low-rank ones are refused).
        sparsity: overall fraction of weights left unperturbed, in [0, 1).
    """

    name = "sparse"

    needs_dense_because = "a per-entry mask of U V^T is not low rank"

    def __init__(self, inner: Estimator, sparsity: float = 0.2) -> None:
        super().__init__(inner)
        self.sparsity = check_range("sparsity", sparsity, 0.0, 1.0)
        self.keep: list[float] = []

    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        super().bind(names, params, run_seed)
        self.keep = layer_keep_ratios(params, self.sparsity, run_seed)

    def num_chunks(self, i: int) -> int:
        return self.inner.num_chunks(i)

    def target(self, p: torch.Tensor, i: int, k: int) -> torch.Tensor:
        return self.inner.target(p, i, k)

    def factored(self, i: int) -> bool:
        return self.inner.factored(i)

    def mask(self, step: int, i: int, k: int, shape, p: torch.Tensor) -> torch.Tensor:
        """Chunk ``k`` of leaf ``i``'s keep-mask at ``step`` (shared by the step's queries)."""
        g = rng.generator(rng.derive_seed(self.run_seed, rng.STREAM_MASK, step, i, k), p.device)
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        return torch.empty(shape, dtype=dtype, device=p.device).bernoulli_(self.keep[i], generator=g)

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None):
        inner = self.inner.leaf_direction(d, i, p, k, out=out)
        if inner is None or self.keep[i] >= 1.0:
            return inner
        if isinstance(inner, Dense):
            return Dense(inner.z.mul_(self.mask(d.step, i, k, inner.z.shape, p)))
        z = to_dense(inner)  # a masked low-rank direction is no longer low rank
        return Dense(z.mul_(self.mask(d.step, i, k, z.shape, p)).view(-1))

    def config(self) -> dict:
        return {"name": self.name, "sparsity": self.sparsity, "inner": self.inner.config()}

    def state_dict(self) -> dict:
        # the ratios were measured on the weights at the start of training: a resumed run must
        # keep them, not re-measure them on the partly tuned weights
        return {"keep": list(self.keep)}

    def load_state_dict(self, state: dict) -> None:
        if len(state["keep"]) != len(self.keep):
            raise ValueError(f"sparse state has {len(state['keep'])} leaves, the optimizer {len(self.keep)}")
        self.keep = list(state["keep"])


def layer_keep_ratios(params: Sequence[torch.Tensor], sparsity: float, seed: int) -> list[float]:
    """Per-leaf keep probabilities ``1 - s_l`` from a global magnitude threshold.

    The threshold is the ``sparsity`` quantile of ``|w|`` estimated on a seeded random sample of
    at most 2**20 weights (drawn in proportion to leaf size); ratios are then exact per leaf.
    """
    if sparsity <= 0.0:
        return [1.0] * len(params)
    total = sum(p.numel() for p in params)
    g = torch.Generator().manual_seed(rng.derive_seed(seed, rng.STREAM_MASK, -1))
    samples = []
    for p in params:
        k = max(1, round(_SAMPLE * p.numel() / total))
        flat = p.detach().reshape(-1)
        idx = torch.randint(0, flat.numel(), (k,), generator=g).to(flat.device)
        samples.append(flat[idx].abs().float().cpu())
    pool = torch.cat(samples)
    tau = pool.kthvalue(max(1, int(sparsity * pool.numel()))).values.item()
    return [1.0 - (p.detach().abs() < tau).float().mean().item() for p in params]
