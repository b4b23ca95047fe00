"""Readers for the official file formats of the task data.

Every reader turns a file into a list of :class:`Record`: one raw row (a plain dict) plus where
it came from, so that any later complaint about the row can name the file and line. Readers
check the *shape* of the file (valid JSON, column counts, the nesting of SQuAD/DROP/MultiRC);
which fields a task needs is checked by the task (see ``TaskSpec.fields``).

Formats:

- tsv with a header line (GLUE SST-2): :func:`read_tsv`
- LM-BFF k-shot tsv with GLUE MNLI/SNLI columns: :func:`read_kshot_tsv`
- jsonl, one object a line (SuperGLUE, WinoGrande): :func:`read_jsonl`
- a JSON object of records or a JSON list of records (LM-BFF MNLI/SNLI json): :func:`read_json_records`
- SuperGLUE MultiRC and ReCoRD jsonl (nested): :func:`read_multirc`, :func:`read_record`
- official SQuAD json: :func:`read_squad`
- DROP json, official (passages with ``qa_pairs``) or flat rows with ``answers_spans``: :func:`read_drop`
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from zotune.errors import ZotuneError

__all__ = [
    "DataFormatError",
    "Record",
    "read_tsv",
    "read_kshot_tsv",
    "read_jsonl",
    "read_json_records",
    "read_multirc",
    "read_record",
    "read_squad",
    "read_drop",
]


class DataFormatError(ZotuneError, ValueError):
    """A row of a data file does not have the shape its task or format needs.

    The message names the file, the line (or record) and the field, e.g.
    ``RTE/train.jsonl line 17: missing field 'hypothesis'``. Templates may raise it without a
    location; the loader then adds the location of the row being rendered.
    """

    def __init__(self, problem: str, source: str | None = None, where: str | None = None):
        self.problem, self.source, self.where = problem, source, where
        place = " ".join(p for p in (source, where) if p)
        super().__init__(f"{place}: {problem}" if place else problem)

    def at(self, source: str, where: str) -> "DataFormatError":
        """The same complaint, located at ``source`` ``where``."""
        return DataFormatError(self.problem, source, where)


@dataclass(frozen=True)
class Record:
    """One raw row and its origin: ``source`` is the file, ``where`` e.g. ``"line 17"``."""

    fields: Mapping[str, Any]
    source: str
    where: str

    @property
    def location(self) -> str:
        return f"{self.source} {self.where}"


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for each non-blank line."""
    with open(path, encoding="utf-8", newline="") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def read_tsv(path: str | Path) -> list[Record]:
    """Tab-separated values with a header line; every row must have the header's column count.

    Fields are split on tabs only (no quoting), as GLUE files contain bare quote characters.
    Values stay strings.
    """
    path = Path(path)
    lines = _text_lines(path)
    header_line = next(lines, None)
    if header_line is None:
        raise DataFormatError("empty file: expected a header line", str(path), "line 1")
    header = header_line[1].split("\t")
    records = []
    for number, line in lines:
        values = line.split("\t")
        if len(values) != len(header):
            raise DataFormatError(
                f"expected {len(header)} tab-separated fields ({', '.join(header)}), got {len(values)}",
                str(path), f"line {number}")
        records.append(Record(dict(zip(header, values)), str(path), f"line {number}"))
    return records


def read_kshot_tsv(path: str | Path) -> list[Record]:
    """LM-BFF k-shot tsv of GLUE MNLI / SNLI: rows become ``{text_a, text_b, label}``.

    The premise and hypothesis are the ``sentence1`` / ``sentence2`` columns named by the header;
    the label is the *last* column, because SNLI rows carry a variable number of annotator labels
    before ``gold_label``.
    """
    path = Path(path)
    lines = _text_lines(path)
    header_line = next(lines, None)
    if header_line is None:
        raise DataFormatError("empty file: expected a header line", str(path), "line 1")
    header = header_line[1].split("\t")
    for name in ("sentence1", "sentence2"):
        if name not in header:
            raise DataFormatError(f"header has no column {name!r}", str(path), "line 1")
    a, b = header.index("sentence1"), header.index("sentence2")
    records = []
    for number, line in lines:
        values = line.split("\t")
        if len(values) < len(header):
            raise DataFormatError(
                f"expected at least {len(header)} tab-separated fields, got {len(values)}",
                str(path), f"line {number}")
        row = {"text_a": values[a], "text_b": values[b], "label": values[-1]}
        records.append(Record(row, str(path), f"line {number}"))
    return records


