"""Find tasks by name and load them into train / dev / test lists of Examples.

>>> from zotune.tasks import load_task, SplitSpec
>>> data = load_task("sst2", split=SplitSpec(train=1000, dev=500, test=1000, seed=0))  # doctest: +SKIP
>>> data.train[0].choices[0]                                                          # doctest: +SKIP
('a gorgeous , witty , seductive movie . It was', ' terrible')
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

from zotune._validate import did_you_mean
from zotune.errors import ZotuneError
from .base import Example, TaskSpec, Template
from .definitions import TASKS
from .formats import DataFormatError, Record
from .splits import SplitSpec, make_splits

__all__ = ["UnknownTaskError", "TemplateError", "TaskData", "get_task", "list_tasks", "register_task",
           "load_task", "default_data_root"]


class UnknownTaskError(ZotuneError, KeyError):
    """No task has this name; the message suggests the closest names."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class TemplateError(ZotuneError, ValueError):
    """A template does not fit the data it was given (it reads a field the rows do not have)."""


def _key(name: str) -> str:
    """Registry key: lowercase letters and digits only, so 'SST-2', 'sst2', 'Sst_2' agree."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_REGISTRY: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, overwrite: bool = False) -> TaskSpec:
    """Make ``spec`` available to :func:`get_task` under its name and aliases."""
    keys = [_key(spec.name)] + [_key(a) for a in spec.aliases]
    taken = [k for k in keys if k in _REGISTRY and _REGISTRY[k].name != spec.name]
    if taken and not overwrite:
        raise ValueError(f"task name(s) {taken} already registered for {_REGISTRY[taken[0]].name}; "
                         "pass overwrite=True to replace")
    for k in keys:
        _REGISTRY[k] = spec
    return spec


for _spec in TASKS:
    register_task(_spec)


def list_tasks() -> list[str]:
    """Display names of the registered tasks, in registration order."""
    return list(dict.fromkeys(spec.name for spec in _REGISTRY.values()))


def get_task(name: str) -> TaskSpec:
    """The task called ``name`` (case and punctuation ignored: ``sst2`` = ``SST-2``) or an alias,
    or the task file at ``name`` when it ends in ``.yaml`` / ``.yml`` (see :mod:`zotune.tasks.file_task`)."""
    from .file_task import is_task_file, load_task_file

    if is_task_file(name):
        return load_task_file(name)
    spec = _REGISTRY.get(_key(name))
    if spec is None:
        canonical = [_key(n) for n in list_tasks()]  # suggest a task's own name before an alias
        hint = did_you_mean(_key(name), canonical) or did_you_mean(_key(name), _REGISTRY)
        raise UnknownTaskError(f"Unknown task {name!r}.{hint} Available: {', '.join(list_tasks())}")
    return spec


def default_data_root() -> Path | None:
    """``$ZOTUNE_DATA`` if set, else ``../shared/data`` relative to the current directory if it
    exists, else None."""
    if os.environ.get("ZOTUNE_DATA"):
        return Path(os.environ["ZOTUNE_DATA"])
    candidate = Path.cwd() / ".." / "shared" / "data"
    return candidate if candidate.is_dir() else None


class TaskData(NamedTuple):
    spec: TaskSpec
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    sizes: dict  # the sizes actually used: {"train": n, "dev": n, "test": n}
    template: str  # name of the template used ("<custom>" for a function)
    sources: tuple[str, ...]  # the train then eval file paths, or hub:<dataset>[<split>]


def _resolve(spec: TaskSpec, path: str | os.PathLike, data_root: Path | None, role: str) -> Path:
    """An absolute path, or one that exists relative to the current directory, is used as is;
    otherwise the path is taken relative to the data root."""
    found = Path(path)
    if not (found.is_absolute() or found.exists()):
        if data_root is None:
            raise FileNotFoundError(
                f"{spec.name}: no data root to find the {role} file {str(path)!r} in: pass data_root=..., "
                "set ZOTUNE_DATA, or run from a directory with ../shared/data")
        found = Path(data_root) / found
    if not (found.is_file() or (found.is_dir() and getattr(spec.loader, "folders", False))):
        raise FileNotFoundError(f"{spec.name}: {role} file not found: {found} "
                                "(pass data_root=..., set ZOTUNE_DATA, or give train_file=/eval_file=)")
    return found


def _pick_template(spec: TaskSpec, template: str | Template | None) -> tuple[str, Template]:
    if template is None:
        return spec.default_template, spec.templates[spec.default_template]
    if callable(template):
        own = [k for k, t in spec.templates.items() if t is template]
        return (own[0] if own else getattr(template, "__name__", "<custom>")), template
    if template in spec.templates:
        return template, spec.templates[template]
    hint = did_you_mean(template, spec.templates)
    raise ValueError(f"Unknown template {template!r} for task {spec.name}.{hint} "
                     f"Available: {', '.join(spec.templates)}")


_MISSING = object()


def _lookup(row: Mapping[str, Any], dotted: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _check(spec: TaskSpec, records: Sequence[Record]) -> None:
    """Every row has the task's fields and a known label, or a DataFormatError names the row."""
    for record in records:
        for name in spec.fields:
            if _lookup(record.fields, name) is _MISSING:
                raise DataFormatError(f"missing field {name!r} (the row has fields: "
                                      f"{', '.join(map(str, record.fields))})", record.source, record.where)
        if spec.labels is not None:
            value = _lookup(record.fields, spec.label_field)
            if value is _MISSING:
                raise DataFormatError(f"missing field {spec.label_field!r}", record.source, record.where)
            if not isinstance(value, (str, int)) or value not in spec.labels:
                known = ", ".join(dict.fromkeys(repr(k) for k in spec.labels))
                raise DataFormatError(f"bad value {value!r} for field {spec.label_field!r} (expected one of {known})",
                                      record.source, record.where)


