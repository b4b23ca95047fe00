"""Evaluation: answer a task's requests with the model and score them with the task's metric.

Rows longer than ``max_length`` lose context from the left; :func:`evaluate` counts them (the
``truncated_*`` keys of its metrics) and logs a warning, and :func:`check_truncation` does the
same once for a training set::

    check_truncation(tokenizer, data.train, cfg.task.max_length, name=data.spec.name)
    # WARNING BoolQ train: 13 of 200 rows cut from the left (up to 140 tokens, ...); raise task.max_length
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from zotune._validate import unknown_choice
from zotune.lm import NORMALIZE, Truncation, choice_truncation, generate, prompt_truncation, score_choices
from zotune.models import require_loaded
from zotune.tasks import Example
from zotune.tasks.metrics import compute_metric, row_scores

log = logging.getLogger("zotune.evaluate")


def check_truncation(tokenizer, examples: Sequence[Example], max_length: int, *, name: str = "examples",
                     kind: str = "causal", max_new_tokens: int = 32, logger: logging.Logger = log) -> Truncation:
    """How many of ``examples`` lose context tokens at ``max_length`` (with the tokenisation of
    scoring and training), and a warning on ``logger`` when any does.

    Generation examples (SQuAD, DROP) are counted as :func:`zotune.lm.generate` cuts their
    prompts (room for ``max_new_tokens``); the others over all their (context, continuation)
    candidates, the most any candidate loses. Call it once per data set, not per step.
    """
    if not examples:
        return Truncation()
    if examples[0].is_generation:
        found = prompt_truncation(tokenizer, [e.prompt for e in examples], max_length, max_new_tokens)
    else:
        found = choice_truncation(tokenizer, [e.choices for e in examples], max_length, kind=kind)
    if found.cut:
        logger.warning(found.message(name, max_length))
    return found


def evaluate(model, tokenizer, examples: Sequence[Example], metric: str, **kwargs) -> dict[str, float]:
    """The metric dict of :func:`evaluate_rows` (same arguments), without the per-row scores."""
    return evaluate_rows(model, tokenizer, examples, metric, **kwargs)[0]


@torch.no_grad()
def evaluate_rows(model, tokenizer, examples: Sequence[Example], metric: str, *, batch_size: int = 32,
                  max_length: int = 256, max_new_tokens: int = 32, scoring: str = "sum",
                  name: str = "evaluation") -> tuple[dict[str, float], list[float]]:
    """Score ``examples`` with ``model`` (a :class:`zotune.models.LoadedModel`): log-likelihood
    ranking of choices, or greedy generation for tasks with gold answers (SQuAD, DROP).

    ``scoring`` ranks candidates by their summed log-likelihood (``"sum"``, zotune's default)
    or per-token mean (``"mean"``, MeZO's); see :func:`zotune.lm.score_choices`. Returns the
    metric dict plus ``n`` (examples scored) and ``truncated_rows``, ``truncated_tokens_max``,
    ``truncated_tokens_mean`` (rows that lost context to ``max_length``, which a warning naming
    ``name`` also reports), and each row's score (:func:`zotune.tasks.metrics.row_scores`), which
    a paired test between two models needs.
    """
    model = require_loaded(model, "evaluate")
    if scoring not in NORMALIZE:
        raise ValueError(unknown_choice("scoring", str(scoring), NORMALIZE))
    if not examples:
        return {"n": 0}, []
    cut = check_truncation(tokenizer, examples, max_length, name=name, kind=model.kind,
                           max_new_tokens=max_new_tokens)
    if examples[0].is_generation:
        preds = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens=max_new_tokens,
                         batch_size=batch_size, max_length=max_length)
    else:
        preds = score_choices(model, tokenizer, [list(e.choices) for e in examples], batch_size=batch_size,
                              max_length=max_length, normalize=scoring)
    out = compute_metric(metric, preds, examples)
    out["n"] = len(examples)
    out.update(cut.metrics())
    return out, row_scores(metric, preds, examples)



def evaluate_configured(model, cfg, examples: Sequence[Example], metric: str,
                        name: str) -> tuple[dict[str, float], list[float]]:
    """:func:`evaluate_rows` with a run's settings (``cfg``: a :class:`zotune.config.Config`): its
    evaluation batch size, context length and candidate scoring, so every evaluation of a run,
    cached or not, scores rows alike."""
    return evaluate_rows(model, model.tokenizer, examples, metric, batch_size=cfg.train.eval_batch_size,
                         max_length=cfg.task.max_length, scoring=cfg.task.scoring, name=name)

def headline(metrics: dict[str, float]) -> tuple[str, float]:
    """The metric a run is selected and reported by (accuracy, else F1)."""
    for key in ("accuracy", "f1", "f1a", "em"):
        if key in metrics:
            return key, metrics[key]
    return "n", float(metrics.get("n", 0))