def read_jsonl(path: str | Path) -> list[Record]:
    """One JSON object per line; blank lines are skipped."""
    path = Path(path)
    records = []
    for number, line in _text_lines(path):
        records.append(Record(_parse_object(line, path, number), str(path), f"line {number}"))
    return records


def _parse_object(line: str, path: Path, number: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"invalid JSON ({e.msg} at column {e.colno})", str(path), f"line {number}") from None
    if not isinstance(row, dict):
        raise DataFormatError(f"expected a JSON object, got {type(row).__name__}", str(path), f"line {number}")
    return row


def _load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"invalid JSON ({e.msg} at column {e.colno})", str(path),
                                  f"line {e.lineno}") from None


def _items(data: Any, path: Path) -> list[tuple[str, Any]]:
    """(record label, value) for a JSON object of records or a JSON list of records."""
    if isinstance(data, dict):
        return [(f"record {key!r}", value) for key, value in data.items()]
    if isinstance(data, list):
        return [(f"record {i}", value) for i, value in enumerate(data)]
    raise DataFormatError(f"expected a JSON object or list of records, got {type(data).__name__}", str(path))


def read_json_records(path: str | Path) -> list[Record]:
    """A JSON object ``{key: {field: ...}}`` or a JSON list ``[{field: ...}]``; one record each."""
    path = Path(path)
    records = []
    for where, value in _items(_load_json(path), path):
        if not isinstance(value, dict):
            raise DataFormatError(f"expected a JSON object, got {type(value).__name__}", str(path), where)
        records.append(Record(value, str(path), where))
    return records


