"""Tasks as files: YAML task files load into the TaskSpec the built-ins use, every documented
error names file, line and key, built-ins print as task files that render the same prompts, and
a task file over a csv trains and evaluates a tiny model end to end."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from zotune import cli
from zotune.config import ConfigError, load_config
from zotune.tasks import DataFormatError, Example, SplitSpec, get_task, list_tasks, load_task
from zotune.tasks.definitions import template_scoring
from zotune.tasks.file_task import FileTaskSpec, TaskFileError, load_task_file, read_csv
from zotune.tasks.task_yaml import BUILTIN_TEMPLATES, task_to_yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "reviews-task.yaml"
CSV = "text,label\nGreat kettle.,1\nIt broke.,0\n\"Loud, but fine.\",1\nAwful lid.,0\n"


def write(folder: Path, text: str, name: str = "task.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


@pytest.fixture
def csv_task(tmp_path) -> Path:
    (tmp_path / "rows.csv").write_text(CSV)
    return write(tmp_path, """
        name: tiny-reviews
        data: {train: rows.csv}
        template:
          context: "Review: {{ text }}\\nSentiment:"
          choices: {0: " bad", 1: " good"}
        """)


# ----------------------------------------------------------------------------- loading and rendering

def test_a_csv_task_renders_the_verbalizer_with_labels_from_the_mapping(csv_task):
    spec = get_task(str(csv_task))  # task.name takes the path
    assert isinstance(spec, FileTaskSpec) and spec.name == "tiny-reviews" and spec.metric == "accuracy"
    assert spec.fields == ("text", "label") and spec.max_length == 256 and spec.default_template == "default"
    data = load_task(str(csv_task), split=SplitSpec(train=4, dev=0, test=0))
    by_text = {ex.choices[0][0]: ex for ex in data.train}
    ex = by_text["Review: Loud, but fine.\nSentiment:"]  # a quoted csv field with a comma
    assert ex == Example(choices=(("Review: Loud, but fine.\nSentiment:", " bad"),
                                  ("Review: Loud, but fine.\nSentiment:", " good")), label=1)
    assert sorted(e.label for e in data.train) == [0, 0, 1, 1]
    # the implicit "none" template: the fields the prompt reads, candidates " 0" / " 1"
    none = spec.templates["none"]({"text": "Awful lid.", "label": "0"})
    assert none == Example(choices=(("Awful lid.", " 0"), ("Awful lid.", " 1")), label=0)
    assert template_scoring(spec.templates["default"]) == "sum"


def test_the_shipped_example_task_and_its_recipe_validate():
    spec = get_task(str(EXAMPLE))
    data = load_task(str(EXAMPLE), split=SplitSpec(train=120, dev=40, test=40))
    assert data.sizes == {"train": 120, "dev": 40, "test": 40} and spec.max_length == 32
    assert {ex.label for ex in data.test} == {0, 1}
    assert data.train[0].choices[1][1] == " positive"
    cfg = load_config(REPO / "recipes" / "own-data-csv.yaml")
    # the task file's split sizes are the run's defaults; the recipe may still override them
    assert (cfg.task.train, cfg.task.dev, cfg.task.test, cfg.task.max_length) == (120, 40, 40, 32)
    assert load_config(REPO / "recipes" / "own-data-csv.yaml", ["task.train=100"]).task.train == 100


def test_read_csv_names_line_of_a_row_with_the_wrong_field_count(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,label\n"two\nlines",1\n\nbad row,1,extra\n')
    with pytest.raises(DataFormatError, match=r"rows.csv line 5: expected 2 comma-separated fields \(text, label\), got 3"):
        read_csv(path)
    path.write_text('text,label\n"two\nlines",1\n')
    (record,) = read_csv(path)
    assert record.fields == {"text": "two\nlines", "label": "1"} and record.where == "line 2"
    path.write_text("a,a\n1,2\n")
    with pytest.raises(DataFormatError, match=r"line 1: the header names column\(s\) 'a' twice"):
        read_csv(path)
    path.write_text("")
    with pytest.raises(DataFormatError, match=r"rows.csv line 1: empty file: expected a header line"):
        read_csv(path)


def test_jsonl_candidates_from_a_field_and_gold_answers(tmp_path):
    rows = [{"q": "Capital of France?", "options": ["Rome", "Paris", "Oslo"], "gold": "Paris"},
            {"q": "Two plus two?", "options": ["4", "5"], "gold": ["4"]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write(tmp_path, """
        data: {train: rows.jsonl}
        template:
          context: "Q: {{ q }}\\nA:"
          choices_field: options
          choice: " {{ choice }}"
          gold_field: gold
        """)
    spec = load_task_file(path)
    assert spec.name == "task" and spec.labels is None
    ex = spec.templates["default"](rows[0])
    assert ex.choices == (("Q: Capital of France?\nA:", " Rome"), ("Q: Capital of France?\nA:", " Paris"),
                          ("Q: Capital of France?\nA:", " Oslo"))
    assert ex.label == 1 and ex.meta["gold_choices"] == (1,)
    assert spec.templates["none"](rows[0]).choices[0] == ("Capital of France?\n0: Rome\n1: Paris\n2: Oslo", " 0")


def test_a_generation_task_with_exact_match(tmp_path):
    (tmp_path / "qa.json").write_text(json.dumps([{"question": "Who wrote Hamlet?", "answer": "Shakespeare"}]))
    path = write(tmp_path, """
        data: {train: qa.json}
        metric: exact_match
        template:
          prompt: "Question: {{ question }}\\nAnswer:"
          answers_field: answer
          target: " {{ answer }}\\n"
        """)
    spec = load_task_file(path)
    assert spec.metric == "em_f1" and spec.fields == ("question", "answer")
    ex = spec.templates["default"]({"question": "Who wrote Hamlet?", "answer": "Shakespeare"})
    assert ex == Example(choices=(("Question: Who wrote Hamlet?\nAnswer:", " Shakespeare\n"),), label=0,
                         prompt="Question: Who wrote Hamlet?\nAnswer:", answers=("Shakespeare",))


def test_several_templates_labels_table_and_scoring(tmp_path):
    (tmp_path / "nli.tsv").write_text("premise\thypothesis\tlabel\nA dog runs.\tAn animal moves.\tentailment\n")
    path = write(tmp_path, """
        data: {train: nli.tsv}
        labels: {entailment: 0, not_entailment: 1}
        default_template: yesno
        templates:
          yesno:
            context: "{{ premise }} Question: {{ hypothesis }} Yes or no?"
            choices: [" Yes", " No"]
            scoring: mean
          swapped:
            context: "{{ hypothesis }} / {{ premise }}"
            choices: {entailment: " true", not_entailment: " false"}  # in the labels' order
        """)
    spec = load_task_file(path)
    assert list(spec.templates) == ["yesno", "swapped", "none"] and spec.default_template == "yesno"
    row = {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": "entailment"}
    assert spec.templates["yesno"](row).label == 0 and template_scoring(spec.templates["yesno"]) == "mean"
    assert load_config(None, [f"task.name={path}", "model.name=tiny-llama"]).task.scoring == "mean"


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["good", "bad"], "label": [1, 0]}), tmp_path / "rows.parquet")
    path = write(tmp_path, """
        data: {train: rows.parquet}
        template: {context: "{{ text }}", choices: {0: " no", 1: " yes"}}
        """)
    data = load_task(str(path), split=SplitSpec(train=2, dev=0, test=0))
    assert sorted((ex.choices[0][0], ex.label) for ex in data.train) == [("bad", 0), ("good", 1)]


def test_an_eval_file_in_the_task_file_is_the_test_split_unless_the_recipe_names_another(csv_task):
    from zotune.train.loop import load_data

    (csv_task.parent / "held-out.csv").write_text("text,label\nSuperb.,1\nDreadful.,0\n")
    csv_task.write_text(csv_task.read_text().replace("data: {train: rows.csv}",
                                                     "data: {train: rows.csv, eval: held-out.csv}\nsplit: {test: 2}"))
    cfg = load_config(None, [f"task.name={csv_task}", "model.name=tiny-llama", "task.train=3", "task.dev=1"])
    assert cfg.task.eval_file == str(csv_task.parent / "held-out.csv") and cfg.task.test == 2
    data = load_data(cfg)
    assert sorted(ex.choices[0][0] for ex in data.test) == ["Review: Dreadful.\nSentiment:", "Review: Superb.\nSentiment:"]
    assert data.sizes == {"train": 3, "dev": 1, "test": 2}
    other = load_config(None, [f"task.name={csv_task}", "model.name=tiny-llama", f"task.eval_file={csv_task.parent / 'rows.csv'}"])
    assert other.task.eval_file == str(csv_task.parent / "rows.csv")


# ----------------------------------------------------------------------------- every documented error

GOOD_TEMPLATE = 'template: {context: "{{ text }}", choices: {0: " no", 1: " yes"}}'
ERRORS = [
    ("not_yaml", "data: {train: rows.csv\ntemplate: [\n", r"line \d+: not valid YAML"),
    ("not_mapping", "- a\n- b\n", r"line 1: expected a mapping of keys"),
    ("unknown_key", f"data: {{train: rows.csv}}\n{GOOD_TEMPLATE}\nmetrc: accuracy\n",
     r"line 3 \(metrc\): unknown key 'metrc'. Did you mean 'metric'\?"),
    ("no_data", f"{GOOD_TEMPLATE}\n", r"task.yaml line 1: missing key 'data'"),
    ("no_train", f"data: {{eval: rows.csv}}\n{GOOD_TEMPLATE}\n", r"line 1 \(data\): missing key 'train'"),
    ("unknown_format", f"data: {{train: rows.csv, format: xlsx}}\n{GOOD_TEMPLATE}\n",
     r"line 1 \(data.format\): unknown format 'xlsx'"),
    ("no_template", "data: {train: rows.csv}\n", r"missing key 'template'"),
    ("both_templates", f"data: {{train: rows.csv}}\n{GOOD_TEMPLATE}\ntemplates: {{}}\n",
     r"line 2 \(template\): give template \(one\) or templates"),
    ("syntax", 'data: {train: rows.csv}\ntemplate:\n  context: "{{ text "\n  choices: [" a", " b"]\n',
     r"line 3 \(template.context\): template syntax error"),
    ("choices_type", 'data: {train: rows.csv}\ntemplate:\n  context: x\n  choices: " yes"\n',
     r"line 4 \(template.choices\): expected a list of continuations or a mapping"),
    ("one_choice", 'data: {train: rows.csv}\ntemplate:\n  context: x\n  choices: [" yes"]\n',
     r"line 4 \(template.choices\): expected at least 2 candidates"),
    ("no_choices", 'data: {train: rows.csv}\ntemplate:\n  context: x\n',
     r"line 2 \(template\): a template needs choices"),
    ("no_context", 'data: {train: rows.csv}\ntemplate:\n  choices: [a, b]\n',
     r"line 2 \(template\): a template needs a context"),
    ("prompt_and_choices", 'data: {train: rows.csv}\ntemplate:\n  prompt: x\n  choices: [a, b]\n',
     r"line 4 \(template.choices\): a generation template \(with prompt\) takes no 'choices'"),
    ("template_key", 'data: {train: rows.csv}\ntemplate:\n  context: x\n  choice: [a, b]\n',
     r"line 4 \(template.choice\): 'choice' needs choices_field"),
    ("scoring", 'data: {train: rows.csv}\ntemplate:\n  context: x\n  choices: [a, b]\n  scoring: max\n',
     r"line 5 \(template.scoring\): expected sum or mean"),
    ("metric", f"data: {{train: rows.csv}}\n{GOOD_TEMPLATE}\nmetric: bleu\n", r"line 3 \(metric\): unknown metric 'bleu'"),
    ("metric_kind", f"data: {{train: rows.csv}}\n{GOOD_TEMPLATE}\nmetric: exact_match\n",
     r"line 3 \(metric\): metric em_f1 does not fit a scored task"),
    ("max_length", f"data: {{train: rows.csv}}\n{GOOD_TEMPLATE}\nmax_length: 1\n", r"line 3 \(max_length\): expected an integer >= 2"),
    ("split", f"data: {{train: rows.csv}}\n{GOOD_TEMPLATE}\nsplit: {{train: -1}}\n",
     r"line 3 \(split.train\): expected an integer >= 0"),
    ("label_index", f"data: {{train: rows.csv}}\n{GOOD_TEMPLATE}\nlabels:\n  pos: one\n",
     r"line 4 \(labels.pos\): expected a candidate index"),
    ("verbalizer_vs_labels", f"data: {{train: rows.csv}}\nlabels: {{0: 1, 1: 0}}\n{GOOD_TEMPLATE}\n",
     r"\(template.choices.0\): verbalizer key 0 is candidate 0 here but label 0 means candidate 1"),
    ("default_template", f"data: {{train: rows.csv}}\n{GOOD_TEMPLATE}\ndefault_template: zotune\n",
     r"line 3 \(default_template\): unknown template 'zotune'"),
]


@pytest.mark.parametrize("text, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_each_task_file_error_names_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    with pytest.raises(TaskFileError, match=message) as caught:
        load_task_file(path)
    assert str(caught.value).startswith(str(path))


def test_a_missing_task_file_is_named(tmp_path):
    with pytest.raises(TaskFileError, match=r"nowhere.yaml: task file not found"):
        get_task(str(tmp_path / "nowhere.yaml"))


def test_validate_names_a_template_field_the_data_lacks_before_any_model_loads(csv_task, capsys, monkeypatch):
    text = csv_task.read_text().replace("{{ text }}", "{{ review }}")
    csv_task.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(None, [f"task.name={csv_task}", "model.name=tiny-llama"])
    assert (f"task.name: {csv_task} line 3 (template): template 'default' reads field 'review', which "
            f"{csv_task.parent / 'rows.csv'} lacks (its fields: text, label)") in str(caught.value)
    # the command line: one line per problem, exit 2, and no model is loaded
    import zotune.models

    monkeypatch.setattr(zotune.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    assert cli.main(["train", f"task.name={csv_task}", "model.name=smollm2-135m"]) == 2
    err = capsys.readouterr().err
    assert "zotune: error: invalid config:" in err and "reads field 'review'" in err


def test_bad_rows_are_named_with_file_line_and_field(csv_task):
    rows = csv_task.parent / "rows.csv"
    rows.write_text(CSV + "Meh.,2\n")
    with pytest.raises(DataFormatError, match=r"rows.csv line 6: bad value '2' for field 'label' \(expected one of"):
        load_task(str(csv_task), split=SplitSpec(train=5, dev=0, test=0))
    rows.write_text("text\nGreat kettle.\n")
    with pytest.raises(DataFormatError, match=r"rows.csv line 2: missing field 'label' \(the row has fields: text\)"):
        load_task(str(csv_task), split=SplitSpec(train=1, dev=0, test=0))
    # a template field missing in a row (not in the task's fields): TemplateError with the row's fields
    other = write(csv_task.parent, """
        data: {train: rows.csv}
        fields: [text]
        template: {context: "{{ text }} {{ title }}", choices: [" no", " yes"]}
        label_field: text
        """, "other.yaml")
    with pytest.raises(DataFormatError, match=r"rows.csv line 2: template template.context: 'title' is undefined"):
        load_task(str(other), split=SplitSpec(train=1, dev=0, test=0))


# ----------------------------------------------------------------------------- built-ins as task files

def test_every_builtin_template_has_a_task_file_form():
    assert {(name, t) for name in list_tasks() for t in get_task(name).templates} == set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("name", ["SST-2", "RTE", "CB", "BoolQ", "WSC", "WiC", "MultiRC", "COPA", "ReCoRD",
                                  "WinoGrande", "SNLI", "MNLI", "SQuAD", "DROP"])
def test_a_printed_builtin_renders_the_same_examples_as_the_builtin(name, data_root, tmp_path):
    spec = get_task(name)
    path = tmp_path / "copy.yaml"
    path.write_text(task_to_yaml(spec))
    copy = load_task_file(path)
    assert (copy.name, copy.metric, copy.fields, copy.max_length, copy.default_template, copy.group_field) == \
        (spec.name, spec.metric, spec.fields, spec.max_length, spec.default_template, spec.group_field)
    assert list(copy.templates) == list(spec.templates)
    records = spec.loader(data_root / spec.train_file)[:150]
    for template, render in spec.templates.items():
        assert template_scoring(copy.templates[template]) == template_scoring(render), template
        for record in records:
            assert copy.templates[template](record.fields) == render(record.fields), (template, record.location)


@pytest.mark.parametrize("name", ["sst2", "copa", "squad"])
def test_loading_a_printed_builtin_gives_the_same_splits_and_prompts(name, data_root, tmp_path, capsys):
    assert cli.main(["tasks", "--show", name]) == 0
    path = tmp_path / f"{name}.yaml"
    path.write_text(capsys.readouterr().out)
    if name == "sst2":  # its 67,349 rows take seconds to read: the first 400 lines do as well
        (tmp_path / "SST-2").mkdir()
        lines = (data_root / "SST-2" / "train.tsv").read_text().splitlines(keepends=True)[:400]
        (tmp_path / "SST-2" / "train.tsv").write_text("".join(lines))
        data_root = tmp_path
    split = SplitSpec(train=40, dev=10, test=20, seed=3)
    a = load_task(name, data_root=data_root, split=split)
    b = load_task(str(path), data_root=data_root, split=split)
    assert (a.train, a.dev, a.test, a.sizes) == (b.train, b.dev, b.test, b.sizes)
    # the comments say what a file cannot express
    text = path.read_text()
    if name == "squad":
        assert "through a Python conversion of its rows" in text
    if name == "sst2":
        assert "  # eval: SST-2/dev.tsv" in text


def test_show_prints_a_task_file_that_loads_back_the_same(csv_task, tmp_path, capsys):
    assert cli.main(["tasks", "--show", str(csv_task)]) == 0
    copy = tmp_path / "elsewhere" / "copy.yaml"
    copy.parent.mkdir()
    copy.write_text(capsys.readouterr().out)
    a, b = load_task_file(csv_task), load_task_file(copy)  # its data path was made absolute
    assert b.train_file == a.train_file
    row = {"text": "Great kettle.", "label": "1"}
    assert [t(row) for t in b.templates.values()] == [t(row) for t in a.templates.values()]


# ----------------------------------------------------------------------------- end to end

def test_a_task_file_over_a_csv_trains_and_evaluates_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    common = [f"task.name={EXAMPLE}", "model.name=tiny-llama", "task.train=32", "task.dev=0", "task.test=16",
              "train.batch_size=8", "optim.lr=1e-3", "train.progress=false", "train.tensorboard=false",
              "train.log_every=1", "train.eval_batch_size=16", "train.eval_at_start=false", "task.max_length=64"]
    assert cli.main(["train", *common, "train.steps=4", "train.save_every=4", f"train.output_dir={out}"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 4 and 0.0 <= result["test"]["accuracy"] <= 1.0
    assert result["test"]["n"] == 16
    assert cli.main(["eval", *common, "--checkpoint", str(out / "ckpt-last")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the checkpoint's accuracy on the same 16 test rows equals the run's final test accuracy
    assert evaluated["accuracy"] == result["test"]["accuracy"] and evaluated["n"] == 16
