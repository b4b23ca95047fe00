"""benchmarks/lm_eval_parity.py: the rows and task file it hands lm-eval, and how it compares the
two harnesses' scores (lm-eval itself is not a dependency: not run here)."""

from __future__ import annotations


import pytest
import yaml

from zotune.tasks.base import Example


@pytest.fixture(scope="module")
def parity(benchmark_script):
    return benchmark_script("lm_eval_parity")


def test_rows_carry_the_rendered_context_and_candidates(parity):
    ex = [Example(choices=(("Great film. It was", " terrible"), ("Great film. It was", " great")), label=1)]
    rows, why = parity.rows_of(ex)
    assert why is None and rows == [{"context": "Great film. It was", "choices": [" terrible", " great"], "label": 1}]


def test_candidates_with_their_own_contexts_and_generation_are_skipped_with_a_reason(parity):
    wino = [Example(choices=(("Anna gave it to Kim because Anna", " was kind"), ("Anna gave it to Kim because Kim", " was kind")), label=0)]
    assert parity.rows_of(wino)[0] == [] and "differ in their context" in parity.rows_of(wino)[1]
    gen = [Example(choices=(("Q: 2+2? A:", " 4"),), label=0, prompt="Q: 2+2? A:", answers=("4",))]
    assert "generation" in parity.rows_of(gen)[1]


def test_task_file_is_multiple_choice_over_the_rows_with_no_delimiter(parity, tmp_path):
    doc = yaml.safe_load(parity.task_file("zotune_parity_x", tmp_path / "rows.jsonl"))
    assert doc["output_type"] == "multiple_choice" and doc["target_delimiter"] == ""
    assert doc["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "rows.jsonl")
    assert (doc["doc_to_text"], doc["doc_to_choice"], doc["doc_to_target"]) == ("{{context}}", "choices", "label")


def test_compare_counts_disagreements_and_separates_a_per_row_constant(parity):
    ours = [[-1.0, -2.0], [-3.0, -1.0], [-0.5, -0.7]]
    theirs = [[-2.5, -3.5], [-3.0, -1.0], [-0.9, -0.6]]  # row 0: a constant 1.5 lower; row 2: ranking flips
    c = parity.compare(ours, theirs, [0, 1, 1])
    assert (c["n"], c["rows_predicted_differently"], c["first_differing_rows"]) == (3, 1, [2])
    assert c["zotune_accuracy"] == pytest.approx(2 / 3) and c["lm_eval_accuracy"] == pytest.approx(1.0)
    assert c["max_abs_loglik_difference"] == pytest.approx(1.5)
    assert c["max_abs_relative_loglik_difference"] == pytest.approx(0.5)  # row 2: -0.2 against +0.3
    with pytest.raises(ValueError, match="zotune scored 3 rows, lm-eval 2"):
        parity.compare(ours, theirs[:2], [0, 1, 1])


def test_markdown_renders_a_saved_run(parity):
    c = parity.compare([[-1.0, -2.0]], [[-1.5, -2.5]], [0])
    saved = {"lm_eval_version": "0.4.13", "zotune_version": "0.1.0", "torch": "2.13.0", "date": "2026-12-02",
             "run": "runs/x", "checkpoint": "runs/x/ckpt-last", "scoring": "sum", "tasks": {"rte": c},
             "skipped": {"squad": "a generation task"}}
    table = parity.markdown(saved)
    assert "| rte | 1 | 100.0 % | 100.0 % | 0 | 5.00e-01 | 0.00e+00 |" in table
    assert "skipped: squad (a generation task)" in table
