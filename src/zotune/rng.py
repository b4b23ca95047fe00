"""Seed derivation: (run seed, step, query, leaf, stream) -> an explicit ``torch.Generator``.

ZO methods never store a random direction: they regenerate it from a seed whenever it is needed
(perturb, perturb back, update). Deriving every leaf's seed from a tuple of integers, instead of
drawing from one running generator, lets any leaf's direction be regenerated alone, in any
order, on any rank or shard, and makes resume exact. The global RNG is never touched, so
dropout and data order are not disturbed by the optimizer.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1

#: Stream tags keep independent random quantities of the same (step, query, leaf) apart.
STREAM_GAUSSIAN = 1
STREAM_LOWRANK_U = 2
STREAM_LOWRANK_V = 3
STREAM_MASK = 4
STREAM_RADEMACHER = 5
STREAM_ROUNDING = 6
STREAM_ADAPTER_INIT = 7  # LoRA / prefix / prompt initial values (zotune.train.loop.adapter_init_seed)
#: a population member's own V (LOZO's V is shared by a period). It shares 7 with the adapter init, a
#: slip kept so recorded runs replay: the keys still differ, (7,) against (7, step, query, leaf)
STREAM_POPULATION_V = 7


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a cheap, well-mixed 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(run_seed: int, *keys: int) -> int:
    """Hash ``run_seed`` and any number of integer keys into a 63-bit seed.

    Order matters: ``derive_seed(s, 1, 2) != derive_seed(s, 2, 1)`` (almost surely).

    >>> derive_seed(0, 5, 0, 3) == derive_seed(0, 5, 0, 3)
    True
    """
    h = _splitmix64(int(run_seed) & _MASK64)
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & 0x7FFF_FFFF_FFFF_FFFF


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed``."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    return g


def leaf_generator(
    run_seed: int, step: int, query: int, leaf: int, stream: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """The generator for one leaf's random quantity at (step, query).

    ``stream`` separates independent draws for the same leaf (e.g. LOZO's U and V).
    """
    return generator(derive_seed(run_seed, stream, step, query, leaf), device)
