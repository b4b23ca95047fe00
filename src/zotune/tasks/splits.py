"""Train / dev / test splits carved from labeled training rows (the MeZO protocol).

Labeled validation sets are often held back, so MeZO samples 1,000 train, 500 dev and 1,000
test examples from the training data with a fixed seed. :func:`make_splits` does that, and
takes the test set from a labeled evaluation file instead when the user has one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from typing import Callable, Hashable, NamedTuple, Sequence, TypeVar

__all__ = ["SplitSpec", "Splits", "make_splits", "fit_sizes"]

T = TypeVar("T")


@dataclass(frozen=True)
class SplitSpec:
    """How many rows each split gets, the seed, and an optional labeled evaluation file.

    ``eval_file`` (a path, absolute or relative to the data root) makes the test split come from
    that file; dev and train are still carved from the training file. Sizes of 0 are allowed.
    """

    train: int = 1000
    dev: int = 500
    test: int = 1000
    seed: int = 0
    eval_file: str | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "eval_file":
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"SplitSpec.eval_file must be a path string or None, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"SplitSpec.{f.name} must be an int, got {value!r}")
            elif f.name != "seed" and value < 0:
                raise ValueError(f"SplitSpec.{f.name} must be >= 0, got {value}")


class Splits(NamedTuple):
    train: list
    dev: list
    test: list
    sizes: dict  # {"train": n, "dev": n, "test": n}, the sizes actually used


def fit_sizes(requested: dict[str, int], available: int) -> dict[str, int]:
    """Shrink ``requested`` sizes to fit ``available`` rows (keys in priority order).

    If the rows suffice, the sizes are unchanged. Otherwise each non-empty split first gets one
    row, the remaining rows are shared in proportion to the requested sizes (rounded down), and
    the few rows left over by rounding go one by one to the splits in key order (train, dev,
    test), never beyond what was requested. Fewer rows than non-empty splits is a ValueError.
    """
    total = sum(requested.values())
    if total <= available:
        return dict(requested)
    wanted = [k for k, v in requested.items() if v > 0]
    if available < len(wanted):
        raise ValueError(f"need at least {len(wanted)} rows for the non-empty splits ({', '.join(wanted)}), "
                         f"got {available}")
    rest, excess = available - len(wanted), total - len(wanted)
    sizes = {k: (1 + (v - 1) * rest // excess if v > 0 else 0) for k, v in requested.items()}
    left = available - sum(sizes.values())
    while left > 0:  # at most len(requested) rounds: each round places a row or all are full
        for k in requested:
            if left > 0 and sizes[k] < requested[k]:
                sizes[k] += 1
                left -= 1
    return sizes


def _take(order: list[list[T]], start: int, size: int) -> tuple[list[T], int]:
    """Whole groups from ``order[start:]`` until at least ``size`` rows; returns (rows, next start)."""
    rows: list[T] = []
    while len(rows) < size and start < len(order):
        rows.extend(order[start])
        start += 1
    return rows, start


def _shuffled_groups(rows: Sequence[T], seed: int, group: Callable[[T], Hashable] | None) -> list[list[T]]:
    if group is None:
        groups = [[row] for row in rows]
    else:
        by_key: dict[Hashable, list[T]] = {}
        for row in rows:
            by_key.setdefault(group(row), []).append(row)
        groups = list(by_key.values())
    random.Random(seed).shuffle(groups)
    return groups


def make_splits(rows: Sequence[T], spec: SplitSpec, eval_rows: Sequence[T] | None = None,
                group: Callable[[T], Hashable] | None = None) -> Splits:
    """Split ``rows`` into disjoint train / dev / test lists by the rule below.

    Without ``eval_rows``: the rows are shuffled with ``random.Random(spec.seed)`` (the global
    RNG is never touched), then test is carved first, then dev, then train from the remainder.
    With ``eval_rows`` (the rows of a labeled evaluation file): test is the first ``spec.test``
    of the eval rows shuffled with their own ``random.Random(spec.seed)`` (all of them if there
    are fewer), and dev then train are carved from ``rows`` as above.

    If ``rows`` hold fewer rows than the splits carved from them ask for, the sizes shrink by
    :func:`fit_sizes` (a ValueError if there are fewer rows than non-empty splits); read the
    sizes used from ``Splits.sizes``.

    ``group`` (row -> key) keeps rows with the same key in one split (MultiRC: a passage's answer
    options). Sizes still count rows: whole groups are taken until a split holds at least its
    size, so it can exceed it by less than one group, and a later split can come up short.
    The same rows, spec and seed always give the same splits.
    """
    carve = {"train": spec.train, "dev": spec.dev} if eval_rows is not None else \
        {"train": spec.train, "dev": spec.dev, "test": spec.test}
    target = fit_sizes(carve, len(rows))
    order = _shuffled_groups(rows, spec.seed, group)
    start = 0
    if eval_rows is None:
        test, start = _take(order, start, target["test"])
    else:
        test, _ = _take(_shuffled_groups(eval_rows, spec.seed, group), 0, spec.test)
    dev, start = _take(order, start, target["dev"])
    train, start = _take(order, start, target["train"])
    return Splits(train, dev, test, {"train": len(train), "dev": len(dev), "test": len(test)})
