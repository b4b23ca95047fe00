"""Fixed masks: perturb (and so update) only the entries of a leaf that a mask chosen before
training keeps, e.g. the values of a prefix and not its keys.

Why: the two-point estimate's variance grows with the number of entries it perturbs, while a
tensor's gradient can sit mostly in a known part of it. On SmolLM2-135M's SST-2 prefix the values
carry 96 % of the gradient's squared norm in half of the entries
(``python benchmarks/prefix_gradients.py``), so perturbing them alone keeps nearly all of the
signal at half the dimension. Per step, with ``m`` the mask and ``z`` the inner direction::

    z' = m * z        (entries outside the mask are neither perturbed nor updated)

The masks are a function of the tensors' layout, given at construction and never checkpointed:
a run rebuilds them from its config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from zotune.estimators.base import Dense, DenseWrapper, Direction, Estimator


class FixedMask(DenseWrapper):
    """Masks another dense estimator's directions with one fixed boolean mask per named leaf.

    Args:
        inner: the dense two-point estimator whose directions are masked.
        masks: leaf name -> boolean tensor of the leaf's shape (True: perturbed); leaves not
            named are perturbed whole.
    """

    name = "fixed_mask"
    needs_dense_because = "a per-entry mask of U V^T is not low rank"

    def __init__(self, inner: Estimator, masks: Mapping[str, torch.Tensor]) -> None:
        super().__init__(inner)
        for name, m in masks.items():
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
                raise ValueError(f"the mask of {name!r} must be a boolean tensor, got {type(m).__name__} "
                                 f"{getattr(m, 'dtype', '')}".rstrip())
            if not bool(m.any()):
                raise ValueError(f"the mask of {name!r} keeps no entry: the leaf would never train")
        self.masks = dict(masks)
        self._flat: list[torch.Tensor | None] = []

    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        super().bind(names, params, run_seed)
        unknown = sorted(set(self.masks) - set(names))
        if unknown:
            raise ValueError(f"masks name leaves that are not trained: {unknown}")
        self._flat = []
        for n, p in zip(names, params):
            m = self.masks.get(n)
            if m is not None and tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"the mask of {n!r} has shape {tuple(m.shape)}, the leaf {tuple(p.shape)}")
            self._flat.append(None if m is None else m.to(p.device).reshape(-1))

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None) -> Dense | None:
        ld = self.inner.leaf_direction(d, i, p, k, out=out)
        m = self._flat[i]
        if ld is None or m is None:
            return ld
        a, b = self.ranges[i][k]
        return Dense(ld.z.mul_(m[a:b].view(ld.z.shape).to(ld.z.dtype)))

    def kept_fraction(self) -> float:
        """The fraction of the trained entries the masks perturb (for logs and tests)."""
        kept = total = 0
        for i, m in enumerate(self._flat):
            n = sum(b - a for a, b in self.ranges[i])
            total += n
            kept += n if m is None else int(m.sum())
        return kept / max(total, 1)

    def config(self) -> dict:
        return {"name": self.name, "inner": self.inner.config(), "masked": sorted(self.masks),
                "kept": round(self.kept_fraction(), 6) if self._flat else None}

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state.get("inner", {}))
