"""Metrics for the tasks: accuracy, SQuAD-style exact match and token F1, MultiRC F1a and EM.

Predictions come from the model side: a choice index per example for classification and
multiple choice, a generated string for generation tasks. :func:`compute_metric` scores them
against the examples under a task's metric name.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Collection, Hashable, Sequence

from zotune._validate import did_you_mean
from .base import METRIC_NAMES, Example

__all__ = ["accuracy", "normalize_answer", "exact_match", "token_f1", "f1a", "multirc_em", "compute_metric",
           "row_scores"]


def _check_lengths(predictions: Sequence, golds: Sequence, what: str) -> None:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} {what}")
    if not predictions:
        raise ValueError("no predictions to score")


def accuracy(predictions: Sequence[int], labels: Sequence[int | Collection[int]]) -> float:
    """Fraction of predictions equal to their label; a label may be a collection of accepted
    indices (ReCoRD, where an entity can appear in several surface forms)."""
    _check_lengths(predictions, labels, "labels")
    return sum(_hit(p, gold) for p, gold in zip(predictions, labels)) / len(predictions)


def _hit(prediction, gold) -> bool:
    """A prediction is right if it is the label, or one of them (a collection of accepted indices)."""
    return prediction in gold if isinstance(gold, Collection) else prediction == gold


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation, drop articles a/an/the, squeeze spaces.

    So that "The Eiffel Tower." and "eiffel tower" count as the same answer.
    """
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer, else 0.0."""
    if not answers:
        raise ValueError("exact_match needs at least one gold answer")
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:  # an empty side only matches an empty side
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token-overlap F1 of the normalized prediction, the best over the gold answers (SQuAD).

    F1 = 2PR/(P+R), with P = shared tokens / prediction tokens, R = shared tokens / gold tokens,
    counting repeated tokens as often as both sides have them.
    """
    if not answers:
        raise ValueError("token_f1 needs at least one gold answer")
    return max(_f1(prediction, a) for a in answers)


def f1a(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """MultiRC F1a: binary F1 over all answer options, with "correct answer" as the positive class.

    Returns 0.0 when there are no true positives (including when nothing is positive at all).
    """
    _check_lengths(predictions, labels, "labels")
    tp = sum(p == positive and y == positive for p, y in zip(predictions, labels))
    fp = sum(p == positive and y != positive for p, y in zip(predictions, labels))
    fn = sum(p != positive and y == positive for p, y in zip(predictions, labels))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def multirc_em(predictions: Sequence[int], labels: Sequence[int], groups: Sequence[Hashable]) -> float:
    """MultiRC EM: fraction of questions (``groups``) whose answer options are all predicted right."""
    _check_lengths(predictions, labels, "labels")
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} question ids for {len(labels)} labels")
    right: dict[Hashable, bool] = {}
    for p, y, g in zip(predictions, labels, groups):
        right[g] = right.get(g, True) and p == y
    return sum(right.values()) / len(right)


def compute_metric(name: str, predictions: Sequence, examples: Sequence[Example]) -> dict[str, float]:
    """Score ``predictions`` for ``examples`` under a task's metric name.

    - ``"accuracy"``: ``{"accuracy"}``; predictions are choice indices; an example's accepted
      indices are ``meta["gold_choices"]`` if present, else its label.
    - ``"f1"`` (MultiRC): ``{"f1a", "em", "accuracy"}``; EM groups options by ``meta["question_id"]``.
    - ``"em_f1"`` (SQuAD, DROP): ``{"em", "f1"}``; predictions are generated strings, scored
      against ``Example.answers`` and averaged.
    """
    if name not in METRIC_NAMES:
        hint = did_you_mean(name, METRIC_NAMES)
        raise ValueError(f"Unknown metric {name!r}.{hint} Available: {', '.join(METRIC_NAMES)}")
    _check_lengths(predictions, examples, "examples")
    if name == "em_f1":
        return {"em": sum(exact_match(p, ex.answers) for p, ex in zip(predictions, examples)) / len(examples),
                "f1": sum(token_f1(p, ex.answers) for p, ex in zip(predictions, examples)) / len(examples)}
    labels = [ex.label for ex in examples]
    if name == "f1":
        groups = [ex.meta.get("question_id", i) for i, ex in enumerate(examples)]
        return {"f1a": f1a(predictions, labels), "em": multirc_em(predictions, labels, groups),
                "accuracy": accuracy(predictions, labels)}
    return {"accuracy": accuracy(predictions, [ex.meta.get("gold_choices", ex.label) for ex in examples])}


def row_scores(name: str, predictions: Sequence, examples: Sequence[Example]) -> list[float]:
    """One score per example, for paired tests between two models on the same rows.

    Why: a corpus metric says how far two models are apart, not whether the gap is more than the
    rows' noise; a paired test needs each row's score under both. ``"accuracy"`` and ``"f1"``
    (MultiRC, whose F1a does not split into rows) give 1.0 / 0.0 for a right / wrong choice;
    ``"em_f1"`` gives the row's token F1 (the mean of these is the corpus F1).
    """
    if name not in METRIC_NAMES:
        hint = did_you_mean(name, METRIC_NAMES)
        raise ValueError(f"Unknown metric {name!r}.{hint} Available: {', '.join(METRIC_NAMES)}")
    _check_lengths(predictions, examples, "examples")
    if name == "em_f1":
        return [token_f1(p, ex.answers) for p, ex in zip(predictions, examples)]
    return [float(_hit(p, ex.label if name == "f1" else ex.meta.get("gold_choices", ex.label)))
            for p, ex in zip(predictions, examples)]
