"""MeZO's randomized gradient estimate (RGE), with q queries (ZO-Bench).

``g = (1/q) * sum_j (L(x + eps z_j) - L(x - eps z_j)) / (2 eps) * z_j`` with ``z_j ~ N(0, I)``
(or Rademacher +-1 entries: the same first two moments, and far cheaper to draw, since one random
64-bit word gives 64 signs). Each chunk of each leaf's ``z_j`` is regenerated from
``(run seed, step, query j, leaf index, chunk index)``.
"""

from __future__ import annotations

import torch

from zotune import rng
from zotune._validate import unknown_choice
from zotune.estimators.base import DEFAULT_CHUNK, Dense, Direction, Estimator

DISTRIBUTIONS = ("gaussian", "rademacher")
_SHIFTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
#: Each float type's same-width integer type and the bit pattern of +1.0 in it: a sign is written
#: by setting (-1) or clearing (+1) the top bit of that pattern.
_ONE_BITS = {
    torch.float64: (torch.int64, 0x3FF0_0000_0000_0000),
    torch.float32: (torch.int32, 0x3F80_0000),
    torch.float16: (torch.int16, 0x3C00),
    torch.bfloat16: (torch.int16, 0x3F80),
}
_WIDTHS = {t: (torch.iinfo(t).bits, torch.iinfo(t).min) for t in (torch.int16, torch.int32, torch.int64)}


class Gaussian(Estimator):
    """Two-point random direction estimate over all leaves (MeZO; q-query RGE of ZO-Bench).

    Args:
        queries: number ``q`` of directions averaged per step (variance falls roughly as 1/q).
        distribution: ``"gaussian"`` (the papers') or ``"rademacher"`` (random signs).
        chunk_size: elements per independently seeded chunk of a direction.
    """

    name = "gaussian"

    def __init__(self, queries: int = 1, distribution: str = "gaussian", chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__(queries, chunk_size)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(unknown_choice("distribution", distribution, DISTRIBUTIONS))
        self.distribution = distribution
        self.parallel_chunks = distribution == "gaussian"  # measured: see for_each_chunk

    def leaf_direction(self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out=None) -> Dense:
        a, b = self.ranges[i][k]
        return Dense(draw(self.run_seed, d.step, d.query, i, k, b - a, p, self.distribution, out))

    def config(self) -> dict:
        return {**super().config(), "distribution": self.distribution}


def draw(run_seed: int, step: int, query: int, leaf: int, chunk: int, n: int, p: torch.Tensor,
         distribution: str = "gaussian", out: torch.Tensor | None = None) -> torch.Tensor:
    """Chunk ``chunk`` (``n`` elements, flat) of leaf ``leaf``'s direction at (step, query),
    in ``p``'s dtype and device; written into ``out`` when given."""
    dtype = p.dtype if p.dtype.is_floating_point else torch.float32
    if out is None:
        out = torch.empty(n, dtype=dtype, device=p.device)
    if distribution == "rademacher":
        g = rng.generator(rng.derive_seed(run_seed, rng.STREAM_RADEMACHER, step, query, leaf, chunk), p.device)
        return signs_(out, g)
    g = rng.generator(rng.derive_seed(run_seed, rng.STREAM_GAUSSIAN, step, query, leaf, chunk), p.device)
    return out.normal_(generator=g)


def signs_(out: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Fill flat, contiguous ``out`` with +-1: element ``e`` is -1 exactly where bit ``e % 64`` of
    the ``e // 64``-th random 64-bit word drawn from ``g`` is set.

    One draw per 64 values instead of one per value: the words are viewed as integers as wide as
    ``out``'s float type (little-endian, so the bit order is the same in every dtype), each bit is
    shifted to the sign position and the pattern of 1.0 is OR-ed in, written straight into ``out``
    (no buffer larger than the chunk, and none of the chunk's size besides ``out``).
    """
    n = out.numel()
    fmt = _ONE_BITS.get(out.dtype)
    if fmt is None:  # another float type (float8 ...): through float32, exact for +-1
        return out.copy_(signs_(torch.empty(n, dtype=torch.float32, device=out.device), g))
    itype, one = fmt
    width, top = _WIDTHS[itype]
    words = torch.empty(-(-n // 64), dtype=torch.int64, device=out.device)
    words = words.random_(-(1 << 63), None, generator=g).view(itype)  # full range: all 64 bits random
    shifts = _SHIFTS.get((itype, out.device))
    if shifts is None:  # bit j of a word goes to the top (sign) bit of element j
        shifts = _SHIFTS[(itype, out.device)] = torch.arange(width - 1, -1, -1, dtype=itype, device=out.device)
    bits = out.view(itype)
    whole, tail = divmod(n, width)
    if tail == 0 and whole == len(words):  # the common case (a chunk of a multiple of 64): fewest ops
        torch.bitwise_left_shift(words.unsqueeze(1), shifts, out=bits.view(whole, width))
    else:
        if whole:
            torch.bitwise_left_shift(words[:whole].unsqueeze(1), shifts, out=bits[: whole * width].view(whole, width))
        if tail:  # the last word's first bits
            bits[whole * width:] = torch.bitwise_left_shift(words[whole], shifts[:tail])
    return bits.bitwise_and_(top).bitwise_or_(one).view(out.dtype)


def draw_leaf(run_seed: int, step: int, query: int, leaf: int, p: torch.Tensor,
              chunk_size: int = DEFAULT_CHUNK, distribution: str = "gaussian") -> torch.Tensor:
    """Leaf ``leaf``'s whole direction, shaped like ``p``: its chunks drawn one after another."""
    n = p.numel()
    parts = [draw(run_seed, step, query, leaf, k, min(chunk_size, n - a), p, distribution)
             for k, a in enumerate(range(0, n, chunk_size))]
    return torch.cat(parts).view(p.shape) if parts else torch.empty_like(p)
