"""What every estimator shares: direction handles, per-leaf direction forms, in-place perturbation.

An estimator says how a random direction ``z`` is drawn for each trainable tensor (a *leaf*)
and how it is regenerated later. A step asks it for cheap handles (:class:`Direction`, just
integers), then for each leaf's direction one leaf at a time, so that at most one leaf-sized
direction is alive at once and no full-model direction is ever stored.

A leaf's direction is either :class:`Dense` (a tensor shaped like the leaf) or :class:`LowRank`
(factors ``u`` (m x r) and ``v`` (n x r) with ``z = u @ v.T``; the product is never formed when
the consumer can use ``addmm_``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch


@dataclass(frozen=True)
class Direction:
    """A cheap handle naming one query's direction: everything else is regenerated from it."""

    step: int
    query: int
    block: int | None = None  # block-wise estimates: the only block this query perturbs


class Dense(NamedTuple):
    """A dense leaf direction ``z`` (same shape as the leaf)."""

    z: torch.Tensor


class LowRank(NamedTuple):
    """A low-rank leaf direction ``z = u @ v.T`` with ``u``: (m, r) and ``v``: (n, r)."""

    u: torch.Tensor
    v: torch.Tensor
    period: int  # which V (LOZO resamples V every ``interval`` steps); used by low-rank momentum


LeafDirection = Dense | LowRank


def add_direction_(p: torch.Tensor, d: LeafDirection, alpha: float) -> None:
    """``p += alpha * z`` in place, without materialising a low-rank ``z``."""
    if isinstance(d, LowRank):
        p.addmm_(d.u, d.v.T, alpha=alpha)
    else:
        p.add_(d.z, alpha=alpha)


def to_dense(d: LeafDirection) -> torch.Tensor:
    """Materialise a direction (only where a consumer truly needs the dense tensor)."""
    return d.u @ d.v.T if isinstance(d, LowRank) else d.z


class Estimator:
    """Base class: draws, regenerates and applies random directions for a list of leaves.

    Subclasses implement :meth:`leaf_direction`. ``bind`` is called once by the optimizer with
    the ordered leaf names and tensors; leaf ``i`` is then addressed by its index.

    ``kind`` is ``"two_point"`` (perturb the weights, difference two losses) or ``"jvp"``
    (forward-mode directional derivative, no perturbation).
    """

    kind = "two_point"
    name = "base"

    def __init__(self, queries: int = 1) -> None:
        from zotune._validate import check_int

        self.queries = check_int("queries", queries)
        self.run_seed = 0
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []

    # -- binding -----------------------------------------------------------------------------
    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        """Remember the leaves' names and shapes and the run seed (called by the optimizer)."""
        self.names = list(names)
        self.shapes = [p.shape for p in params]
        self.run_seed = int(run_seed)

    # -- directions ----------------------------------------------------------------------------
    def directions(self, step: int) -> list[Direction]:
        """The query handles of ``step`` (``queries`` of them by default)."""
        return [Direction(step, j) for j in range(self.queries)]

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor) -> LeafDirection | None:
        """Regenerate leaf ``i``'s direction for handle ``d``; ``None`` if ``d`` leaves it alone."""
        raise NotImplementedError

    def touches(self, d: Direction, i: int) -> bool:
        """Whether query ``d`` perturbs leaf ``i`` (all do, except in block-wise estimates)."""
        return True

    def grad_scale(self, i: int) -> float:
        """Factor between the perturbation ``z`` and the gradient estimate ``c * scale * z``.

        1 for Gaussian directions; ``1 / r`` for LOZO's ``U V^T / r``.
        """
        return 1.0

    def perturb_(self, params: Sequence[torch.Tensor], d: Direction, alpha: float) -> int:
        """``x += alpha * z(d)`` leaf by leaf, in place. Returns the number of leaves written."""
        written = 0
        for i, p in enumerate(params):
            if not self.touches(d, i):
                continue
            ld = self.leaf_direction(d, i, p)
            if ld is not None:
                add_direction_(p, ld, alpha)
                written += 1
        return written

    def config(self) -> dict:
        """Hyperparameters that determine the directions (checked on resume)."""
        return {"name": self.name, "queries": self.queries}

    def state_dict(self) -> dict:
        """Estimator state worth checkpointing (none for stateless ones)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def randn_like_leaf(p: torch.Tensor, g: torch.Generator, shape=None) -> torch.Tensor:
    """Standard normal draws in the leaf's dtype and device (MeZO draws in the weight dtype)."""
    dtype = p.dtype if p.dtype.is_floating_point else torch.float32
    return torch.randn(p.shape if shape is None else shape, generator=g, dtype=dtype, device=p.device)
