"""Evaluation: answer a task's requests with the model and score them with the task's metric."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zotune.lm import generate, score_choices
from zotune.tasks import Example
from zotune.tasks.metrics import compute_metric


@torch.no_grad()
def evaluate(model, tokenizer, examples: Sequence[Example], metric: str, *, batch_size: int = 32,
             max_length: int = 256, max_new_tokens: int = 32) -> dict[str, float]:
    """Score ``examples``: log-likelihood ranking of choices, or greedy generation for tasks
    with gold answers (SQuAD, DROP). Returns the metric dict plus ``n`` (examples scored)."""
    if not examples:
        return {"n": 0}
    if examples[0].is_generation:
        preds = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                         batch_size=batch_size, max_length=max_length)
    else:
        preds = score_choices(model, tokenizer, [list(e.choices) for e in examples], batch_size=batch_size,
                              max_length=max_length)
    out = compute_metric(metric, preds, examples)
    out["n"] = len(examples)
    return out


def headline(metrics: dict[str, float]) -> tuple[str, float]:
    """The metric a run is selected and reported by (accuracy, else F1)."""
    for key in ("accuracy", "f1", "f1a", "em"):
        if key in metrics:
            return key, metrics[key]
    return "n", float(metrics.get("n", 0))
