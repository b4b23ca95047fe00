import random

import pytest

from zotune.tasks import SplitSpec, make_splits
from zotune.tasks.splits import fit_sizes

ROWS = list(range(100))


def test_disjoint_sizes_and_deterministic():
    splits = make_splits(ROWS, SplitSpec(train=50, dev=20, test=30, seed=3))
    assert splits.sizes == {"train": 50, "dev": 20, "test": 30}
    assert sorted(splits.train + splits.dev + splits.test) == ROWS
    assert make_splits(ROWS, SplitSpec(train=50, dev=20, test=30, seed=3)) == splits
    other = make_splits(ROWS, SplitSpec(train=50, dev=20, test=30, seed=4))
    assert other.test != splits.test and other.train != splits.train


def test_rule_test_then_dev_then_train_from_one_shuffle():
    order = list(ROWS)
    random.Random(7).shuffle(order)
    splits = make_splits(ROWS, SplitSpec(train=10, dev=5, test=5, seed=7))
    assert splits.test == order[:5] and splits.dev == order[5:10] and splits.train == order[10:20]


def test_global_rng_untouched():
    state = random.getstate()
    make_splits(ROWS, SplitSpec(train=10, dev=5, test=5, seed=1))
    assert random.getstate() == state


def test_zero_sizes_allowed():
    splits = make_splits(ROWS, SplitSpec(train=10, dev=0, test=0))
    assert splits.sizes == {"train": 10, "dev": 0, "test": 0}


@pytest.mark.parametrize("field", ["train", "dev", "test"])
def test_negative_size_names_the_field(field):
    with pytest.raises(ValueError, match=f"SplitSpec.{field} must be >= 0, got -1"):
        SplitSpec(**{field: -1})


def test_non_integer_size():
    with pytest.raises(ValueError, match="SplitSpec.dev must be an int, got 2.5"):
        SplitSpec(dev=2.5)


def test_shrinks_to_fit_small_files():
    # one row each, the rest shared in proportion (rounded down), leftovers to train then dev
    assert fit_sizes({"train": 1000, "dev": 500, "test": 1000}, 32) == {"train": 13, "dev": 7, "test": 12}
    assert fit_sizes({"train": 1000, "dev": 500, "test": 1000}, 3) == {"train": 1, "dev": 1, "test": 1}
    assert fit_sizes({"train": 1, "dev": 10**6, "test": 1}, 3) == {"train": 1, "dev": 1, "test": 1}
    assert fit_sizes({"train": 5, "dev": 0, "test": 5}, 7) == {"train": 4, "dev": 0, "test": 3}
    splits = make_splits(list(range(32)), SplitSpec())
    assert splits.sizes == {"train": 13, "dev": 7, "test": 12}
    assert sorted(splits.train + splits.dev + splits.test) == list(range(32))


def test_too_few_rows():
    with pytest.raises(ValueError, match="need at least 3 rows .* got 2"):
        make_splits([0, 1], SplitSpec())
    assert make_splits([0, 1], SplitSpec(dev=0)).sizes == {"train": 1, "dev": 0, "test": 1}


def test_eval_rows_give_the_test_split():
    eval_rows = [f"e{i}" for i in range(40)]
    splits = make_splits(ROWS, SplitSpec(train=60, dev=40, test=30, seed=2), eval_rows=eval_rows)
    assert len(splits.test) == 30 and set(splits.test) <= set(eval_rows)
    assert splits.sizes == {"train": 60, "dev": 40, "test": 30}
    assert sorted(splits.train + splits.dev) == ROWS  # all 100 train rows used for dev + train
    assert make_splits(ROWS, SplitSpec(test=1000), eval_rows=eval_rows).sizes["test"] == 40


def test_groups_never_straddle_splits():
    rows = [(g, i) for g in range(30) for i in range(g % 4 + 1)]  # groups of 1..4 rows
    splits = make_splits(rows, SplitSpec(train=20, dev=10, test=10, seed=0), group=lambda r: r[0])
    seen = [{g for g, _ in part} for part in (splits.train, splits.dev, splits.test)]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    for part, size in zip((splits.train, splits.dev, splits.test), (20, 10, 10)):
        assert size <= len(part) < size + 4
