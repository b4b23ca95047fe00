"""The methods a run can name (``optim.method``): one spec each, read by everything that needs
to know about methods.

A :class:`Method` says what the method is made of (estimator, update rule, sampling scheme),
which ``optim`` fields it defaults differently, which fields it reads, which ``zotune`` class is
its preset, and what it can do (capability flags). The presets (:data:`zotune.presets.PRESETS`),
the command line (``zotune methods``, ``zotune memory --help``), config validation
(:func:`zotune.config.validate`), the memory model (:mod:`zotune.bench.memory_model`) and the
studies all read :data:`METHODS`; adding a method is one entry here (plus its preset class, and
its terms in the memory model if it brings a new estimator or rule: the table test
``tests/test_methods.py`` says what is missing). Every built method has ``step(closure)``,
``state_dict()`` and ``load_state_dict()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zotune import estimators, rules
from zotune.defaults import SCHEME_EPS, starting_point
from zotune.fo import FOAdam, FOSGD
from zotune.params import SCHEMES as ALL_SCHEMES  # what trainable.scheme can name
from zotune.step import ZOOptimizer

log = logging.getLogger("zotune.methods")

#: trained entries above which per-example directions warn of their cost (2 B perturbed copies a step)
PER_EXAMPLE_LARGE = 10_000_000

#: values of the optional ``optim`` fields for methods that do not set their own
COMMON_DEFAULTS = {"queries": 1, "distribution": "gaussian", "sparsity": 0.0, "hessian_smooth": 1e-6}


@dataclass(frozen=True)
class Method:
    """One method: what it is made of, its own defaults, and what it supports.

    Parts: ``estimator`` (a name in :data:`ESTIMATOR_BUILDERS`; None for first-order methods),
    ``rule`` (a name in :data:`RULE_BUILDERS`), ``scheme`` (zotune.schemes: ``central``,
    ``one_sided_normalised``, ``central_curvature``), ``conservative`` (ZO-SGD-Cons's best of
    three). ``preset``: the name of its class in ``zotune`` (``zotune.MeZO`` ...).
    ``defaults``: ``optim`` fields it sets differently when the config leaves them unset;
    ``reads``: ``optim`` fields beyond lr / eps / weight_decay / seed / queries it uses.

    Capabilities: ``two_point`` (one central difference of two losses per direction, the
    estimate streamed weights and ``perturbation: dual`` evaluate), ``stateless`` (keeps no
    optimizer state between steps: nothing model-sized to store or checkpoint),
    ``data_parallel`` (ranks agree on every step when only scalars are reduced, or DDP for
    first-order), ``half_precision`` (trains float16 / bfloat16 weights), ``streamable``
    (evaluates both halves while a module is resident: ``model.offload``), ``sparse_masks``
    (combines with random masks, ``optim.sparsity``), ``schemes`` (trainable schemes it
    supports), ``min_queries`` (the fewest directions per step it is defined for), ``per_example``
    (takes ``optim.perturbation: per_example``: a central difference per direction, directions
    drawn fresh each step). ``perturbation``: the evaluation the method always uses (None: ``optim.perturbation``).
    """

    name: str
    family: str  # "zo" (forward passes only) or "fo" (backpropagation)
    title: str  # the name the papers' tables use (ZO-Bench's "ZO-SGD" for MeZO)
    description: str
    preset: str
    estimator: str | None
    rule: str
    scheme: str = "central"
    conservative: bool = False
    defaults: dict = field(default_factory=dict)
    reads: tuple[str, ...] = ()
    two_point: bool = True
    stateless: bool = True
    data_parallel: bool = True
    half_precision: bool = True
    streamable: bool = False
    sparse_masks: bool = True
    schemes: tuple[str, ...] = ALL_SCHEMES
    min_queries: int = 1
    per_example: bool = False
    perturbation: str | None = None

    @property
    def per_example_only(self) -> bool:
        """Its evaluation is per-example directions (one query per example of the batch)."""
        return self.perturbation == "per_example"

    def flags(self) -> list[str]:
        """The capability flags that hold, by name (for ``zotune methods``)."""
        names = ("two_point", "stateless", "data_parallel", "half_precision", "streamable", "sparse_masks",
                 "per_example")
        return [n for n in names if getattr(self, n)]


def _zo(name, title, description, preset, estimator, rule, **kw) -> Method:
    return Method(name, "zo", title, description, preset, estimator, rule, **kw)


def _fo(name, title, description, preset, rule, **kw) -> Method:
    # autograd in the weights' dtype: first-order methods train float32 weights
    return Method(name, "fo", title, description, preset, None, rule, two_point=False, half_precision=False,
                  sparse_masks=False, **kw)


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        _zo("mezo", "ZO-SGD", "MeZO / ZO-SGD: two-point Gaussian estimate", "MeZO",
            "gaussian", "sgd", streamable=True, per_example=True),
        _zo("zo-sgd-sign", "ZO-SGD-Sign", "ZO-SGD-Sign: only the sign of the projected gradient", "ZOSGDSign",
            "gaussian", "sign", reads=("sign_mode",), streamable=True, per_example=True),
        _zo("zo-sgd-momentum", "ZO-SGD-MMT", "ZO-SGD-MMT (beta = optim.momentum or 0.9)", "ZOSGDMomentum",
            "gaussian", "momentum", reads=("momentum",), stateless=False, streamable=True, per_example=True),
        _zo("zo-sgd-cons", "ZO-SGD-Cons", "ZO-SGD-Cons: best of x, x -+ lr g", "ZOSGDConservative",
            "gaussian", "sgd", conservative=True, half_precision=False, per_example=True),
        _zo("zo-adam", "ZO-Adam", "ZO-Adam: AMSGrad-style Adam on the two-point estimate", "ZOAdam",
            "gaussian", "adam", reads=("betas",), stateless=False, streamable=True, per_example=True),
        _zo("zo-sgd-block", "ZO-SGD-Block", "ZO-SGD-Block: one query per layer block", "ZOSGDBlock",
            "blockwise", "sgd", streamable=True),
        _zo("lozo", "LOZO", "LOZO: low-rank directions U V^T (LOZO-M with optim.momentum > 0)", "LOZO",
            "lowrank", "lowrank_momentum", reads=("rank", "interval", "momentum"), stateless=False,
            streamable=True, sparse_masks=False),
        _zo("fzoo", "FZOO", "FZOO: N one-sided Rademacher estimates, step normalised by the losses' spread", "FZOO",
            "gaussian", "sgd", scheme="one_sided_normalised", defaults={"queries": 8, "distribution": "rademacher"},
            two_point=False, min_queries=2),
        _zo("hizoo", "HiZOO", "HiZOO: MeZO preconditioned by a diagonal Hessian estimate (optim.hessian_smooth)",
            "HiZOO", "hessian", "sgd", scheme="central_curvature", reads=("hessian_smooth",), two_point=False,
            stateless=False, sparse_masks=False),
        _zo("sparse-mezo", "Sparse-MeZO",
            "Sparse-MeZO: perturb and update only small weights (optim.sparsity of each matrix left alone)",
            "SparseMeZO", "magnitude", "sgd", defaults={"sparsity": 0.75}, reads=("sparsity",), stateless=False,
            sparse_masks=False, per_example=True),
        _zo("forward-grad", "Forward-Grad", "Forward-Grad: forward-mode JVP, no backward", "ForwardGrad",
            "forward", "sgd", two_point=False, sparse_masks=False),
        _fo("fo-sgd", "FO-SGD", "first-order SGD (backprop; optim.momentum)", "FOSGD", "sgd", reads=("momentum",)),
        _fo("fo-adam", "FO-Adam", "first-order Adam (backprop)", "FOAdam", "adam", reads=("betas",),
            stateless=False),
    ]
}


def resolve_optim(o, scheme: str = "full"):
    """Fill the ``optim`` fields a config left unset (None) from its method's defaults, in place;
    lr and eps from the method's starting point for ``scheme`` (:mod:`zotune.defaults`; a debug
    line says so; a run's log says it at info level, after the config was accepted)."""
    method = METHODS.get(o.method)
    own = method.defaults if method is not None else {}
    for key, common in COMMON_DEFAULTS.items():
        if getattr(o, key) is None:
            setattr(o, key, own.get(key, common))
    if method is not None and (o.lr is None or o.eps is None):
        start = starting_point(o.method, scheme if scheme in SCHEME_EPS else "full")
        unset = [k for k in ("lr", "eps") if getattr(o, k) is None]
        for key in unset:
            setattr(o, key, getattr(start, key))
        log.debug("optim.%s not set: %s for %s on %s (%s; `zotune tune` probes one for your model and task)",
                 " / ".join(unset), " / ".join(f"{getattr(o, k):g}" for k in unset), o.method, scheme, start.evidence)
    return o


