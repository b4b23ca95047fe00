"""Any task as a task file: ``zotune tasks --show NAME`` prints it, so a user starts from a copy.

A task file's own templates are data already. The 14 built-in tasks render with small Python
functions (:mod:`zotune.tasks.definitions`); :data:`BUILTIN_TEMPLATES` writes each of them as
the Jinja2 template that renders the same text, and ``tests/tasks/test_task_files.py`` checks
on the shared data that every one gives the same Examples as its function. What a file cannot
say is written as a comment: the Python conversion of hub rows (WSC, MultiRC, ReCoRD, SNLI,
MNLI, SQuAD, DROP), and that a built-in's labeled evaluation file is only used when asked for.
"""

from __future__ import annotations

import textwrap
from typing import Any, Mapping

import yaml

from .base import TaskSpec
from .definitions import template_scoring
from .file_task import FileTaskSpec

__all__ = ["BUILTIN_TEMPLATES", "task_to_yaml"]

_NO = ["No", "Yes"]
_IDX2 = [" 0", " 1"]
_IDX3 = [" 0", " 1", " 2"]
_DOES_THIS_MEAN = '{{ premise }}\nDoes this mean that "{{ hypothesis }}" is true? Yes or No?\n'


def _lmbff(a: str, b: str, words) -> dict:
    # premise without final punctuation, then '?'; hypothesis stripped, its first letter lowercased
    hyp = f"{{{{ {b}.strip()[:1].lower() ~ {b}.strip()[1:] }}}}"
    return {"context": f"{{{{ {a}.strip().rstrip('.?!') }}}}?", "choices": [f" {w}, {hyp}" for w in words]}


def _copa_choice(field: str) -> str:
    # the choice's first letter lowercased unless its first word is "I" (or "I'm", "I'd" ...)
    return (f" {{% set w = {field}.split(' ', 1)[0] %}}{{{{ {field} if w == 'I' or w.startswith(\"I'\") "
            f"else {field}[:1].lower() ~ {field}[1:] }}}}")


def _copa_mezo_choice(field: str) -> str:
    # MeZO: the whole first word lowercased unless it is exactly "I"
    return (f" {{% set w = {field}.split(' ') %}}{{{{ ([w[0] if w[0] == 'I' else w[0].lower()] + w[1:]) "
            f"| join(' ') }}}}")


_COPA_CONNECTOR = "{{ {'cause': ' because', 'effect': ' so'}[question] }}"
_RECORD_CHOICE = "{{ query.replace('@placeholder', choice) }}"
_BEFORE, _AFTER = "{{ sentence.split('_', 1)[0] }}", "{{ sentence.split('_', 1)[1] }}"

