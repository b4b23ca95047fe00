"""The methods a run can name (``optim.method``), each built from an ``OptimConfig``.

One registry serves the CLI, the recipes, config validation and the benchmark grid, so a method
is added in one place: a :class:`Method` says how to build it, which ``optim`` fields it defaults
differently (``defaults``, filled in where the config leaves a field unset) and what it can do
(capability flags read by :func:`zotune.config.validate`). Every entry returns an object with
``step(closure)``, ``state_dict()`` and ``load_state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zotune import estimators, rules
from zotune.fo import FOAdam, FOSGD
from zotune.step import ZOOptimizer


#: values of the optional ``optim`` fields for methods that do not set their own
COMMON_DEFAULTS = {"queries": 1, "distribution": "gaussian", "sparsity": 0.0, "hessian_smooth": 1e-6}


@dataclass(frozen=True)
class Method:
    """One method: how to build it, its own defaults, and what it supports.

    ``streamable``: evaluates both halves of a two-point estimate while a module is resident
    (streamed weights); ``min_queries``: the fewest directions per step it is defined for.
    """

    name: str
    family: str  # "zo" (forward passes only) or "fo" (backpropagation)
    description: str
    build: Callable
    defaults: dict = field(default_factory=dict)
    streamable: bool = False
    min_queries: int = 1
    sparse_masks: bool = True  # combines with optim.sparsity (random masks, ZO-Bench)
    half_precision: bool = True  # trains float16 / bfloat16 weights (ZO only: FO uses autograd)


def _estimator(o, default="gaussian", module=None):
    if default == "hessian":
        return estimators.HessianInformed(estimators.Gaussian(queries=o.queries, distribution=o.distribution),
                                          hessian_smooth=o.hessian_smooth)
    if default == "magnitude":
        return estimators.MagnitudeMasked(estimators.Gaussian(queries=o.queries, distribution=o.distribution),
                                          sparsity=o.sparsity)
    if default == "lowrank":
        est = estimators.LowRankEstimator(rank=o.rank, interval=o.interval, queries=o.queries)
    elif default == "blockwise":
        est = estimators.Blockwise()
    elif default == "forward":
        est = estimators.ForwardGradient(module, queries=o.queries)
    else:
        est = estimators.Gaussian(queries=o.queries, distribution=o.distribution)
    return estimators.Sparse(est, o.sparsity) if o.sparsity > 0 else est


def resolve_optim(o):
    """Fill the ``optim`` fields a config left unset (None) from its method's defaults, in place."""
    method = METHODS.get(o.method)
    own = method.defaults if method is not None else {}
    for key, common in COMMON_DEFAULTS.items():
        if getattr(o, key) is None:
            setattr(o, key, own.get(key, common))
    return o


def _zo(estimator: str, rule: Callable, conservative=False, scheme: str = "central"):
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
            module=module, perturbation=mode, defer_update=streamed, scheme=scheme,
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
        Method("mezo", "zo", "MeZO / ZO-SGD: two-point Gaussian estimate", _zo("gaussian", lambda o: rules.sgd()),
               streamable=True),
        Method("zo-sgd-sign", "zo", "ZO-SGD-Sign", _zo("gaussian", lambda o: rules.sign(o.sign_mode)),
               streamable=True),
        Method("zo-sgd-momentum", "zo", "ZO-SGD-MMT (beta = optim.momentum or 0.9)",
               _zo("gaussian", lambda o: rules.momentum(o.momentum or 0.9)), streamable=True),
        Method("zo-sgd-cons", "zo", "ZO-SGD-Cons: best of x, x -+ lr g", _zo("gaussian", lambda o: rules.sgd(), True),
               half_precision=False),
        Method("zo-adam", "zo", "ZO-Adam", _zo("gaussian", lambda o: rules.adam(o.betas[0], o.betas[1])),
               streamable=True),
        Method("zo-sgd-block", "zo", "ZO-SGD-Block: one query per layer block", _zo("blockwise", lambda o: rules.sgd()),
               streamable=True),
        Method("lozo", "zo", "LOZO (LOZO-M with optim.momentum > 0)",
               _zo("lowrank", lambda o: rules.lowrank_momentum(o.momentum) if o.momentum > 0 else rules.sgd()),
               streamable=True, sparse_masks=False),
        Method("fzoo", "zo", "FZOO: N one-sided Rademacher estimates, step normalised by the losses' spread",
               _zo("gaussian", lambda o: rules.sgd(), scheme="one_sided_normalised"),
               defaults={"queries": 8, "distribution": "rademacher"}, min_queries=2),
        Method("hizoo", "zo", "HiZOO: MeZO preconditioned by a diagonal Hessian estimate (optim.hessian_smooth)",
               _zo("hessian", lambda o: rules.sgd(), scheme="central_curvature"), sparse_masks=False),
        Method("sparse-mezo", "zo", "Sparse-MeZO: perturb and update only small weights (optim.sparsity of each matrix left alone)",
               _zo("magnitude", lambda o: rules.sgd()), defaults={"sparsity": 0.75}, sparse_masks=False),
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
    resolve_optim(o)
    if streamed:
        return METHODS[o.method].build(o, named, module, reduce, streamed=True)
    return METHODS[o.method].build(o, named, module, reduce)
