"""Tasks as files: a YAML task file (no Python) loaded and checked into the :class:`TaskSpec`
the built-in tasks use, so ``load_task``, training and evaluation treat both alike.

In the spirit of lm-evaluation-harness task files: the data, the fields, a Jinja2 template per
prompt, the candidates (a fixed verbalizer, per-candidate templates, or a field that holds them)
or a generation target, and the metric. ``docs/tasks.md`` documents every key::

    name: reviews
    data: {train: reviews.csv}                # csv, tsv, jsonl, json, parquet, or a load_from_disk folder
    template:
      context: "Review: {{ text }}\\nSentiment:"
      choices: {0: " negative", 1: " positive"}   # raw label value -> continuation

``task.name: path/to/task.yaml`` selects one (:func:`zotune.tasks.get_task` reads it). Templates
are Jinja2 in a sandbox with strict undefined values: a row's fields are variables (``row``
holds them all, for names that are not identifiers). Every problem with the file is a
:class:`TaskFileError` naming the file, the line and the key.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from zotune._validate import did_you_mean
from zotune.errors import ZotuneError
from .base import METRIC_NAMES, Example, HubSource, TaskSpec, Template
from .formats import (DataFormatError, Record, read_drop, read_json_records, read_jsonl, read_kshot_tsv,
                      read_multirc, read_record, read_squad, read_tsv)

__all__ = ["TaskFileError", "FileTaskSpec", "is_task_file", "load_task_file", "read_csv", "read_parquet",
           "read_disk", "FORMATS", "check_task_data", "template_fields"]


class TaskFileError(ZotuneError, ValueError):
    """A task file that cannot be used; the message names the file, the line and the key,
    e.g. ``reviews-task.yaml line 7 (templates.default.choices): ...``."""

    def __init__(self, problem: str, source: str, line: int | None = None, key: str | None = None):
        self.problem, self.source, self.line, self.key = problem, source, line, key
        place = source + (f" line {line}" if line else "") + (f" ({key})" if key else "")
        super().__init__(f"{place}: {problem}")


def is_task_file(name: Any) -> bool:
    """``task.name`` names a task file (``*.yaml`` / ``*.yml``) rather than a registered task."""
    return isinstance(name, (str, Path)) and str(name).lower().endswith((".yaml", ".yml"))


# ----------------------------------------------------------------------------- data readers

def read_csv(path: str | Path) -> list[Record]:
    """Comma-separated values with a header line (quoting as Excel writes it); values stay
    strings. A record's location is the line it starts on."""
    path = Path(path)
    source, records = str(path), []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header, start = None, 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row or not any(v.strip() for v in row):
                continue
            if header is None:
                header = row
                doubled = sorted({h for h in header if header.count(h) > 1})
                if doubled:
                    raise DataFormatError(f"the header names column(s) {', '.join(map(repr, doubled))} twice",
                                          source, f"line {line}")
                continue
            if len(row) != len(header):
                raise DataFormatError(f"expected {len(header)} comma-separated fields ({', '.join(header)}), "
                                      f"got {len(row)}", source, f"line {line}")
            records.append(Record(dict(zip(header, row)), source, f"line {line}"))
    if header is None:
        raise DataFormatError("empty file: expected a header line", source, "line 1")
    return records


def read_parquet(path: str | Path) -> list[Record]:
    """A parquet file (needs ``pyarrow``); one record per row, located as ``row i``."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFormatError("reading parquet needs pyarrow: pip install pyarrow", str(path)) from None
    rows = pq.read_table(str(path)).to_pylist()
    return [Record(row, str(path), f"row {i}") for i, row in enumerate(rows)]


def read_disk(path: str | Path) -> list[Record]:
    """A folder written by ``datasets.Dataset.save_to_disk`` (needs ``datasets``); for a
    ``DatasetDict`` name one split's folder (``folder/train``)."""
    try:
        import datasets
    except ImportError:
        raise DataFormatError("reading a save_to_disk folder needs datasets: pip install datasets",
                              str(path)) from None
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        raise DataFormatError(f"is a DatasetDict with splits {', '.join(data)}: name one split's folder, "
                              f"e.g. {Path(path) / next(iter(data))}", str(path))
    return [Record(dict(row), str(path), f"row {i}") for i, row in enumerate(data)]


