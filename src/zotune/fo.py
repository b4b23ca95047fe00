"""First-order baselines (FO-SGD, FO-Adam) and the hybrid ZO/FO split, on the ZO contract.

Every zotune optimizer takes ``step(closure)`` with a closure that just computes the loss, so
one training loop runs ZO and FO methods alike: the FO ones run the closure with autograd on,
call ``backward`` and take a torch step.
"""

from __future__ import annotations

import torch

from zotune.step import ZOOptimizer


class _BackwardStep:
    """Mixin: ``step(closure)`` = zero grads, loss = closure() with grad, backward, update."""

    forward_passes = 0

    def step(self, closure=None):  # type: ignore[override]
        if closure is None or not callable(closure):
            raise ValueError("first-order baselines need a closure that returns the loss")
        with torch.enable_grad():
            self.zero_grad(set_to_none=True)
            loss = closure()
            loss.backward()
        self.forward_passes += 1
        super().step()
        return loss.detach()

    @property
    def forward_passes_per_step(self) -> int:
        return 1


class FOSGD(_BackwardStep, torch.optim.SGD):
    """FO-SGD: ``torch.optim.SGD`` driven by the closure contract (backward inside ``step``)."""


class FOAdam(_BackwardStep, torch.optim.Adam):
    """FO-Adam: ``torch.optim.Adam`` driven by the closure contract (backward inside ``step``)."""


class HybridOptimizer:
    """ZO-Bench's hybrid scheme (Table 7): shallow tensors by ZO, deep ones by FO.

    Each step first takes the ZO step on its tensors (two forward passes, no graph), then one
    FO step with backward; the ZO tensors are frozen for autograd, so the graph (and the
    activation memory) only covers the FO part of the network.
    """

    def __init__(self, zo: ZOOptimizer, fo: torch.optim.Optimizer) -> None:
        if not isinstance(zo, ZOOptimizer):
            raise ValueError(f"zo must be a ZOOptimizer, got {type(zo).__name__}")
        if not hasattr(fo, "forward_passes_per_step"):
            raise ValueError("fo must be a zotune FO optimizer (FOSGD or FOAdam)")
        self.zo, self.fo = zo, fo
        for p in zo.leaves:
            p.requires_grad_(False)

    @property
    def param_groups(self) -> list[dict]:
        """The ZO groups then the FO ones, read live: each part's ``load_state_dict`` replaces
        its group dicts, so a list taken once would go stale (and an lr set on it be lost)."""
        return self.zo.param_groups + self.fo.param_groups

    @property
    def forward_passes_per_step(self) -> int:
        return self.zo.forward_passes_per_step + self.fo.forward_passes_per_step

    @property
    def forward_passes(self) -> int:
        return self.zo.forward_passes + self.fo.forward_passes

    def step(self, closure):
        loss = self.zo.step(closure)
        self.fo.step(closure)
        return loss

    def state_dict(self) -> dict:
        return {"zo": self.zo.state_dict(), "fo": self.fo.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.zo.load_state_dict(state["zo"])
        self.fo.load_state_dict(state["fo"])
