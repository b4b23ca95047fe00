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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from zotune.errors import ZotuneError
from zotune._validate import check_int, check_positive, unknown_choice
from zotune.perturb import HALF, MODES, DualPerturbation, SidePerturbation, SwapPerturbation, stochastic_round_
from zotune.schemes import Central, Scheme, make_scheme
from zotune.rng import STREAM_ROUNDING, derive_seed, generator
from zotune.estimators import Direction, Estimator, LowRank, add_direction_, make_estimator, to_dense
from zotune.estimators.base import Dense, for_each_chunk
from zotune.rules import DenseGrad, LowRankGrad, Transform, make_rule

Closure = Callable[[], Any]


class NonFiniteLossError(ZotuneError, RuntimeError):
    """Raised after ``max_nonfinite`` steps in a row whose loss was NaN or infinite."""


def named_param_groups(params) -> tuple[list[dict], list[str]]:
    """Normalise torch-style ``params`` into groups of plain tensors plus leaf names.

    Accepts an iterable of tensors, of ``(name, tensor)`` pairs, a mapping ``name -> tensor``,
    or a list of group dicts whose ``"params"`` is any of those (other keys: per-group
    ``lr``, ``weight_decay``).
    """
    if isinstance(params, torch.Tensor):
        raise ValueError("params must be an iterable of tensors or dicts, got a single Tensor")
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    if not items:
        raise ValueError("params is empty: the optimizer has nothing to train")
    raw_groups = items if isinstance(items[0], Mapping) else [{"params": items}]
    groups, names = [], []
    for gi, group in enumerate(raw_groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise ValueError(f"param group {gi} must be a dict with a 'params' key, got {group!r}")
        tensors = []
        plist = group["params"]
        entries = list(plist.items()) if isinstance(plist, Mapping) else list(plist)
        for k, entry in enumerate(entries):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor):
                name, t = entry
            elif isinstance(entry, torch.Tensor):
                name, t = f"group{gi}.param{k}", entry
            else:
                raise ValueError(f"param group {gi} entry {k} is not a tensor or (name, tensor) pair: {entry!r}")
            if not t.is_floating_point():
                raise ValueError(f"parameter {name!r} has dtype {t.dtype}; only floating tensors can be trained")
            tensors.append(t)
            names.append(str(name))
        groups.append({**group, "params": tensors})
    return groups, names


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
        module: the ``nn.Module`` that owns the tensors (needed by ``perturbation="swap"`` and ``"dual"``).
        perturbation: ``"inplace"`` writes ``x +- eps z`` into the weights (MeZO); ``"swap"``
            leaves them untouched and hands each module its perturbed weights only while it
            runs (exact in half precision); ``"dual"`` evaluates both halves in one forward of
            twice the rows, drawing each direction once fewer; ``"side"`` (low-rank directions)
            adds ``eps U V^T`` to layer outputs as a thin side term instead of writing the
            matrices (see :mod:`zotune.perturb`).
        stochastic_rounding: round updates to float16 / bfloat16 weights stochastically
            (default: on for half-precision tensors), so updates below their resolution are
            kept in expectation instead of being rounded away.
        defer_update: keep each step's update pending and apply it leaf by leaf when the leaf is
            next needed (:meth:`apply_pending`), or at :meth:`flush`; used by streamed weights
            (:mod:`zotune.streamed`) so that each tensor is brought in once per step.

    The closure takes no arguments, runs the model and returns the scalar loss; the optimizer
    calls it under ``torch.no_grad()`` (forward-mode AD for the ``forward`` estimator). With
    ``perturbation="dual"`` it is also called as ``closure(copies=2)``: it must then run its
    batch twice over as one batch (rows ``0..n-1`` then the same rows again) and return the two
    copies' losses, e.g. ``zotune.lm.pair_loss(model, batch, copies=2)``.
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
        if conservative and not self.rule.stateless:
            raise ValueError(
                f"conservative=True needs a stateless rule (sgd or sign), got rule '{self.rule.name}': "
                "trying x - lr u and x + lr u must not advance the rule's state"
            )
        if conservative and self.estimator.kind != "two_point":
            raise ValueError("conservative=True works with two-point estimators only")
        self.conservative = bool(conservative)
        self.decay_1d = bool(decay_1d)
        self.reduce = reduce
        self.scheme = make_scheme(scheme) if isinstance(scheme, str) else scheme
        if not isinstance(self.scheme, Scheme):
            raise ValueError(f"scheme must be a zotune.schemes.Scheme or a registry name, got {scheme!r}")
        if not isinstance(self.scheme, Central):
            if self.estimator.kind != "two_point":
                raise ValueError(f"scheme={self.scheme.name!r} needs perturbed losses: "
                                 f"the {self.estimator.name!r} estimator measures directional derivatives")
            if perturbation == "dual" or conservative:
                raise ValueError(f"scheme={self.scheme.name!r} works with perturbation='inplace', 'swap' or "
                                 "'side' and a non-conservative step")
        groups, self.names = named_param_groups(params)
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        for group in self.param_groups:
            check_positive("lr", group["lr"], allow_zero=True)
            check_positive("weight_decay", group["weight_decay"], allow_zero=True)
        self.leaves = [p for group in self.param_groups for p in group["params"]]
        if conservative and any(p.dtype in HALF for p in self.leaves):
            raise ValueError(
                "conservative=True (ZO-SGD-Cons) needs float32 weights: it writes x - lr u, then x + lr u, then "
                "goes back, and in float16 / bfloat16 each write rounds, so 'keep x' would not give x back"
            )
        self._constructed = True
        self.estimator.bind(self.names, self.leaves, self.seed)
        q = len(self.estimator.directions(0))
        if q < self.scheme.min_queries:
            raise ValueError(f"scheme={self.scheme.name!r} needs at least {self.scheme.min_queries} query "
                             f"directions per step, got queries={q}")
        if perturbation not in MODES:
            raise ValueError(unknown_choice("perturbation", perturbation, MODES))
        if perturbation != "inplace" and self.estimator.kind != "two_point":
            raise ValueError(f"perturbation={perturbation!r} applies to two-point estimators only")
        self.perturbation = perturbation
        self.swap = SwapPerturbation(module, self.leaves, self.names) if perturbation == "swap" else None
        self.dual = DualPerturbation(module, self.leaves, self.names) if perturbation == "dual" else None
        if perturbation == "side" and not any(self.estimator.factored(i) for i in range(len(self.leaves))):
            raise ValueError("perturbation='side' is for low-rank directions (LOZO): this estimator draws none")
        self.side = (SidePerturbation(module, self.leaves, self.names, self.estimator)
                     if perturbation == "side" else None)
        self.stochastic_rounding = stochastic_rounding
        self.steps_taken = 0  # steps attempted (drives the seeds); skipped ones included
        self.updates = 0  # steps applied (drives bias correction)
        self.nonfinite_in_row = 0
        self.skipped_steps = 0
        self.forward_passes = 0
        self.last_record: dict | None = None
        if defer_update and (perturbation not in ("swap", "dual") or self.conservative):
            raise ValueError(
                "defer_update=True needs weights that the evaluation never writes "
                "(perturbation='swap' or 'dual') and a non-conservative step"
            )
        self.defer_update = bool(defer_update)
        self.pending: dict | None = None  # a deferred update waiting to be applied (streamed mode)
        self.streamer = None  # set by zotune.streamed.StreamedWeights

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
        per = q if self.estimator.kind == "jvp" else self.scheme.forward_passes(q)
        return per + (3 if self.conservative else 0)

    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """Take one ZO step. Returns the loss: the loss at ``x`` for schemes that evaluate it,
        else the mean of the perturbed losses."""
        if closure is None or not callable(closure):
            raise ValueError(
                "ZO optimizers need a closure: opt.step(lambda: model_loss()) "
                "-- it is called several times per step"
            )
        with torch.no_grad():
            return self._step(closure, None)

    def replay(self, record: Mapping) -> None:
        """Repeat a recorded step (``last_record``) without evaluating any loss.

        Starting from the same weights, this reproduces the step bit for bit on the same device.
        """
        if int(record["step"]) != self.steps_taken:
            raise ValueError(f"record is for step {record['step']}, but the optimizer is at step {self.steps_taken}")
        for group, lr in zip(self.param_groups, record["lrs"]):
            group["lr"] = lr
        with torch.no_grad():
            self._step(None, record)

    # ------------------------------------------------------------------ the step
    def _loss(self, closure: Closure | None) -> float:
        self.forward_passes += 1
        return float(closure())

    def _dual_losses(self, closure: Closure) -> tuple[float, float]:
        try:
            out = closure(copies=2)
        except TypeError as e:
            if "copies" not in str(e):
                raise
            raise ValueError(
                "perturbation='dual' calls closure(copies=2): the closure must accept `copies` and "
                "return one loss per copy of its batch, e.g. lambda copies=1: pair_loss(model, batch, copies=copies)"
            ) from e
        out = torch.as_tensor(out).detach().flatten()
        if out.numel() != 2:
            raise ValueError(f"closure(copies=2) must return 2 losses (one per copy of the batch), got {out.numel()}")
        self.forward_passes += 2
        return float(out[0]), float(out[1])

    def _step(self, closure: Closure | None, record: Mapping | None) -> torch.Tensor:
        live = record is None
        est, eps, leaves = self.estimator, self.eps, self.leaves
        if self.pending is not None and (self.streamer is None or not live):
            self.flush()  # not streamed (or replaying): nothing applies it lazily
        dirs = est.directions(self.steps_taken)
        scheme = self.scheme
        fuse = not self.conservative and est.fuses_restore
        base = (self._loss(closure) if live else 0.0) if scheme.base_point else None
        rows: list[list[float]] = []  # rows[j][k]: the loss at x + offsets[k] eps z_j
        restore_alpha = 0.0  # what the fused update pass adds back: -offsets[-1] eps z_last
        if est.kind == "jvp":
            coeffs = []
            for d in dirs:
                if live:
                    self.forward_passes += 1
                    loss, c = est.measure(closure, leaves, d)
                    rows.append([loss])
                    coeffs.append(c)
            fuse = False
        elif self.swap is not None or self.side is not None:  # weights (matrices) not written
            jit = self.swap if self.swap is not None else self.side
            for d in dirs:
                row = []
                for o in scheme.offsets:
                    with jit.active(est, d, o * eps):
                        row.append(self._loss(closure) if live else 0.0)
                rows.append(row)
            fuse = False
        elif self.dual is not None:
            for d in dirs:
                with self.dual.active(est, d, eps):
                    rows.append(list(self._dual_losses(closure)) if live else [0.0, 0.0])
            fuse = False
        else:  # in place: x + o_1 eps z, x + o_2 eps z, ..., then back (the last restore fused)
            for j, d in enumerate(dirs):
                at, row = 0.0, []
                for o in scheme.offsets:
                    est.perturb_(leaves, d, (o - at) * eps)
                    at = o
                    row.append(self._loss(closure) if live else 0.0)
                if j < len(dirs) - 1 or not fuse:
                    est.perturb_(leaves, d, -at * eps)
                else:
                    restore_alpha = -at * eps
                rows.append(row)
        self.flush()  # leaves no module brought in during the evaluation
        aux: list[float] = []
        if not live:
            coeffs = [float(x) for x in record["coeffs"]]
            aux = [float(x) for x in record.get("aux", [])]
        elif est.kind != "jvp":
            if scheme.reduces_losses and self.reduce is not None:  # a nonlinear scheme: reduce the losses first
                flat = ([base] if base is not None else []) + [x for row in rows for x in row]
                flat = [float(x) for x in self.reduce(torch.tensor(flat, dtype=torch.float64))]
                if base is not None:
                    base, flat = flat[0], flat[1:]
                width = len(scheme.offsets)
                rows = [flat[j * width:(j + 1) * width] for j in range(len(rows))]
            coeffs, aux = scheme.coefficients(base, rows, eps)
        if live and not scheme.reduces_losses:
            c = torch.tensor(coeffs, dtype=torch.float64)
            if self.reduce is not None:
                c = self.reduce(c)
            coeffs = [float(x) for x in c]
        everything = [x for row in rows for x in row]
        if base is not None:
            loss = base
        else:
            loss = sum(everything) / len(everything) if everything else float("nan")
        skipped = (not all(math.isfinite(x) for x in coeffs)) if live else bool(record["skipped"])
        rec = {
            "step": self.steps_taken,
            "coeffs": coeffs,
            "lrs": [g["lr"] for g in self.param_groups],
            "skipped": skipped,
            "choice": None,
            "loss": loss,
        }
        if aux:
            rec["aux"] = aux
        self.steps_taken += 1
        if skipped:
            if restore_alpha:
                est.perturb_(leaves, dirs[-1], restore_alpha)
            self.last_record = rec
            return self._skip(loss) if live else torch.tensor(loss)
        self.nonfinite_in_row = 0
        if self.rule.coeff is not None:
            coeffs = [float(x) for x in self.rule.coeff(torch.tensor(coeffs, dtype=torch.float64))]
        self.updates += 1
        if aux:
            est.observe(dirs, aux, leaves)
        if self.defer_update:
            self.pending = {"dirs": dirs, "coeffs": coeffs, "lrs": rec["lrs"], "updates": self.updates,
                            "step": self.steps_taken, "applied": set()}
        elif not self.conservative:
            self._apply(dirs, coeffs, 1.0, restore_alpha, decay=True)
        else:
            choice, loss = self._conservative(closure, dirs, coeffs, record)
            rec["choice"] = choice
            rec["loss"] = loss
        self.last_record = rec
        return torch.tensor(loss)

    def _skip(self, loss: float) -> torch.Tensor:
        self.skipped_steps += 1
        self.nonfinite_in_row += 1
        if self.nonfinite_in_row >= self.max_nonfinite:
            raise NonFiniteLossError(
                f"the loss was non-finite ({loss}) in {self.nonfinite_in_row} steps in a row "
                f"(step {self.steps_taken - 1}); the weights were left as before each of them. "
                "Lower eps or lr, use float32, or raise max_nonfinite."
            )
        return torch.tensor(loss)

    def _conservative(self, closure, dirs, coeffs, record) -> tuple[int, float]:
        """ZO-SGD-Cons: evaluate x, x - lr u, x + lr u and keep the best (ZO-Bench appendix A).

        Data parallel: the three losses are averaged over ranks before the choice, so every rank
        keeps the same point. Weight decay belongs to the update: it is applied only when a
        moved point is kept."""
        live = record is None
        f = [0.0, 0.0, 0.0]
        if live:
            f[0] = self._loss(closure)
        self._apply(dirs, coeffs, 1.0, 0.0, decay=False)
        if live:
            f[1] = self._loss(closure)
        self._apply(dirs, coeffs, -2.0, 0.0, decay=False)
        if live:
            f[2] = self._loss(closure)
            if self.reduce is not None:
                f = [float(x) for x in self.reduce(torch.tensor(f, dtype=torch.float64))]
        choice = min(range(3), key=lambda k: f[k]) if live else int(record["choice"])
        if choice == 0:
            self._apply(dirs, coeffs, 1.0, 0.0, decay=False)
        elif choice == 1:
            self._apply(dirs, coeffs, 2.0, 0.0, decay=False)
        if choice != 0 and any(g["weight_decay"] > 0 for g in self.param_groups):
            self._decay_only()
        return choice, f[choice]

    def _round_stochastically(self, p: torch.Tensor) -> bool:
        if self.stochastic_rounding is None:
            return p.dtype in HALF
        return self.stochastic_rounding and p.dtype in HALF

    def _decays(self, p: torch.Tensor) -> bool:
        return self.decay_1d or p.dim() > 1

    def _decay_only(self) -> None:
        for group in self.param_groups:
            shrink = 1.0 - group["lr"] * group["weight_decay"]
            for p in group["params"]:
                if shrink != 1.0 and self._decays(p):
                    p.mul_(shrink)

    def _apply(self, dirs: list[Direction], coeffs: list[float], lr_mult: float, restore_eps: float, decay: bool,
               *, lrs: list[float] | None = None, only: set[int] | None = None,
               updates: int | None = None, step: int | None = None):
        """The update pass: per leaf, build g from the regenerated directions, run the rule,
        and write ``x <- (1 - lr wd)(x + restore_eps z_last) - lr u`` in as few writes as possible.

        A deferred update (:meth:`apply_pending`) passes the learning rates, update count and
        step of the step it belongs to, and the leaves ``only`` to update now."""
        est, rule = self.estimator, self.rule
        updates = self.updates if updates is None else updates
        step = self.steps_taken if step is None else step
        last = dirs[-1]
        items = []  # (leaf index, leaf, chunk, queries touching it, lr, shrink): independent units
        i = 0
        for gi, group in enumerate(self.param_groups):
            lr = (group["lr"] if lrs is None else lrs[gi]) * lr_mult
            wd = group["weight_decay"] if decay else 0.0
            for p in group["params"]:
                if only is not None and i not in only:
                    i += 1
                    continue
                touching = [(j, d) for j, d in enumerate(dirs) if est.touches(d, i)]
                shrink = 1.0 - lr * wd if (wd and self._decays(p)) else 1.0
                if touching and not self.state[p]:
                    self.state[p].update(rule.init(p))
                if touching or shrink != 1.0:
                    items += [(i, p, k, touching, lr, shrink) for k in range(est.num_chunks(i))]
                i += 1

        def update_chunk(item) -> None:
            i, p, k, touching, lr, shrink = item
            target = est.target(p, i, k)
            # half precision: compute in float32, then round stochastically (seeded, so exact on resume)
            rounding = self._round_stochastically(p)
            if rounding and target.dim() == 2:  # a whole half-precision matrix (LOZO): in row blocks
                self._update_matrix_rounded(item, target, dirs, coeffs, last, restore_eps, updates, step)
                return
            work = target.float() if rounding else target
            if shrink != 1.0:
                work.mul_(shrink)
            if touching:
                u, restore = self._rule_update(item, target, coeffs, last, restore_eps, updates)
                _write(work, u, restore, restore_eps * shrink, lr)
            if rounding:
                seed = derive_seed(self.seed, STREAM_ROUNDING, step, i, k)
                stochastic_round_(target, work, generator(seed, p.device))

        if items:
            for_each_chunk(update_chunk, items, self.leaves[0].device, est.parallel_chunks)

    def _rule_update(self, item, target, coeffs, last, restore_eps, updates):
        """One chunk's estimate ``g`` from its regenerated directions, through the rule: the
        update ``u``, and the last query's direction when the restore is fused into the write."""
        i, p, k, touching, lr, shrink = item
        est = self.estimator
        scale = est.grad_scale(i) / len(touching)
        g, restore = None, None
        for j, d in touching:
            ld = est.leaf_direction(d, i, p, k, out=est.out_buffer(target, i, p))
            if d is last and restore_eps:
                restore = ld
            g = _accumulate(g, ld, coeffs[j] * scale, single=len(touching) == 1, est=est, i=i, p=p)
        state = self.state[p]
        chunk_state = _state_view(state, p, target)
        u = self.rule.update(g, chunk_state, target, updates)
        _merge_state(state, chunk_state, p)
        return u, restore

    def _update_matrix_rounded(self, item, target, dirs, coeffs, last, restore_eps, updates, step) -> None:
        """The update of a whole half-precision matrix whose direction is low rank, written in
        float32 row blocks of about one chunk, each rounded stochastically: no float32 copy of
        the matrix (nor of ``U V^T``) is ever made."""
        i, p, k, touching, lr, shrink = item
        est = self.estimator
        u, restore = None, None
        if touching:
            u, restore = self._rule_update(item, target, coeffs, last, restore_eps, updates)
        m, n = target.shape
        rows = max(1, est.chunk_size // max(n, 1))
        dense = u.t.view(m, n) if isinstance(u, DenseGrad) else None
        for b, r0 in enumerate(range(0, m, rows)):
            r1 = min(m, r0 + rows)
            work = target[r0:r1].float()
            if shrink != 1.0:
                work.mul_(shrink)
            if restore is not None:
                if isinstance(restore, LowRank):
                    work.addmm_(restore.u[r0:r1].float(), restore.v.float().T, alpha=restore_eps * shrink)
                else:
                    work.add_(restore.z.view(m, n)[r0:r1].float(), alpha=restore_eps * shrink)
            if dense is not None:
                work.add_(dense[r0:r1].float(), alpha=-lr * u.scale)
            elif u is not None:
                work.addmm_(u.a[r0:r1].float(), u.v.float().T, alpha=-lr * u.scale)
            seed = derive_seed(self.seed, STREAM_ROUNDING, step, i, k, b)
            stochastic_round_(target[r0:r1], work, generator(seed, p.device))

    # ------------------------------------------------------------------ deferred updates
    def apply_pending(self, indices: Iterable[int]) -> None:
        """Apply the deferred update of the last step to leaves ``indices`` (those not yet
        updated), where they are now: a streamed module calls this while its tensors are resident."""
        pending = self.pending
        if pending is None:
            return
        todo = set(indices) - pending["applied"]
        if todo:
            with torch.no_grad():
                self._apply(pending["dirs"], pending["coeffs"], 1.0, 0.0, decay=True, lrs=pending["lrs"],
                            only=todo, updates=pending["updates"], step=pending["step"])
            pending["applied"] |= todo
        if len(pending["applied"]) == len(self.leaves):
            self.pending = None

    def flush(self) -> None:
        """Apply whatever is left of a deferred update (before evaluating, saving or stopping)."""
        if self.pending is None:
            return
        if self.streamer is not None:
            self.streamer.flush()
        self.apply_pending(range(len(self.leaves)))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        self.flush()  # the state must describe weights with every update applied
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
        super().load_state_dict(state_dict)
        self.eps = zo["eps"]
        self.steps_taken = zo["steps_taken"]
        self.updates = zo["updates"]
        self.nonfinite_in_row = zo["nonfinite_in_row"]
        self.skipped_steps = zo["skipped_steps"]
        self.forward_passes = zo["forward_passes"]
        self.estimator.load_state_dict(zo["estimator_state"])


def _accumulate(g, ld, coeff: float, *, single: bool, est: Estimator, i: int, p: torch.Tensor):
    """Running ``g += coeff * direction``. A lone term is borrowed as is (no copy); with
    several queries the first term is copied into a buffer that the others are added to."""
    if isinstance(ld, LowRank):
        if g is None:
            v_of = lambda period: est.v(i, period, p)  # noqa: E731
            a = ld.u if single else ld.u * coeff
            return LowRankGrad(a, ld.v, coeff if single else 1.0, ld.period, v_of)
        g.a.add_(ld.u, alpha=coeff)
        return g
    if g is None:
        return DenseGrad(ld.z, coeff) if single else DenseGrad(ld.z * coeff, 1.0)
    g.t.add_(ld.z, alpha=coeff)
    return g


def _state_view(state: dict, p: torch.Tensor, target: torch.Tensor) -> dict:
    """The rule state of one chunk: leaf-shaped buffers seen through the chunk's flat view."""
    if target is p:
        return dict(state)
    start = target.storage_offset() - p.storage_offset()
    view = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == p.shape:
            view[key] = value.view(-1)[start:start + target.numel()]
        else:
            view[key] = value
    return view


def _merge_state(state: dict, chunk_state: dict, p: torch.Tensor) -> None:
    """Keep what a rule created or replaced (new buffers, counters); views write through."""
    for key, value in chunk_state.items():
        current = state.get(key)
        if current is None or not torch.is_tensor(value) or (torch.is_tensor(current) and current.shape != p.shape):
            state[key] = value


def _write(p: torch.Tensor, u, restore, restore_alpha: float, lr: float) -> None:
    """``p += restore_alpha * z_restore - lr * u``, fused into one write where the shapes allow."""
    if isinstance(u, DenseGrad):
        if isinstance(restore, Dense) and restore.z is u.t:
            p.add_(u.t, alpha=restore_alpha - lr * u.scale)
            return
        if restore is not None:
            if isinstance(restore, LowRank) and restore.u.dtype != p.dtype:
                p.add_(to_dense(restore).to(p.dtype), alpha=restore_alpha)
            else:
                add_direction_(p, restore, restore_alpha)
        p.add_(u.t, alpha=-lr * u.scale)
        return
    if u.a.dtype != p.dtype:  # a float32 work copy of a half-precision matrix
        if restore is not None:
            p.add_(to_dense(restore).to(p.dtype), alpha=restore_alpha)
        p.add_((u.a @ u.v.T).to(p.dtype), alpha=-lr * u.scale)
        return
    if isinstance(restore, LowRank) and restore.v is u.v:
        if restore.u is u.a:
            p.addmm_(u.a, u.v.T, alpha=restore_alpha - lr * u.scale)
        else:
            p.addmm_(restore.u * restore_alpha - u.a * (lr * u.scale), u.v.T)
        return
    if restore is not None:
        add_direction_(p, restore, restore_alpha)
    p.addmm_(u.a, u.v.T, alpha=-lr * u.scale)
