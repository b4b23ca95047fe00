"""The ``mezo`` template of every task MeZO has renders one real row exactly as MeZO's code
(``large_models/templates.py``, ``tasks.py``) would: context and every candidate pinned.

Issue 9 defect 16: zotune's templates were called "mezo" but differed from MeZO's code
(BoolQ's capitalised question, WSC's lowercased pronoun, COPA's "I", ReCoRD's "- ", SQuAD's
title, WinoGrande's option placement); CB used RTE's prompt.
"""

import pytest

from zotune.tasks import get_task, load_task, SplitSpec
from zotune.tasks.definitions import template_scoring

MEZO_TASKS = ["SST-2", "RTE", "CB", "BoolQ", "WSC", "WiC", "MultiRC", "COPA", "ReCoRD", "SQuAD", "DROP", "WinoGrande"]


def row(name, data_root, index=0):
    spec = get_task(name)
    return spec.loader(data_root / spec.train_file)[index].fields


def mezo(name, fields):
    return get_task(name).templates["mezo"](fields)


def test_every_mezo_task_has_a_mezo_template_scored_by_the_mean():
    for name in MEZO_TASKS:
        spec = get_task(name)
        assert template_scoring(spec.templates["mezo"]) == "mean", name
        assert template_scoring(spec.templates[spec.default_template]) == "sum", name
    assert "mezo" not in get_task("snli").templates  # MeZO's code has no SNLI / MNLI


def test_selectable_with_task_template(data_root):
    data = load_task("boolq", data_root=data_root, split=SplitSpec(train=2, dev=0, test=0), template="mezo")
    assert data.template == "mezo" and data.train[0].choices[0][0].endswith("?\n")


def test_sst2(data_root):
    ex = mezo("sst2", row("sst2", data_root))
    context = "when are bears bears and It was"
    assert ex.choices == ((context, " terrible"), (context, " great"))
    assert ex.label == 1


def test_rte(data_root):
    ex = mezo("rte", row("rte", data_root))
    context = ('No Weapons of Mass Destruction Found in Iraq Yet.\nDoes this mean that '
               '"Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\n')
    assert ex.choices == ((context, "Yes"), (context, "No")) and ex.label == 1


def test_cb(data_root):
    fields = row("cb", data_root)
    ex = mezo("cb", fields)
    context = (f"Suppose {fields['premise']} Can we infer that \"the language was peeled down\"? "
               "Yes, No, or Maybe?\n")
    assert fields["premise"].endswith("One might say it was peeled down.")
    assert ex.choices == ((context, "Yes"), (context, "No"), (context, "Maybe")) and ex.label == 0
    assert get_task("cb").templates["zotune"](fields).choices == ex.choices  # the appendix's prompt too


def test_boolq_capitalises_the_question_and_answers_on_a_new_line(data_root):
    fields = row("boolq", data_root)
    assert fields["question"] == "is ghost in the shell based on the anime"
    ex = mezo("boolq", fields)
    context = fields["passage"] + " Is ghost in the shell based on the anime?\n"
    assert fields["passage"].startswith("Ghost in the Shell -- ")
    assert ex.choices == ((context, "No"), (context, "Yes")) and ex.label == 0


def test_wsc_lowercases_the_pronoun(data_root):
    ex = mezo("wsc", row("wsc", data_root))
    context = ("Mark told Pete many lies about himself, which Pete included in his book. He should have been "
               'more skeptical.\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n')
    assert ex.choices == ((context, "No"), (context, "Yes")) and ex.label == 0


def test_wic(data_root):
    ex = mezo("wic", row("wic", data_root))
    context = ('Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
               "Do you want to come over to my place later?\n"
               "A political system with no place for the less prominent groups.\n")
    assert ex.choices == ((context, "No"), (context, "Yes")) and ex.label == 0


