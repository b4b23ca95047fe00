"""trainable.scheme final_norm through the training recipe: every method that takes it trains it,
resume and replay are bit for bit, and the export is a plain model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import load_config
from zotune.methods import METHODS
from zotune.train.loop import build, replay, train

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = [
    "model.name=tiny-llama", "task.name=sst2", "task.train=32", "task.dev=0", "task.test=8",
    f"task.data_root={DATA}", "task.max_length=32", "train.batch_size=4", "optim.lr=1e-2", "optim.eps=1e-2",
    "train.progress=false", "train.tensorboard=false", "train.eval_batch_size=8", "train.eval_at_start=false",
    "trainable.scheme=final_norm",
]
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
    straight, half = tmp_path / "straight", tmp_path / "half"
    train(load_config(None, common + ["train.steps=6", f"train.output_dir={straight}"]))
    train(load_config(None, common + ["train.steps=3", f"train.output_dir={half}"]))
    train(load_config(None, common + ["train.steps=6", f"train.output_dir={half}"]))
    a = load_file(str(straight / "ckpt-last" / "weights.safetensors"))
    b = load_file(str(half / "ckpt-last" / "weights.safetensors"))
    assert a.keys() == b.keys() == {"model.norm.weight"} and all(torch.equal(a[k], b[k]) for k in a)
    assert replay(straight)["bitwise_equal"]
    assert json.loads((straight / "config.json").read_text())["trainable"]["scheme"] == "final_norm"
