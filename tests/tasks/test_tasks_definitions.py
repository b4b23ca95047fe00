"""Every task loads from the real shared data, and its first row renders to the papers' prompt."""

import pytest

from zotune.tasks import Example, SplitSpec, get_task, list_tasks, load_task

SMALL = SplitSpec(train=8, dev=4, test=4, seed=0)


def test_fourteen_tasks_registered():
    assert list_tasks() == ["SST-2", "RTE", "CB", "BoolQ", "WSC", "WiC", "MultiRC", "COPA", "ReCoRD",
                            "WinoGrande", "SNLI", "MNLI", "SQuAD", "DROP"]


@pytest.mark.parametrize("name", list_tasks())
@pytest.mark.parametrize("template", [None, "none"])
def test_every_task_loads_small_splits(name, template, data_root):
    data = load_task(name, data_root=data_root, split=SMALL, template=template)
    spec = get_task(name)
    assert data.spec is spec
    for part in ("train", "dev", "test"):
        examples = getattr(data, part)
        assert len(examples) == data.sizes[part]
        assert all(isinstance(ex, Example) for ex in examples)
    if name == "MultiRC":  # whole passages: at least the requested rows, possibly more
        assert data.sizes["train"] >= 8 and data.sizes["dev"] >= 4 and data.sizes["test"] >= 4
    else:
        assert data.sizes == {"train": 8, "dev": 4, "test": 4}
    ex = data.train[0]
    context, continuation = ex.target
    assert context.strip() and continuation.strip()
    assert ex.is_generation == (spec.metric == "em_f1")
    if template == "none" and not ex.is_generation:
        assert [c for _, c in ex.choices] == [f" {i}" for i in range(len(ex.choices))]


def first(name, data_root, template=None, file=None):
    """The task's template applied to the first row of its (or the given) file."""
    spec = get_task(name)
    record = spec.loader(data_root / (file or spec.train_file))[0]
    return record.fields, spec.templates[template or spec.default_template](record.fields)


def test_sst2(data_root):
    row, ex = first("sst2", data_root)
    assert row == {"sentence": "when are bears bears and ", "label": "1"}
    assert ex.choices == (("when are bears bears and It was", " terrible"),
                          ("when are bears bears and It was", " great"))
    assert ex.label == 1 and ex.target[1] == " great"


def test_rte_and_its_lmbff_template(data_root):
    row, ex = first("rte", data_root)
    assert row["label"] == "not_entailment" and ex.label == 1
    assert ex.choices[0][0] == ('No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that '
                                '"Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\n')
    assert [c for _, c in ex.choices] == ["Yes", "No"]
    _, ex = first("rte", data_root, template="lmbff")
    assert ex.target == ("No Weapons of Mass Destruction Found in Iraq Yet?",
                         " No, weapons of Mass Destruction Found in Iraq.")


def test_cb(data_root):
    row, ex = first("cb", data_root)
    assert row["label"] == "entailment" and ex.label == 0
    assert [c for _, c in ex.choices] == ["Yes", "No", "Maybe"]
    # the MeZO appendix's CB prompt (zotune used RTE's until issue 9 defect 16)
    assert ex.choices[0][0].startswith("Suppose It was a complex language. Not written down")
    assert ex.choices[0][0].endswith('Can we infer that "the language was peeled down"? Yes, No, or Maybe?\n')


def test_boolq(data_root):
    row, ex = first("boolq", data_root)
    assert row["label"] is False and ex.target[1] == " No"
    assert ex.choices[0][0].startswith("Ghost in the Shell -- ")
    assert ex.choices[0][0].endswith(" is ghost in the shell based on the anime?")


def test_wsc(data_root):
    row, ex = first("wsc", data_root)
    assert row["label"] is False and ex.target[1] == "No"
    assert ex.choices[0][0] == ("Mark told Pete many lies about himself, which Pete included in his book. "
                                "He should have been more skeptical.\nIn the previous sentence, does the pronoun "
                                '"He" refer to Mark? Yes or No?\n')


def test_wic(data_root):
    _, ex = first("wic", data_root)
    assert ex.choices[0][0] == ('Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
                                "Do you want to come over to my place later?\n"
                                "A political system with no place for the less prominent groups.\n")
    assert ex.label == 0


def test_multirc_rows_are_answer_options(data_root):
    row, ex = first("multirc", data_root)
    assert row["answer"] == "Children, Gerd, or Dorian Popa" and row["label"] == 0
    assert ex.choices[0][0].endswith("Question: What did the high-level effort to persuade Pakistan include?\n"
                                     'I found this answer "Children, Gerd, or Dorian Popa". Is that correct? Yes or No?\n')
    assert ex.meta == {"question_id": "0-0", "passage_id": 0}
    assert len(get_task("multirc").loader(data_root / "MultiRC/train.jsonl")) == 27243


def test_copa(data_root):
    _, ex = first("copa", data_root)
    assert ex.choices == (("My body cast a shadow over the grass because", " the sun was rising."),
                          ("My body cast a shadow over the grass because", " the grass was cut."))
    assert ex.label == 0
    data = load_task("copa", data_root=data_root, split=SplitSpec(train=40, dev=0, test=0))
    for ex in data.train:
        assert ex.choices[0][0] == ex.choices[1][0]
        assert ex.choices[0][0].endswith((" so", " because")) and not ex.choices[0][0].endswith(". so")