def test_multirc(data_root):
    fields = row("multirc", data_root)
    ex = mezo("multirc", fields)
    context = (fields["paragraph"] + "\nQuestion: What did the high-level effort to persuade Pakistan include?\n"
               'I found this answer "Children, Gerd, or Dorian Popa". Is that correct? Yes or No?\n')
    assert ex.choices == ((context, "No"), (context, "Yes")) and ex.label == 0
    assert ex.meta == {"question_id": "0-0", "passage_id": 0}


def test_copa_keeps_I_and_lowercases_the_first_word(data_root):
    fields = row("copa", data_root, 6)
    assert (fields["choice1"], fields["choice2"]) == ("I patched the shirt.", "I bleached the shirt.")
    ex = mezo("copa", fields)
    context = "The stain came out of the shirt because"
    assert ex.choices == ((context, " I patched the shirt."), (context, " I bleached the shirt.")) and ex.label == 1
    ex = mezo("copa", row("copa", data_root, 0))
    context = "My body cast a shadow over the grass because"
    assert ex.choices == ((context, " the sun was rising."), (context, " the grass was cut."))
    # MeZO lowercases the whole first word unless it is exactly "I"
    made_up = {**fields, "choice1": "NASA launched it.", "choice2": "I'm late."}
    assert [c for _, c in mezo("copa", made_up).choices] == [" nasa launched it.", " i'm late."]


def test_record_bullets_the_query(data_root):
    fields = row("record", data_root)
    ex = mezo("record", fields)
    context = fields["passage"].replace("@highlight\n", "- ") + "\n-"
    assert context.endswith("\n- Fernando Torres missed a clear cut chance to make it 3-1\n-")
    assert len(ex.choices) == len(fields["entities"]) == len(set(fields["entities"]))
    assert ex.choices[0] == (context, " " + fields["query"].replace("@placeholder", "Hamish Mackay"))
    assert ex.target[1].startswith(" Speaking after the game, Mourinho said: 'The important thing is")
    assert ex.target[1].endswith("the best thing was that Olimpija Ljubljana made it difficult.")
    assert ex.meta["gold_choices"] == (fields["entities"].index("Olimpija Ljubljana"),)


def test_squad_keeps_the_title_and_ends_the_target_with_a_newline(data_root):
    fields = row("squad", data_root)
    ex = mezo("squad", fields)
    prompt = ("Title: University_of_Notre_Dame\nContext: " + fields["context"] +
              "\nQuestion: To whom did the Virgin Mary allegedly appear in 1858 in Lourdes France?\nAnswer:")
    assert fields["context"].startswith("Architecturally, the school has a Catholic character.")
    assert ex.prompt == prompt and ex.answers == ("Saint Bernadette Soubirous",)
    assert ex.choices == ((prompt, " Saint Bernadette Soubirous\n"),)


def test_drop(data_root):
    spec = get_task("drop")
    fields = spec.loader(data_root / spec.train_file)[0].fields
    ex = mezo("drop", fields)
    prompt = "Passage: " + fields["passage"] + "\nQuestion: How many priests influenced Mem de Sa?\nAnswer:"
    assert fields["passage"].startswith("Urged by influential Jesuit priests")
    assert ex.prompt == prompt and ex.choices == ((prompt, " 2\n"),) and ex.answers == ("2",)


def test_winogrande_scores_the_option_with_the_rest(data_root):
    ex = mezo("winogrande", row("winogrande", data_root))
    context = "Ian volunteered to eat Dennis's menudo after already having a bowl because "
    assert ex.choices == ((context, "Ian despised eating intestine."), (context, "Dennis despised eating intestine."))
    assert ex.label == 1


@pytest.mark.parametrize("name", MEZO_TASKS)
def test_mezo_templates_render_every_small_split(name, data_root):
    data = load_task(name, data_root=data_root, split=SplitSpec(train=8, dev=0, test=4), template="mezo")
    assert data.template == "mezo" and len(data.train) >= 8
