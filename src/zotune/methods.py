"""The methods a run can name (``optim.method``), each built from an ``OptimConfig``.

One registry serves the CLI, the recipes and the benchmark grid, so a method is added in one
place. Every entry returns an object with ``step(closure)``, ``state_dict()`` and
``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zotune import estimators, rules
from zotune.fo import FOAdam, FOSGD
from zotune.step import ZOOptimizer


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "zo" (forward passes only) or "fo" (backpropagation)
    description: str
    build: Callable


def _estimator(o, default="gaussian", module=None):
    if default == "lowrank":
        est = estimators.LowRankEstimator(rank=o.rank, interval=o.interval, queries=o.queries)
    elif default == "blockwise":
        est = estimators.Blockwise()
    elif default == "forward":
        est = estimators.ForwardGradient(module, queries=o.queries)
    else:
        est = estimators.Gaussian(queries=o.queries, distribution=o.distribution)
    return estimators.Sparse(est, o.sparsity) if o.sparsity > 0 else est


def _zo(estimator: str, rule: Callable, conservative=False):
    def build(o, named, module=None, reduce=None, streamed=False):
        est = _estimator(o, estimator, module)
        mode = o.perturbation
        if streamed:  # streamed weights: both halves while a module is resident, updates deferred
            mode = "dual"
        elif mode == "auto":  # half-precision weights must not be written by the perturbation
            half = any(p.dtype in (torch.float16, torch.bfloat16) for p in named.values())
            mode = "swap" if half and module is not None and est.kind == "two_point" else "inplace"
        return ZOOptimizer(
            list(named.items()), est, rule(o), o.lr, o.eps, o.weight_decay, o.seed,
            conservative=conservative, max_nonfinite=o.max_nonfinite, reduce=reduce,
            module=module, perturbation=mode, defer_update=streamed,
        )
    return build


def _fo(cls, **extra):
    def build(o, named, module=None, reduce=None):
        kwargs = {"lr": o.lr, "weight_decay": o.weight_decay}
        if cls is FOAdam:
            kwargs["betas"] = tuple(o.betas)
        else:
            kwargs["momentum"] = o.momentum
        return cls(list(named.values()), **kwargs)
    return build


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("mezo", "zo", "MeZO / ZO-SGD: two-point Gaussian estimate", _zo("gaussian", lambda o: rules.sgd())),
        Method("zo-sgd-sign", "zo", "ZO-SGD-Sign", _zo("gaussian", lambda o: rules.sign(o.sign_mode))),
        Method("zo-sgd-momentum", "zo", "ZO-SGD-MMT (beta = optim.momentum or 0.9)",
               _zo("gaussian", lambda o: rules.momentum(o.momentum or 0.9))),
        Method("zo-sgd-cons", "zo", "ZO-SGD-Cons: best of x, x -+ lr g", _zo("gaussian", lambda o: rules.sgd(), True)),
        Method("zo-adam", "zo", "ZO-Adam", _zo("gaussian", lambda o: rules.adam(o.betas[0], o.betas[1]))),
        Method("zo-sgd-block", "zo", "ZO-SGD-Block: one query per layer block", _zo("blockwise", lambda o: rules.sgd())),
        Method("lozo", "zo", "LOZO (LOZO-M with optim.momentum > 0)",
               _zo("lowrank", lambda o: rules.lowrank_momentum(o.momentum) if o.momentum > 0 else rules.sgd())),
        Method("forward-grad", "zo", "Forward-Grad: forward-mode JVP, no backward", _zo("forward", lambda o: rules.sgd())),
        Method("fo-sgd", "fo", "first-order SGD (backprop)", _fo(FOSGD)),
        Method("fo-adam", "fo", "first-order Adam (backprop)", _fo(FOAdam)),
    ]
}


def build_optimizer(o, named: dict[str, torch.Tensor], module=None, reduce=None, streamed: bool = False):
    """Build ``o.method`` over the named trainable tensors (``streamed``: for streamed weights)."""
    from zotune._validate import unknown_choice

    if o.method not in METHODS:
        raise ValueError(unknown_choice("method", o.method, METHODS))
    if streamed:
        return METHODS[o.method].build(o, named, module, reduce, streamed=True)
    return METHODS[o.method].build(o, named, module, reduce)
