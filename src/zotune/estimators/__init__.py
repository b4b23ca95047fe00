"""Estimators: how a random direction is drawn, applied and regenerated from a seed.

Registry names: ``gaussian`` (MeZO), ``rademacher``, ``lowrank`` (LOZO), ``blockwise``
(ZO-SGD-Block), ``sparse`` (random masks around another estimator), ``forward`` (Forward-Grad),
``hessian`` (HiZOO's ``z / sqrt(H)``), ``magnitude`` (Sparse-MeZO's small-weight masks),
``population_lowrank`` (N low-rank members per step, evaluated as copies of the batch).
:class:`FixedMask` (perturb only the entries of fixed masks, e.g. a prefix's values) wraps one
by hand: its masks come from the model's layout, not from keyword arguments.
"""

from __future__ import annotations

from zotune._validate import build_checked, unknown_choice
from zotune.estimators.base import (
    Dense,
    Direction,
    Estimator,
    LowRank,
    add_direction_,
    to_dense,
)
from zotune.estimators.blockwise import Blockwise, layer_block_key
from zotune.estimators.fixed_mask import FixedMask
from zotune.estimators.forward import ForwardGradient
from zotune.estimators.gaussian import Gaussian
from zotune.estimators.hessian import HessianInformed
from zotune.estimators.magnitude import MagnitudeMasked
from zotune.estimators.lowrank import LowRankEstimator
from zotune.estimators.population import PopulationLowRank
from zotune.estimators.sparse import Sparse, layer_keep_ratios


def _sparse(sparsity: float = 0.2, inner: str | Estimator = "gaussian", **inner_kwargs) -> Sparse:
    base = inner if isinstance(inner, Estimator) else make_estimator(inner, **inner_kwargs)
    return Sparse(base, sparsity=sparsity)


def _wrapped(cls):
    def build(inner: str | Estimator = "gaussian", *, queries: int = 1, distribution: str = "gaussian", **kwargs):
        if isinstance(inner, Estimator):
            base = inner
        else:
            extra = {"distribution": distribution} if inner == "gaussian" else {}
            base = make_estimator(inner, queries=queries, **extra)
        return cls(base, **kwargs)
    return build


ESTIMATORS = {
    "gaussian": Gaussian,
    "rademacher": lambda **kw: Gaussian(distribution="rademacher", **kw),
    "lowrank": LowRankEstimator,
    "blockwise": Blockwise,
    "sparse": _sparse,
    "forward": ForwardGradient,
    "hessian": _wrapped(HessianInformed),
    "magnitude": _wrapped(MagnitudeMasked),
    "population_lowrank": PopulationLowRank,
}


def make_estimator(name: str, **kwargs) -> Estimator:
    """Build an estimator by registry name, e.g. ``make_estimator("lowrank", rank=4)``."""
    if name not in ESTIMATORS:
        raise ValueError(unknown_choice("estimator", name, ESTIMATORS))
    return build_checked("estimator", name, ESTIMATORS[name], kwargs)


__all__ = [
    "Blockwise",
    "Dense",
    "Direction",
    "ESTIMATORS",
    "Estimator",
    "FixedMask",
    "ForwardGradient",
    "Gaussian",
    "HessianInformed",
    "MagnitudeMasked",
    "LowRank",
    "LowRankEstimator",
    "PopulationLowRank",
    "Sparse",
    "add_direction_",
    "layer_block_key",
    "layer_keep_ratios",
    "make_estimator",
    "to_dense",
]
