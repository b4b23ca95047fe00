"""Plain ZO-SGD and ZO-SGD-Sign."""

from __future__ import annotations

import torch

from zotune._validate import unknown_choice
from zotune.rules.base import DenseGrad, LowRankGrad, Transform, identity_update, no_state


def sgd() -> Transform:
    """``u = g``: the step writes ``x <- x - lr * g`` (MeZO, ZO-SGD)."""
    return Transform("sgd", no_state, identity_update)


SIGN_MODES = ("scalar", "elementwise")


def sign(mode: str = "scalar") -> Transform:
    """ZO-SGD-Sign (Liu et al., 2019; ZO-Bench appendix A).

    ``mode="scalar"`` (ZO-Bench's appendix): ``u = sign(c) * z`` -- the sign of the projected
    gradient, so the step length no longer depends on the loss difference.
    ``mode="elementwise"``: ``u = sign(g)`` coordinate by coordinate (1-bit updates).
    """
    if mode not in SIGN_MODES:
        raise ValueError(unknown_choice("sign mode", mode, SIGN_MODES))
    if mode == "scalar":
        return Transform("sign", no_state, identity_update, coeff=torch.sign, config={"mode": mode})

    def update(g, state, p, step):
        if isinstance(g, LowRankGrad):
            return DenseGrad((g.a @ g.v.T).sign_(), float(torch.tensor(g.scale).sign()))
        return DenseGrad(torch.sign(g.t), float(torch.tensor(g.scale).sign()))

    return Transform("sign", no_state, update, config={"mode": mode})
