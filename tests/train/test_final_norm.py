"""trainable.scheme final_norm through the training recipe: every method that takes it trains it,
resume and replay are bit for bit, and the export is a plain model folder."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import load_config
from zotune.methods import METHODS
from zotune.train.loop import build, replay, train

from tiny_runs import DATA, straight_and_resumed, tiny_sst2  # tests/ is on the path (its conftest)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = tiny_sst2("final_norm", dev=0, test=8, lr=1e-2)
TAKING = sorted(name for name, m in METHODS.items() if "final_norm" in m.schemes)


def test_every_method_but_those_that_need_matrices_takes_the_final_norm():
    assert {"mezo", "fzoo", "zo-adam", "fo-adam", "fo-sgd"} <= set(TAKING)


@pytest.mark.parametrize("method", TAKING)
def test_every_method_that_takes_it_trains_the_final_norm_alone(tmp_path, method):
    extra = ["optim.queries=2"] if method == "fzoo" else []
    cfg = load_config(None, TINY + [f"optim.method={method}", "train.steps=2", "train.save_every=2",
                                    f"train.output_dir={tmp_path / 'run'}"] + extra)
    setup = build(cfg)
    assert set(setup.named) == {"model.norm.weight"}
    frozen = {n: p.detach().clone() for n, p in setup.model.named_parameters() if n not in setup.named}
    before = setup.named["model.norm.weight"].detach().clone()
    train(cfg, setup=setup)
    assert not torch.equal(setup.named["model.norm.weight"].detach(), before)
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in setup.model.named_parameters() if n in frozen)
    assert set(load_file(str(tmp_path / "run" / "ckpt-last" / "weights.safetensors"))) == {"model.norm.weight"}


def test_a_final_norm_run_resumes_and_replays_bit_for_bit(tmp_path):
    common = TINY + ["optim.method=mezo", "train.save_every=3", "task.test=0"]
    a, b, straight = straight_and_resumed(common, tmp_path)
    assert a.keys() == b.keys() == {"model.norm.weight"} and all(torch.equal(a[k], b[k]) for k in a)
    assert replay(straight)["bitwise_equal"]
    assert json.loads((straight / "config.json").read_text())["trainable"]["scheme"] == "final_norm"