#: (task name, template name) -> the template as task-file data; "mean" scoring is added from
#: the function (:func:`zotune.tasks.definitions.template_scoring`).
BUILTIN_TEMPLATES: dict[tuple[str, str], dict] = {
    ("SST-2", "zotune"): {"context": "{{ sentence | trim }} It was", "choices": [" terrible", " great"]},
    ("SST-2", "mezo"): {"context": "{{ sentence | trim }} It was", "choices": [" terrible", " great"]},
    ("SST-2", "none"): {"context": "{{ sentence | trim }}", "choices": _IDX2},
    ("RTE", "zotune"): {"context": _DOES_THIS_MEAN, "choices": ["Yes", "No"]},
    ("RTE", "mezo"): {"context": _DOES_THIS_MEAN, "choices": ["Yes", "No"]},
    ("RTE", "lmbff"): _lmbff("premise", "hypothesis", ("Yes", "No")),
    ("RTE", "none"): {"context": "{{ premise }}\n{{ hypothesis }}", "choices": _IDX2},
    ("CB", "zotune"): {"context": 'Suppose {{ premise }} Can we infer that "{{ hypothesis }}"? Yes, No, or Maybe?\n',
                       "choices": ["Yes", "No", "Maybe"]},
    ("CB", "mezo"): {"context": 'Suppose {{ premise }} Can we infer that "{{ hypothesis }}"? Yes, No, or Maybe?\n',
                     "choices": ["Yes", "No", "Maybe"]},
    ("CB", "none"): {"context": "{{ premise }}\n{{ hypothesis }}", "choices": _IDX3},
    ("BoolQ", "zotune"): {"context": "{{ passage }} {{ question }}?", "choices": [" No", " Yes"]},
    ("BoolQ", "mezo"): {"context": "{% set q = question if question.endswith('?') else question ~ '?' %}"
                                   "{{ passage }} {{ q[:1].upper() ~ q[1:] }}\n", "choices": _NO},
    ("BoolQ", "none"): {"context": "{{ passage }}\n{{ question }}", "choices": _IDX2},
    ("WSC", "zotune"): {"context": '{{ text }}\nIn the previous sentence, does the pronoun "{{ target.span2_text }}" '
                                   "refer to {{ target.span1_text }}? Yes or No?\n", "choices": _NO},
    ("WSC", "mezo"): {"context": '{{ text }}\nIn the previous sentence, does the pronoun '
                                 '"{{ target.span2_text | lower }}" refer to {{ target.span1_text }}? Yes or No?\n',
                      "choices": _NO},
    ("WSC", "none"): {"context": "{{ text }}\n{{ target.span2_text }}\n{{ target.span1_text }}", "choices": _IDX2},
    ("WiC", "zotune"): {"context": 'Does the word "{{ word }}" have the same meaning in these two sentences? '
                                   "Yes, No?\n{{ sentence1 }}\n{{ sentence2 }}\n", "choices": _NO},
    ("WiC", "mezo"): {"context": 'Does the word "{{ word }}" have the same meaning in these two sentences? '
                                 "Yes, No?\n{{ sentence1 }}\n{{ sentence2 }}\n", "choices": _NO},
    ("WiC", "none"): {"context": "{{ word }}\n{{ sentence1 }}\n{{ sentence2 }}", "choices": _IDX2},
    ("MultiRC", "zotune"): {"context": '{{ paragraph }}\nQuestion: {{ question }}\nI found this answer "{{ answer }}". '
                                       "Is that correct? Yes or No?\n", "choices": _NO},
    ("MultiRC", "mezo"): {"context": '{{ paragraph }}\nQuestion: {{ question }}\nI found this answer "{{ answer }}". '
                                     "Is that correct? Yes or No?\n", "choices": _NO},
    ("MultiRC", "none"): {"context": "{{ paragraph }}\n{{ question }}\n{{ answer }}", "choices": _IDX2},
    ("COPA", "zotune"): {"context": "{% set p = premise | trim %}{{ p[:-1] if p.endswith('.') else p }}" + _COPA_CONNECTOR,
                         "choices": [_copa_choice("choice1"), _copa_choice("choice2")]},
    ("COPA", "mezo"): {"context": "{% set p = premise.rstrip() %}{{ p[:-1] if p.endswith('.') else p }}" + _COPA_CONNECTOR,
                       "choices": [_copa_mezo_choice("choice1"), _copa_mezo_choice("choice2")]},
    ("COPA", "none"): {"context": "{{ premise }}\n{{ question }}\n0: {{ choice1 }}\n1: {{ choice2 }}", "choices": _IDX2},
    ("ReCoRD", "zotune"): {"context": "{{ passage.replace('@highlight\\n', '- ') }}\n", "choices_field": "entities",
                           "choice": _RECORD_CHOICE, "gold_field": "answers"},
    ("ReCoRD", "mezo"): {"context": "{{ passage.replace('@highlight\\n', '- ') }}\n-", "choices_field": "entities",
                         "choice": " " + _RECORD_CHOICE, "gold_field": "answers"},
    ("ReCoRD", "none"): {"context": "{{ passage }}\n{{ query }}{% for e in entities %}\n{{ loop.index0 }}: {{ e }}"
                                    "{% endfor %}", "choices_field": "entities", "choice": " {{ index }}",
                         "gold_field": "answers"},
    ("WinoGrande", "zotune"): {"choices": [{"context": _BEFORE + "{{ option1 }}", "continuation": _AFTER},
                                           {"context": _BEFORE + "{{ option2 }}", "continuation": _AFTER}]},
    ("WinoGrande", "mezo"): {"context": _BEFORE, "choices": ["{{ option1 }}" + _AFTER, "{{ option2 }}" + _AFTER]},
    ("WinoGrande", "none"): {"context": "{{ sentence }}\n0: {{ option1 }}\n1: {{ option2 }}", "choices": _IDX2},
    ("SQuAD", "zotune"): {"prompt": "Title: {{ title.replace('_', ' ') }}\nContext: {{ context }}\n"
                                    "Question: {{ question }}\nAnswer:"},
    ("SQuAD", "mezo"): {"prompt": "Title: {{ title }}\nContext: {{ context }}\nQuestion: {{ question | trim }}\nAnswer:",
                        "target": " {{ answer }}\n"},
    ("SQuAD", "none"): {"prompt": "{{ context }}\n{{ question }}"},
    ("DROP", "zotune"): {"prompt": "Passage: {{ passage }}\nQuestion: {{ question }}\nAnswer:"},
    ("DROP", "mezo"): {"prompt": "Passage: {{ passage }}\nQuestion: {{ question | trim }}\nAnswer:",
                       "target": " {{ answer }}\n"},
    ("DROP", "none"): {"prompt": "{{ passage }}\n{{ question }}"},
}
for _nli in ("SNLI", "MNLI"):
    BUILTIN_TEMPLATES[(_nli, "lmbff")] = _lmbff("text_a", "text_b", ("Yes", "Maybe", "No"))
    BUILTIN_TEMPLATES[(_nli, "infer")] = {"context": 'Suppose {{ text_a }} Can we infer that "{{ text_b }}"? '
                                                 "Yes, No, or Maybe?\n", "choices": ["Yes", "Maybe", "No"]}
    BUILTIN_TEMPLATES[(_nli, "none")] = {"context": "{{ text_a }}\n{{ text_b }}", "choices": _IDX3}

