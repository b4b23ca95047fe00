"""ZO-Adam (Chen et al., 2019, ZO-AdaMM; ZO-Bench appendix A)."""

from __future__ import annotations

import torch

from zotune._validate import check_positive, check_range
from zotune.rules.base import DenseGrad, Transform, state_zeros


def adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, bias_correction: bool = True) -> Transform:
    """ZO-Adam as in ZO-Bench appendix A:

    ``m_t = b1 m_{t-1} + (1 - b1) g``, ``v_t = b2 v_{t-1} + (1 - b2) g^2``,
    ``u = m_t / (sqrt(max(v_t, v_{t-1})) + eps)``; with ``bias_correction`` (as torch.optim.Adam,
    which ZO-Bench's code calls) ``m_t`` and both ``v`` are divided by ``1 - b^t``.
    Two model-size buffers.
    """
    b1 = check_range("b1", b1, 0.0, 1.0)
    b2 = check_range("b2", b2, 0.0, 1.0)
    eps = check_positive("eps", eps)

    def init(p):
        return {"exp_avg": state_zeros(p), "exp_avg_sq": state_zeros(p)}

    def update(g, state, p, step):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        bc1 = 1.0 - b1**step if bias_correction else 1.0
        bc2_t = 1.0 - b2**step if bias_correction else 1.0
        bc2_prev = 1.0 - b2 ** (step - 1) if bias_correction and step > 1 else 1.0
        gd = g.dense()  # temp 1: g (in the state's float32 for half-precision leaves)
        if gd.dtype != m.dtype:
            gd = gd.to(m.dtype)
        m.mul_(b1).add_(gd, alpha=1.0 - b1)
        gd.mul_(gd).mul_(1.0 - b2).add_(v, alpha=b2)  # temp 1 now holds v_t
        v_prev_hat = v.mul(1.0 / bc2_prev) if step > 1 else None  # temp 2: v_{t-1} bias-corrected
        v.copy_(gd)
        denom = gd.mul_(1.0 / bc2_t)
        if v_prev_hat is not None:
            torch.maximum(denom, v_prev_hat, out=denom)
            del v_prev_hat
        denom.sqrt_().add_(eps)
        return DenseGrad(torch.div(m, denom, out=denom), 1.0 / bc1)

    return Transform(
        "adam", init, update, stateless=False,
        config={"b1": b1, "b2": b2, "eps": eps, "bias_correction": bias_correction},
    )
