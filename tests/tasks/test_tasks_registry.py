import sys
import types
import warnings

import pytest

from zotune.tasks import (SplitSpec, TemplateError, UnknownTaskError, get_task, list_tasks, load_task)


@pytest.mark.parametrize("name", ["sst2", "SST-2", "Sst_2", "sst", "glue-sst2"])
def test_names_and_aliases(name):
    assert get_task(name).name == "SST-2"


def test_unknown_task_did_you_mean():
    with pytest.raises(UnknownTaskError) as info:
        get_task("sst3")
    assert isinstance(info.value, KeyError)
    assert str(info.value).startswith("Unknown task 'sst3'. Did you mean 'sst2'? Available: SST-2, RTE, CB")
    with pytest.raises(UnknownTaskError, match="Did you mean 'multirc'"):
        get_task("multi-rc-x")


def test_every_task_has_a_none_template():
    for name in list_tasks():
        spec = get_task(name)
        assert "none" in spec.templates and spec.default_template in spec.templates


def test_unknown_template(data_root):
    with pytest.raises(ValueError, match=r"Unknown template 'mezzo' for task RTE. Did you mean 'mezo'\? "
                                         r"Available: zotune, mezo, lmbff, none"):
        load_task("rte", data_root=data_root, template="mezzo")


def test_template_that_does_not_fit(data_root):
    with pytest.raises(TemplateError, match=r"task SST-2, template 'does_this_mean' does not fit .*SST-2/train.tsv line \d+: "
                                            r"field 'premise' not found \(the row has fields: sentence, label\)"):
        load_task("sst2", data_root=data_root, template=get_task("rte").templates["zotune"],
                  split=SplitSpec(train=2, dev=0, test=0))


def test_custom_template_callable(data_root):
    from zotune.tasks import Example

    def short(row):
        return Example(choices=((row["sentence"], " +"), (row["sentence"], " -")), label=1 - int(row["label"]))

    data = load_task("sst2", data_root=data_root, template=short, split=SplitSpec(train=3, dev=0, test=0))
    assert data.template == "short" and [c for _, c in data.train[0].choices] == [" +", " -"]


def test_data_root_from_environment(data_root, monkeypatch):
    monkeypatch.setenv("ZOTUNE_DATA", str(data_root))
    data = load_task("cb", split=SplitSpec(train=4, dev=2, test=2))
    assert data.sizes == {"train": 4, "dev": 2, "test": 2}
    assert data.sources == (str(data_root / "CB/train.jsonl"),)


def test_eval_file_gives_test(data_root):
    spec = get_task("sst2")
    split = SplitSpec(train=6, dev=3, test=5, seed=1, eval_file=spec.eval_file)
    data = load_task("sst2", data_root=data_root, split=split)
    assert data.sizes == {"train": 6, "dev": 3, "test": 5}
    assert data.sources[1].endswith("SST-2/dev.tsv")
    dev_contexts = {r.fields["sentence"].strip() + " It was" for r in spec.loader(data_root / "SST-2/dev.tsv")}
    assert all(ex.choices[0][0] in dev_contexts for ex in data.test)
    # the eval_file argument works the same and wins over SplitSpec.eval_file
    again = load_task("sst2", data_root=data_root, split=SplitSpec(train=6, dev=3, test=5, seed=1),
                      eval_file=data_root / "SST-2/dev.tsv")
    assert again.test == data.test and again.train == data.train


def test_small_file_warns_and_shrinks(data_root):
    with pytest.warns(UserWarning, match=r"BoolQ: too few rows .* using \{'train': 13, 'dev': 7, 'test': 12\}"):
        data = load_task("boolq", data_root=data_root)
    assert data.sizes == {"train": 13, "dev": 7, "test": 12}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_task("boolq", data_root=data_root, split=SplitSpec(train=20, dev=4, test=32),
                  eval_file=get_task("boolq").eval_file)


def test_splits_deterministic_and_seeded(data_root):
    a = load_task("rte", data_root=data_root, split=SplitSpec(train=20, dev=10, test=10, seed=0))
    b = load_task("rte", data_root=data_root, split=SplitSpec(train=20, dev=10, test=10, seed=0))
    c = load_task("rte", data_root=data_root, split=SplitSpec(train=20, dev=10, test=10, seed=1))
    assert a.train == b.train and a.test == b.test
    assert a.test != c.test
    contexts = [{ex.choices[0][0] for ex in part} for part in (a.train, a.dev, a.test)]
    assert not (contexts[0] & contexts[1] or contexts[0] & contexts[2] or contexts[1] & contexts[2])


def test_multirc_passages_do_not_straddle(data_root):
    data = load_task("multirc", data_root=data_root, split=SplitSpec(train=100, dev=50, test=50))
    passages = [{ex.meta["passage_id"] for ex in part} for part in (data.train, data.dev, data.test)]
    assert not (passages[0] & passages[1] or passages[0] & passages[2] or passages[1] & passages[2])


def test_hub_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"RTE: hub=True .* install `datasets` and be online"):
        load_task("rte", hub=True)


def test_hub_code_path_with_a_stand_in_datasets(monkeypatch):
    calls = []
    rows = {
        ("aps/super_glue", "rte", "train"): [{"premise": "P.", "hypothesis": "H.", "label": i % 2, "idx": i}
                                              for i in range(6)],
        ("aps/super_glue", "wsc.fixed", "validation"): [
            {"text": "Mark lied. He knew.", "span1_index": 0, "span1_text": "Mark", "span2_index": 2,
             "span2_text": "He", "label": 1, "idx": 0}],
        ("stanfordnlp/snli", None, "train"): [{"premise": "A.", "hypothesis": "B.", "label": lab}
                                              for lab in (0, 1, 2, -1)],
    }

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return rows[(path, name, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_task("rte", hub=True, split=SplitSpec(train=4, dev=1, test=1))
    assert data.sizes == {"train": 4, "dev": 1, "test": 1}
    assert data.sources == ("hub:aps/super_glue/rte[train]",)
    assert data.train[0].choices[0][0] == 'P.\nDoes this mean that "H." is true? Yes or No?\n'
    data = load_task("wsc", hub=True, train_file="validation", split=SplitSpec(train=1, dev=0, test=0))
    assert data.train[0].label == 1 and '"He" refer to Mark?' in data.train[0].choices[0][0]
    data = load_task("snli", hub=True, split=SplitSpec(train=3, dev=0, test=0))  # label -1 rows dropped
    assert sorted(ex.label for ex in data.train) == [0, 1, 2]
    assert calls[0] == ("aps/super_glue", "rte", "train")
