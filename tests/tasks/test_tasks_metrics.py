import pytest

from zotune.tasks import (Example, accuracy, compute_metric, exact_match, f1a, multirc_em, normalize_answer,
                          row_scores, token_f1)


def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an Apple, a pear") == "apple pear"
    assert normalize_answer("Theater") == "theater"  # articles only as whole words


def test_exact_match_max_over_answers():
    assert exact_match("The Eiffel Tower.", ["Louvre", "eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["eiffel tower"]) == 0.0


def test_token_f1_by_hand():
    # pred tokens {cat, sat}; gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert token_f1("the cat sat", ["dog", "a cat sat down", "cat"]) == pytest.approx(0.8)
    # repeated tokens count as often as both sides have them: common = 2, P = R = 2/3
    assert token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)
    assert token_f1("nothing", ["else"]) == 0.0
    assert token_f1("the", ["x"]) == 0.0 and token_f1("a", ["the"]) == 1.0  # empty after normalizing


def test_f1a_and_em():
    # tp = 1, fp = 1, fn = 1: F1 = 2 / (2 + 1 + 1)
    assert f1a([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.5)
    assert f1a([0, 0], [0, 0]) == 0.0
    assert multirc_em([1, 0, 1, 1], [1, 0, 1, 0], ["q1", "q1", "q2", "q2"]) == 0.5


def test_accuracy_accepts_gold_sets():
    assert accuracy([0, 2, 1], [0, {1, 2}, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="2 predictions for 3 labels"):
        accuracy([0, 1], [0, 1, 1])


def _yes_no(label, qid=None):
    return Example(choices=(("c", "No"), ("c", "Yes")), label=label, meta={"question_id": qid} if qid else {})


def test_compute_metric():
    examples = [_yes_no(1, "q1"), _yes_no(0, "q1"), _yes_no(1, "q2")]
    assert compute_metric("accuracy", [1, 1, 1], examples) == {"accuracy": pytest.approx(2 / 3)}
    scores = compute_metric("f1", [1, 0, 0], examples)  # tp 1, fn 1: F1a = 2/3; q1 right, q2 wrong
    assert scores == {"f1a": pytest.approx(2 / 3), "em": 0.5, "accuracy": pytest.approx(2 / 3)}
    gen = [Example(choices=(("Q:", " Paris"),), label=0, prompt="Q:", answers=("Paris", "Paris, France"))]
    assert compute_metric("em_f1", ["paris."], gen) == {"em": 1.0, "f1": 1.0}
    record = [Example(choices=(("p", "a"), ("p", "b"), ("p", "c")), label=0, meta={"gold_choices": (0, 2)})]
    assert compute_metric("accuracy", [2], record) == {"accuracy": 1.0}
    with pytest.raises(ValueError, match="Unknown metric 'acc'. Did you mean 'accuracy'"):
        compute_metric("acc", [1], examples[:1])


def test_row_scores_average_to_the_corpus_metric():
    examples = [_yes_no(1, "q1"), _yes_no(0, "q1"), _yes_no(1, "q2")]
    assert row_scores("accuracy", [1, 1, 1], examples) == [1.0, 0.0, 1.0]
    assert row_scores("f1", [1, 0, 0], examples) == [1.0, 1.0, 0.0]  # MultiRC: right / wrong per option
    record = [Example(choices=(("p", "a"), ("p", "b"), ("p", "c")), label=0, meta={"gold_choices": (0, 2)})]
    assert row_scores("accuracy", [2], record) == [1.0]
    gen = [Example(choices=(("Q:", " x"),), label=0, prompt="Q:", answers=("the cat sat down",)),
           Example(choices=(("Q:", " x"),), label=0, prompt="Q:", answers=("Paris",))]
    rows = row_scores("em_f1", ["cat sat", "paris"], gen)
    assert rows == [pytest.approx(0.8), 1.0]
    assert sum(rows) / 2 == pytest.approx(compute_metric("em_f1", ["cat sat", "paris"], gen)["f1"])
    with pytest.raises(ValueError, match="Unknown metric 'acc'"):
        row_scores("acc", [1], examples[:1])
    with pytest.raises(ValueError, match="2 predictions for 3 examples"):
        row_scores("accuracy", [1, 1], examples)


def test_example_checks():
    with pytest.raises(ValueError, match="label=2 is out of range for 2 choices"):
        Example(choices=(("c", "a"), ("c", "b")), label=2)
    ex = Example(choices=(("Q:", " A"),), label=0, prompt="Q:", answers=("A",))
    assert ex.is_generation and ex.target == ("Q:", " A")
    assert not _yes_no(1).is_generation
