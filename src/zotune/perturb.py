"""Two ways to evaluate the loss at ``x + s * eps * z``, and stochastic rounding for half precision.

``inplace`` (MeZO): add ``s * eps * z`` to the weights, run the closure, move on; the restore is
fused into the update. Cheapest, but in float16 / bfloat16 each add rounds, so ``+eps, -2eps,
+eps`` does not come back to ``x``: the weights take a random walk of about one unit in the last
place per step, larger than a typical ZO update, which is how half-precision ZO runs drift.

``swap`` (just in time): the weights are never written during the evaluation. A forward
pre-hook on each module that owns trained tensors gives it a perturbed copy while it runs and
puts the original back after, so only one module's perturbed weights exist at a time
(ZO-Bench's ``max_l |x_l|``), and half-precision weights stay exact.

Updates to half-precision weights are far below their resolution (``lr * c * z`` ~ 1e-5 against
a spacing of ~4e-4 for bfloat16 weights near 0.05), so round-to-nearest drops them;
:func:`stochastic_round_` keeps them in expectation.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from zotune.estimators.base import Direction, Estimator, add_direction_

HALF = (torch.float16, torch.bfloat16)
MODES = ("inplace", "swap")


class SwapPerturbation:
    """Perturbs the trained tensors of ``module`` just in time, module by module."""

    def __init__(self, module: nn.Module, leaves: list[torch.Tensor], names: list[str]) -> None:
        if not isinstance(module, nn.Module):
            raise ValueError(f"perturbation='swap' needs the nn.Module being trained, got {type(module).__name__}")
        index = {id(p): i for i, p in enumerate(leaves)}
        self.owners: list[tuple[nn.Module, list[int]]] = []
        owned = set()
        for mod in module.modules():
            own = [index[id(p)] for _, p in mod.named_parameters(recurse=False) if id(p) in index]
            if own:
                self.owners.append((mod, own))
                owned.update(own)
        missing = [names[i] for i in range(len(leaves)) if i not in owned]
        if missing:
            raise ValueError(
                f"perturbation='swap': {len(missing)} trained tensors (e.g. {missing[0]!r}) are not "
                "parameters of the module given"
            )
        self.leaves = leaves

    @contextmanager
    def active(self, est: Estimator, d: Direction, alpha: float):
        """While active, every owning module runs with ``x + alpha * z(d)`` for its tensors."""
        saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        leaves = self.leaves

        def pre(module, args, own):
            swapped = []
            for i in own:
                p = leaves[i]
                if not est.touches(d, i):
                    continue
                perturbed = p.detach().clone()
                for k in range(est.num_chunks(i)):
                    t = est.target(perturbed, i, k)
                    ld = est.leaf_direction(d, i, p, k, out=est.out_buffer(t, i, p))
                    if ld is not None:
                        add_direction_(t, ld, alpha)
                swapped.append((p, p.data))
                p.data = perturbed
            saved.append(swapped)

        def post(module, args, output):
            for p, data in saved.pop():
                p.data = data

        handles = []
        for mod, own in self.owners:
            handles.append(mod.register_forward_pre_hook(lambda m, a, own=own: pre(m, a, own)))
            handles.append(mod.register_forward_hook(post))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            while saved:  # an exception inside a forward: put every original back
                for p, data in saved.pop():
                    p.data = data


def stochastic_round_(dst: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Write float32 ``value`` into half-precision ``dst``, rounding up or down at random with
    the probabilities that make the result exact in expectation."""
    nearest = value.to(dst.dtype)
    near32 = nearest.float()
    away = torch.where(near32 > value, float("-inf"), float("inf")).to(dst.dtype)
    other = torch.nextafter(nearest, away)
    gap = other.float() - near32
    prob = ((value - near32) / gap).nan_to_num_(0.0, posinf=0.0, neginf=0.0)
    draw = torch.rand(value.shape, generator=generator, device=value.device)
    return dst.copy_(torch.where(draw < prob, other, nearest))
