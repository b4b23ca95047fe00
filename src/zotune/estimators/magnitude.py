"""Sparse-MeZO's magnitude masks (Liu et al., NeurIPS 2025): perturb and update only the
small-magnitude weights.

Each leaf gets a threshold ``tau_l`` at bind time: the ``1 - sparsity`` quantile of its ``|w|``.
At every step the mask is ``m = 1[|w| <= tau_l]`` of the weights *as they are at the start of
the step* (so it follows the weights as they train), and the inner direction becomes ``m * z``:
``g = c m z`` is an estimate of the masked gradient ``m * grad``. The paper's argument: large
weights carry the pretrained knowledge and their ZO noise dominates the estimate, small ones are
where a few-step fine-tune moves.

The mask is taken when a chunk's direction is first asked for in a step, before anything of
that step has written the chunk, and kept as packed bits (one bit per weight, 1/32 of a float32
model) until the next step, so every pass of the step (perturb, restore, update, and a replay)
sees the same mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zotune import rng
from zotune._validate import check_range
from zotune.estimators.base import Dense, DenseWrapper, Direction, Estimator

_SAMPLE = 1 << 20  # elements sampled per leaf to estimate its magnitude quantile
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device) -> torch.Tensor:
    s = _SHIFTS.get(device)
    if s is None:
        s = _SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return s


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8, 8 entries per byte (entry ``8a + b`` is bit ``b`` of byte ``a``)."""
    n = mask.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.view(-1)
    return (padded.view(-1, 8) << _shifts(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` entries of :func:`pack_bits`' input, as uint8 0/1."""
    return (packed.unsqueeze(1) >> _shifts(packed.device)).bitwise_and_(1).view(-1)[:n]


def magnitude_threshold(p: torch.Tensor, keep: float, seed: int) -> float:
    """The ``keep`` quantile of ``|p|`` (estimated from a seeded sample of large tensors)."""
    flat = p.detach().reshape(-1)
    if flat.numel() > _SAMPLE:
        g = rng.generator(seed, torch.device("cpu"))
        idx = torch.randint(0, flat.numel(), (_SAMPLE,), generator=g).to(flat.device)
        flat = flat[idx]
    a = flat.abs().float()
    k = max(1, min(a.numel(), int(round(keep * a.numel()))))
    return float(a.kthvalue(k).values)


class MagnitudeMasked(DenseWrapper):
    """Masks another dense estimator's directions to the weights of small magnitude (Sparse-MeZO).

    Args:
        inner: the estimator whose directions are masked (Gaussian in the paper).
        sparsity: fraction of each leaf's weights (the largest in magnitude) left untouched, in [0, 1).
        min_dim: leaves with fewer dimensions (biases, norms) are not masked; nor is a leaf whose
            magnitudes are all equal at bind time (LoRA's zero-initialised B), which has none to pick.
    """

    name = "magnitude"

    def __init__(self, inner: Estimator, sparsity: float = 0.75, min_dim: int = 2) -> None:
        super().__init__(inner)
        self.sparsity = check_range("sparsity", sparsity, 0.0, 1.0)
        self.min_dim = min_dim
        self.thresholds: list[float | None] = []
        self._masks: dict[tuple[int, int], tuple[int, torch.Tensor]] = {}  # (leaf, chunk) -> (step, bits)

    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        super().bind(names, params, run_seed)
        keep = 1.0 - self.sparsity
        self.thresholds = []
        for i, p in enumerate(params):
            tau = None
            if p.dim() >= self.min_dim and self.sparsity > 0:
                tau = magnitude_threshold(p, keep, rng.derive_seed(run_seed, rng.STREAM_MASK, 0, 0, i, 0))
                if float(p.detach().abs().max()) <= tau:
                    # every |w| is the threshold (LoRA's zero-initialised B): no small weights to pick,
                    # and once a step moved them all would be above it and the leaf would freeze
                    tau = None
            self.thresholds.append(tau)
        self._masks.clear()

    def mask(self, d: Direction, i: int, p: torch.Tensor, k: int) -> torch.Tensor | None:
        """Chunk ``k`` of leaf ``i``'s mask for ``d``'s step (0/1 in ``p``'s dtype), None if unmasked."""
        tau = self.thresholds[i]
        if tau is None:
            return None
        key = (i, k)
        cached = self._masks.get(key)
        a, b = self.ranges[i][k]
        if cached is None or cached[0] != d.step:
            bits = pack_bits(p.detach().view(-1)[a:b].abs() <= tau)
            self._masks[key] = cached = (d.step, bits)
        return unpack_bits(cached[1], b - a)

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None) -> Dense | None:
        m = self.mask(d, i, p, k)  # first: before this chunk's direction is written anywhere
        ld = self.inner.leaf_direction(d, i, p, k, out=out)
        if ld is None or m is None:
            return ld
        return Dense(ld.z.mul_(m.to(ld.z.dtype)))

    def kept_fraction(self, params: Sequence[torch.Tensor]) -> float:
        """The fraction of all entries the current weights' masks perturb (for logs and tests)."""
        kept = total = 0
        for i, p in enumerate(params):
            total += p.numel()
            tau = self.thresholds[i]
            kept += p.numel() if tau is None else int((p.detach().abs() <= tau).sum())
        return kept / max(total, 1)

    def config(self) -> dict:
        return {"name": self.name, "inner": self.inner.config(), "sparsity": self.sparsity, "min_dim": self.min_dim}

    def state_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.thresholds = list(state["thresholds"])
        self._masks.clear()
        self.inner.load_state_dict(state.get("inner", {}))
