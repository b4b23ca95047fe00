"""The papers' optimizers as named presets of :class:`~zotune.step.ZOOptimizer`.

Every preset documents its update equation and what ``lr`` and ``eps`` scale. Throughout,
``c = (L(x + eps z) - L(x - eps z)) / (2 eps)`` is the projected gradient (an estimate of the
directional derivative along ``z``), so ``eps`` only sets where the losses are taken, never the
step length; ``lr`` multiplies the whole estimate, with no hidden factor.

Each class is the preset of one method of :data:`zotune.methods.METHODS` (its ``preset`` field),
and :data:`PRESETS` is read from that registry: a method without its class here fails at import.
"""

from __future__ import annotations

from torch import nn

from zotune.estimators import Blockwise, ForwardGradient, Gaussian, HessianInformed, LowRankEstimator, MagnitudeMasked
from zotune.estimators import PopulationLowRank as PopulationLowRankEstimator
from zotune.fo import FOAdam, FOSGD  # noqa: F401 (PRESETS below looks the presets up by name)
from zotune.methods import METHODS
from zotune.rules import adam, lowrank_momentum, momentum, sgd, sign
from zotune.schemes import CentralWithCurvature, OneSidedNormalised
from zotune.step import ZOOptimizer


class MeZO(ZOOptimizer):
    """MeZO (Malladi et al., 2023): ZO-SGD with the two-point Gaussian estimate.

    ``x <- x - lr * (c * z + weight_decay * x)``, ``z ~ N(0, I)`` regenerated from the seed;
    with ``queries = q > 1``, ``c z`` is averaged over ``q`` directions (ZO-Bench's q-query RGE).
    ``lr`` scales ``c z`` directly: the expected step is ``lr * grad``. Papers' defaults:
    ``lr=1e-6`` (OPT), ``eps=1e-3``; on SmolLM2-135M 3e-5 was best on SST-2's dev rows
    (:mod:`zotune.defaults`, which recipes without an lr use; ``zotune tune`` probes one).

    Example::

        opt = zotune.MeZO(model.parameters(), lr=1e-6, eps=1e-3)
        for batch in data:
            loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, queries=1, distribution="gaussian",
                 **kwargs):
        super().__init__(params, Gaussian(queries, distribution), sgd(), lr, eps, weight_decay, seed, **kwargs)


class ZOSGDSign(ZOOptimizer):
    """ZO-SGD-Sign (ZO-Bench appendix A): ``x <- x - lr * sign(c) * z``.

    Only the sign of the projected gradient is kept, so the step length is ``lr * |z|`` whatever
    the loss difference; ``lr`` must therefore be much smaller than MeZO's for the same movement.
    ``mode="elementwise"`` uses ``sign(c z)`` coordinate-wise instead.
    """

    def __init__(self, params, lr=1e-7, eps=1e-3, weight_decay=0.0, seed=0, mode="scalar", queries=1, **kwargs):
        super().__init__(params, Gaussian(queries), sign(mode), lr, eps, weight_decay, seed, **kwargs)


class ZOSGDMomentum(ZOOptimizer):
    """ZO-SGD-MMT (ZO-Bench appendix A): ``m <- beta m + c z``; ``x <- x - lr * m``.

    ``lr`` scales the momentum buffer, whose steady-state size is ``1 / (1 - beta)`` times the
    estimate (10x at ``beta=0.9``): use about a tenth of MeZO's lr. One model-size buffer.
    """

    def __init__(self, params, lr=1e-7, eps=1e-3, weight_decay=0.0, seed=0, beta=0.9, queries=1, **kwargs):
        super().__init__(params, Gaussian(queries), momentum(beta), lr, eps, weight_decay, seed, **kwargs)


class ZOSGDConservative(ZOOptimizer):
    """ZO-SGD-Cons (ZO-Bench appendix A): ``x <- argmin over {x, x - lr c z, x + lr c z} of L``.

    Three extra forward passes per step (five in all); ``lr`` and ``eps`` as in MeZO.
    """

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, queries=1, **kwargs):
        super().__init__(params, Gaussian(queries), sgd(), lr, eps, weight_decay, seed, conservative=True, **kwargs)


class ZOSGDBlock(ZOOptimizer):
    """ZO-SGD-Block (ZO-Bench Sec. 5): one query per block of parameters (by default one block
    per transformer layer), every block covered each step:

    ``c_b = (L(x + eps z_b) - L(x - eps z_b)) / (2 eps)``; ``x_b <- x_b - lr * c_b * z_b``.
    A step costs ``2 * num_blocks`` forward passes (as q-query RGE with ``q = num_blocks``) with
    lower variance than one direction over the whole model: each block's noise is its share of a
    whole-model direction's, so with B blocks an lr up to about B times MeZO's keeps MeZO's noise
    per forward pass (``zotune train`` starts at 30x MeZO's, ``zotune.defaults``); ``eps`` as in MeZO.
    """

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, **kwargs):
        super().__init__(params, Blockwise(), sgd(), lr, eps, weight_decay, seed, **kwargs)


class ZOAdam(ZOOptimizer):
    """ZO-Adam (ZO-AdaMM; ZO-Bench appendix A), fed with the Gaussian estimate ``g = c z``:

    ``m <- b1 m + (1-b1) g``; ``v <- b2 v + (1-b2) g^2``;
    ``x <- x - lr * m_hat / (sqrt(max(v_hat_t, v_hat_{t-1})) + adam_eps)``.
    The update is scale-free in ``g``: ``lr`` is close to the per-coordinate step length, so it is
    far larger than MeZO's (ZO-Bench used about 1e-5 to 1e-4). Per unit lr it moves along the
    gradient about as far as ZO-Sign (``E[c z] = g``, ``rms(c z) ~ ||g||``), with a fifth of its
    noise, so a recipe without an lr starts from ZO-Sign's (``zotune.defaults``). Two model-size buffers.
    """

    def __init__(
        self, params, lr=1e-5, eps=1e-3, weight_decay=0.0, seed=0, betas=(0.9, 0.999), adam_eps=1e-8,
        queries=1, **kwargs,
    ):
        rule = adam(betas[0], betas[1], adam_eps)
        super().__init__(params, Gaussian(queries), rule, lr, eps, weight_decay, seed, **kwargs)


class LOZO(ZOOptimizer):
    """LOZO (Chen et al., 2024): low-rank ZO-SGD; with ``momentum > 0``, LOZO-M.

    Each matrix ``X`` (m x n) is perturbed by ``eps U V^T`` (``U``: m x r fresh every step,
    ``V``: n x r resampled every ``interval`` steps) and updated by
    ``X <- X - lr * c * U V^T / r`` -- the paper's Algorithm 1, with the ``1/r`` kept explicit:
    ``lr`` scales ``c U V^T / r``, whose expected value is the gradient projected onto the span
    of ``V``, so lr is comparable to MeZO's (the paper's code and some forks fold ``1/r`` into
    lr; here it is not). Vectors (biases, norms) use a Gaussian ``z`` as in MeZO.

    LOZO-M (``momentum = beta > 0``): ``N <- beta N + (1 - beta) c U`` per matrix (m x r; projected
    as ``N <- N V_old^T V_new / n`` when V is resampled) and ``X <- X - lr N V^T / r``.
    """

    def __init__(
        self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, rank=2, interval=50, momentum=0.0,
        queries=1, **kwargs,
    ):
        rule = lowrank_momentum(momentum) if momentum > 0 else sgd()
        est = LowRankEstimator(rank=rank, interval=interval, queries=queries)
        super().__init__(params, est, rule, lr, eps, weight_decay, seed, **kwargs)


class ForwardGrad(ZOOptimizer):
    """Forward-Grad (Baydin et al., 2022; ZO-Bench): ``x <- x - lr * (grad L . z) z``.

    The directional derivative is exact (forward-mode AD), so ``eps`` is unused; ``lr`` as in
    MeZO. Needs the ``module`` that the closure runs, to swap its weights for dual tensors.
    """

    def __init__(self, params, module: nn.Module, lr=1e-6, weight_decay=0.0, seed=0, queries=1, **kwargs):
        super().__init__(params, ForwardGradient(module, queries), sgd(), lr, 1e-3, weight_decay, seed, **kwargs)


class FZOO(ZOOptimizer):
    """FZOO (Dang et al., ICLR 2026): batched one-sided Rademacher estimates, normalised by the
    spread of the losses.

    Per step, ``N = queries`` Rademacher directions ``u_j`` (entries +-1) and ``N + 1`` forward passes::

        L_0 = L(x),  L_j = L(x + eps u_j),  sigma = std(L_1, ..., L_N)
        x <- x - lr * (1 / N) sum_j ((L_j - L_0) / sigma) u_j  (+ weight decay)

    Dividing by ``sigma`` makes the step scale-free (a normalised SGD): its length is about
    ``lr`` per coordinate whatever the size of the loss differences, larger when the N losses
    agree on a direction. ``eps`` only places the losses. Needs ``N >= 2``. The reference code's
    defaults: ``queries=8``, ``lr=1e-5`` (OPT / LLaMA, full fine-tuning), ``eps=1e-3``; on
    SmolLM2-135M SST-2's dev rows chose 1e-3 (full), 1e-2 (LoRA), 0.1 (prefix): see
    :mod:`zotune.defaults`.
    No model-size buffer. (The paper evaluates the ``N`` copies in one batched forward on a GPU;
    here they run one after another, which costs the same on a CPU.)

    Example::

        opt = zotune.FZOO(model.named_parameters(), lr=1e-5, queries=8)
        loss = opt.step(lambda: model(**batch).loss)
    """

    def __init__(self, params, lr=1e-5, eps=1e-3, weight_decay=0.0, seed=0, queries=8, distribution="rademacher",
                 **kwargs):
        super().__init__(params, Gaussian(queries, distribution), sgd(), lr, eps, weight_decay, seed,
                         scheme=OneSidedNormalised(), **kwargs)


class HiZOO(ZOOptimizer):
    """HiZOO (Zhao et al., ICLR 2025): MeZO with directions preconditioned by a diagonal Hessian
    estimate ``H`` learned from the same losses plus ``L(x)`` (three forward passes a step)::

        L+- = L(x +- eps z / sqrt(H)),  L0 = L(x),  h = |L+ + L- - 2 L0| / (2 eps^2)
        H <- (1 - alpha) H + alpha h H z^2
        x <- x - lr ((L+ - L-) / (2 eps)) z / sqrt(H)

    ``alpha = hessian_smooth``: the reference scripts use 1e-8 for 13B-parameter models, where a
    step's curvature is large relative to H; smaller models and short runs need a larger alpha for
    H to move at all. ``H`` starts at ones (the first step is MeZO's). One model-size float32
    buffer (``H``). ``lr`` and ``eps`` as in MeZO.
    """

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, hessian_smooth=1e-6, queries=1,
                 **kwargs):
        est = HessianInformed(Gaussian(queries), hessian_smooth=hessian_smooth)
        super().__init__(params, est, sgd(), lr, eps, weight_decay, seed, scheme=CentralWithCurvature(), **kwargs)


class SparseMeZO(ZOOptimizer):
    """Sparse-MeZO (Liu et al., NeurIPS 2025): MeZO that perturbs and updates only the weights of
    small magnitude.

    ``m = 1[|x| <= tau_l]`` per matrix (``tau_l`` the ``1 - sparsity`` quantile of the layer's
    initial ``|x|``; the mask follows the current weights each step); ``x <- x - lr c (m * z)``
    with ``c = (L(x + eps m z) - L(x - eps m z)) / (2 eps)``. Vectors (biases, norms) are not
    masked. Two forward passes a step and no model-size buffer (the mask is packed bits, 1/32 of
    the model). ``sparsity`` is the fraction of each matrix left alone.
    """

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, sparsity=0.75, queries=1, **kwargs):
        est = MagnitudeMasked(Gaussian(queries), sparsity=sparsity)
        super().__init__(params, est, sgd(), lr, eps, weight_decay, seed, **kwargs)


class PopulationLowRank(ZOOptimizer):
    """A population of ``N = queries`` low-rank perturbations per step, each member one copy of
    the batch in a single forward (EGGROLL, Sarkar et al. 2025, "Evolution Strategies at the
    Hyperscale"; GRZO 2026's per-example perturbations in spirit).

    Member ``k`` perturbs each matrix by ``eps U_k V_k^T`` (``U_k``: m x r, ``V_k``: n x r, both
    fresh per step and member) and each other tensor by a dense Gaussian ``z_k``; then, with
    ``c_k`` from the scheme (central: ``(L(x + eps E_k) - L(x - eps E_k)) / (2 eps)``, ``2N``
    copies; ``scheme="one_sided_normalised"``, FZOO's ``(L(x + eps E_k) - L(x)) / sigma``, ``N + 1``)::

        X <- X - lr * ((1/N) sum_k c_k U_k V_k^T / r + weight_decay * X)

    regenerated from the seeds, never stored: no model-size buffer. With ``module`` given the
    members are evaluated as copies in one forward (``perturbation="dual"``): copy ``k``'s
    ``nn.Linear`` output gets ``eps (x V_k) U_k^T``, so no member's weight is ever built; the
    closure must accept ``copies`` (``lambda copies=1: pair_loss(lm, batch, copies=copies)``).
    Without ``module`` they are evaluated in place, one after another (same result up to
    rounding). ``lr`` scales the averaged estimate as in MeZO; ``eps`` only places the losses.

    Example::

        lm = zotune.models.as_loaded(model, tokenizer)   # once: the model's kind, carried along
        opt = zotune.PopulationLowRank(model.named_parameters(), module=model, lr=1e-5, queries=8)
        loss = opt.step(lambda copies=1: pair_loss(lm, batch, copies=copies))
    """

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, queries=8, rank=2,
                 scheme="central", module: nn.Module | None = None, perturbation: str | None = None, **kwargs):
        if perturbation is None:
            perturbation = "inplace" if module is None else "dual"
        super().__init__(params, PopulationLowRankEstimator(queries, rank), sgd(), lr, eps, weight_decay, seed,
                         scheme=scheme, module=module, perturbation=perturbation, **kwargs)


def _check_per_example(name: str, module: nn.Module | None, batch_size: int, queries: int | None) -> None:
    """What a per-example preset needs: the module (each example's rows run its layers with that
    example's direction) and one direction per example."""
    if module is None:
        raise ValueError(f"{name} needs module= (the nn.Module being trained): each example's rows run its "
                         "layers with that example's own perturbation")
    if queries not in (None, batch_size):
        raise ValueError(f"{name} draws one direction per example: queries is batch_size ({batch_size}), "
                         f"got queries={queries!r}")


class PerExampleMeZO(ZOOptimizer):
    """MeZO with per-example directions (GRZO, 2026: a different perturbation per example of the
    batch), at MeZO's cost of two copies of the batch a step, both in one forward.

    Example ``j`` of the batch (``j = 1..B``) is evaluated at ``x + eps z_j`` in the first copy and
    at ``x - eps z_j`` in the second; with its losses ``l_j``::

        c_j = (l_j(x + eps z_j) - l_j(x - eps z_j)) / (2 eps)
        x <- x - lr * ((1/B) sum_j c_j z_j + weight_decay * x)

    ``z_j`` regenerated from ``(seed, step, j)``, never stored: no model-size buffer. The expected
    step is MeZO's (``lr * grad``); its noise is lower by ``(B G + T) / (G + T)`` with ``G`` the
    squared norm of the batch's mean gradient and ``T`` the examples' spread about it
    (:class:`zotune.evaluation.PerExample`), so the same lr walks less far from the signal.
    ``batch_size`` must be the closure's number of examples. Each module owning trained tensors
    runs once per example and copy with its own perturbed copy, so it suits small trained sets
    (prefix, prompt, norms, LoRA); with all weights a step copies every trained tensor ``2 B`` times.

    Example::

        opt = zotune.PerExampleMeZO(named_prefix, module=model, batch_size=16, lr=1e-2, eps=1e-1)
        loss = opt.step(lambda copies=1, per_example=False:
                        pair_loss(lm, batch, copies=copies, per_example=per_example))
    """

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, batch_size=16, distribution="gaussian",
                 module: nn.Module | None = None, **kwargs):
        _check_per_example(type(self).__name__, module, batch_size, kwargs.pop("queries", None))
        super().__init__(params, Gaussian(batch_size, distribution), sgd(), lr, eps, weight_decay, seed,
                         module=module, perturbation="per_example", **kwargs)


class PerExampleLowRank(ZOOptimizer):
    """Per-example low-rank directions: each example of the batch its own rank-``r`` perturbation
    ``U_j V_j^T`` of every matrix (GRZO, 2026: per-example perturbations), evaluated as side terms
    of one shared forward (EGGROLL, Sarkar et al. 2025: a population's low-rank perturbations at
    about inference throughput), at MeZO's cost of two copies of the batch a step.

    Example ``j`` of the batch (``j = 1..B``) runs at ``X + eps U_j V_j^T`` in the first copy and
    at ``X - eps U_j V_j^T`` in the second (each other tensor: a dense ``z_j``); with its losses
    ``l_j``::

        c_j = (l_j(x + eps E_j) - l_j(x - eps E_j)) / (2 eps)
        X <- X - lr * ((1/B) sum_j c_j U_j V_j^T / r + weight_decay * X)

    ``U_j`` (m x r) and ``V_j`` (n x r) regenerated from ``(seed, step, j, leaf)``, never stored:
    no model-size buffer, no weight written while evaluating. ``E[U V^T <G, U V^T>] / r = G``, so
    the expected step is MeZO's (``lr * grad``), with the per-example noise reduction of
    :class:`PerExampleMeZO`. A plain ``nn.Linear`` / ``nn.Embedding`` runs once over both copies
    and adds each example's ``eps (x V_j) U_j^T`` in two batched thin matmuls; only the other
    tensors (norms, biases) get per-example copies. ``batch_size`` must be the closure's number of
    examples.

    Example::

        opt = zotune.PerExampleLowRank(model.named_parameters(), module=model, batch_size=16, lr=1e-4)
        loss = opt.step(lambda copies=1, per_example=False:
                        pair_loss(lm, batch, copies=copies, per_example=per_example))
    """

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, batch_size=16, rank=2,
                 module: nn.Module | None = None, **kwargs):
        _check_per_example(type(self).__name__, module, batch_size, kwargs.pop("queries", None))
        super().__init__(params, PopulationLowRankEstimator(batch_size, rank), sgd(), lr, eps, weight_decay, seed,
                         module=module, perturbation="per_example", **kwargs)


#: method name -> its zotune class (first-order methods: :mod:`zotune.fo`), read from the registry
PRESETS: dict[str, type] = {name: globals()[m.preset] for name, m in METHODS.items()}
