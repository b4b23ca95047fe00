"""Tasks as data: raw rows -> Examples (requests the model side answers), splits and metrics.

>>> from zotune.tasks import load_task, SplitSpec
>>> data = load_task("rte", split=SplitSpec(train=1000, dev=500, test=1000, seed=0))  # doctest: +SKIP
"""

from .base import Example, HubSource, TaskSpec, Template
from .formats import DataFormatError, Record
from .metrics import accuracy, compute_metric, exact_match, f1a, multirc_em, normalize_answer, row_scores, token_f1
from .registry import (TaskData, TemplateError, UnknownTaskError, default_data_root, get_task, list_tasks,
                       load_task, register_task)
from .splits import SplitSpec, Splits, make_splits
from .file_task import FileTaskSpec, TaskFileError, load_task_file

__all__ = [
    "Example", "TaskSpec", "Template", "HubSource", "Record", "TaskData",
    "SplitSpec", "Splits", "make_splits",
    "get_task", "list_tasks", "load_task", "register_task", "default_data_root",
    "DataFormatError", "TemplateError", "UnknownTaskError",
    "FileTaskSpec", "TaskFileError", "load_task_file",
    "accuracy", "normalize_answer", "exact_match", "token_f1", "f1a", "multirc_em", "compute_metric", "row_scores",
]
