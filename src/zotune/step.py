"""One ZO step composing an estimator and an update rule, behind a ``torch.optim`` facade.

The step (two-point estimators), with ``q`` query directions ``z_1..z_q`` regenerated from
seeds::

    for j in 1..q:
        x += eps z_j;       L+ = closure()
        x -= 2 eps z_j;     L- = closure()
        x += eps z_j        (restore; for the last query fused into the update pass below)
        c_j = (L+ - L-) / (2 eps)
    c = reduce(c)                               # data parallel: all-reduce q scalars
    for each leaf x_l, chunk by chunk (one chunk's direction alive at a time):
        g_l = (1 / q_l) sum_j c_j s_l z_jl      # s_l = 1, or 1/r for LOZO matrices
        u_l = rule(g_l)
        x_l <- x_l - lr (u_l + wd x_l)

Passes over the parameters: per query, perturb, perturb and restore, the last restore fused
into the update pass, which regenerates every query's direction: ``4q - 1`` passes, 3 for MeZO's
``q = 1``. Directions are drawn in chunks (4 MiB by default), so plain ZO-SGD keeps no buffer
larger than one chunk per thread, whatever the size of the largest tensor. A closure that returns a non-finite loss
leaves the weights as they were: the step is skipped and counted, and after
``max_nonfinite`` skipped steps in a row :class:`NonFiniteLossError` is raised.

Every step's scalars are kept in :attr:`ZOOptimizer.last_record`; :meth:`ZOOptimizer.replay`
repeats a step from its record alone, with exactly the same floating-point operations, which
is how ``zotune replay`` rebuilds tuned weights from the base model and a step log.

Where the parts are: how the losses are evaluated (in place, swap, side terms, N copies in
one forward, JVP, replay) in :mod:`zotune.evaluation`; the update pass and the deferred update
in :mod:`zotune.update`; ZO-SGD-Cons in :mod:`zotune.conservative`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from zotune.conservative import check_conservative, conservative_step
from zotune.errors import ZotuneError
from zotune._validate import check_int, check_positive
from zotune.evaluation import Estimate, Evaluation, Replay, make_evaluation
from zotune.groups import named_param_groups
from zotune.schemes import Scheme, make_scheme
from zotune.estimators import Estimator, make_estimator
from zotune.rules import Transform, make_rule
from zotune.update import Deferred, PendingUpdate, Update, UpdateWriter

Closure = Callable[[], Any]


class NonFiniteLossError(ZotuneError, RuntimeError):
    """Raised after ``max_nonfinite`` steps in a row whose loss was NaN or infinite."""


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order optimizer: an estimator (how directions are drawn) + a rule (how estimates
    become updates), with the familiar ``step(closure)`` / ``state_dict()`` contract.

    Args:
        params: tensors, ``(name, tensor)`` pairs, a name->tensor mapping, or group dicts.
        estimator: an :class:`~zotune.estimators.Estimator` or a registry name
            (``gaussian``, ``rademacher``, ``lowrank``, ``blockwise``, ``sparse``, ``forward``).
        rule: a :class:`~zotune.rules.Transform` or a registry name (``sgd``, ``sign``,
            ``momentum``, ``adam``, ``lowrank_momentum``).
        lr: learning rate: the update is ``x <- x - lr * (u + weight_decay * x)``.
        eps: perturbation scale: losses are taken at ``x +- eps * z``.
        weight_decay: decoupled decay, by default not applied to 1-D tensors (biases, norms).
        seed: run seed; every direction derives from (seed, step, query, leaf index).
        conservative: ZO-SGD-Cons: after estimating ``g``, keep the best of ``x``,
            ``x - lr u`` and ``x + lr u`` by three extra forward passes (stateless rules only).
        decay_1d: also decay 1-D tensors.
        max_nonfinite: raise :class:`NonFiniteLossError` after this many skipped steps in a row.
        reduce: maps the tensor of the step's projected-gradient scalars to their mean over
            data-parallel workers (default: identity).
        module: the ``nn.Module`` that owns the tensors (needed by ``perturbation="swap"``, ``"dual"``, ``"side"``).
        perturbation: how the losses are evaluated (:mod:`zotune.evaluation`): ``"inplace"``
            writes ``x +- eps z`` into the weights (MeZO); ``"swap"`` leaves them untouched and
            hands each module its perturbed weights only while it runs (exact in half
            precision); ``"dual"`` evaluates every point of the step as one copy of the batch in
            one forward; ``"per_example"`` gives each example of the batch its own direction
            (GRZO; ``queries`` = the batch's examples, two copies of the batch in one forward);
            ``"side"`` (low-rank directions) adds ``eps U V^T`` to layer outputs as
            a thin side term instead of writing the matrices.
        stochastic_rounding: round updates to float16 / bfloat16 weights stochastically
            (default: on for half-precision tensors), so updates below their resolution are
            kept in expectation instead of being rounded away.
        defer_update: keep each step's update pending (a :class:`~zotune.update.PendingUpdate`)
            and apply it leaf by leaf when the leaf is next needed (:meth:`apply_pending`), or
            at :meth:`flush`; used by streamed weights (:mod:`zotune.streamed`) so that each
            tensor is brought in once per step. A pending update is saved by :meth:`state_dict`.
        scheme: which losses a step takes (:mod:`zotune.schemes`).

    The closure takes no arguments, runs the model and returns the scalar loss; the optimizer
    calls it under ``torch.no_grad()`` (forward-mode AD for the ``forward`` estimator). With
    ``perturbation="dual"`` it is called as ``closure(copies=n)``: it must then run its batch
    ``n`` times over as one batch (rows ``0..b-1``, then the same rows again, ...) and return
    the ``n`` copies' losses, e.g. ``zotune.lm.pair_loss(lm, batch, copies=n)``; with
    ``perturbation="per_example"`` as ``closure(copies=2, per_example=True)``, returning every
    example's loss in each copy (``pair_loss(lm, batch, copies=2, per_example=True)``).
    """

    def __init__(
        self,
        params,
        estimator: str | Estimator = "gaussian",
        rule: str | Transform = "sgd",
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        conservative: bool = False,
        decay_1d: bool = False,
        max_nonfinite: int = 3,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        module: torch.nn.Module | None = None,
        perturbation: str = "inplace",
        stochastic_rounding: bool | None = None,
        defer_update: bool = False,
        scheme: str | Scheme = "central",
    ) -> None:
        lr = check_positive("lr", lr, allow_zero=True)
        self.eps = check_positive("eps", eps)
        weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.max_nonfinite = check_int("max_nonfinite", max_nonfinite)
        self.estimator = make_estimator(estimator) if isinstance(estimator, str) else estimator
        if not isinstance(self.estimator, Estimator):
            raise ValueError(f"estimator must be an Estimator or a registry name, got {estimator!r}")
        self.rule = make_rule(rule) if isinstance(rule, str) else rule
        if not isinstance(self.rule, Transform):
            raise ValueError(f"rule must be a zotune.rules.Transform or a registry name, got {rule!r}")
        missing = self.rule.needs - self.estimator.provides
        if missing:
            raise ValueError(f"rule {self.rule.name} needs {', '.join(sorted(missing))}, which estimator "
                             f"{self.estimator.name} does not provide (LOZO-M's momentum lives in the one V that "
                             "the lowrank estimator keeps for `interval` steps)")
        self.conservative = bool(conservative)
        self.decay_1d = bool(decay_1d)
        self.reduce = reduce
        self.scheme = make_scheme(scheme) if isinstance(scheme, str) else scheme
        if not isinstance(self.scheme, Scheme):
            raise ValueError(f"scheme must be a zotune.schemes.Scheme or a registry name, got {scheme!r}")
        groups, self.names = named_param_groups(params)
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        for group in self.param_groups:
            check_positive("lr", group["lr"], allow_zero=True)
            check_positive("weight_decay", group["weight_decay"], allow_zero=True)
        self.leaves = [p for group in self.param_groups for p in group["params"]]
        if conservative:
            check_conservative(self.rule, self.scheme, self.leaves)
        self._constructed = True
        self.estimator.bind(self.names, self.leaves, self.seed)
        self.perturbation = perturbation
        self.evaluation: Evaluation = make_evaluation(
            perturbation, self.estimator, self.leaves, self.names, module, scheme=self.scheme,
            conservative=self.conservative, fuse=not self.conservative and self.estimator.fuses_restore)
        q = len(self.estimator.directions(0))
        if q < self.scheme.min_queries:
            raise ValueError(f"scheme={self.scheme.name!r} needs at least {self.scheme.min_queries} query "
                             f"directions per step, got queries={q}")
        self.writer = UpdateWriter(self.estimator, self.rule, self.leaves, self.seed, stochastic_rounding,
                                   self.decay_1d)
        self.steps_taken = 0  # steps attempted (drives the seeds); skipped ones included
        self.updates = 0  # steps applied (drives bias correction)
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.forward_passes = 0
        self.last_record: dict | None = None
        if defer_update and (self.evaluation.writes_weights or self.conservative):
            raise ValueError(
                "defer_update=True needs weights that the evaluation never writes "
                "(perturbation='swap' or 'dual') and a non-conservative step"
            )
        self.defer_update = bool(defer_update)
        #: the update held back for streamed weights (``defer_update=True``)
        self.deferred = Deferred(lambda pending, only: self.writer.write(self.param_groups, self.state, pending, only),
                                 len(self.leaves))

    # ------------------------------------------------------------------ public API
    def add_param_group(self, param_group: dict) -> None:
        """Only during construction: leaves are bound to the estimator (names, chunks, seeds) once."""
        if getattr(self, "_constructed", False):
            raise ValueError(
                "add_param_group is not supported after construction: the estimator has bound every leaf's "
                "name and seeds; pass all groups to the constructor at once"
            )
        super().add_param_group(param_group)

    @property
    def forward_passes_per_step(self) -> int:
        """Forward passes one step costs (JVP passes count as one)."""
        q = len(self.estimator.directions(0))
        return self.evaluation.forward_passes(self.scheme, q) + (3 if self.conservative else 0)

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """Take one ZO step. Returns the loss: the loss at ``x`` for schemes that evaluate it,
        else the mean of the perturbed losses."""
        if closure is None or not callable(closure):
            raise ValueError(
                "ZO optimizers need a closure: opt.step(lambda: model_loss()) "
                "-- it is called several times per step"
            )
        if not self.deferred.streamed:
            self.flush()  # nothing applies a deferred update lazily: apply it before evaluating
        with torch.no_grad():
            return self._step(closure, self.evaluation)

    def replay(self, record: Mapping) -> None:
        """Repeat a recorded step (``last_record``) without evaluating any loss.

        Starting from the same weights, this reproduces the step bit for bit on the same device.
        """
        if int(record["step"]) != self.steps_taken:
            raise ValueError(f"record is for step {record['step']}, but the optimizer is at step {self.steps_taken}")
        for group, lr in zip(self.param_groups, record["lrs"]):
            group["lr"] = lr
        self.flush()
        with torch.no_grad():
            self._step(None, Replay(self.evaluation, record))

    # ------------------------------------------------------------------ the step
    def _step(self, closure: Closure | None, evaluation: Evaluation) -> torch.Tensor:
        dirs = self.estimator.directions(self.steps_taken)
        measured = evaluation.evaluate(closure, dirs, self.scheme, self.eps)
        self.forward_passes += measured.forward_passes
        self.flush()  # leaves no module brought in during the evaluation
        estimate = measured.estimate(self.scheme, self.eps, self.reduce)
        coeffs, aux, loss, skipped = estimate
        lrs = [g["lr"] for g in self.param_groups]
        rec = {"step": self.steps_taken, "coeffs": coeffs, "lrs": lrs, "skipped": skipped, "choice": None,
               "loss": loss}
        if aux:
            rec["aux"] = aux
        self.steps_taken += 1
        self.last_record = rec
        if skipped:
            if measured.restore_alpha:
                self.estimator.perturb_(self.leaves, dirs[-1], measured.restore_alpha)
            return self._skip(estimate)
        self.nonfinite_in_row = 0
        if self.rule.coeff is not None:
            coeffs = [float(x) for x in self.rule.coeff(torch.tensor(coeffs, dtype=torch.float64))]
        self.updates += 1
        if aux:
            self.estimator.observe(dirs, aux, self.leaves)
        update = Update(rec["step"], coeffs, lrs, self.updates, measured.restore_alpha)
        if self.defer_update:
            self.deferred.hold(update)
        elif self.conservative:
            probe = evaluation.probe(closure)
            rec["choice"], rec["loss"] = conservative_step(self.writer, self.param_groups, self.state, update,
                                                           probe, self.reduce)
            self.forward_passes += probe.passes
            loss = rec["loss"]
        else:
            self.writer.write(self.param_groups, self.state, update)
        return torch.tensor(loss)

    def _skip(self, estimate: Estimate) -> torch.Tensor:
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        if self.nonfinite_in_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"{estimate.what_was_nonfinite()} in {self.nonfinite_in_row} steps in a row "
                f"(step {self.steps_taken - 1}); the weights were left as before each of them. "
                "Lower eps or lr, use float32, or raise max_nonfinite."
            )
        return torch.tensor(estimate.loss)

    # ------------------------------------------------------------------ deferred updates
    @property
    def pending(self) -> PendingUpdate | None:
        """The last step's update while it waits to be applied (``defer_update=True``)."""
        return self.deferred.pending

    def apply_pending(self, indices: Iterable[int]) -> None:
        """Apply the deferred update to leaves ``indices`` (see :class:`zotune.update.Deferred`)."""
        self.deferred.apply(indices)

    def flush(self) -> None:
        """Apply whatever is left of a deferred update (before evaluating, saving or stopping)."""
        self.deferred.flush()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The optimizer's state; a pure read (a pending update is saved, not applied)."""
        sd = super().state_dict()
        sd["zo"] = {
            "seed": self.seed,
            "eps": self.eps,
            "estimator": self.estimator.config(),
            "rule": {"name": self.rule.name, "config": self.rule.config},
            "conservative": self.conservative,
            "scheme": self.scheme.config(),
            "names": list(self.names),
            "steps_taken": self.steps_taken,
            "updates": self.updates,
            "nonfinite_in_row": self.nonfinite_in_row,
            "skipped_steps": self.skipped_steps,
            "forward_passes": self.forward_passes,
            "estimator_state": self.estimator.state_dict(),
            "pending": None if self.pending is None else self.pending.to_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("not a ZOOptimizer state_dict (no 'zo' entry)")
        mine = self.state_dict()["zo"]
        zo.setdefault("scheme", {"name": "central"})  # checkpoints from before schemes
        for key in ("seed", "estimator", "rule", "conservative", "scheme", "names"):
            if zo[key] != mine[key]:
                raise ValueError(
                    f"checkpoint does not match this optimizer: {key} was {zo[key]!r}, now {mine[key]!r}"
                )
        pending = zo.get("pending")
        if pending is not None and not self.defer_update:
            raise ValueError("the checkpoint holds a deferred update (taken with defer_update=True); "
                             "load it into an optimizer built with defer_update=True")
        super().load_state_dict(state_dict)
        self.eps = zo["eps"]
        self.steps_taken = zo["steps_taken"]
        self.updates = zo["updates"]
        self.nonfinite_in_row = zo["nonfinite_in_row"]
        self.skipped_steps = zo["skipped_steps"]
        self.forward_passes = zo["forward_passes"]
        self.estimator.load_state_dict(zo["estimator_state"])
        self.deferred.pending = None if pending is None else PendingUpdate.from_state(pending)