# ----------------------------------------------------------------------------- building
def _gaussian(o, module):
    return estimators.Gaussian(queries=o.queries, distribution=o.distribution)


#: estimator name -> build(optim config, module) (random masks are added by build_optimizer)
ESTIMATOR_BUILDERS: dict[str, Callable] = {
    "gaussian": _gaussian,
    "lowrank": lambda o, module: estimators.LowRankEstimator(rank=o.rank, interval=o.interval, queries=o.queries),
    "blockwise": lambda o, module: estimators.Blockwise(),
    "forward": lambda o, module: estimators.ForwardGradient(module, queries=o.queries),
    "hessian": lambda o, module: estimators.HessianInformed(_gaussian(o, module), hessian_smooth=o.hessian_smooth),
    "magnitude": lambda o, module: estimators.MagnitudeMasked(_gaussian(o, module), sparsity=o.sparsity),
}

#: rule name -> build(optim config) for ZO methods
RULE_BUILDERS: dict[str, Callable] = {
    "sgd": lambda o: rules.sgd(),
    "sign": lambda o: rules.sign(o.sign_mode),
    "momentum": lambda o: rules.momentum(o.momentum or 0.9),
    "adam": lambda o: rules.adam(o.betas[0], o.betas[1]),
    # LOZO: plain low-rank steps without momentum, LOZO-M's projected momentum with it
    "lowrank_momentum": lambda o: rules.lowrank_momentum(o.momentum) if o.momentum > 0 else rules.sgd(),
}