#: ``data.format`` -> reader. The generic ones are picked by file suffix when ``format`` is not
#: set (a folder is ``disk``); the others are the nested official formats of the built-in tasks.
FORMATS: dict[str, Callable[[Path], list[Record]]] = {
    "csv": read_csv, "tsv": read_tsv, "jsonl": read_jsonl, "json": read_json_records,
    "parquet": read_parquet, "disk": read_disk,
    "kshot_tsv": read_kshot_tsv, "multirc": read_multirc, "record": read_record, "squad": read_squad,
    "drop": read_drop,
}
_BY_SUFFIX = ("csv", "tsv", "jsonl", "json", "parquet")


def _loader(fmt: str | None) -> Callable[[Path], list[Record]]:
    def load(path: Path) -> list[Record]:
        path = Path(path)
        name = fmt or ("disk" if path.is_dir() else path.suffix.lstrip(".").lower())
        if name not in FORMATS:
            raise DataFormatError(f"unsupported file type {path.suffix!r}: expected one of "
                                  f"{', '.join('.' + s for s in _BY_SUFFIX)}, a folder, or set data.format", str(path))
        return FORMATS[name](path)

    load.folders = fmt in (None, "disk")  # registry: a folder is a valid data path
    return load


# ----------------------------------------------------------------------------- the YAML document

