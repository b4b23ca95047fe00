"""ZO-SGD-Block (ZO-Bench Sec. 5): one block of parameters perturbed per query.

The leaves are split into blocks (by default one per transformer layer); each step makes one
query per block, perturbing only that block with a Gaussian direction, so every leaf's gradient
estimate comes from exactly one query: ``g_b = (L(x + eps z_b) - L(x - eps z_b)) / (2 eps) z_b``.
A step costs ``2 * num_blocks`` forward passes (the same as q-query RGE with ``q = num_blocks``)
and has lower variance than one direction over the whole model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from zotune.estimators.base import DEFAULT_CHUNK, Dense, Direction, Estimator
from zotune.estimators.gaussian import draw

_LAYER = re.compile(r"^(.*?\.\d+)\.")


def layer_block_key(name: str) -> str:
    """Default grouping: everything up to the first numeric component (``model.layers.3``);
    tensors outside numbered layers are grouped by their owning module (``model.embed_tokens``)."""
    m = _LAYER.match(name)
    if m:
        return m.group(1)
    return name.rsplit(".", 1)[0] if "." in name else name


class Blockwise(Estimator):
    """Block-wise Gaussian estimate: one query per block, every block covered each step.

    Args:
        block_key: maps a leaf name to its block key (default :func:`layer_block_key`).
    """

    name = "blockwise"

    def __init__(self, block_key: Callable[[str], str] | None = None, chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(1, chunk_size)
        self.block_key = block_key or layer_block_key
        self.block_of: list[int] = []
        self.block_names: list[str] = []

    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        super().bind(names, params, run_seed)
        index: dict[str, int] = {}
        self.block_of = []
        for n in names:
            key = self.block_key(n)
            self.block_of.append(index.setdefault(key, len(index)))
        self.block_names = list(index)
        self.queries = max(1, len(index))

    def directions(self, step: int) -> list[Direction]:
        return [Direction(step, b, block=b) for b in range(len(self.block_names))]

    def touches(self, d: Direction, i: int) -> bool:
        return self.block_of[i] == d.block

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None):
        if not self.touches(d, i):
            return None
        a, b = self.ranges[i][k]
        return Dense(draw(self.run_seed, d.step, d.query, i, k, b - a, p, out=out))

    def config(self) -> dict:
        return {"name": self.name, "blocks": len(self.block_names), "chunk_size": self.chunk_size}
