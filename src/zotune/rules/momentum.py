"""Heavy-ball momentum (ZO-SGD-MMT) and LOZO-M's low-rank momentum."""

from __future__ import annotations

import torch

from zotune._validate import check_range
from zotune.rules.base import DenseGrad, LowRankGrad, Transform, state_dtype, state_zeros


def _accumulate_(buf: torch.Tensor, g, alpha: float) -> None:
    """``buf += alpha * g`` without materialising ``g``."""
    if isinstance(g, LowRankGrad):
        a, v = (g.a, g.v) if g.a.dtype == buf.dtype else (g.a.to(buf.dtype), g.v.to(buf.dtype))
        buf.addmm_(a, v.T, alpha=alpha * g.scale)
    else:
        buf.add_(g.t, alpha=alpha * g.scale)


def momentum(beta: float = 0.9, dampening: float = 0.0) -> Transform:
    """ZO-SGD-MMT: ``m <- beta * m + (1 - dampening) * g``, ``u = m``.

    ZO-Bench writes ``m_t = beta m_{t-1} + g_t`` (``dampening=0``). One model-size buffer.
    """
    beta = check_range("beta", beta, 0.0, 1.0)
    dampening = check_range("dampening", dampening, 0.0, 1.0)

    def init(p):
        return {"momentum": state_zeros(p)}

    def update(g, state, p, step):
        m = state["momentum"]
        m.mul_(beta)
        _accumulate_(m, g, 1.0 - dampening)
        return DenseGrad(m, 1.0)

    return Transform("momentum", init, update, stateless=False, config={"beta": beta, "dampening": dampening})


def lowrank_momentum(beta: float = 0.9) -> Transform:
    """LOZO-M: momentum kept in the low-rank space.

    For a matrix with gradient estimate ``g = c U V^T / r``:
    ``N <- beta * N + (1 - beta) * c U`` (``N``: m x r) and ``u = N V^T / r``. When ``V`` is
    resampled, the old momentum is first projected onto the new subspace:
    ``N <- N V_old^T V_new / n`` (the least-squares fit, using ``V^T V ~ n I``).
    Leaves with dense estimates (biases, norms) keep an ordinary EMA ``m <- beta m + (1-beta) g``.
    The state ``lowrank_momentum`` holds ``N / r`` (the ``1/r`` folded in once, so that the update
    is ``N V^T`` with no further scaling); the projection is linear, so this changes nothing else.
    """
    beta = check_range("beta", beta, 0.0, 1.0)

    def init(p):
        # matrices get N (m x r) on first use; other leaves, which the low-rank estimator
        # perturbs densely, an ordinary momentum buffer
        return {} if p.dim() == 2 else {"momentum": state_zeros(p)}

    def update(g, state, p, step):
        if isinstance(g, LowRankGrad):
            n_buf = state.get("lowrank_momentum")
            if n_buf is None:
                n_buf = state["lowrank_momentum"] = torch.zeros(g.a.shape, dtype=state_dtype(p), device=g.a.device)
                state["period"] = g.period
            elif state["period"] != g.period:
                v_old = g.v_of(state["period"])
                n = g.v.shape[0]
                n_buf.copy_(n_buf @ (v_old.T @ g.v).to(n_buf.dtype) / n)
                state["period"] = g.period
            n_buf.mul_(beta).add_(g.a, alpha=(1.0 - beta) * g.scale)
            return LowRankGrad(n_buf, g.v, 1.0, g.period, g.v_of)
        m = state.get("momentum")
        if m is None:
            raise ValueError("lowrank_momentum got a dense estimate for a matrix: use it with the lowrank estimator")
        m.mul_(beta)
        _accumulate_(m, g, 1.0 - beta)
        return DenseGrad(m, 1.0)

    return Transform("lowrank_momentum", init, update, stateless=False, config={"beta": beta},
                     needs=frozenset({"shared_subspace"}))