#: fields copied into Example.meta (MultiRC's metric groups answer options by question_id)
_META = {"MultiRC": ["question_id", "passage_id"], "ReCoRD": ["idx"], "SQuAD": ["id"], "DROP": ["query_id"]}
#: the reader of each built-in whose file needs more than its suffix says
_FORMAT = {"MultiRC": "multirc", "ReCoRD": "record", "SQuAD": "squad", "DROP": "drop"}


class _Quoted(str):
    """A string written in double quotes: leading spaces, newlines and braces stay visible."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Quoted, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", str(s), style='"'))


def _quote(value: Any) -> Any:
    if isinstance(value, str):
        return _Quoted(value)
    if isinstance(value, list):
        return [_quote(v) for v in value]
    if isinstance(value, dict):
        return {k: _quote(v) for k, v in value.items()}
    return value


def _dump(data: Mapping, quoted: bool = False, flow: bool | None = None) -> str:
    """YAML text of ``data``; ``quoted``: every string in double quotes (templates);
    ``flow``: None puts lists and mappings of scalars on one line, False never does."""
    data = _quote(dict(data)) if quoted else dict(data)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=flow)


def _comment(text: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines())


def _labels(labels: Mapping[Any, int]) -> dict:
    """Bool keys (``False``/``True`` = 0/1 in a dict) written as the 0/1 the files hold."""
    out: dict = {}
    for key, index in labels.items():
        out.setdefault(int(key) if isinstance(key, bool) else key, index)
    return out


def _builtin_document(spec: TaskSpec) -> tuple[dict, dict[str, dict], list[str]]:
    """(top-level keys, templates, comments) of a built-in task."""
    missing = [t for t in spec.templates if (spec.name, t) not in BUILTIN_TEMPLATES]
    if missing:
        raise ValueError(f"task {spec.name}: templates {missing} have no task-file form in BUILTIN_TEMPLATES")
    notes = []
    data: dict = {"train": spec.train_file}
    if spec.name in _FORMAT:
        data["format"] = _FORMAT[spec.name]
    if spec.hub is not None:
        if spec.hub.convert is None:
            data["hub"] = {"path": spec.hub.path, "name": spec.hub.name, "train_split": spec.hub.train_split,
                           "eval_split": spec.hub.eval_split}
        else:
            notes.append(f"data.hub: the built-in reads {spec.hub.path}" + (f"/{spec.hub.name}" if spec.hub.name else "")
                         + " through a Python conversion of its rows to the shape above, which a task file cannot "
                           "express; hub rows already in that shape can be named as data.hub: {path: ..., name: ...}.")
    if spec.eval_file:
        notes.append(f"data.eval: {spec.eval_file} is a labeled file of this task; the built-in uses it only when "
                     "asked (task.eval_file). In a task file data.eval is used by default: uncomment to test on it.")
    if spec.name in ("SNLI", "MNLI"):
        notes.append("data.format: the built-in reads .tsv files as LM-BFF k-shot files; set format: kshot_tsv "
                     "for those.")
    top: dict = {"name": spec.name, "description": spec.description, "data": data, "fields": list(spec.fields)}
    if spec.labels is not None:
        top["label_field"] = spec.label_field
        top["labels"] = _labels(spec.labels)
    if spec.group_field:
        top["group_field"] = spec.group_field
    if spec.name in _META:
        top["meta_fields"] = _META[spec.name]
    top.update(metric=spec.metric, max_length=spec.max_length, default_template=spec.default_template)
    templates = {}
    for name, function in spec.templates.items():
        t = dict(BUILTIN_TEMPLATES[(spec.name, name)])
        if template_scoring(function) != "sum":
            t["scoring"] = template_scoring(function)
        templates[name] = t
    return top, templates, notes


def task_to_yaml(spec: TaskSpec) -> str:
    """``spec`` as a task file: loading the text back (:func:`zotune.tasks.file_task.load_task_file`)
    renders the same prompts. Each template's docstring is written above it as a comment."""
    if isinstance(spec, FileTaskSpec):
        top = dict(spec.document)
        templates = dict(top.pop("templates", None) or {"default": top.pop("template")})
        top.pop("template", None)
        top["data"] = {**top["data"], "train": spec.train_file or None, "eval": spec.eval_file}
        top["data"] = {k: v for k, v in top["data"].items() if v is not None}
        for key, value in (("metric", spec.metric), ("max_length", spec.max_length),
                           ("default_template", spec.default_template)):
            top.setdefault(key, value)
        notes = []
        header = (f"zotune task file {spec.name}, from {spec.path}, its data paths made absolute "
                  "(docs/tasks.md lists every key).")
    else:
        top, templates, notes = _builtin_document(spec)
        header = (f"zotune task file: the built-in task {spec.name}, written as data (docs/tasks.md lists every "
                  f"key).\nSave it, edit it, and train on it with task.name=path/to/this.yaml. Relative data paths "
                  f"are looked up beside\nthis file, then in the current directory, then in the data root "
                  f"(task.data_root, $ZOTUNE_DATA, ../shared/data).")
    out = [_comment(header)]
    for key, value in top.items():
        if key == "data":
            out.append(_dump({"data": value}, flow=False))
            if not isinstance(spec, FileTaskSpec) and spec.eval_file:
                out.append(f"  # eval: {spec.eval_file}\n")
            out += [_comment(textwrap.fill(note, 98)) for note in notes]
        else:
            out.append(_dump({key: value}, flow=None if isinstance(value, (list, dict)) else False))
    out.append("templates:\n")
    for name, body in templates.items():
        function = spec.templates.get(name)
        if function is not None and function.__doc__:
            out.append("".join(f"  # {line.strip()}".rstrip() + "\n" for line in function.__doc__.strip().splitlines()))
        text = _dump({name: body}, quoted=True, flow=False)
        out.append("".join(f"  {line}\n" for line in text.splitlines()))
    return "".join(out)
