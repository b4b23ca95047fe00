"""How a ZO step evaluates its losses: one protocol, one class per mode.

A step asks its :class:`Evaluation` for the losses at the points a sampling scheme needs,
``x + o * eps * z_j`` for every query direction ``z_j`` and offset ``o`` (and ``x`` itself when
the scheme has a base point), and gets back a :class:`Measured`. The step never asks which mode
it is talking to:

=================  ==========================================================================
``InPlace``        MeZO: writes ``x + o eps z`` into the weights; the last restore is left to
                   the update pass (``Measured.restore_alpha``), which puts it back in the same write
``Swap``           each module gets its perturbed tensors only while it runs (``perturbation="swap"``)
``Side``           low-rank directions as side terms of the layers' outputs (LOZO, ``"side"``)
``Copies``         every point of the step as one copy of the batch, all in ONE forward
                   (``"dual"``: MeZO's pair is 2 copies, FZOO's 8 queries + base 9)
``PerExample``     each example of the batch its own direction (GRZO): 2 copies of the batch in
                   one forward, example ``j`` at ``x +- eps z_j`` (``"per_example"``)
``ForwardMode``    forward-mode JVP: the directional derivative itself, no perturbation
``Replay``         a recorded step: no forward pass; the weights see exactly the writes they saw
=================  ==========================================================================

The closure is always called through a :class:`Probe`, which counts forward passes; a replay
hands the modes a silent probe, so an in-place replay repeats the live step's floating-point
writes (``+eps z``, ``-2 eps z``, ...) bit for bit without running the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from zotune._validate import unknown_choice
from zotune.estimators import Direction, Estimator
from zotune.perturb import CopiesPerturbation, Point, SidePerturbation, SwapPerturbation
from zotune.schemes import Central, Scheme

MODES = ("inplace", "swap", "dual", "side", "per_example")
Reduce = Callable[[torch.Tensor], torch.Tensor]


class Estimate(NamedTuple):
    """What a step's losses give: one coefficient per direction, the scheme's extra scalars
    (``aux``), the loss reported for the step, and whether the step must be skipped."""

    coeffs: list[float]
    aux: list[float]
    loss: float
    skipped: bool

    def what_was_nonfinite(self) -> str:
        """The loss, or, for a finite loss, the coefficients (Forward-Grad's directional derivative,
        a scheme's normalisation can be non-finite on their own): an error should name which."""
        if not math.isfinite(self.loss):
            return f"the loss was non-finite ({self.loss})"
        return f"the estimate was non-finite (loss {self.loss:.4g}, coefficients {self.coeffs})"


@dataclass
class Measured:
    """An evaluation's result. ``rows[j][k]`` is the loss at ``x + offsets[k] eps z_j``;
    ``base`` the loss at ``x`` (schemes with a base point); ``coeffs`` set when the mode measured
    the coefficients directly (JVP); ``restore_alpha`` what the update pass must add back along
    the last direction (in place: the last restore, fused into the update)."""

    base: float | None
    rows: list[list[float]]
    restore_alpha: float = 0.0
    forward_passes: int = 0
    coeffs: list[float] | None = None

    def estimate(self, scheme: Scheme, eps: float, reduce: Reduce | None) -> Estimate:
        """Coefficients from the losses; data parallel, the scalars are averaged over ranks: the
        losses for nonlinear schemes (FZOO's sigma is a statistic of the global losses), else
        the coefficients (q scalars)."""
        base, rows = self.base, self.rows
        aux: list[float] = []
        if self.coeffs is not None:
            coeffs = list(self.coeffs)
        else:
            if scheme.reduces_losses and reduce is not None:
                flat = ([base] if base is not None else []) + [x for row in rows for x in row]
                flat = [float(x) for x in reduce(torch.tensor(flat, dtype=torch.float64))]
                if base is not None:
                    base, flat = flat[0], flat[1:]
                width = len(scheme.offsets)
                rows = [flat[j * width:(j + 1) * width] for j in range(len(rows))]
            coeffs, aux = scheme.coefficients(base, rows, eps)
        if not scheme.reduces_losses:
            c = torch.tensor(coeffs, dtype=torch.float64)
            if reduce is not None:
                c = reduce(c)
            coeffs = [float(x) for x in c]
        everything = [x for row in rows for x in row]
        if base is not None:
            loss = base
        else:
            loss = sum(everything) / len(everything) if everything else float("nan")
        return Estimate(coeffs, aux, loss, not all(math.isfinite(x) for x in coeffs))


class Recorded(Measured):
    """A replayed step's result: the record's coefficients, whatever the (silent) losses."""

    def __init__(self, record: Mapping, restore_alpha: float) -> None:
        super().__init__(None, [], restore_alpha, 0)
        self.record = record

    def estimate(self, scheme, eps, reduce) -> Estimate:
        r = self.record
        return Estimate([float(x) for x in r["coeffs"]], [float(x) for x in r.get("aux", [])],
                        float(r.get("loss", float("nan"))), bool(r["skipped"]))


class Probe:
    """Calls the closure and counts the forward passes it costs (a copy of the batch is one)."""

    def __init__(self, closure: Callable[..., Any]) -> None:
        self.closure = closure
        self.passes = 0

    def loss(self) -> float:
        self.passes += 1
        return float(self.closure())

    def losses(self, copies: int, mode: str) -> list[float]:
        """``closure(copies=n)``: one forward of the batch ``n`` times over, one loss per copy."""
        try:
            out = self.closure(copies=copies)
        except TypeError as e:
            if "copies" not in str(e):
                raise
            raise ValueError(
                f"perturbation={mode!r} calls closure(copies={copies}): the closure must accept `copies` and "
                "return one loss per copy of its batch, e.g. lambda copies=1: pair_loss(lm, batch, copies=copies)"
            ) from e
        out = torch.as_tensor(out).detach().flatten()
        if out.numel() != copies:
            raise ValueError(f"closure(copies={copies}) must return {copies} losses (one per copy of the batch), "
                             f"got {out.numel()}")
        self.passes += copies
        return [float(x) for x in out]

    def example_losses(self, copies: int, examples: int, mode: str) -> list[list[float]]:
        """``closure(copies=n, per_example=True)``: one forward of the batch ``n`` times over, one
        loss per example of each copy (a copy's mean over its examples is its loss)."""
        try:
            out = self.closure(copies=copies, per_example=True)
        except TypeError as e:
            if "per_example" not in str(e) and "copies" not in str(e):
                raise
            raise ValueError(
                f"perturbation={mode!r} calls closure(copies={copies}, per_example=True): the closure must return "
                "one loss per example of each copy, e.g. lambda copies=1, per_example=False: "
                "pair_loss(lm, batch, copies=copies, per_example=per_example)"
            ) from e
        out = torch.as_tensor(out).detach()
        if out.dim() != 2 or out.shape[0] != copies:
            raise ValueError(f"closure(copies={copies}, per_example=True) must return a ({copies}, examples) tensor, "
                             f"got shape {tuple(out.shape)}")
        if out.shape[1] != examples:
            raise ValueError(f"perturbation={mode!r} draws one direction per example: the estimator draws {examples} "
                             f"a step (queries) but the batch has {out.shape[1]} examples; set queries to the batch size")
        self.passes += copies
        return out.tolist()

    def directional(self, est: Estimator, leaves: Sequence[torch.Tensor], d: Direction) -> tuple[float, float]:
        """One forward pass in forward-mode AD: ``(loss, grad L . z)``."""
        self.passes += 1
        return est.measure(self.closure, leaves, d)

    def choose(self, losses: list[float], reduce: Reduce | None) -> tuple[int, float]:
        """The index of the lowest of ``losses`` and that loss, averaged over ranks first (so
        ranks agree)."""
        if reduce is not None:
            losses = [float(x) for x in reduce(torch.tensor(losses, dtype=torch.float64))]
        k = min(range(len(losses)), key=lambda k: losses[k])
        return k, losses[k]


class Silent(Probe):
    """A replay's probe: no forward pass; choices come from the record."""

    def __init__(self, record: Mapping) -> None:
        super().__init__(None)
        self.record = record

    def loss(self) -> float:
        return 0.0

    def losses(self, copies: int, mode: str) -> list[float]:
        return [0.0] * copies

    def example_losses(self, copies: int, examples: int, mode: str) -> list[list[float]]:
        return [[0.0] * examples for _ in range(copies)]

    def choose(self, losses, reduce) -> tuple[int, float]:
        return int(self.record["choice"]), 0.0


class Evaluation:
    """Base class: ``evaluate(closure, dirs, scheme, eps) -> Measured``.

    ``writes_weights``: whether evaluating writes the weights (then a replay must repeat the
    writes for bit-identical rounding, and deferred updates are impossible).
    """

    name = "base"
    writes_weights = False

    def __init__(self, est: Estimator, leaves: Sequence[torch.Tensor]) -> None:
        self.est, self.leaves = est, list(leaves)

    def probe(self, closure) -> Probe:
        return Probe(closure)

    def evaluate(self, closure, dirs: list[Direction], scheme: Scheme, eps: float) -> Measured:
        return self.measure(self.probe(closure), dirs, scheme, eps)

    def measure(self, probe: Probe, dirs: list[Direction], scheme: Scheme, eps: float) -> Measured:
        base = probe.loss() if scheme.base_point else None
        rows = [[self.loss_at(probe, d, o * eps) for o in scheme.offsets] for d in dirs]
        return Measured(base, rows, 0.0, probe.passes)

    def loss_at(self, probe: Probe, d: Direction, alpha: float) -> float:
        raise NotImplementedError

    def forward_passes(self, scheme: Scheme, queries: int) -> int:
        """Forward passes one step's evaluation costs."""
        return scheme.forward_passes(queries)


class InPlace(Evaluation):
    """MeZO: ``x + o_1 eps z``, ``x + o_2 eps z``, ... written into the weights, then back; the
    last direction's way back is left to the update pass when ``fuse`` (3 passes per query)."""

    name = "inplace"
    writes_weights = True

    def __init__(self, est: Estimator, leaves, fuse: bool) -> None:
        super().__init__(est, leaves)
        self.fuse = fuse

    def measure(self, probe, dirs, scheme, eps) -> Measured:
        est, leaves = self.est, self.leaves
        base = probe.loss() if scheme.base_point else None
        rows, restore_alpha = [], 0.0
        for j, d in enumerate(dirs):
            at, row = 0.0, []
            for o in scheme.offsets:
                est.perturb_(leaves, d, (o - at) * eps)
                at = o
                row.append(probe.loss())
            if j < len(dirs) - 1 or not self.fuse:
                est.perturb_(leaves, d, -at * eps)
            else:
                restore_alpha = -at * eps
            rows.append(row)
        return Measured(base, rows, restore_alpha, probe.passes)


class Swap(Evaluation):
    """Each module runs with its perturbed tensors swapped in just in time (exact in half precision)."""

    name = "swap"

    def __init__(self, est, leaves, names, module) -> None:
        super().__init__(est, leaves)
        self.perturbation = SwapPerturbation(module, self.leaves, names)

    def loss_at(self, probe, d, alpha) -> float:
        with self.perturbation.active(self.est, d, alpha):
            return probe.loss()


class Side(Swap):
    """Low-rank directions as side terms ``alpha (x V) U^T`` of the layers' outputs; other
    tensors (biases, norms) perturbed in place."""

    name = "side"
    writes_weights = True  # the tensors perturbed in place

    def __init__(self, est, leaves, names, module) -> None:
        Evaluation.__init__(self, est, leaves)
        if not any(est.factored(i) for i in range(len(self.leaves))):
            raise ValueError("perturbation='side' is for low-rank directions (LOZO): this estimator draws none")
        self.perturbation = SidePerturbation(module, self.leaves, names, est)


class Copies(Evaluation):
    """Every point of the step as one copy of the batch, in one forward: the closure is called
    as ``closure(copies=n)`` and returns ``n`` losses. The points are ``x`` (schemes with a base
    point) then ``x + o eps z_j`` for each direction ``j`` and offset ``o``: MeZO's pair is 2
    copies, MeZO with ``q`` queries ``2q``, FZOO's ``N`` queries ``N + 1``."""

    name = "dual"

    def __init__(self, est, leaves, names, module) -> None:
        super().__init__(est, leaves)
        self.perturbation = CopiesPerturbation(module, self.leaves, names, est, self.name)

    def use_originals(self, originals: list[torch.Tensor] | None) -> None:
        """Streamed weights copied in per module (see :mod:`zotune.streamed`)."""
        self.perturbation.use_originals(originals)

    def measure(self, probe, dirs, scheme, eps) -> Measured:
        points = ([Point(None, 0.0)] if scheme.base_point else []) + [
            Point(d, o * eps) for d in dirs for o in scheme.offsets]
        with self.perturbation.active(self.est, points):
            losses = probe.losses(len(points), self.name)
        base = losses.pop(0) if scheme.base_point else None
        width = len(scheme.offsets)
        rows = [losses[j * width:(j + 1) * width] for j in range(len(dirs))]
        return Measured(base, rows, 0.0, probe.passes)


class PerExample(Copies):
    """Each example of the batch its own direction (GRZO, 2026: per-example perturbations), at
    MeZO's cost: the closure runs the batch twice in one forward (``closure(copies=2,
    per_example=True)``), example ``j`` of the first copy at ``x + eps z_j`` and of the second at
    ``x - eps z_j``, and returns every example's loss ``l_j``; then, with ``B`` examples and
    ``q = B`` directions::

        c_j = (l_j(x + eps z_j) - l_j(x - eps z_j)) / (2 eps)        g = (1/B) sum_j c_j z_j

    ``E[g]`` is the batch's gradient, as for MeZO's ``c z``. The noise is not: with the examples'
    gradients ``g_j`` (mean ``G = |mean g_j|^2``, spread ``T = mean |g_j - mean g_j|^2``) and ``d``
    trained entries, MeZO's ``E|c z|^2 ~ d (G + T / B)``, here ``d (G + T) / B``: lower by
    ``(B G + T) / (G + T)`` (2.7x for SST-2's prefix at B = 16, T / G = 7.6:
    ``benchmarks/batch_noise.py``). The estimator must draw one direction per example
    (``queries = B``) and the scheme must have no base point (its one loss would be the batch's).
    With low-rank directions (:class:`zotune.estimators.PopulationLowRank`) each example's
    perturbation of a plain layer's weight is a side term of one shared forward (EGGROLL), so all
    weights train per example at about MeZO's cost; dense directions give each example's rows a
    perturbed copy of their module's tensors."""

    name = "per_example"

    def __init__(self, est, leaves, names, module, scheme: Scheme) -> None:
        super().__init__(est, leaves, names, module)
        if scheme.base_point:
            raise ValueError(f"perturbation='per_example' gives each example its own direction; scheme="
                             f"{scheme.name!r} also takes the loss at x, one for the whole batch (use 'central')")

    def measure(self, probe, dirs, scheme, eps) -> Measured:
        offsets = scheme.offsets
        points = [Point(d, o * eps) for o in offsets for d in dirs]
        with self.perturbation.active(self.est, points, same_rows=False):
            losses = probe.example_losses(len(offsets), len(dirs), self.name)
        rows = [[losses[k][j] for k in range(len(offsets))] for j in range(len(dirs))]
        return Measured(None, rows, 0.0, probe.passes)

    def forward_passes(self, scheme, queries) -> int:
        return len(scheme.offsets)


class ForwardMode(Evaluation):
    """Forward-Grad: each direction's exact directional derivative by one forward-mode AD pass."""

    name = "jvp"

    def measure(self, probe, dirs, scheme, eps) -> Measured:
        rows, coeffs = [], []
        for d in dirs:
            loss, c = probe.directional(self.est, self.leaves, d)
            rows.append([loss])
            coeffs.append(c)
        return Measured(None, rows, 0.0, probe.passes, coeffs)

    def forward_passes(self, scheme, queries) -> int:
        return queries


class Replay(Evaluation):
    """A recorded step (``ZOOptimizer.last_record``) without any forward pass. A mode that writes
    the weights while evaluating repeats those writes (so the rounding is the live step's);
    the coefficients, the skip and the conservative choice come from the record."""

    name = "replay"

    def __init__(self, inner: Evaluation, record: Mapping) -> None:
        super().__init__(inner.est, inner.leaves)
        self.inner, self.record = inner, record

    def probe(self, closure) -> Probe:
        return Silent(self.record)

    def evaluate(self, closure, dirs, scheme, eps) -> Measured:
        restore = 0.0
        if self.inner.writes_weights:
            restore = self.inner.measure(self.probe(None), dirs, scheme, eps).restore_alpha
        return Recorded(self.record, restore)


def make_evaluation(mode: str, est: Estimator, leaves, names, module, *, scheme: Scheme, conservative: bool,
                    fuse: bool) -> Evaluation:
    """The evaluation for ``perturbation=mode``. Estimators that measure directional derivatives
    themselves (``kind == "jvp"``) get :class:`ForwardMode`: only with ``inplace`` (nothing is
    perturbed), MeZO's central scheme and a non-conservative step."""
    if mode not in MODES:
        raise ValueError(unknown_choice("perturbation", mode, MODES))
    if est.kind == "jvp":
        if not isinstance(scheme, Central):
            raise ValueError(f"scheme={scheme.name!r} needs perturbed losses: "
                             f"the {est.name!r} estimator measures directional derivatives")
        if conservative:
            raise ValueError("conservative=True works with two-point estimators only")
        if mode != "inplace":
            raise ValueError(f"perturbation={mode!r} applies to two-point estimators only")
        return ForwardMode(est, leaves)
    if mode == "inplace":
        return InPlace(est, leaves, fuse)
    if mode == "per_example":
        return PerExample(est, leaves, names, module, scheme)
    return {"swap": Swap, "side": Side, "dual": Copies}[mode](est, leaves, names, module)