def test_copa_keeps_I_capitalised(data_root):
    """Issue 9 defect 16: the default template lowercased "I" (" i patched the shirt.")."""
    spec = get_task("copa")
    rows = [r.fields for r in spec.loader(data_root / spec.train_file)]
    ex = spec.templates[spec.default_template](rows[6])
    assert [c for _, c in ex.choices] == [" I patched the shirt.", " I bleached the shirt."]
    for fields in rows:
        for _, choice in spec.templates[spec.default_template](fields).choices:
            assert not choice.startswith((" i ", " i'")), choice
    made_up = {**rows[6], "choice1": "I'm late.", "choice2": "The bus left."}
    assert [c for _, c in spec.templates["zotune"](made_up).choices] == [" I'm late.", " the bus left."]


def test_record_candidates_are_filled_queries(data_root):
    row, ex = first("record", data_root)
    assert len(ex.choices) == len(row["entities"]) and row["entities"][0] == "Hamish Mackay"
    context, gold = ex.target
    assert "@highlight" not in context and "\n- Chelsea come from behind" in context
    assert gold.endswith("the best thing was that Olimpija Ljubljana made it difficult.")
    assert all("@placeholder" not in c for _, c in ex.choices)
    assert ex.label in ex.meta["gold_choices"]


def test_winogrande(data_root):
    row, ex = first("winogrande", data_root)
    before = "Ian volunteered to eat Dennis's menudo after already having a bowl because "
    assert ex.choices == ((before + "Ian", " despised eating intestine."),
                          (before + "Dennis", " despised eating intestine."))
    assert row["answer"] == "2" and ex.label == 1
    assert ex.choices[0][1] == row["sentence"].split("_", 1)[1]


def test_snli_and_mnli_json(data_root):
    row, ex = first("snli", data_root)
    assert row["label"] == "contradiction" and ex.label == 2
    assert ex.target == ("Two people lower themselves into a cave with long ropes?", " No, two people leave a cave")
    assert [c.split(",")[0] for _, c in ex.choices] == [" Yes", " Maybe", " No"]
    _, ex = first("mnli", data_root)
    assert ex.label == 0 and ex.target[1] == " Yes, we are especially sad this year because we lost a lot of people."


@pytest.mark.parametrize("name", ["mnli", "snli"])
def test_nli_infer_template_shares_one_context(name, data_root):
    """CB's prompt for MNLI / SNLI: one context, one-token answers, so one forward row scores all
    three candidates (the LM-BFF template needs three rows, the answer sitting mid-sentence)."""
    row, ex = first(name, data_root, template="infer")
    assert ex.choices[0][0] == (f'Suppose {row["text_a"]} Can we infer that "{row["text_b"]}"? '
                                "Yes, No, or Maybe?\n")
    assert len({c for c, _ in ex.choices}) == 1
    assert [c for _, c in ex.choices] == ["Yes", "Maybe", "No"]  # NLI_LABELS: entailment, neutral, contradiction
    assert ex.target[1] == {"entailment": "Yes", "neutral": "Maybe", "contradiction": "No"}[row["label"]]


@pytest.mark.parametrize("name, dev", [("MNLI", "dev_matched.tsv"), ("SNLI", "dev.tsv")])
def test_lmbff_kshot_files(name, dev, data_root):
    data = load_task(name, data_root=data_root, split=SplitSpec(train=48, dev=0, test=48),
                     train_file=f"{name}/k-shot/16-13/train.tsv", eval_file=f"{name}/k-shot/16-13/{dev}")
    assert data.sizes == {"train": 48, "dev": 0, "test": 48}
    # 16 per class; SNLI rows with extra annotator columns still take the last column as the label
    assert sorted(ex.label for ex in data.train) == [0] * 16 + [1] * 16 + [2] * 16
    if name == "MNLI":
        row, ex = first("mnli", data_root, file="MNLI/k-shot/16-13/train.tsv")
        assert row == {"text_a": "Price caps may sound more attractive with every passing rate case.",
                       "text_b": "Rate cases make price caps sound more attractive.", "label": "entailment"}
        assert ex.target == ("Price caps may sound more attractive with every passing rate case?",
                             " Yes, rate cases make price caps sound more attractive.")


def test_squad(data_root):
    row, ex = first("squad", data_root)
    assert ex.is_generation and ex.answers == ("Saint Bernadette Soubirous",)
    assert ex.prompt.startswith("Title: University of Notre Dame\nContext: Architecturally, the school")
    assert ex.prompt.endswith("\nQuestion: To whom did the Virgin Mary allegedly appear in 1858 in Lourdes France?\nAnswer:")
    assert ex.choices == ((ex.prompt, " Saint Bernadette Soubirous"),) and ex.label == 0
    assert len(get_task("squad").loader(data_root / "SQuAD/train-subset-v1.1.json")) == 3807


def test_drop_contrast_set_answers(data_root):
    row, ex = first("drop", data_root)
    assert ex.prompt.startswith("Passage: Urged by influential Jesuit priests")
    assert ex.prompt.endswith("\nQuestion: How many priests influenced Mem de Sa?\nAnswer:")
    assert ex.answers == ("2",) and ex.target[1] == " 2"
    rows = [r.fields for r in get_task("drop").loader(data_root / "DROP/contrast_set.json")]
    assert len(rows) == 947
    dated = next(r for r in rows if r["question"].startswith("What was the point in time when the Portuguese"))
    assert dated["answers"] == ["1615"]  # date {year: 1615} and the validated number agree
    assert any(", " in a for r in rows for a in r["answers"])  # multi-span answers joined


def test_drop_five_shot_files(data_root):
    data = load_task("drop", data_root=data_root, split=SplitSpec(train=3, dev=1, test=1),
                     train_file="DROP/history_5shot.json")
    assert data.sizes == {"train": 3, "dev": 1, "test": 1}
    _, ex = first("drop", data_root, file="DROP/nfl_5shot.json")
    assert ex.answers == ("Colts",) and ex.prompt.endswith("Question: Which team won the game?\nAnswer:")
