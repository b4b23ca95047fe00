"""Malformed files raise DataFormatError naming the file, the line (or record) and the field."""

import json

import pytest

from zotune.tasks import DataFormatError, SplitSpec, get_task, load_task

TINY = SplitSpec(train=1, dev=0, test=1)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


RTE_ROW = {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": "entailment"}


def test_missing_field(tmp_path):
    path = write(tmp_path, "RTE/train.jsonl", jsonl(RTE_ROW, {"premise": "p", "label": "entailment"}, RTE_ROW))
    with pytest.raises(DataFormatError, match=r"RTE/train.jsonl line 2: missing field 'hypothesis'"):
        load_task("rte", train_file=path, split=TINY)


def test_bad_json_line(tmp_path):
    path = write(tmp_path, "RTE/train.jsonl", jsonl(RTE_ROW, "", RTE_ROW, '{"premise": "p",'))
    with pytest.raises(DataFormatError, match=r"train.jsonl line 4: invalid JSON"):
        load_task("rte", train_file=path, split=TINY)


def test_json_line_not_an_object(tmp_path):
    path = write(tmp_path, "x.jsonl", jsonl(RTE_ROW, "[1, 2]"))
    with pytest.raises(DataFormatError, match=r"x.jsonl line 2: expected a JSON object, got list"):
        load_task("rte", train_file=path, split=TINY)


def test_bad_label(tmp_path):
    path = write(tmp_path, "RTE/train.jsonl", jsonl(RTE_ROW, dict(RTE_ROW, label="maybe")))
    with pytest.raises(DataFormatError, match=r"line 2: bad value 'maybe' for field 'label' \(expected one of 'entailment'"):
        load_task("rte", train_file=path, split=TINY)


def test_tsv_column_count(tmp_path):
    path = write(tmp_path, "SST-2/train.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n")
    with pytest.raises(DataFormatError, match=r"SST-2/train.tsv line 3: expected 2 tab-separated fields \(sentence, label\), got 3"):
        load_task("sst2", train_file=path, split=TINY)


def test_tsv_bad_label(tmp_path):
    path = write(tmp_path, "SST-2/train.tsv", "sentence\tlabel\ngood\t1\nbad\tneg\n")
    with pytest.raises(DataFormatError, match=r"train.tsv line 3: bad value 'neg' for field 'label'"):
        load_task("sst2", train_file=path, split=TINY)


def test_nested_field_missing(tmp_path):
    row = {"text": "Mark lied. He was wrong.", "target": {"span1_text": "Mark"}, "label": True}
    path = write(tmp_path, "WSC/train.jsonl", jsonl(row))
    with pytest.raises(DataFormatError, match=r"line 1: missing field 'target.span2_text'"):
        load_task("wsc", train_file=path, split=TINY)


def test_multirc_nested_answer(tmp_path):
    passage = {"text": "P.", "questions": [{"question": "Q?", "answers": [{"text": "a", "label": 1}, {"text": "b"}]}]}
    path = write(tmp_path, "MultiRC/train.jsonl", jsonl({"idx": 0, "passage": passage}))
    with pytest.raises(DataFormatError, match=r"line 1: missing field 'passage.questions\[0\].answers\[1\].label'"):
        load_task("multirc", train_file=path, split=TINY)


def test_json_object_record(tmp_path):
    data = {"0": {"text_a": "a", "text_b": "b", "label": "neutral"}, "1": {"text_a": "a", "label": "neutral"}}
    path = write(tmp_path, "MNLI/train.json", json.dumps(data, indent=2))
    with pytest.raises(DataFormatError, match=r"MNLI/train.json record '1': missing field 'text_b'"):
        load_task("mnli", train_file=path, split=TINY)


def test_whole_file_bad_json(tmp_path):
    path = write(tmp_path, "MNLI/train.json", '{\n  "0": {"text_a": "a",\n  oops\n}')
    with pytest.raises(DataFormatError, match=r"train.json line 3: invalid JSON"):
        load_task("mnli", train_file=path, split=TINY)


def test_squad_missing_question(tmp_path):
    qas = [{"id": "1", "question": "Q?", "answers": [{"text": "A", "answer_start": 0}]},
           {"id": "2", "answers": [{"text": "A", "answer_start": 0}]}]
    data = {"version": "1.1", "data": [{"title": "T", "paragraphs": [{"context": "A b.", "qas": qas}]}]}
    path = write(tmp_path, "squad.json", json.dumps(data))
    with pytest.raises(DataFormatError, match=r"squad.json data\[0\].paragraphs\[0\].qas\[1\]: missing field 'question'"):
        load_task("squad", train_file=path, split=TINY)


def test_drop_missing_answer(tmp_path):
    data = {"p1": {"passage": "P.", "qa_pairs": [{"question": "Q?", "query_id": "x"}]}}
    path = write(tmp_path, "drop.json", json.dumps(data))
    with pytest.raises(DataFormatError, match=r"drop.json record 'p1' qa_pairs\[0\]: missing field 'answer'"):
        load_task("drop", train_file=path, split=TINY)


def test_template_data_checks_are_located(tmp_path):
    rows = [{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"},
            {"sentence": "no blank here", "option1": "x", "option2": "y", "answer": "2"}]
    path = write(tmp_path, "wino.jsonl", jsonl(*rows))
    with pytest.raises(DataFormatError, match=r"wino.jsonl line 2: field 'sentence' has no '_' blank"):
        load_task("winogrande", train_file=path, split=SplitSpec(train=1, dev=0, test=1))
    row = {"premise": "It rained.", "choice1": "a", "choice2": "b", "question": "reason", "label": 0}
    path = write(tmp_path, "copa.jsonl", jsonl(row))
    with pytest.raises(DataFormatError, match=r"copa.jsonl line 1: bad value 'reason' for field 'question'"):
        load_task("copa", train_file=path, split=SplitSpec(train=1, dev=0, test=0))


def test_unsupported_file_type(tmp_path):
    path = write(tmp_path, "train.csv", "sentence,label\n")
    with pytest.raises(DataFormatError, match=r"train.csv: unsupported file type '.csv'"):
        load_task("sst2", train_file=path, split=TINY)


def test_missing_file_names_path_and_task(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"RTE: train file not found: .*nowhere/RTE/train.jsonl"):
        load_task("rte", data_root=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"SST-2: eval file not found: .*missing.tsv"):
        load_task("sst2", data_root=tmp_path, train_file=write(tmp_path, "t.tsv", "sentence\tlabel\na\t1\n"),
                  eval_file="missing.tsv", split=SplitSpec(train=1, dev=0, test=1))


def test_record_gold_answer_must_be_an_entity(tmp_path):
    passage = {"text": "Anna met Bob.", "entities": [{"start": 0, "end": 3}, {"start": 9, "end": 11}]}
    good = {"query": "@placeholder smiled.", "answers": [{"start": 0, "end": 3, "text": "Anna"}]}
    bad = {"query": "@placeholder left.", "answers": [{"start": 0, "end": 2, "text": "Carl"}]}
    path = write(tmp_path, "record.jsonl", jsonl({"passage": passage, "qas": [good, bad]}))
    with pytest.raises(DataFormatError, match=r"record.jsonl line 1 qas\[1\]: no gold answer"):
        load_task("record", train_file=path, split=SplitSpec(train=2, dev=0, test=0))
    data = load_task("record", train_file=path, split=SplitSpec(train=1, dev=0, test=0, seed=0),
                     template=lambda row: get_task("record").templates["zotune"](dict(row, answers=["Bob"])))
    assert [c for _, c in data.train[0].choices] in (["Anna smiled.", "Bob smiled."], ["Anna left.", "Bob left."])