def _positions(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Key path -> 1-based line, for every mapping key (the key's line) and list item."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            # the key as the loader builds it: plain 0 / true are an int / a bool, quoted ones text
            k = yaml.safe_load(key.value) if isinstance(key, yaml.ScalarNode) and key.style is None else key.value
            out[path + (k,)] = key.start_mark.line + 1
            _positions(value, path + (k,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _positions(item, path + (i,), out)
    return out


class _Doc:
    """The parsed file and where each key is, for errors that name file, line and key."""

    def __init__(self, path: Path):
        self.path, self.source = path, str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TaskFileError("task file not found", self.source) from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            raise TaskFileError(f"not valid YAML: {e.problem or e.context}", self.source,
                                mark.line + 1 if mark else None) from None
        self.lines = _positions(node) if node is not None else {}
        if not isinstance(self.data, dict):
            raise TaskFileError(f"expected a mapping of keys (name, data, template ...), got "
                                f"{type(self.data).__name__}", self.source, 1)

    def error(self, path: tuple, problem: str) -> TaskFileError:
        line = None
        for n in range(len(path), -1, -1):  # the nearest enclosing key that has a line
            if path[:n] in self.lines:
                line = self.lines[path[:n]]
                break
        return TaskFileError(problem, self.source, line, ".".join(map(str, path)) or None)

    def mapping(self, value: Any, path: tuple, allowed: Sequence[str]) -> dict:
        if not isinstance(value, dict):
            raise self.error(path, f"expected a mapping with keys among {', '.join(allowed)}, got {value!r}")
        for key in value:
            if key not in allowed:
                raise self.error(path + (key,), f"unknown key {key!r}.{did_you_mean(str(key), allowed)} "
                                                f"Allowed: {', '.join(allowed)}")
        return value

    def typed(self, value: Any, path: tuple, kind: type | tuple, what: str) -> Any:
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                                                  else (kind,))):
            raise self.error(path, f"expected {what}, got {value!r}")
        return value


TOP_KEYS = ("name", "description", "data", "fields", "label_field", "labels", "group_field", "meta_fields",
            "metric", "max_length", "split", "default_template", "template", "templates")
DATA_KEYS = ("train", "eval", "format", "hub")
HUB_KEYS = ("path", "name", "train_split", "eval_split")
SPLIT_KEYS = ("train", "dev", "test", "seed")
TEMPLATE_KEYS = ("context", "choices", "choices_field", "choice", "gold_field", "prompt", "answers_field",
                 "target", "scoring")
METRIC_ALIASES = {"exact_match": "em_f1", "em": "em_f1"}
#: names a template may use besides the row's fields
PROVIDED = {"row": "every template", "choice": "choice templates with choices_field",
            "index": "choice templates with choices_field", "answer": "the target template"}


# ----------------------------------------------------------------------------- templates

def _environment():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    # keep_trailing_newline: a prompt that ends in "\n" (MeZO's "Yes or No?\n") keeps it
    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True, autoescape=False)


_ENV = None


def _env():
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    return _ENV


def template_fields(source: str) -> list[str]:
    """The row fields a Jinja2 template reads, in order of first use (top-level names only)."""
    from jinja2 import meta, nodes

    env = _env()
    tree = env.parse(source)
    free = meta.find_undeclared_variables(tree)
    names = [n.name for n in tree.find_all(nodes.Name) if n.name in free]
    return [n for n in dict.fromkeys(names) if n not in env.globals and n not in PROVIDED]


@dataclass(frozen=True)
class _Text:
    """One compiled Jinja2 template and where it was written."""

    source: str
    compiled: Any
    path: tuple
    fields: tuple[str, ...]

    def render(self, row: Mapping[str, Any], **extra) -> str:
        from jinja2 import UndefinedError

        try:
            return self.compiled.render({**row, "row": row, **extra})
        except UndefinedError as e:
            raise DataFormatError(f"template {'.'.join(map(str, self.path))}: {e.message}") from None


def _text(doc: _Doc, value: Any, path: tuple) -> _Text:
    from jinja2 import TemplateSyntaxError

    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise doc.error(path, f"expected a template string, got {value!r}")
    source = str(value)
    try:
        compiled = _env().from_string(source)
    except TemplateSyntaxError as e:
        raise doc.error(path, f"template syntax error: {e.message} (template line {e.lineno})") from None
    return _Text(source, compiled, path, tuple(template_fields(source)))


@dataclass(frozen=True)
class _Compiled:
    """One template of a task file: what it renders and the fields it reads."""

    name: str
    kind: str  # "classify" | "field_choices" | "generate"
    context: _Text | None = None
    choices: tuple[tuple[_Text | None, _Text], ...] = ()  # (own context or None, continuation)
    verbalizer: tuple | None = None  # raw label keys of a verbalizer mapping, in choice order
    choices_field: str | None = None
    gold_field: str | None = None
    prompt: _Text | None = None
    answers_field: str = "answers"
    target: _Text | None = None
    scoring: str = "sum"
    document: dict = field(default_factory=dict)

    def texts(self) -> list[_Text]:
        out = [t for t in (self.context, self.prompt, self.target) if t is not None]
        for own, continuation in self.choices:
            out += ([own] if own is not None else []) + [continuation]
        return out

    def fields(self) -> list[str]:
        """Fields read by the templates and named by the keys, in order of first use."""
        names = [f for t in self.texts() for f in t.fields]
        names += [f for f in (self.choices_field, self.gold_field) if f]
        if self.kind == "generate":
            names.append(self.answers_field)
        return list(dict.fromkeys(names))


def _compile_template(doc: _Doc, name: str, value: Any, path: tuple) -> _Compiled:
    spec = doc.mapping(value, path, TEMPLATE_KEYS)
    at = lambda key: path + (key,)  # noqa: E731
    scoring = spec.get("scoring", "sum")
    if scoring not in ("sum", "mean"):
        raise doc.error(at("scoring"), f"expected sum or mean, got {scoring!r}")
    common = dict(name=name, scoring=scoring, document=dict(spec))
    if "prompt" in spec:
        extra = [k for k in ("context", "choices", "choices_field", "choice", "gold_field") if k in spec]
        if extra:
            raise doc.error(at(extra[0]), f"a generation template (with prompt) takes no {extra[0]!r}: it "
                                          "generates after the prompt and is scored against answers_field")
        answers = doc.typed(spec.get("answers_field", "answers"), at("answers_field"), str, "a field name")
        return _Compiled(kind="generate", prompt=_text(doc, spec["prompt"], at("prompt")), answers_field=answers,
                         target=_text(doc, spec.get("target", " {{ answer }}"), at("target")), **common)
    for key in ("answers_field", "target"):
        if key in spec:
            raise doc.error(at(key), f"{key!r} belongs to a generation template (one with a prompt)")
    context = _text(doc, spec["context"], at("context")) if "context" in spec else None
    if "choices_field" in spec:
        if "choices" in spec:
            raise doc.error(at("choices"), "give choices (fixed candidates) or choices_field (a field that holds "
                                           "them), not both")
        if context is None:
            raise doc.error(path, "a template with choices_field needs a context")
        return _Compiled(kind="field_choices", context=context,
                         choices=((None, _text(doc, spec.get("choice", "{{ choice }}"), at("choice"))),),
                         choices_field=doc.typed(spec["choices_field"], at("choices_field"), str, "a field name"),
                         gold_field=doc.typed(spec["gold_field"], at("gold_field"), str, "a field name")
                         if "gold_field" in spec else None, **common)
    for key in ("choice", "gold_field"):
        if key in spec:
            raise doc.error(at(key), f"{key!r} needs choices_field (a field that holds the candidates)")
    if "choices" not in spec:
        raise doc.error(path, "a template needs choices (candidates scored after the context), choices_field, "
                              "or a prompt (generation)")
    raw, verbalizer = spec["choices"], None
    if isinstance(raw, dict):
        verbalizer, items = tuple(raw), list(raw.values())
        paths = [at("choices") + (k,) for k in raw]
    elif isinstance(raw, list):
        items, paths = raw, [at("choices") + (i,) for i in range(len(raw))]
    else:
        raise doc.error(at("choices"), f"expected a list of continuations or a mapping label -> continuation, "
                                       f"got {raw!r}")
    if len(items) < 2:
        raise doc.error(at("choices"), f"expected at least 2 candidates, got {len(items)}")
    choices = []
    for item, where in zip(items, paths):
        if isinstance(item, dict):
            doc.mapping(item, where, ("context", "continuation"))
            if "continuation" not in item:
                raise doc.error(where, "a candidate given as a mapping needs a continuation (and may have a context)")
            own = _text(doc, item["context"], where + ("context",)) if "context" in item else None
            choices.append((own, _text(doc, item["continuation"], where + ("continuation",))))
        else:
            choices.append((None, _text(doc, item, where)))
    if context is None and any(own is None for own, _ in choices):
        raise doc.error(path, "a template needs a context (or a context in every candidate)")
    return _Compiled(kind="classify", context=context, choices=tuple(choices), verbalizer=verbalizer, **common)


# ----------------------------------------------------------------------------- labels

def _label_table(labels: Mapping[Any, int]) -> dict[Any, int]:
    """The raw labels as written plus their text forms, so a csv's "1" finds the key 1."""
    table: dict[Any, int] = {}
    for key, index in labels.items():
        forms = [key, str(key)] + ([str(int(key)), str(key).lower()] if isinstance(key, bool) else [])
        for form in forms:
            table.setdefault(form, index)
    return table


def _index(value: Any, labels: Mapping[Any, int] | None, n: int, label_field: str) -> int:
    if labels is not None:
        if isinstance(value, (str, int)) and value in labels:
            return labels[value]
        if isinstance(value, (str, int)) and str(value) in labels:
            return labels[str(value)]
        known = ", ".join(dict.fromkeys(repr(k) for k in labels))
        raise DataFormatError(f"bad value {value!r} for field {label_field!r} (expected one of {known})")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise DataFormatError(f"bad value {value!r} for field {label_field!r} (expected a candidate index "
                              f"0..{n - 1}, or give labels: in the task file)")
    return value


# ----------------------------------------------------------------------------- rendering

def _make_template(t: _Compiled, labels: Mapping[Any, int] | None, label_field: str,
                   meta_fields: Sequence[str]) -> Template:
    """The Template (row -> Example) of one compiled template."""

    def meta(row):
        return {name: _get(row, name) for name in meta_fields}

    if t.kind == "generate":
        def render(row):
            value = row[t.answers_field]
            answers = [value] if isinstance(value, str) else value
            if not isinstance(answers, (list, tuple)) or not answers:
                raise DataFormatError(f"field {t.answers_field!r} is empty or not a list: a generation example "
                                      "needs a gold answer")
            answers = tuple(str(a) for a in answers)
            prompt = t.prompt.render(row)
            target = t.target.render(row, answer=answers[0])
            return Example(choices=((prompt, target),), label=0, prompt=prompt, answers=answers, meta=meta(row))
    elif t.kind == "field_choices":
        def render(row):
            candidates = row[t.choices_field]
            if not isinstance(candidates, (list, tuple)) or not candidates:
                raise DataFormatError(f"field {t.choices_field!r} should be a non-empty list of candidates, "
                                      f"got {candidates!r}")
            context = t.context.render(row)
            choices = tuple((context, t.choices[0][1].render(row, choice=c, index=i))
                            for i, c in enumerate(candidates))
            info = meta(row)
            if t.gold_field is not None:
                gold_value = row[t.gold_field]
                golds = gold_value if isinstance(gold_value, (list, tuple)) else [gold_value]
                gold = tuple(i for i, c in enumerate(candidates) if c in golds)
                if not gold:
                    raise DataFormatError(f"no gold answer (field {t.gold_field!r}) is among the candidates "
                                          f"(field {t.choices_field!r})")
                return Example(choices=choices, label=gold[0], meta={"gold_choices": gold, **info})
            return Example(choices=choices, label=_index(row[label_field], None, len(choices), label_field),
                           meta=info)
    else:
        def render(row):
            shared = t.context.render(row) if t.context is not None else None
            choices = tuple((own.render(row) if own is not None else shared, continuation.render(row))
                            for own, continuation in t.choices)
            return Example(choices=choices, label=_index(row[label_field], labels, len(choices), label_field),
                           meta=meta(row))

    render.__name__ = render.__qualname__ = t.name
    render.__doc__ = f"Task-file template {t.name!r} ({t.kind})."
    render.scoring = t.scoring
    render.document = t.document
    return render


def _get(row: Mapping[str, Any], dotted: str) -> Any:
    value: Any = row
    for key in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _none_template(t: _Compiled, label_field: str, n: int, labels, meta_fields) -> Template:
    """No task alignment, derived from the default template: the input fields it reads joined by
    newlines (templated candidates listed as 'i: <candidate>'); candidates ' 0', ' 1', ..."""
    skip = {label_field, t.gold_field, t.answers_field if t.kind == "generate" else None, t.choices_field}
    inputs = [f for text in (t.context, t.prompt) if text is not None for f in text.fields if f not in skip]
    for own, _ in t.choices:
        inputs += [f for f in (own.fields if own is not None else ()) if f not in skip]
    inputs = list(dict.fromkeys(inputs))
    listed = t.kind == "field_choices" or any(c.fields for _, c in t.choices)

    def none(row):
        lines = [str(_get(row, f)) for f in inputs]
        if t.kind == "generate":
            example = base(row)
            return Example(choices=(("\n".join(lines), " " + example.answers[0]),), label=0,
                           prompt="\n".join(lines), answers=example.answers, meta=example.meta)
        example = base(row)
        if listed:
            lines += [f"{i}: {continuation.strip()}" for i, (_, continuation) in enumerate(example.choices)]
        context = "\n".join(lines)
        return Example(choices=tuple((context, f" {i}") for i in range(len(example.choices))),
                       label=example.label, meta=example.meta)

    base = _make_template(t, labels, label_field, meta_fields)
    none.__name__ = none.__qualname__ = "none"
    none.__doc__ = (f"No task alignment (derived from {t.name!r}): fields {', '.join(inputs)} joined by newlines"
                    + ("; candidates listed as 'i: <candidate>'" if listed else "") + "; candidates ' 0', ' 1', ...")
    none.scoring = "sum"
    none.document = None  # implicit: not written back to a file
    return none


# ----------------------------------------------------------------------------- the spec

@dataclass(frozen=True)
class FileTaskSpec(TaskSpec):
    """A :class:`TaskSpec` read from a task file. Unlike a built-in's, its ``eval_file`` and its
    split sizes are defaults of the run (``task.eval_file``, ``task.train`` ... override them)."""

    path: str = ""
    split: dict = field(default_factory=dict)
    uses_eval: bool = False
    template_fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    document: Mapping = field(default_factory=dict)
    lines: Mapping = field(default_factory=dict)

    def config_defaults(self) -> dict:
        """``TaskConfig`` fields this file sets when the recipe does not."""
        out = {f"{k}" if k != "seed" else "split_seed": v for k, v in self.split.items()}
        if self.uses_eval and self.eval_file:
            out["eval_file"] = self.eval_file
        return out


def _data_path(task_dir: Path, value: str) -> str:
    """Relative to the task file's folder when it exists there; else as written (then the
    current directory, then the data root, as for built-in tasks)."""
    candidate = Path(value) if Path(value).is_absolute() else task_dir / value
    return str(candidate) if candidate.exists() else value


def load_task_file(path: str | Path) -> FileTaskSpec:
    """Read and check a task file; every problem is a :class:`TaskFileError` (file, line, key)."""
    path = Path(path)
    doc = _Doc(path)
    d = doc.mapping(doc.data, (), TOP_KEYS)
    task_dir = path.resolve().parent

    def get(key, kind, what, default=None):
        return doc.typed(d[key], (key,), kind, what) if key in d and d[key] is not None else default

    name = str(get("name", (str, int), "a name", path.stem))
    if "data" not in d:
        raise doc.error((), "missing key 'data': where the rows are (data: {train: FILE})")
    data = doc.mapping(d["data"], ("data",), DATA_KEYS)
    fmt = data.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise doc.error(("data", "format"), f"unknown format {fmt!r}.{did_you_mean(str(fmt), FORMATS)} "
                                            f"Available: {', '.join(FORMATS)}")
    hub = None
    if data.get("hub") is not None:
        h = data["hub"] if isinstance(data["hub"], dict) else {"path": data["hub"]}
        doc.mapping(h, ("data", "hub"), HUB_KEYS)
        if not isinstance(h.get("path"), str):
            raise doc.error(("data", "hub"), "expected a dataset name, or a mapping with path (and name, "
                                             "train_split, eval_split)")
        hub = HubSource(h["path"], h.get("name"), h.get("train_split", "train"), h.get("eval_split", "validation"))
    for key in ("train", "eval"):
        if data.get(key) is not None:
            doc.typed(data[key], ("data", key), str, "a file path")
    if data.get("train") is None and hub is None:
        raise doc.error(("data",), "missing key 'train': the training file (csv, tsv, jsonl, json, parquet, or a "
                                   "save_to_disk folder), or a hub dataset (data.hub)")
    train = _data_path(task_dir, data["train"]) if data.get("train") else ""
    eval_file = _data_path(task_dir, data["eval"]) if data.get("eval") else None

    raw_templates = {}
    if "template" in d and "templates" in d:
        raise doc.error(("template",), "give template (one) or templates (several, by name), not both")
    if "template" in d:
        raw_templates = {"default": (d["template"], ("template",))}
    elif "templates" in d:
        ts = doc.typed(d["templates"], ("templates",), dict, "a mapping of template name -> template")
        raw_templates = {str(k): (v, ("templates", k)) for k, v in ts.items()}
    if not raw_templates:
        raise doc.error((), "missing key 'template': the prompt (see docs/tasks.md)")
    compiled = {k: _compile_template(doc, k, v, where) for k, (v, where) in raw_templates.items()}

    default = str(get("default_template", str, "a template name", next(iter(compiled))))
    if default not in compiled:
        raise doc.error(("default_template",), f"unknown template {default!r}.{did_you_mean(default, compiled)} "
                                               f"Available: {', '.join(compiled)}")
    first = compiled[default]
    label_field = get("label_field", str, "a field name", "label")
    labels = None
    if "labels" in d and d["labels"] is not None:
        raw = doc.typed(d["labels"], ("labels",), dict, "a mapping raw label -> candidate index")
        for key, index in raw.items():
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise doc.error(("labels", key), f"expected a candidate index >= 0, got {index!r}")
        labels = dict(raw)
    else:
        mapped = [t for t in compiled.values() if t.verbalizer is not None]
        if mapped:
            source = first if first.verbalizer is not None else mapped[0]
            labels = {k: i for i, k in enumerate(source.verbalizer)}
    table = _label_table(labels) if labels is not None else None
    if labels is not None:
        for key, index in labels.items():  # "1" and 1 are one label: they must agree
            if table[str(key)] != index:
                raise doc.error(("labels", key), f"label {key!r} -> {index} conflicts with another key written "
                                                 f"the same way ({table[str(key)]})")
    for t in compiled.values():
        if t.verbalizer is not None:
            for i, key in enumerate(t.verbalizer):
                if table.get(key, table.get(str(key))) != i:
                    raise doc.error(_tpath(raw_templates, t.name) + ("choices", key),
                                    f"verbalizer key {key!r} is candidate {i} here but label {key!r} means candidate "
                                    f"{table.get(key, table.get(str(key)))} (labels: {labels})")
        if t.kind == "classify" and labels is not None and max(labels.values()) >= len(t.choices):
            raise doc.error(_tpath(raw_templates, t.name) + ("choices",),
                            f"{len(t.choices)} candidates, but labels reach index {max(labels.values())}")
    kinds = {t.kind == "generate" for t in compiled.values()}
    if len(kinds) > 1:
        raise doc.error(("templates",), "mixes generation templates (prompt) with scored candidates: one task "
                                        "is one or the other")
    generation = first.kind == "generate"

    metric = get("metric", str, "a metric name", "em_f1" if generation else "accuracy")
    metric = METRIC_ALIASES.get(metric, metric)
    if metric not in METRIC_NAMES:
        raise doc.error(("metric",), f"unknown metric {metric!r}.{did_you_mean(metric, METRIC_NAMES)} Available: "
                                     f"accuracy, f1 (binary, candidate 1 positive), em_f1 (alias exact_match)")
    if generation != (metric == "em_f1"):
        raise doc.error(("metric",), f"metric {metric} does not fit a {'generation' if generation else 'scored'} "
                                     f"task: use {'em_f1' if generation else 'accuracy or f1'}")
    max_length = get("max_length", int, "an integer >= 2", 256)
    if max_length < 2:
        raise doc.error(("max_length",), f"expected an integer >= 2, got {max_length}")
    split = doc.mapping(d["split"], ("split",), SPLIT_KEYS) if d.get("split") is not None else {}
    for key, value in split.items():
        if not isinstance(value, int) or isinstance(value, bool) or (key != "seed" and value < 0):
            raise doc.error(("split", key), f"expected an integer{' >= 0' if key != 'seed' else ''}, got {value!r}")
    meta_fields = tuple(str(f) for f in doc.typed(d.get("meta_fields") or [], ("meta_fields",), list,
                                                   "a list of field names"))
    fields = d.get("fields")
    if fields is None:
        fields = first.fields() + ([label_field] if first.kind == "classify" or
                                   (first.kind == "field_choices" and first.gold_field is None) else [])
    fields = tuple(dict.fromkeys(str(f) for f in doc.typed(fields, ("fields",), list, "a list of field names")))
    group_field = get("group_field", str, "a field name")

    templates: dict[str, Template] = {k: _make_template(t, table, label_field, meta_fields)
                                      for k, t in compiled.items()}
    if "none" not in templates:
        n = len(set(labels.values())) if labels is not None else len(first.choices)
        templates["none"] = _none_template(first, label_field, n, table, meta_fields)
    try:
        return FileTaskSpec(
            name=name, description=str(get("description", str, "one line", "")), loader=_loader(fmt),
            templates=templates, default_template=default, metric=metric, train_file=train, eval_file=eval_file,
            fields=fields, labels=table, label_field=label_field, group_field=group_field, hub=hub,
            max_length=max_length, path=str(path), split=dict(split), uses_eval=eval_file is not None,
            template_fields={k: tuple(t.fields()) for k, t in compiled.items()}, document=d, lines=doc.lines)
    except ValueError as e:
        raise TaskFileError(str(e), str(path)) from None


def _tpath(raw_templates: dict, name: str) -> tuple:
    return raw_templates[name][1]


# ----------------------------------------------------------------------------- checks before training

def check_task_data(spec: FileTaskSpec, template: str | None = None, data_root: str | Path | None = None,
                    train_file: str | None = None, eval_file: str | None = None) -> list[str]:
    """Problems with a task file's data, found without a model: files that are missing or
    malformed, and fields the template reads that the data lacks (named with the file, the
    template's line and the fields the data has). Empty when the data fits."""
    from .registry import _check, _resolve, default_data_root

    root = Path(data_root) if data_root is not None else default_data_root()
    name = template or spec.default_template
    errors = []
    wanted = spec.template_fields.get(name, ())
    tpath = ("templates", name) if ("templates", name) in spec.lines else ("template",)
    line = spec.lines.get(tpath)
    for role, where in (("train", train_file or spec.train_file), ("eval", eval_file)):
        if not where:
            continue
        try:
            records = spec.loader(_resolve(spec, where, root, role))
        except (FileNotFoundError, DataFormatError) as e:
            errors.append(f"{spec.path}: {e}")
            continue
        if not records:
            errors.append(f"{spec.path}: the {role} file {where} has no rows")
            continue
        have = list(records[0].fields)
        missing = [f for f in wanted if f not in have]
        for f in missing:
            place = f"{spec.path}" + (f" line {line}" if line else "") + f" ({'.'.join(map(str, tpath))})"
            errors.append(f"{place}: template {name!r} reads field {f!r}, which {records[0].source} lacks "
                          f"(its fields: {', '.join(map(str, have))})")
        if not missing:
            try:
                _check(spec, records)  # every row: the task's fields and a known label
            except DataFormatError as e:
                errors.append(f"{spec.path}: {e}")
    return errors