def _require_dense(method: Method, what: str) -> None:
    """Masks multiply a direction entry by entry: only methods drawing dense per-entry directions take them."""
    if not method.sparse_masks:
        raise ValueError(f"{what} does not combine with {method.name}: its directions are not dense per-entry draws")


def _build_zo(method: Method, o, named, module=None, reduce=None, streamed=False, masks=None) -> ZOOptimizer:
    est = ESTIMATOR_BUILDERS[method.estimator](o, module)
    if o.sparsity > 0 and "sparsity" not in method.reads:
        _require_dense(method, f"optim.sparsity={o.sparsity} (random sparse masks)")
        est = estimators.Sparse(est, o.sparsity)
    if masks:
        _require_dense(method, "fixed perturbation masks")
        est = estimators.FixedMask(est, masks)
    mode = o.perturbation
    if method.perturbation is not None:
        if mode not in ("auto", method.perturbation):
            raise ValueError(f"{method.name} evaluates with perturbation={method.perturbation!r}, "
                             f"not optim.perturbation={mode!r} (leave it auto)")
        mode = method.perturbation
    if mode == "per_example":
        if not method.per_example:
            raise ValueError(f"perturbation='per_example' is for methods with a central difference per direction "
                             f"and directions drawn fresh each step; {method.name} has not (see `zotune methods`)")
        # low-rank directions perturb a matrix through side terms: only the other tensors are copied
        entries = sum(p.numel() for p in named.values() if not (est.side_terms_only and p.dim() == 2))
        if entries > PER_EXAMPLE_LARGE:
            log.warning("per-example directions run each example's rows with its own perturbed copy of the trained "
                        "tensors: %d entries, so a step draws 2 x %d such copies; it suits small trained sets "
                        "(prefix, prompt, norms, LoRA)", entries, o.queries)
    if streamed:  # streamed weights: both halves while a module is resident, updates deferred
        mode = "dual"
    elif mode == "auto":  # half-precision weights must not be written by the perturbation
        half = any(p.dtype in (torch.float16, torch.bfloat16) for p in named.values())
        mode = "swap" if half and module is not None and est.kind == "two_point" else "inplace"
    return ZOOptimizer(
        list(named.items()), est, RULE_BUILDERS[method.rule](o), o.lr, o.eps, o.weight_decay, o.seed,
        conservative=method.conservative, max_nonfinite=o.max_nonfinite, reduce=reduce,
        module=module, perturbation=mode, defer_update=streamed, scheme=method.scheme,
    )


