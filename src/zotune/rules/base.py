"""Update rules as small composable transforms of a leaf's gradient estimate.

Shaped after optax's ``GradientTransformation``: a rule is a pair ``init(leaf) -> state`` and
``update(g, state, leaf, step) -> u``; ``chain`` composes them. Two differences, both for memory:
rules work one leaf at a time (so no model-size gradient is ever formed), and the state is a
dict of tensors updated in place (a ZO step must not allocate a second copy of a momentum
buffer). The step then writes ``x <- x - lr * (u + weight_decay * x)``.

A leaf's gradient estimate arrives in factored form, so rules that can keep it cheap do:
:class:`DenseGrad` is ``scale * t`` (``t`` is often the very direction the step regenerated,
so it must not be modified in place); :class:`LowRankGrad` is ``scale * a @ v.T``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch


class DenseGrad(NamedTuple):
    """``g = scale * t``. ``t`` is borrowed: read it, never write it."""

    t: torch.Tensor
    scale: float

    def dense(self) -> torch.Tensor:
        """A new tensor holding ``g``."""
        return self.t * self.scale


class LowRankGrad(NamedTuple):
    """``g = scale * a @ v.T`` with ``a``: (m, r), ``v``: (n, r) (LOZO: ``a = c U``, ``scale = 1/r``).

    ``period`` names the ``v`` in use; ``v_of(period)`` regenerates the ``v`` of an earlier
    period (low-rank momentum projects its state onto the new subspace when ``v`` changes).
    """

    a: torch.Tensor
    v: torch.Tensor
    scale: float
    period: int
    v_of: Callable[[int], torch.Tensor]

    def dense(self) -> torch.Tensor:
        return (self.a @ self.v.T).mul_(self.scale)


Grad = DenseGrad | LowRankGrad


class Transform(NamedTuple):
    """One update rule.

    Attributes:
        name: registry name, recorded in checkpoints.
        init: ``leaf -> dict of state tensors`` (empty for stateless rules).
        update: ``(g, state, leaf, step) -> u``; ``step`` counts updates from 1.
        coeff: optional map applied to the projected-gradient scalars ``c`` before the
            update (ZO-SGD-Sign takes ``sign(c)``).
        stateless: True when ``u`` depends only on ``g`` (required by the conservative step,
            which tries ``x - lr u`` and ``x + lr u`` and must be able to move back).
        config: hyperparameters (checked on resume).
        needs: what the estimator must provide (its ``provides``), e.g. ``"shared_subspace"``:
            LOZO-M's momentum lives in one ``V`` kept for several steps.
    """

    name: str
    init: Callable[[torch.Tensor], dict]
    update: Callable[[Grad, dict, torch.Tensor, int], Grad]
    coeff: Callable[[torch.Tensor], torch.Tensor] | None = None
    stateless: bool = True
    config: dict = {}
    needs: frozenset = frozenset()


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """Optimizer state is kept in float32 for half-precision leaves: ``g^2`` overflows float16,
    and bfloat16 loses increments below 1/256 of the buffer's value."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def state_zeros(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)


def identity_update(g: Grad, state: dict, p: torch.Tensor, step: int) -> Grad:
    return g


def no_state(p: torch.Tensor) -> dict:
    return {}


def chain(*transforms: Transform) -> Transform:
    """Apply ``transforms`` in order (the output of one is the input of the next).

    State keys must not collide: each transform names its buffers distinctly.
    """
    if not transforms:
        raise ValueError("chain needs at least one transform")

    def init(p):
        state: dict = {}
        for t in transforms:
            s = t.init(p)
            clash = set(s) & set(state)
            if clash:
                raise ValueError(f"chain: transforms share state keys {sorted(clash)}")
            state.update(s)
        return state

    def update(g, state, p, step):
        for t in transforms:
            g = t.update(g, state, p, step)
        return g

    coeffs = [t.coeff for t in transforms if t.coeff is not None]

    def coeff(c):
        for f in coeffs:
            c = f(c)
        return c

    return Transform(
        name="+".join(t.name for t in transforms),
        init=init,
        update=update,
        coeff=coeff if coeffs else None,
        stateless=all(t.stateless for t in transforms),
        config={t.name: t.config for t in transforms},
        needs=frozenset().union(*(t.needs for t in transforms)),
    )