def _render(spec: TaskSpec, name: str, template: Template, records: Sequence[Record]) -> list[Example]:
    examples = []
    for record in records:
        try:
            examples.append(template(record.fields))
        except DataFormatError as e:
            raise (e.at(record.source, record.where) if e.source is None else e) from None
        except (KeyError, TypeError, AttributeError) as e:
            if isinstance(e, KeyError) and e.args:
                detail = f"field {e.args[0]!r} not found"
            else:
                detail = f"{type(e).__name__}: {e}"
            raise TemplateError(
                f"task {spec.name}, template {name!r} does not fit {record.location}: {detail} "
                f"(the row has fields: {', '.join(map(str, record.fields))})") from e
    return examples


def _read_file(spec: TaskSpec, path: Path) -> tuple[list[Record], str]:
    records = spec.loader(path)
    _check(spec, records)
    return records, str(path)


def _read_hub(spec: TaskSpec, split: str) -> tuple[list[Record], str]:
    try:
        import datasets  # optional: only this code path needs it
    except ImportError as e:
        raise ImportError(f"{spec.name}: hub=True loads from the Hugging Face hub: install `datasets` and be "
                          "online, or load local files with data_root=/train_file=") from e
    hub = spec.hub
    rows = datasets.load_dataset(hub.path, hub.name, split=split)
    source = f"hub:{hub.path}" + (f"/{hub.name}" if hub.name else "") + f"[{split}]"
    records = []
    for i, row in enumerate(rows):
        for raw in (hub.convert(row) if hub.convert else [row]):
            records.append(Record(dict(raw), source, f"row {i}"))
    _check(spec, records)
    return records, source


def load_task(name: str | TaskSpec, data_root: str | os.PathLike | None = None, split: SplitSpec = SplitSpec(),
              template: str | Template | None = None, train_file: str | os.PathLike | None = None,
              eval_file: str | os.PathLike | None = None, hub: bool = False) -> TaskData:
    """Read a task's rows, split them (see :func:`zotune.tasks.splits.make_splits`) and render
    them as Examples.

    Files: ``train_file`` (default: the task's ``train_file``) and the eval file
    (``eval_file``, else ``split.eval_file``; none by default, so test is carved from train)
    are absolute, relative to the current directory, or relative to ``data_root``
    (default: :func:`default_data_root`). With ``hub=True`` rows come from the Hugging Face hub
    (``spec.hub``) instead: ``train_file`` and the eval file then name hub splits, e.g.
    ``eval_file=spec.hub.eval_split`` to test on the official validation split.

    Every row is checked (a DataFormatError names file, line and field); only the rows chosen
    for the splits are rendered. A warning says when the file was too small for the sizes asked.
    """
    spec = name if isinstance(name, TaskSpec) else get_task(name)
    template_name, render = _pick_template(spec, template)
    eval_source = eval_file if eval_file is not None else split.eval_file
    if hub and spec.hub is None:
        raise ValueError(f"task {spec.name} has no hub dataset (hub=True); load it from files instead")
    root = Path(data_root) if data_root is not None else default_data_root()

    def read(where: str | os.PathLike, role: str) -> tuple[list[Record], str]:
        if hub:
            return _read_hub(spec, str(where))
        return _read_file(spec, _resolve(spec, where, root, role))

    records, source = read(train_file or (spec.hub.train_split if hub else spec.train_file), "train")
    eval_records, sources = None, (source,)
    if eval_source is not None:
        eval_records, eval_name = read(eval_source, "eval")
        sources += (eval_name,)
    group = (lambda r: _lookup(r.fields, spec.group_field)) if spec.group_field else None
    splits = make_splits(records, split, eval_rows=eval_records, group=group)
    requested = {"train": split.train, "dev": split.dev, "test": split.test}
    if any(splits.sizes[k] < requested[k] for k in requested):
        warnings.warn(f"{spec.name}: too few rows for the requested splits {requested}; "
                      f"using {splits.sizes}", stacklevel=2)
    return TaskData(spec, _render(spec, template_name, render, splits.train),
                    _render(spec, template_name, render, splits.dev),
                    _render(spec, template_name, render, splits.test),
                    splits.sizes, template_name, sources)
