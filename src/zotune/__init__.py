"""zotune: memory-efficient zeroth-order (ZO) fine-tuning of language models.

The optimizers follow the ``torch.optim`` contract with a closure that returns the loss::

    import zotune
    opt = zotune.MeZO(model.parameters(), lr=1e-6, eps=1e-3)
    loss = opt.step(lambda: model(**batch).loss)
"""

__version__ = "0.1.0"

from zotune.estimators import make_estimator
from zotune.fo import FOAdam, FOSGD, HybridOptimizer
from zotune.presets import (
    FZOO,
    LOZO,
    HiZOO,
    SparseMeZO,
    PRESETS,
    ForwardGrad,
    MeZO,
    PerExampleLowRank,
    PerExampleMeZO,
    PopulationLowRank,
    ZOAdam,
    ZOSGDConservative,
    ZOSGDMomentum,
    ZOSGDBlock,
    ZOSGDSign,
)
from zotune.rules import make_rule
from zotune.schedules import LRSchedule, TimedLRSchedule, lr_multiplier, make_schedule
from zotune.step import NonFiniteLossError, ZOOptimizer

__all__ = [
    "FOAdam", "FOSGD", "FZOO", "ForwardGrad", "HiZOO", "SparseMeZO", "HybridOptimizer", "LOZO", "MeZO", "NonFiniteLossError",
    "PerExampleLowRank", "PerExampleMeZO", "PopulationLowRank", "PRESETS", "ZOAdam", "ZOOptimizer", "ZOSGDConservative", "ZOSGDBlock", "ZOSGDMomentum", "ZOSGDSign",
    "LRSchedule", "TimedLRSchedule", "lr_multiplier", "make_estimator", "make_rule", "make_schedule",
]
