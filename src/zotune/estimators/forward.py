"""Forward-Grad (Baydin et al., 2022; ZO-Bench): the exact directional derivative by forward AD.

``g = (grad L(x) . z) z`` with ``z ~ N(0, I)``: an unbiased gradient estimate with no backward
pass and no finite-difference error. The directional derivative comes from one forward pass
in forward-mode AD (``torch.func.jvp`` over ``torch.func.functional_call``). Unlike the
two-point estimates, all of ``z`` is alive during that pass (PyTorch's forward AD needs the
tangents up front), so it costs about one model-size buffer plus the tangent activations
(ZO-Bench Table 5: ``|x| + max_l |a_l|``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from zotune.estimators.base import DEFAULT_CHUNK, Dense, Direction, Estimator
from zotune.estimators.gaussian import draw


class _CallClosure(nn.Module):
    """Wraps the user's model so that ``functional_call`` swaps its weights for dual tensors
    while the user's own closure runs it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.closure: Callable[[], torch.Tensor] | None = None

    def forward(self) -> torch.Tensor:
        return self.closure()


class ForwardGradient(Estimator):
    """Forward-mode directional-derivative estimate over all leaves.

    Args:
        module: the ``nn.Module`` that owns the trained tensors; its forward is what the
            closure runs. Needed to swap the weights for forward-AD dual tensors.
        queries: number of directions averaged per step.
    """

    kind = "jvp"
    name = "forward"

    def __init__(self, module: nn.Module, queries: int = 1, chunk_size: int = DEFAULT_CHUNK) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"module must be the torch.nn.Module being trained, got {type(module).__name__}")
        super().__init__(queries, chunk_size)
        self.wrapper = _CallClosure(module)
        self.qualnames: list[str] = []

    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        super().bind(names, params, run_seed)
        by_id = {id(t): n for n, t in self.wrapper.named_parameters(remove_duplicate=False)}
        missing = [n for n, p in zip(names, params) if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"Forward-Grad: {len(missing)} trained tensors (e.g. {missing[0]!r}) are not "
                "parameters of the module given; pass the module that owns them"
            )
        self.qualnames = [by_id[id(p)] for p in params]

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None) -> Dense:
        a, b = self.ranges[i][k]
        return Dense(draw(self.run_seed, d.step, d.query, i, k, b - a, p, out=out))

    def measure(self, closure, params: Sequence[torch.Tensor], d: Direction) -> tuple[float, float]:
        """One forward pass in forward-mode AD: returns ``(loss, grad L . z)``."""
        primals = tuple(p.detach() for p in params)
        tangents = tuple(self.full_direction(d, i, p) for i, p in enumerate(params))

        def loss_of(*weights):
            self.wrapper.closure = closure
            try:
                out = torch.func.functional_call(self.wrapper, dict(zip(self.qualnames, weights)), ())
            finally:
                self.wrapper.closure = None
            return out if torch.is_tensor(out) else torch.as_tensor(out)

        loss, dd = torch.func.jvp(loss_of, primals, tangents)
        return float(loss), float(dd)
