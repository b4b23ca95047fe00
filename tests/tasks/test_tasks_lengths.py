"""Issue 9 defect 15: contexts were cut from the left without a word, and every task got 256
tokens. Now each task carries a default length measured on the shared data, evaluation
counts the rows it cuts (metrics and a warning), and a training set can be checked once."""

import logging

import pytest

from zotune.config import ConfigError, load_config
from zotune.lm import Truncation
from zotune.tasks import Example, TaskSpec, get_task, list_tasks
from zotune.train.evaluate import check_truncation, evaluate

LONG = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen the end"


def examples():
    return [Example(choices=((LONG, " yes"), (LONG, " no")), label=0),
            Example(choices=(("It was", " yes"), ("It was", " no")), label=1),
            Example(choices=((LONG + " " + LONG, " yes"), ("short", " no")), label=0)]


def test_tasks_carry_default_lengths():
    lengths = {name: get_task(name).max_length for name in list_tasks()}
    assert lengths == {"SST-2": 64, "RTE": 224, "CB": 256, "BoolQ": 352, "WSC": 160, "WiC": 64, "MultiRC": 672,
                       "COPA": 64, "ReCoRD": 416, "WinoGrande": 64, "SNLI": 64, "MNLI": 128, "SQuAD": 544,
                       "DROP": 512}
    spec = get_task("sst2")
    with pytest.raises(ValueError, match="max_length must be an integer >= 2, got 1"):
        TaskSpec(**{**spec.__dict__, "max_length": 1})


def test_config_uses_the_task_length_unless_set():
    assert load_config(None, ["task.name=boolq"]).task.max_length == 352
    assert load_config(None, ["task.name=sst2"]).task.max_length == 64
    assert load_config(None, ["task.name=boolq", "task.max_length=256"]).task.max_length == 256
    with pytest.raises(ConfigError, match="task.max_length must be an integer >= 1, got 0"):
        load_config(None, ["task.max_length=0"])


def test_config_scoring_follows_the_template_unless_set():
    assert load_config(None, ["task.name=copa"]).task.scoring == "sum"
    assert load_config(None, ["task.name=copa", "task.template=mezo"]).task.scoring == "mean"
    assert load_config(None, ["task.name=copa", "task.template=mezo", "task.scoring=sum"]).task.scoring == "sum"
    with pytest.raises(ConfigError, match="task.scoring: Unknown scoring 'avg'"):
        load_config(None, ["task.scoring=avg"])


def test_evaluate_reports_and_warns_about_cut_rows(tiny_llama, caplog):
    tok, model = tiny_llama.tokenizer, tiny_llama
    expected = check_truncation(tok, examples(), 12, logger=logging.getLogger("unused"))
    with caplog.at_level(logging.WARNING, logger="zotune"):
        out = evaluate(model, tok, examples(), "accuracy", batch_size=4, max_length=12, name="BoolQ test")
    assert expected.cut == 2 and expected.rows == 3
    assert {k: out[k] for k in ("truncated_rows", "truncated_tokens_max", "truncated_tokens_mean")} == expected.metrics()
    assert out["n"] == 3 and 0 <= out["accuracy"] <= 1
    warned = [r.getMessage() for r in caplog.records if r.name.startswith("zotune")]
    assert len(warned) == 1
    assert f"BoolQ test: 2 of 3 rows cut from the left (up to {expected.tokens_max} tokens" in warned[-1]
    assert warned[-1].endswith("at max_length=12; raise task.max_length")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zotune"):
        out = evaluate(model, tok, examples(), "accuracy", max_length=256)
    assert out["truncated_rows"] == 0 and out["truncated_tokens_max"] == 0 and not caplog.records


def test_evaluate_counts_cut_generation_prompts(tiny_llama):
    ex = [Example(choices=((LONG, " x"),), label=0, prompt=LONG, answers=("x",)),
          Example(choices=(("Q:", " y"),), label=0, prompt="Q:", answers=("y",))]
    out = evaluate(tiny_llama, tiny_llama.tokenizer, ex, "em_f1", max_length=12, max_new_tokens=4)
    n = len(tiny_llama.tokenizer(LONG)["input_ids"])
    assert out["truncated_rows"] == 1 and out["truncated_tokens_max"] == n - 8


def test_evaluate_scoring_sum_or_mean(tiny_llama):
    tok, model = tiny_llama.tokenizer, tiny_llama
    from zotune.lm import score_choices

    ex = [Example(choices=(("It was", " great fun and more"), ("It was", " bad")), label=0),
          Example(choices=(("So", " yes"), ("So", " no it was not at all")), label=1)]
    for scoring in ("sum", "mean"):
        preds = score_choices(model, tok, [e.choices for e in ex], max_length=32, normalize=scoring)
        want = sum(p == e.label for p, e in zip(preds, ex)) / len(ex)
        assert evaluate(model, tok, ex, "accuracy", max_length=32, scoring=scoring)["accuracy"] == want
    with pytest.raises(ValueError, match="Unknown scoring 'avg'"):
        evaluate(model, tok, ex, "accuracy", scoring="avg")


def test_check_truncation_scans_a_training_set_once(tiny_llama, caplog):
    with caplog.at_level(logging.WARNING, logger="zotune"):
        found = check_truncation(tiny_llama.tokenizer, examples(), 12, name="RTE train")
    assert isinstance(found, Truncation) and found.cut == 2
    assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("RTE train: 2 of 3 rows cut")
    assert check_truncation(tiny_llama.tokenizer, [], 12) == Truncation()
