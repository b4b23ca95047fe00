"""Paired significance tests: is a tuned model better than the base on the same test rows?

Why: with a few hundred test rows, a few points of accuracy are within noise. Both models
answer the same rows, so the test looks only at the rows where they differ (far more power
than comparing two accuracies as if independent). A run writes each test row's score for
the zero-shot and the tuned model to ``test_rows.json`` (:func:`zotune.train.loop.train`);
:func:`paired_test` compares the two lists::

    rows = json.load(open("runs/x/test_rows.json"))
    paired_test(rows["zero_shot"], rows["tuned"])
    # {'test': 'mcnemar-exact', 'n': 400, 'mean_a': 0.58, 'mean_b': 0.7125, 'only_a': 23, 'only_b': 59, 'p': 8.7e-05}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["mcnemar_exact", "sign_flip", "paired_test"]


def _check(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same rows: {len(a)} against {len(b)}")
    if not a:
        raise ValueError("no rows to compare")


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact two-sided McNemar test for right (1) / wrong (0) rows: under "neither model is
    better", each row only one model gets right is a fair coin, so the count is Binomial(n, 1/2)."""
    _check(a, b)
    if any(x not in (0, 1) for x in (*a, *b)):
        raise ValueError("mcnemar_exact needs scores of 0 or 1 (right / wrong); use sign_flip for graded scores")
    only_a = sum(x == 1 and y == 0 for x, y in zip(a, b))
    only_b = sum(x == 0 and y == 1 for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"test": "mcnemar-exact", "n": len(a), "mean_a": sum(a) / len(a), "mean_b": sum(b) / len(b),
            "only_a": only_a, "only_b": only_b, "p": p}


def sign_flip(a: Sequence[float], b: Sequence[float], *, resamples: int = 20000, seed: int = 0) -> dict:
    """Two-sided paired permutation test on the mean difference for graded scores (token F1):
    under "no difference", each row's ``b - a`` is as likely negated. ``resamples`` random sign
    patterns (seeded, so the p-value is reproducible); p counts the observed pattern as one of them."""
    _check(a, b)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    d = torch.tensor([y - x for x, y in zip(a, b)], dtype=torch.float64)
    observed = abs(float(d.mean()))
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, resamples, 1000):
        m = min(1000, resamples - start)
        signs = torch.randint(0, 2, (m, d.numel()), generator=g, dtype=torch.float64) * 2 - 1
        hits += int(((signs * d).mean(dim=1).abs() >= observed - 1e-12).sum())
    return {"test": "sign-flip", "n": len(a), "mean_a": sum(a) / len(a), "mean_b": sum(b) / len(b),
            "resamples": resamples, "p": (hits + 1) / (resamples + 1)}


def paired_test(a: Sequence[float], b: Sequence[float], **kwargs) -> dict:
    """McNemar's exact test when every score is 0 or 1, else the sign-flip test (``kwargs``)."""
    _check(a, b)
    if all(x in (0, 1) for x in (*a, *b)):
        return mcnemar_exact(a, b)
    return sign_flip(a, b, **kwargs)
