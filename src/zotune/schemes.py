"""Sampling schemes: which perturbed losses a ZO step takes and how they become coefficients.

A scheme is independent of how a direction is drawn (the estimator) and of how an estimate
becomes an update (the rule). The step evaluates, for every query direction ``z_j``, the losses
at ``x + o * eps * z_j`` for each offset ``o`` in :attr:`Scheme.offsets` (and once the loss at
``x`` itself when :attr:`Scheme.base_point` is set), then asks the scheme for one coefficient
``c_j`` per direction. The update is then ``g = (1/q) sum_j c_j z_j`` for every scheme.

- :class:`Central` (MeZO): ``c_j = (L(x + eps z_j) - L(x - eps z_j)) / (2 eps)``.
- :class:`OneSidedNormalised` (FZOO, Dang et al., ICLR 2026): ``c_j = (L(x + eps u_j) - L(x)) / sigma``
  with ``sigma`` the (population) standard deviation of ``L(x + eps u_1..q)``: the step is
  normalised by how much the losses spread, so its length adapts to the loss landscape.
- :class:`CentralWithCurvature` (HiZOO, Zhao et al., ICLR 2025): MeZO's coefficient plus the
  curvature along each direction, ``h_j = |L+ + L- - 2 L(x)| / (2 eps^2)``, which a Hessian-
  informed estimator uses to update its diagonal Hessian estimate.

Schemes are pure functions of the losses, so replaying a step from its recorded coefficients
(and ``aux``) needs no forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from zotune._validate import unknown_choice


class Coefficients(NamedTuple):
    """What a scheme makes of a step's losses: one ``coeffs[j]`` per direction; ``aux`` holds
    extra per-direction scalars an estimator observes (HiZOO's curvatures), else empty."""

    coeffs: list[float]
    aux: list[float]


class Scheme:
    """Base class. Subclasses set ``name``, ``offsets``, ``base_point`` and :meth:`coefficients`."""

    name = "base"
    offsets: tuple[float, ...] = (1.0, -1.0)
    base_point = False
    #: the smallest number of query directions the scheme is defined for
    min_queries = 1
    #: data parallel: average the losses over ranks before forming coefficients (nonlinear
    #: schemes); a linear scheme averages the coefficients instead (q scalars, fewer bytes)
    reduces_losses = True

    def coefficients(self, base: float | None, losses: Sequence[Sequence[float]], eps: float) -> Coefficients:
        """``losses[j][k]`` is the loss at ``x + offsets[k] * eps * z_j``; ``base`` the loss at ``x``."""
        raise NotImplementedError

    def forward_passes(self, queries: int) -> int:
        return queries * len(self.offsets) + (1 if self.base_point else 0)

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Central(Scheme):
    """MeZO's two-point central difference: ``c = (L(x + eps z) - L(x - eps z)) / (2 eps)``."""

    name = "central"
    offsets = (1.0, -1.0)
    reduces_losses = False

    def coefficients(self, base, losses, eps):
        return Coefficients([(lp - lm) / (2.0 * eps) for lp, lm in losses], [])


class OneSidedNormalised(Scheme):
    """FZOO's batched one-sided estimate, normalised by the spread of the losses.

    ``c_j = (L(x + eps u_j) - L(x)) / sigma``, ``sigma = std(L(x + eps u_1), ..., L(x + eps u_q))``
    (population standard deviation, as FZOO's reference code). With the step's ``1/q`` average
    this is FZOO's update ``x <- x - lr / (q sigma) sum_j (L_j - L_0) u_j``. When every perturbed
    loss is the same (``sigma = 0``) the step carries no information and every ``c_j`` is 0.
    """

    name = "one_sided_normalised"
    offsets = (1.0,)
    base_point = True
    min_queries = 2

    def coefficients(self, base, losses, eps):
        ls = [row[0] for row in losses]
        if not all(math.isfinite(x) for x in ls) or not math.isfinite(base):
            return Coefficients([float("nan")] * len(ls), [])
        mean = sum(ls) / len(ls)
        sigma = math.sqrt(sum((x - mean) ** 2 for x in ls) / len(ls))
        if sigma == 0.0:
            return Coefficients([0.0] * len(ls), [])
        return Coefficients([(x - base) / sigma for x in ls], [])


class CentralWithCurvature(Scheme):
    """MeZO's central difference plus the curvature along each direction (HiZOO).

    ``c_j = (L+ - L-) / (2 eps)`` and ``h_j = |L+ + L- - 2 L(x)| / (2 eps^2)``, from the three
    losses at ``x + eps z_j``, ``x - eps z_j`` and ``x``.
    """

    name = "central_curvature"
    offsets = (1.0, -1.0)
    base_point = True

    def coefficients(self, base, losses, eps):
        coeffs = [(lp - lm) / (2.0 * eps) for lp, lm in losses]
        aux = [abs(lp + lm - 2.0 * base) / (2.0 * eps * eps) for lp, lm in losses]
        return Coefficients(coeffs, aux)


SCHEMES = {s.name: s for s in (Central, OneSidedNormalised, CentralWithCurvature)}


def make_scheme(name: str) -> Scheme:
    """A scheme by registry name: ``central``, ``one_sided_normalised``, ``central_curvature``."""
    if name not in SCHEMES:
        raise ValueError(unknown_choice("scheme", name, SCHEMES))
    return SCHEMES[name]()
