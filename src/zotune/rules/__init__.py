"""Update rules: composable per-leaf transforms (``sgd``, ``sign``, ``momentum``, ``adam``,
``lowrank_momentum``) and ``chain``. ZO-SGD-Cons is not a transform: it wraps the whole step
(it needs extra losses), see ``ZOOptimizer(conservative=True)``."""

from __future__ import annotations

from zotune._validate import build_checked, unknown_choice
from zotune.rules.adam import adam
from zotune.rules.base import DenseGrad, Grad, LowRankGrad, Transform, chain
from zotune.rules.momentum import lowrank_momentum, momentum
from zotune.rules.sgd import sgd, sign

RULES = {
    "sgd": sgd,
    "sign": sign,
    "momentum": momentum,
    "adam": adam,
    "lowrank_momentum": lowrank_momentum,
}


def make_rule(name: str, **kwargs) -> Transform:
    """Build a rule by registry name, e.g. ``make_rule("momentum", beta=0.9)``."""
    if name not in RULES:
        raise ValueError(unknown_choice("rule", name, RULES))
    return build_checked("rule", name, RULES[name], kwargs)


__all__ = [
    "DenseGrad", "Grad", "LowRankGrad", "RULES", "Transform",
    "adam", "chain", "lowrank_momentum", "make_rule", "momentum", "sgd", "sign",
]
