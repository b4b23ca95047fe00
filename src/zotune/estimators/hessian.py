"""HiZOO's Hessian-informed directions (Zhao et al., ICLR 2025): ``z / sqrt(H)`` with a diagonal
Hessian estimate ``H`` learned from the step's own losses.

Per step, with ``z ~ N(0, I)`` regenerated from the seed and ``H`` (one model-size buffer,
initialised to ones)::

    L+ = L(x + eps z / sqrt(H)),  L- = L(x - eps z / sqrt(H)),  L0 = L(x)
    h  = |L+ + L- - 2 L0| / (2 eps^2)                       (curvature along the direction)
    H <- (1 - alpha) H + alpha h H z^2                      (elementwise)
    x <- x - lr ((L+ - L-) / (2 eps)) z / sqrt(H)           (with the updated H)

as in the reference implementation (``zo_Hessian_step_update``): the update divides by the
*updated* ``H``. ``alpha`` (``hessian_smooth``) sets how fast ``H`` moves; with ``alpha = 0`` HiZOO
is MeZO plus one forward pass. The scheme that supplies ``h`` is
:class:`zotune.schemes.CentralWithCurvature`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zotune._validate import check_range
from zotune.estimators.base import Dense, DenseWrapper, Direction, Estimator, for_each_chunk


class HessianInformed(DenseWrapper):
    """Scales another estimator's dense directions by ``H^{-1/2}``, ``H`` a diagonal Hessian estimate.

    Args:
        inner: a dense two-point estimator (Gaussian, as the paper; Rademacher works too).
        hessian_smooth: ``alpha`` in ``H <- (1 - alpha) H + alpha h H z^2``, in [0, 1).

    State: ``H``, one float32 tensor per leaf (the method's one model-size buffer), checkpointed.
    """

    name = "hessian"
    #: the update pass needs ``z / sqrt(H_new)`` while the weights hold ``x - eps z / sqrt(H_old)``,
    #: so the restore cannot be folded into the update
    fuses_restore = False

    def __init__(self, inner: Estimator, hessian_smooth: float = 1e-6) -> None:
        super().__init__(inner)
        self.hessian_smooth = check_range("hessian_smooth", hessian_smooth, 0.0, 1.0)
        self.hessian: list[torch.Tensor] = []

    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        super().bind(names, params, run_seed)
        # float32 whatever the weights' dtype: H z^2 would overflow float16 and lose small changes in bfloat16
        self.hessian = [torch.ones(p.shape, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32,
                                   device=p.device) for p in params]

    def _h(self, i: int, k: int) -> torch.Tensor:
        a, b = self.ranges[i][k]
        return self.hessian[i].view(-1)[a:b]

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None) -> Dense | None:
        ld = self.inner.leaf_direction(d, i, p, k, out=out)
        if ld is None:
            return None
        z = ld.z
        scale = self._h(i, k).rsqrt()
        return Dense(z.mul_(scale if scale.dtype == z.dtype else scale.to(z.dtype)))

    def observe(self, dirs, aux, params) -> None:
        """``H <- H * (1 - alpha + alpha h_j z_j^2)`` for each query ``j``, chunk by chunk."""
        alpha = self.hessian_smooth
        if alpha == 0.0:
            return
        items = [(i, p, k) for i, p in enumerate(params) for k in range(self.num_chunks(i))]

        def one(item) -> None:
            i, p, k = item
            h = self._h(i, k)
            for d, curvature in zip(dirs, aux):
                if not self.inner.touches(d, i):
                    continue
                z = self.inner.leaf_direction(d, i, p, k, out=self.scratch(h.numel(), p)).z.to(h.dtype)
                h.mul_(z.square_().mul_(alpha * curvature).add_(1.0 - alpha))

        for_each_chunk(one, items, params[0].device if params else None, self.parallel_chunks)

    def config(self) -> dict:
        return {"name": self.name, "inner": self.inner.config(), "hessian_smooth": self.hessian_smooth}

    def state_dict(self) -> dict:
        return {"hessian": [h.clone() for h in self.hessian], "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state["hessian"]
        if len(saved) != len(self.hessian):
            raise ValueError(f"HiZOO state has {len(saved)} Hessian tensors, this optimizer {len(self.hessian)}")
        for h, s in zip(self.hessian, saved):
            h.copy_(s)
        self.inner.load_state_dict(state.get("inner", {}))
