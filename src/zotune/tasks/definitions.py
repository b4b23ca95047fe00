"""The 14 tasks of the MeZO / ZO-Bench papers, as data plus small template functions.

Each task has up to three templates, selected with ``task.template``:

- ``"zotune"`` (the default; ``"lmbff"`` for SNLI/MNLI, which MeZO's code does not have): the
  prompts printed in the MeZO appendix (after LM-BFF, Gao et al., 2021, and PromptSource),
  rendered by zotune: the label word follows the prompt after a space or newline as printed,
  COPA keeps "I" capitalised, WinoGrande puts each option in the context and scores the shared
  rest of the sentence (partial scoring: only the context differs, so only the option decides).
- ``"mezo"``: MeZO's code (``large_models/templates.py`` and ``tasks.py``) exactly, for the
  eleven tasks it has (SST-2, RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD, SQuAD, DROP),
  and for WinoGrande the protocol the MeZO line of work uses: context up to the blank, scored
  continuation the option plus the rest. These templates carry ``scoring = "mean"`` (MeZO's
  ``run.py`` ranks candidates by their per-token mean log-likelihood); the ``zotune`` ones
  ``"sum"`` (see :func:`template_scoring`).
- ``"none"``: the ZO-Bench "without prompt" baseline (their Table 1): no instruction and no
  label words. Its context is the task's raw input fields joined by newlines; the candidates
  are the class indices " 0", " 1", ... For multiple-choice tasks (COPA, ReCoRD, WinoGrande)
  the options are listed in the context as "0: <option>" lines, since an index means nothing
  without them. For SQuAD and DROP the prompt is the passage and the question joined by a
  newline, without "Title:/Context:/Question:/Answer:" cues.

Where ``zotune`` and ``mezo`` differ (besides scoring): BoolQ (MeZO capitalises the question and
puts the answer on a new line), WSC (MeZO lowercases the pronoun), COPA (MeZO lowercases the
whole first word of a choice unless it is exactly "I"), ReCoRD (MeZO's context ends in "\\n-"),
SQuAD (MeZO keeps the title's underscores) and SQuAD / DROP (MeZO's training target ends in
a newline), WinoGrande (above). SST-2, RTE, CB, WiC and MultiRC render the same text.

Choice order always equals the Hugging Face class id (e.g. RTE: 0 = entailment -> "Yes"), so hub
integer labels and file labels share one label table.

Default lengths (``TaskSpec.max_length``, used when ``task.max_length`` is not set) are the
smallest multiple of 32, and at least 64, that keeps at least 99 % of the rows of the task's
shared data files whole with SmolLM2's tokenizer, for the ``zotune`` and the ``mezo`` template
alike (a row's length: its longest candidate with the special tokens; for generation the prompt
plus 32 new tokens). Each task's comment says what its length covers. A longer row loses
context from the left; evaluation counts and reports it (:mod:`zotune.train.evaluate`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from .base import Example, HubSource, TaskSpec, Template
from .formats import (DataFormatError, Record, read_drop, read_json_records, read_jsonl, read_kshot_tsv,
                      read_multirc, read_record, read_squad, read_tsv)

__all__ = ["TASKS", "template_scoring", "SCORING"]

# Raw label -> choice index. False/True are the same dict keys as 0/1, so these tables accept
# the JSON booleans of the files and the integer class ids of the hub alike.
BINARY = {False: 0, True: 1}
SST2_LABELS = {"0": 0, "1": 1, 0: 0, 1: 1}
RTE_LABELS = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}
CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2, 0: 0, 1: 1, 2: 2}
NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2, 0: 0, 1: 1, 2: 2}
WINOGRANDE_LABELS = {"1": 0, "2": 1}

#: How candidates are compared: total log-likelihood of the continuation, or per token.
SCORING = ("sum", "mean")


def template_scoring(template: Template) -> str:
    """The scoring a template was written for: ``"mean"`` for the ``mezo`` templates (MeZO's
    ``run.py`` ranks by the per-token mean), ``"sum"`` for every other (zotune's default: the
    candidates' log-likelihoods, the same scores the classification loss trains)."""
    return getattr(template, "scoring", "sum")


def _mezo(template: Template, doc: str | None = None) -> Template:
    """A copy of ``template`` marked as MeZO's protocol (scored by the per-token mean)."""

    def mezo(row):
        return template(row)

    mezo.__name__ = mezo.__qualname__ = "mezo"
    mezo.__doc__ = doc or f"MeZO's code renders the same text as zotune's: {template.__doc__}"
    mezo.scoring = "mean"
    return mezo


# ---------------------------------------------------------------- helpers

def _field(row: Mapping[str, Any], dotted: str) -> Any:
    """row["a"]["b"] for ``"a.b"``; a missing key raises KeyError (a template that does not fit)."""
    value: Any = row
    for key in dotted.split("."):
        value = value[key]
    return value


def _classify(context: str, continuations: Sequence[str], label: int, **meta) -> Example:
    """All candidates share one context and differ in the continuation (the label word)."""
    return Example(choices=tuple((context, c) for c in continuations), label=label, meta=meta)


def _generate(prompt: str, answers: Sequence[str], ending: str = "", **meta) -> Example:
    """A generation request; its one choice (prompt, " " + first answer + ending) is the training target."""
    if not answers:
        raise DataFormatError("field 'answers' is empty: a generation example needs a gold answer")
    return Example(choices=((prompt, " " + answers[0] + ending),), label=0, prompt=prompt,
                   answers=tuple(answers), meta=meta)


def _unaligned(inputs: Sequence[str], labels: Mapping[Any, int], label_field: str = "label",
               options: Sequence[str] = ()) -> Template:
    """The "none" template: raw inputs joined by newlines, options as "i: text", candidates " i"."""
    n = len(options) or len(set(labels.values()))

    def none(row: Mapping[str, Any]) -> Example:
        lines = [str(_field(row, name)) for name in inputs]
        lines += [f"{i}: {_field(row, name)}" for i, name in enumerate(options)]
        return _classify("\n".join(lines), [f" {i}" for i in range(n)], labels[row[label_field]])

    none.__name__ = none.__qualname__ = "none"
    listed = f", then options {', '.join(options)} as 'i: <option>' lines" if options else ""
    none.__doc__ = (f"No task alignment: fields {', '.join(inputs)} joined by newlines{listed}; "
                    f"candidates ' 0'..' {n - 1}'.")
    return none


def _by_suffix(**readers: Callable[[Path], list[Record]]) -> Callable[[Path], list[Record]]:
    """A loader that picks the reader by file suffix (``tsv=..., json=...``)."""

    def load(path: Path) -> list[Record]:
        suffix = Path(path).suffix.lstrip(".").lower()
        if suffix not in readers:
            raise DataFormatError(f"unsupported file type {Path(path).suffix!r}: expected one of "
                                  f"{', '.join('.' + s for s in readers)}", str(path))
        return readers[suffix](path)

    return load


def _unique(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(x for x in items if x not in ("", None)))


# ---------------------------------------------------------------- templates

def sst2(row):
    """'<sentence> It was' + ' terrible' / ' great'."""
    return _classify(f"{row['sentence'].strip()} It was", (" terrible", " great"), SST2_LABELS[row["label"]])


def sst2_none(row):
    """No task alignment: the sentence; candidates ' 0' / ' 1' (the GLUE labels)."""
    return _classify(row["sentence"].strip(), (" 0", " 1"), SST2_LABELS[row["label"]])


def _shared_context(name: str, prompt: str, a: str, b: str, labels: Mapping[Any, int], words: Sequence[str],
                    note: str = ".") -> Template:
    """A premise / hypothesis ``prompt`` (``{premise}``, ``{hypothesis}``) whose candidates are the
    label ``words`` after it: one shared context, so one forward row scores every candidate."""
    def template(row):
        return _classify(prompt.format(premise=row[a], hypothesis=row[b]), words, labels[row["label"]])

    template.__name__ = template.__qualname__ = name
    template.__doc__ = f"{prompt.format(premise='<premise>', hypothesis='<hypothesis>')!r} + {' / '.join(words)}{note}"
    return template


def _does_this_mean(labels: Mapping[Any, int], words: Sequence[str]) -> Template:
    return _shared_context("does_this_mean", '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
                           "premise", "hypothesis", labels, words)


def _lmbff_nli(a: str, b: str, labels: Mapping[Any, int], words: Sequence[str]) -> Template:
    def template(row):
        premise = row[a].strip().rstrip(".?!")
        hypothesis = row[b].strip()
        hypothesis = hypothesis[:1].lower() + hypothesis[1:]
        return _classify(f"{premise}?", [f" {w}, {hypothesis}" for w in words], labels[row["label"]])

    template.__name__ = template.__qualname__ = "lmbff_nli"
    template.__doc__ = (f"LM-BFF: '<premise>?' + ' [{'|'.join(words)}], <hypothesis>' "
                        "(premise without its final punctuation, hypothesis lowercased first letter).")
    return template


def _can_we_infer(a: str, b: str, labels: Mapping[Any, int], words: Sequence[str]) -> Template:
    """CB's prompt (the MeZO appendix's) for any premise / hypothesis pair."""
    return _shared_context("can_we_infer", 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
                           a, b, labels, words, " (CB's prompt; one forward row scores every answer).")


def boolq(row):
    """'<passage> <question>?' + ' No' / ' Yes' (the MeZO appendix's prompt)."""
    return _classify(f"{row['passage']} {row['question']}?", (" No", " Yes"), BINARY[row["label"]])


def boolq_mezo(row):
    """MeZO's code (BoolQTemplateV3, its default): '<passage> <Question>?\\n' + 'No' / 'Yes'; the
    question's first letter capitalised, '?' added only when missing."""
    question = row["question"] if row["question"].endswith("?") else row["question"] + "?"
    question = question[:1].upper() + question[1:]
    return _classify(f"{row['passage']} {question}\n", ("No", "Yes"), BINARY[row["label"]])


def cb(row):
    """'Suppose <premise> Can we infer that "<hypothesis>"? Yes, No, or Maybe?\\n' + Yes / No / Maybe."""
    context = f'Suppose {row["premise"]} Can we infer that "{row["hypothesis"]}"? Yes, No, or Maybe?\n'
    return _classify(context, ("Yes", "No", "Maybe"), CB_LABELS[row["label"]])


def _wsc(row, pronoun: str) -> Example:
    context = (f'{row["text"]}\nIn the previous sentence, does the pronoun "{pronoun}" '
               f'refer to {row["target"]["span1_text"]}? Yes or No?\n')
    return _classify(context, ("No", "Yes"), BINARY[row["label"]])


def wsc(row):
    """'<text>\\nIn the previous sentence, does the pronoun "<span2>" refer to <span1>? Yes or No?\\n' + No / Yes."""
    return _wsc(row, row["target"]["span2_text"])


def wsc_mezo(row):
    """MeZO's code: as ``wsc`` with the pronoun lowercased ('"he"', not '"He"')."""
    return _wsc(row, row["target"]["span2_text"].lower())


def wic(row):
    """'Does the word "<word>" have the same meaning in these two sentences? Yes, No?\\n<s1>\\n<s2>\\n' + No / Yes."""
    context = (f'Does the word "{row["word"]}" have the same meaning in these two sentences? Yes, No?\n'
               f'{row["sentence1"]}\n{row["sentence2"]}\n')
    return _classify(context, ("No", "Yes"), BINARY[row["label"]])


def multirc(row):
    """'<paragraph>\\nQuestion: <question>\\nI found this answer "<answer>". Is that correct? Yes or No?\\n'
    + No / Yes."""
    context = (f'{row["paragraph"]}\nQuestion: {row["question"]}\n'
               f'I found this answer "{row["answer"]}". Is that correct? Yes or No?\n')
    return _classify(context, ("No", "Yes"), BINARY[row["label"]],
                     question_id=row["question_id"], passage_id=row["passage_id"])


def multirc_none(row):
    """No task alignment: paragraph, question, answer joined by newlines; candidates ' 0' / ' 1'."""
    return _classify(f"{row['paragraph']}\n{row['question']}\n{row['answer']}", (" 0", " 1"),
                     BINARY[row["label"]], question_id=row["question_id"], passage_id=row["passage_id"])


COPA_CONNECTORS = {"cause": " because", "effect": " so"}


def _copa(row, premise: str, lower: Callable[[str], str]) -> Example:
    if row["question"] not in COPA_CONNECTORS:
        raise DataFormatError(f"bad value {row['question']!r} for field 'question' (expected 'cause' or 'effect')")
    context = (premise[:-1] if premise.endswith(".") else premise) + COPA_CONNECTORS[row["question"]]
    choices = tuple((context, " " + lower(c)) for c in (row["choice1"], row["choice2"]))
    return Example(choices=choices, label=BINARY[row["label"]])


def _lower_first_letter(choice: str) -> str:
    """'The sun rose.' -> 'the sun rose.'; 'I' and its contractions ("I'm") keep their capital."""
    first = choice.split(" ", 1)[0]
    return choice if first == "I" or first.startswith("I'") else choice[:1].lower() + choice[1:]


def _lower_first_word(choice: str) -> str:
    """MeZO's rule: the whole first word lowercased unless it is exactly 'I'."""
    first, *rest = choice.split(" ")
    return " ".join([first if first == "I" else first.lower(), *rest])


def copa(row):
    """'<premise without final period> because' (cause) or ' so' (effect) + ' <choice>', the
    choice's first letter lowercased unless its first word is "I" (or "I'm", "I'd", ...)."""
    return _copa(row, row["premise"].strip(), _lower_first_letter)


def copa_mezo(row):
    """MeZO's code: as ``copa``, but the whole first word of the choice is lowercased unless it
    is exactly "I" (and only trailing spaces are stripped from the premise)."""
    return _copa(row, row["premise"].rstrip(), _lower_first_word)


def _record_gold(row) -> tuple[int, ...]:
    """Indices of the entities that are gold answers (several surface forms may be)."""
    answers = set(row["answers"])
    gold = tuple(i for i, entity in enumerate(row["entities"]) if entity in answers)
    if not gold:
        raise DataFormatError("no gold answer (field 'answers') is among the passage entities (field 'entities')")
    return gold


def record(row):
    """Context: the passage ("@highlight" lines as "- " bullets) and a newline; one candidate per
    passage entity: the query with @placeholder replaced by it. Every entity equal to a gold
    answer is listed in meta["gold_choices"]; ``label`` is the first."""
    gold = _record_gold(row)
    passage = row["passage"].replace("@highlight\n", "- ") + "\n"
    choices = tuple((passage, row["query"].replace("@placeholder", entity)) for entity in row["entities"])
    return Example(choices=choices, label=gold[0], meta={"gold_choices": gold, "idx": row.get("idx")})


def record_mezo(row):
    """MeZO's code (ReCoRDTemplateGPT3): context '<passage with "- " bullets>\\n-', one candidate
    per entity: ' ' + the query with @placeholder replaced by it."""
    gold = _record_gold(row)
    passage = row["passage"].replace("@highlight\n", "- ") + "\n-"
    choices = tuple((passage, " " + row["query"].replace("@placeholder", entity)) for entity in row["entities"])
    return Example(choices=choices, label=gold[0], meta={"gold_choices": gold, "idx": row.get("idx")})


def record_none(row):
    """No task alignment: passage, query and the entities as "i: entity" lines; candidates ' 0'..' k'."""
    gold = _record_gold(row)
    entities = list(row["entities"])
    context = "\n".join([row["passage"], row["query"]] + [f"{i}: {e}" for i, e in enumerate(entities)])
    return Example(choices=tuple((context, f" {i}") for i in range(len(entities))), label=gold[0],
                   meta={"gold_choices": gold, "idx": row.get("idx")})


def _blank(row) -> tuple[str, str]:
    if "_" not in row["sentence"]:
        raise DataFormatError("field 'sentence' has no '_' blank")
    before, after = row["sentence"].split("_", 1)
    return before, after


def winogrande(row):
    """Per option: context = sentence up to '_' with the option in its place; continuation = the
    text after '_' (the same for both, so only the context decides)."""
    before, after = _blank(row)
    choices = tuple((before + option, after) for option in (row["option1"], row["option2"]))
    return Example(choices=choices, label=WINOGRANDE_LABELS[row["answer"]])


def winogrande_mezo(row):
    """MeZO's protocol: context = the sentence up to '_' (shared); continuation = the option
    and the rest of the sentence."""
    before, after = _blank(row)
    choices = tuple((before, option + after) for option in (row["option1"], row["option2"]))
    return Example(choices=choices, label=WINOGRANDE_LABELS[row["answer"]])


def squad(row):
    """'Title: <title>\\nContext: <context>\\nQuestion: <question>\\nAnswer:', generate the answer."""
    title = row["title"].replace("_", " ")
    prompt = f"Title: {title}\nContext: {row['context']}\nQuestion: {row['question']}\nAnswer:"
    return _generate(prompt, row["answers"], id=row.get("id"))


def squad_mezo(row):
    """MeZO's code: as ``squad`` with the title as written (underscores kept), the question
    stripped, and the training target ' <answer>\\n'."""
    prompt = f"Title: {row['title']}\nContext: {row['context']}\nQuestion: {row['question'].strip()}\nAnswer:"
    return _generate(prompt, row["answers"], "\n", id=row.get("id"))


def squad_none(row):
    """No task alignment: '<context>\\n<question>', generate the answer."""
    return _generate(f"{row['context']}\n{row['question']}", row["answers"], id=row.get("id"))


def drop(row):
    """'Passage: <passage>\\nQuestion: <question>\\nAnswer:', generate the answer."""
    prompt = f"Passage: {row['passage']}\nQuestion: {row['question']}\nAnswer:"
    return _generate(prompt, row["answers"], query_id=row.get("query_id"))


def drop_mezo(row):
    """MeZO's code: as ``drop`` with the question stripped and the training target ' <answer>\\n'."""
    prompt = f"Passage: {row['passage']}\nQuestion: {row['question'].strip()}\nAnswer:"
    return _generate(prompt, row["answers"], "\n", query_id=row.get("query_id"))


def drop_none(row):
    """No task alignment: '<passage>\\n<question>', generate the answer."""
    return _generate(f"{row['passage']}\n{row['question']}", row["answers"], query_id=row.get("query_id"))


_rte = _does_this_mean(RTE_LABELS, ("Yes", "No"))


# ---------------------------------------------------------------- hub rows -> file-shaped rows

def _hub_wsc(row):
    target = {k: row[k] for k in ("span1_index", "span1_text", "span2_index", "span2_text")}
    yield {"text": row["text"], "target": target, "label": row["label"], "idx": row.get("idx")}


def _hub_multirc(row):
    idx = row["idx"]
    yield {"paragraph": row["paragraph"], "question": row["question"], "answer": row["answer"],
           "label": row["label"], "passage_id": idx["paragraph"],
           "question_id": f"{idx['paragraph']}-{idx['question']}"}


def _hub_record(row):
    yield {"passage": row["passage"], "query": row["query"], "entities": _unique(row["entities"]),
           "answers": _unique(row["answers"]), "idx": row.get("idx")}


def _hub_nli(row):
    if row["label"] in (0, 1, 2):  # SNLI marks pairs without a gold label with -1
        yield {"text_a": row["premise"], "text_b": row["hypothesis"], "label": row["label"]}


def _hub_squad(row):
    yield {"title": row["title"], "context": row["context"], "question": row["question"],
           "answers": _unique(row["answers"]["text"]), "id": row.get("id")}


def _hub_drop(row):
    yield {"passage": row["passage"], "question": row["question"],
           "answers": _unique(s.strip() for s in row["answers_spans"]["spans"]), "query_id": row.get("query_id")}


# ---------------------------------------------------------------- the tasks

_jsonl = _by_suffix(jsonl=read_jsonl, json=read_json_records)
_nli = _by_suffix(json=read_json_records, tsv=read_kshot_tsv, jsonl=read_jsonl)
_superglue = "aps/super_glue"

TASKS: tuple[TaskSpec, ...] = (
    TaskSpec(
        name="SST-2", description="Binary sentiment of movie-review phrases (GLUE).",
        loader=_by_suffix(tsv=read_tsv, jsonl=read_jsonl), metric="accuracy",
        templates={"zotune": sst2, "mezo": _mezo(sst2), "none": sst2_none}, default_template="zotune",
        train_file="SST-2/train.tsv", eval_file="SST-2/dev.tsv",
        fields=("sentence", "label"), labels=SST2_LABELS, aliases=("sst", "glue-sst2"),
        hub=HubSource("nyu-mll/glue", "sst2"),
        # max_length: 99.99 % of the 67,349 rows of train.tsv + dev.tsv whole (99th percentile 46
        # SmolLM2 tokens, max 71)
        max_length=64),
    TaskSpec(
        name="RTE", description="Recognizing textual entailment: does the premise entail the hypothesis? (SuperGLUE)",
        loader=_jsonl, metric="accuracy",
        templates={"zotune": _rte, "mezo": _mezo(_rte),
                   "lmbff": _lmbff_nli("premise", "hypothesis", RTE_LABELS, ("Yes", "No")),
                   "none": _unaligned(("premise", "hypothesis"), RTE_LABELS)},
        default_template="zotune", train_file="RTE/train.jsonl",
        fields=("premise", "hypothesis", "label"), labels=RTE_LABELS,
        hub=HubSource(_superglue, "rte"),
        # max_length: 99.2 % of the 2,490 rows of train.jsonl whole (99th percentile 219, max 313)
        max_length=224),
    TaskSpec(
        name="CB", description="CommitmentBank: three-way entailment (SuperGLUE).",
        loader=_jsonl, metric="accuracy",
        templates={"zotune": cb, "mezo": _mezo(cb),
                   "none": _unaligned(("premise", "hypothesis"), CB_LABELS)},
        default_template="zotune", train_file="CB/train.jsonl",
        fields=("premise", "hypothesis", "label"), labels=CB_LABELS,
        hub=HubSource(_superglue, "cb"),
        # max_length: 99.6 % of the 250 rows of train.jsonl whole (99th percentile 228, max 283)
        max_length=256),
    TaskSpec(
        name="BoolQ", description="Yes/no questions about a Wikipedia passage (SuperGLUE; FewGLUE 32-shot files).",
        loader=_jsonl, metric="accuracy",
        templates={"zotune": boolq, "mezo": _mezo(boolq_mezo, boolq_mezo.__doc__),
                   "none": _unaligned(("passage", "question"), BINARY)},
        default_template="zotune", train_file="BoolQ/train32.jsonl", eval_file="BoolQ/dev32.jsonl",
        fields=("passage", "question", "label"), labels=BINARY,
        hub=HubSource(_superglue, "boolq"),
        # max_length: all 64 rows of train32 + dev32 whole (99th percentile 323, max 335); 256 cut 6
        max_length=352),
    TaskSpec(
        name="WSC", description="Winograd schema: does the pronoun refer to the given noun phrase? (SuperGLUE)",
        loader=_jsonl, metric="accuracy",
        templates={"zotune": wsc, "mezo": _mezo(wsc_mezo, wsc_mezo.__doc__),
                   "none": _unaligned(("text", "target.span2_text", "target.span1_text"), BINARY)},
        default_template="zotune", train_file="WSC/train.jsonl",
        fields=("text", "target.span1_text", "target.span2_text", "label"), labels=BINARY,
        aliases=("wsc.fixed",), hub=HubSource(_superglue, "wsc.fixed", convert=_hub_wsc),
        # max_length: all 554 rows of train.jsonl whole (99th percentile 133, max 134)
        max_length=160),
    TaskSpec(
        name="WiC", description="Word in context: same sense of a word in two sentences? (SuperGLUE)",
        loader=_jsonl, metric="accuracy",
        templates={"zotune": wic, "mezo": _mezo(wic),
                   "none": _unaligned(("word", "sentence1", "sentence2"), BINARY)},
        default_template="zotune", train_file="WiC/train.jsonl",
        fields=("word", "sentence1", "sentence2", "label"), labels=BINARY,
        hub=HubSource(_superglue, "wic"),
        # max_length: 99.5 % of the 5,428 rows of train.jsonl whole (99th percentile 60, max 96)
        max_length=64),
    TaskSpec(
        name="MultiRC", description="Multi-sentence reading comprehension; one row per answer option (SuperGLUE).",
        loader=read_multirc, metric="f1",
        templates={"zotune": multirc, "mezo": _mezo(multirc), "none": multirc_none}, default_template="zotune",
        train_file="MultiRC/train.jsonl",
        fields=("paragraph", "question", "answer", "label", "question_id", "passage_id"), labels=BINARY,
        # Whole passages go to one split, as in the official splits: test passages are unseen and
        # the options of a question are never split (F1a and EM are computed per question).
        group_field="passage_id", hub=HubSource(_superglue, "multirc", convert=_hub_multirc),
        # max_length: 99.05 % of the 27,243 answer rows of train.jsonl whole (99th percentile 671, max 779)
        max_length=672),
    TaskSpec(
        name="COPA", description="Choice of plausible alternatives: the cause or effect of a premise (SuperGLUE).",
        loader=_jsonl, metric="accuracy",
        templates={"zotune": copa, "mezo": _mezo(copa_mezo, copa_mezo.__doc__),
                   "none": _unaligned(("premise", "question"), BINARY, options=("choice1", "choice2"))},
        default_template="zotune", train_file="COPA/train.jsonl",
        fields=("premise", "choice1", "choice2", "question", "label"), labels=BINARY,
        hub=HubSource(_superglue, "copa"),
        # max_length: all 400 rows of train.jsonl whole (max 23)
        max_length=64),
    TaskSpec(
        name="ReCoRD",
        description="Cloze-style news reading comprehension: which entity fills @placeholder? (SuperGLUE; FewGLUE files)",
        loader=_by_suffix(jsonl=read_record), metric="accuracy",
        templates={"zotune": record, "mezo": _mezo(record_mezo, record_mezo.__doc__), "none": record_none},
        default_template="zotune",
        train_file="ReCoRD/train32.jsonl", eval_file="ReCoRD/dev32.jsonl",
        fields=("passage", "query", "entities", "answers"),
        hub=HubSource(_superglue, "record", convert=_hub_record),
        # max_length: all 64 queries of train32 + dev32 whole, every candidate (99th percentile 380, max 387)
        max_length=416),
    TaskSpec(
        name="WinoGrande", description="Pronoun resolution as a two-way fill-in-the-blank (WinoGrande 1.1).",
        loader=_jsonl, metric="accuracy",
        templates={"zotune": winogrande,
                   "mezo": _mezo(winogrande_mezo, winogrande_mezo.__doc__),
                   "none": _unaligned(("sentence",), WINOGRANDE_LABELS, "answer", options=("option1", "option2"))},
        default_template="zotune", train_file="WinoGrande/train_l.jsonl",
        fields=("sentence", "option1", "option2", "answer"), labels=WINOGRANDE_LABELS, label_field="answer",
        aliases=("winogrande_l", "wino"), hub=HubSource("allenai/winogrande", "winogrande_l"),
        # max_length: all 10,234 rows of train_l.jsonl whole (max 44)
        max_length=64),
    TaskSpec(
        name="SNLI", description="Three-way natural language inference on image captions (LM-BFF files).",
        loader=_nli, metric="accuracy",
        templates={"lmbff": _lmbff_nli("text_a", "text_b", NLI_LABELS, ("Yes", "Maybe", "No")),
                   "infer": _can_we_infer("text_a", "text_b", NLI_LABELS, ("Yes", "Maybe", "No")),
                   "none": _unaligned(("text_a", "text_b"), NLI_LABELS)},
        default_template="lmbff", train_file="SNLI/train.json",
        fields=("text_a", "text_b", "label"), labels=NLI_LABELS,
        hub=HubSource("stanfordnlp/snli", None, convert=_hub_nli),
        # max_length: 99.8 % of the 8,999 rows of train.json whole (99th percentile 50, max 83)
        max_length=64),
    TaskSpec(
        name="MNLI", description="Three-way multi-genre natural language inference (LM-BFF files).",
        loader=_nli, metric="accuracy",
        templates={"lmbff": _lmbff_nli("text_a", "text_b", NLI_LABELS, ("Yes", "Maybe", "No")),
                   "infer": _can_we_infer("text_a", "text_b", NLI_LABELS, ("Yes", "Maybe", "No")),
                   "none": _unaligned(("text_a", "text_b"), NLI_LABELS)},
        default_template="lmbff", train_file="MNLI/train.json",
        fields=("text_a", "text_b", "label"), labels=NLI_LABELS, aliases=("multinli",),
        hub=HubSource("nyu-mll/glue", "mnli", eval_split="validation_matched", convert=_hub_nli),
        # max_length: 99.7 % of the 8,999 rows of train.json whole (99th percentile 102, max 254)
        max_length=128),
    TaskSpec(
        name="SQuAD", description="Extractive question answering on Wikipedia (SQuAD v1.1), as generation.",
        loader=_by_suffix(json=read_squad), metric="em_f1",
        templates={"zotune": squad, "mezo": _mezo(squad_mezo, squad_mezo.__doc__), "none": squad_none},
        default_template="zotune",
        train_file="SQuAD/train-subset-v1.1.json",
        fields=("title", "context", "question", "answers"), aliases=("squad1.1", "squadv1"),
        hub=HubSource("rajpurkar/squad", None, convert=_hub_squad),
        # max_length: prompt + 32 new tokens: 99.05 % of the 3,807 questions of train-subset whole (99th
        # percentile 521, max 802)
        max_length=544),
    TaskSpec(
        name="DROP", description="Discrete reasoning over paragraphs (numbers, spans, dates), as generation.",
        loader=_by_suffix(json=read_drop), metric="em_f1",
        templates={"zotune": drop, "mezo": _mezo(drop_mezo, drop_mezo.__doc__), "none": drop_none},
        default_template="zotune",
        train_file="DROP/contrast_set.json",
        fields=("passage", "question", "answers"),
        hub=HubSource("ucinlp/drop", None, convert=_hub_drop),
        # max_length: prompt + 32 new tokens: 99.2 % of the 957 questions of the three files whole (99th
        # percentile 507, max 898)
        max_length=512),
)