def _get(obj: Any, key: str, kind: type | tuple[type, ...], source: str, where: str, field: str) -> Any:
    """obj[key] checked to be a ``kind``; ``field`` is the dotted name used in the error."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"missing field {field!r}", source, where)
    value = obj[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataFormatError(f"field {field!r} should be a {names}, got {type(value).__name__}", source, where)
    return value


def read_multirc(path: str | Path) -> list[Record]:
    """SuperGLUE MultiRC jsonl (one passage a line) flattened to one record per answer option.

    Each record is ``{paragraph, question, answer, label, passage_id, question_id}``; the ids let
    splits keep a passage's options together and metrics group options by question.
    """
    path = Path(path)
    source, records = str(path), []
    for number, line in _text_lines(path):
        where = f"line {number}"
        row = _parse_object(line, path, number)
        passage = _get(row, "passage", dict, source, where, "passage")
        text = _get(passage, "text", str, source, where, "passage.text")
        pid = row.get("idx", number)
        for q, question in enumerate(_get(passage, "questions", list, source, where, "passage.questions")):
            qfield = f"passage.questions[{q}]"
            qtext = _get(question, "question", str, source, where, f"{qfield}.question")
            qid = f"{pid}-{question.get('idx', q)}"
            for a, answer in enumerate(_get(question, "answers", list, source, where, f"{qfield}.answers")):
                afield = f"{qfield}.answers[{a}]"
                records.append(Record({
                    "paragraph": text,
                    "question": qtext,
                    "answer": _get(answer, "text", str, source, where, f"{afield}.text"),
                    "label": _get(answer, "label", int, source, where, f"{afield}.label"),
                    "passage_id": pid,
                    "question_id": qid,
                }, source, f"{where} {afield}"))
    return records


def read_record(path: str | Path) -> list[Record]:
    """SuperGLUE ReCoRD jsonl flattened to one record per query.

    Each record is ``{passage, query, entities, answers, idx}`` where ``entities`` are the distinct
    entity strings of the passage in order of first mention (entity spans are inclusive at both
    ends in this format) and ``answers`` the distinct gold strings.
    """
    path = Path(path)
    source, records = str(path), []
    for number, line in _text_lines(path):
        where = f"line {number}"
        row = _parse_object(line, path, number)
        passage = _get(row, "passage", dict, source, where, "passage")
        text = _get(passage, "text", str, source, where, "passage.text")
        entities: list[str] = []
        for e, span in enumerate(_get(passage, "entities", list, source, where, "passage.entities")):
            start = _get(span, "start", int, source, where, f"passage.entities[{e}].start")
            end = _get(span, "end", int, source, where, f"passage.entities[{e}].end")
            if not 0 <= start <= end < len(text):
                raise DataFormatError(f"entity span passage.entities[{e}] = ({start}, {end}) lies outside the passage",
                                      source, where)
            if text[start:end + 1] not in entities:
                entities.append(text[start:end + 1])
        for q, qa in enumerate(_get(row, "qas", list, source, where, "qas")):
            qfield = f"qas[{q}]"
            answers: list[str] = []
            for a, answer in enumerate(_get(qa, "answers", list, source, where, f"{qfield}.answers")):
                answer_text = _get(answer, "text", str, source, where, f"{qfield}.answers[{a}].text")
                if answer_text not in answers:
                    answers.append(answer_text)
            records.append(Record({
                "passage": text,
                "query": _get(qa, "query", str, source, where, f"{qfield}.query"),
                "entities": entities,
                "answers": answers,
                "idx": qa.get("idx", row.get("idx")),
            }, source, f"{where} {qfield}"))
    return records


def read_squad(path: str | Path) -> list[Record]:
    """Official SQuAD v1.1 json, flattened to one record per question.

    Each record is ``{title, context, question, answers, id}`` with ``answers`` the gold texts
    (duplicates kept once, order kept).
    """
    path = Path(path)
    source, records = str(path), []
    data = _get(_load_json(path), "data", list, source, "", "data")
    for i, article in enumerate(data):
        title = _get(article, "title", str, source, f"data[{i}]", "title")
        for j, paragraph in enumerate(_get(article, "paragraphs", list, source, f"data[{i}]", "paragraphs")):
            where = f"data[{i}].paragraphs[{j}]"
            context = _get(paragraph, "context", str, source, where, "context")
            for k, qa in enumerate(_get(paragraph, "qas", list, source, where, "qas")):
                where_q = f"{where}.qas[{k}]"
                answers = []
                for a, answer in enumerate(_get(qa, "answers", list, source, where_q, "answers")):
                    answer_text = _get(answer, "text", str, source, where_q, f"answers[{a}].text")
                    if answer_text not in answers:
                        answers.append(answer_text)
                records.append(Record({
                    "title": title,
                    "context": context,
                    "question": _get(qa, "question", str, source, where_q, "question"),
                    "answers": answers,
                    "id": qa.get("id", where_q),
                }, source, where_q))
    return records


def drop_answer_text(answer: Mapping[str, Any]) -> str:
    """One DROP answer object as text: the number if set, else the spans joined by ", ", else
    the non-empty parts of the date as "day month year"."""
    if str(answer.get("number", "")).strip():
        return str(answer["number"]).strip()
    if answer.get("spans"):
        return ", ".join(answer["spans"])
    date = answer.get("date") or {}
    return " ".join(str(date[k]).strip() for k in ("day", "month", "year") if str(date.get(k, "")).strip())


def read_drop(path: str | Path) -> list[Record]:
    """DROP json, one record ``{passage, question, answers, query_id}`` per question.

    Two shapes are accepted. The official one (and the contrast set): an object of passages
    ``{id: {passage, qa_pairs: [{question, answer, validated_answers?}]}}``; gold answers are
    ``answer`` then each of ``validated_answers``, each rendered by :func:`drop_answer_text`.
    The flat one (Hugging Face ``ucinlp/drop`` rows, the 5-shot files): a list of
    ``{passage, question, answers_spans: {spans}}``; each span is an accepted answer.
    """
    path = Path(path)
    source, records = str(path), []
    data = _load_json(path)
    for where, item in _items(data, path):
        passage = _get(item, "passage", str, source, where, "passage")
        if "qa_pairs" in item:
            for q, qa in enumerate(_get(item, "qa_pairs", list, source, where, "qa_pairs")):
                where_q = f"{where} qa_pairs[{q}]"
                golds = [_get(qa, "answer", dict, source, where_q, "answer")]
                golds += _get(qa, "validated_answers", list, source, where_q, "validated_answers") \
                    if "validated_answers" in qa else []
                answers = _unique(drop_answer_text(g) for g in golds if isinstance(g, dict))
                if not answers:
                    raise DataFormatError("field 'answer' has no number, spans or date", source, where_q)
                records.append(Record({
                    "passage": passage,
                    "question": _get(qa, "question", str, source, where_q, "question"),
                    "answers": answers,
                    "query_id": qa.get("query_id", where_q),
                }, source, where_q))
        else:
            spans = _get(_get(item, "answers_spans", dict, source, where, "answers_spans"),
                         "spans", list, source, where, "answers_spans.spans")
            answers = _unique(str(s).strip() for s in spans if str(s).strip())
            if not answers:
                raise DataFormatError("field 'answers_spans.spans' is empty", source, where)
            records.append(Record({
                "passage": passage,
                "question": _get(item, "question", str, source, where, "question"),
                "answers": answers,
                "query_id": item.get("query_id", where),
            }, source, where))
    return records


def _unique(texts) -> list[str]:
    out: list[str] = []
    for text in texts:
        if text and text not in out:
            out.append(text)
    return out
