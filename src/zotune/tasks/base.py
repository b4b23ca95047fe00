"""The data types of a task: what a template produces (:class:`Example`) and what a task is
(:class:`TaskSpec`).

Tasks never touch the model. A template turns one raw row into an :class:`Example`, a request
that the model side answers either by scoring each candidate continuation by its
log-likelihood (classification, multiple choice) or by greedy generation after ``prompt``
(SQuAD, DROP). Training uses one code path for both: the loss is the negative log-likelihood of
``Example.target``'s continuation given its context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .formats import Record

__all__ = ["Example", "Template", "HubSource", "TaskSpec", "METRIC_NAMES"]

#: Metric names a task may declare; :func:`zotune.tasks.metrics.compute_metric` implements them.
METRIC_NAMES = ("accuracy", "f1", "em_f1")


@dataclass(frozen=True)
class Example:
    """One request for the model side.

    ``choices`` holds a (context, continuation) pair per candidate; a candidate is scored by the
    log-likelihood of its continuation given its context. Each choice carries its own context
    because for COPA and WinoGrande the candidates differ in the context, not only the ending.
    ``label`` is the index of the gold choice (``None`` when unknown). Generation tasks also set
    ``prompt`` (the text to continue greedily) and ``answers`` (gold answers, any of which counts);
    their single choice is (prompt, " " + first answer), so training needs no special case.
    """

    choices: tuple[tuple[str, str], ...]
    label: int | None
    prompt: str = ""
    answers: tuple[str, ...] = ()
    meta: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if not self.choices:
            raise ValueError("Example.choices is empty: a template must give at least one (context, continuation)")
        if self.label is not None and not 0 <= self.label < len(self.choices):
            raise ValueError(f"Example.label={self.label} is out of range for {len(self.choices)} choices")
        if self.prompt and not self.answers:
            raise ValueError("Example has a prompt but no answers: generation examples need gold answers")

    @property
    def is_generation(self) -> bool:
        """True for generation tasks (SQuAD, DROP), whose prediction is generated text."""
        return bool(self.prompt)

    @property
    def target(self) -> tuple[str, str]:
        """The gold (context, continuation): its negative log-likelihood is the training loss."""
        if self.label is None:
            raise ValueError("Example has no label, so it has no training target")
        return self.choices[self.label]


#: A template renders one raw row (a plain dict from a reader) as an Example.
Template = Callable[[Mapping[str, Any]], Example]


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the Hugging Face hub, and how a hub row becomes raw rows.

    ``convert`` maps one hub row to zero or more rows shaped like the file rows, so the same
    templates serve both; ``None`` means hub rows already have that shape.
    """

    path: str
    name: str | None = None
    train_split: str = "train"
    eval_split: str | None = "validation"
    convert: Callable[[Mapping[str, Any]], Iterable[Mapping[str, Any]]] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A task as data: where its rows come from, how they render, and how they are scored.

    Attributes:
        name: display name, e.g. ``"SST-2"``; the registry also accepts ``sst2``, ``sst-2``, aliases.
        description: one line.
        loader: reads a file into :class:`Record` rows (see :mod:`zotune.tasks.formats`).
        templates: template name -> function (row -> Example). Always has ``"none"``: no task
            alignment (see :mod:`zotune.tasks.definitions`).
        default_template: the papers' prompt (MeZO, after LM-BFF), i.e. with task alignment.
        metric: ``"accuracy"``, ``"f1"`` (MultiRC: F1a over answer options, plus EM and accuracy)
            or ``"em_f1"`` (SQuAD, DROP).
        train_file: default training file, relative to the data root.
        eval_file: a labeled evaluation file known for this task (relative to the data root). It
            is never used implicitly; pass it as ``load_task(..., eval_file=spec.eval_file)``.
        fields: fields every row must have (dotted for nesting, e.g. ``"target.span1_text"``).
        labels: raw label value -> gold choice index; any other value is a data error.
        label_field: the field holding the raw label.
        group_field: rows sharing this value stay in one split (MultiRC: one passage).
        aliases: more names for the registry.
        hub: the Hugging Face dataset, for ``load_task(..., hub=True)``.
        max_length: tokens per example when the config does not set ``task.max_length``: long
            enough that nearly every row of the task's data is scored whole (each task's
            definition says which percentile it covers); longer rows lose context from the left.
    """

    name: str
    description: str
    loader: Callable[[Path], list[Record]]
    templates: Mapping[str, Template]
    default_template: str
    metric: str
    train_file: str
    eval_file: str | None = None
    fields: tuple[str, ...] = ()
    labels: Mapping[Any, int] | None = None
    label_field: str = "label"
    group_field: str | None = None
    aliases: tuple[str, ...] = ()
    hub: HubSource | None = None
    max_length: int = 256

    def __post_init__(self):
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length < 2:
            raise ValueError(f"TaskSpec {self.name}: max_length must be an integer >= 2, got {self.max_length!r}")
        if self.default_template not in self.templates:
            raise ValueError(f"TaskSpec {self.name}: default_template={self.default_template!r} "
                             f"is not one of its templates {sorted(self.templates)}")
        if "none" not in self.templates:
            raise ValueError(f"TaskSpec {self.name}: every task needs a 'none' template (no task alignment)")
        if self.metric not in METRIC_NAMES:
            raise ValueError(f"TaskSpec {self.name}: metric={self.metric!r} is not one of {METRIC_NAMES}")