def _build_fo(method: Method, o, named, module=None, reduce=None, streamed=False, masks=None):
    if masks:
        raise ValueError(f"fixed perturbation masks are for ZO methods; {method.name} follows the gradient of every "
                         "trained entry")
    if method.rule == "adam":
        return FOAdam(list(named.values()), lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    return FOSGD(list(named.values()), lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)


def build_optimizer(o, named: dict[str, torch.Tensor], module=None, reduce=None, streamed: bool = False,
                    masks: dict[str, torch.Tensor] | None = None):
    """Build ``o.method`` over the named trainable tensors (``streamed``: for streamed weights;
    ``masks``: name -> boolean mask of the entries a ZO method perturbs, :class:`FixedMask`)."""
    from zotune._validate import unknown_choice

    if o.method not in METHODS:
        raise ValueError(unknown_choice("method", o.method, METHODS))
    method = METHODS[o.method]
    resolve_optim(o)
    if streamed and not method.streamable:
        raise ValueError(f"optim.method {o.method!r} cannot train streamed weights (model.offload): "
                         "it does not evaluate both halves of a two-point estimate while a module is resident")
    build = _build_zo if method.family == "zo" else _build_fo
    return build(method, o, named, module, reduce, streamed, masks)


# population low-rank (EGGROLL-style): N low-rank members per step, evaluated as copies of the
# batch in one forward with optim.perturbation=dual (side terms, no member weight materialised)
ESTIMATOR_BUILDERS["population_lowrank"] = lambda o, module: estimators.PopulationLowRank(
    queries=o.queries, rank=o.rank)
METHODS["population"] = _zo(
    "population", "Population-LR",
    "Population low-rank (EGGROLL-style): N members U_k V_k^T per matrix, one copy of the batch each "
    "(optim.perturbation=dual: all in one forward)", "PopulationLowRank", "population_lowrank", "sgd",
    defaults={"queries": 8}, reads=("rank",), sparse_masks=False, per_example=True)

# per-example directions (GRZO-style): MeZO's step with each example of the batch its own direction,
# at MeZO's two copies of the batch a step (zotune.evaluation.PerExample)
METHODS["per-example"] = _zo(
    "per-example", "PE-MeZO",
    "Per-example MeZO (GRZO-style): each example of the batch its own direction z_j, both copies (+-eps z_j) in "
    "one forward; optim.queries = train.batch_size", "PerExampleMeZO", "gaussian", "sgd",
    perturbation="per_example", per_example=True, data_parallel=False)

# per-example low-rank directions (EGGROLL x GRZO): each example of the batch its own U_j V_j^T per
# matrix, as a side term of one shared forward: all weights per example at about MeZO's cost
METHODS["per-example-lowrank"] = _zo(
    "per-example-lowrank", "PE-LR",
    "Per-example low-rank (EGGROLL-style side terms, GRZO-style one direction per example): example j's "
    "U_j V_j^T per matrix, both copies (+-eps) in one forward; optim.queries = train.batch_size",
    "PerExampleLowRank", "population_lowrank", "sgd", reads=("rank",), sparse_masks=False,
    perturbation="per_example", per_example=True, data_parallel=False)
