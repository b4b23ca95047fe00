"""FZOO, HiZOO, Sparse-MeZO and per-example MeZO through the training recipe: every trainable scheme, resume, replay."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import load_config
from zotune.train.loop import build, replay, train

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = [
    "model.name=tiny-llama", "task.name=sst2", "task.train=32", "task.dev=0", "task.test=8",
    f"task.data_root={DATA}", "task.max_length=32", "train.batch_size=4", "optim.lr=3e-4",
    "train.progress=false", "train.tensorboard=false", "train.eval_batch_size=8", "train.eval_at_start=false",
]
METHODS = ["fzoo", "hizoo", "sparse-mezo", "per-example"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scheme", ["full", "norms", "lora", "prefix", "prompt"])
def test_new_methods_train_every_scheme(tmp_path, method, scheme):
    extra = [] if scheme in ("full", "lora") else ["optim.lr=1e-2", "optim.eps=1e-1"]
    if method == "fzoo":
        extra.append("optim.queries=2")  # the test's budget; the default is 8
    cfg = load_config(None, TINY + [f"optim.method={method}", f"trainable.scheme={scheme}", "train.steps=2",
                                    "train.save_every=2", f"train.output_dir={tmp_path / 'run'}"] + extra)
    setup = build(cfg)
    before = {n: p.detach().clone() for n, p in setup.named.items()}
    train(cfg, setup=setup)
    moved = [n for n, p in setup.named.items() if not torch.equal(p.detach(), before[n])]
    assert moved, "no trainable tensor changed"
    assert set(load_file(str(tmp_path / "run" / "ckpt-last" / "weights.safetensors"))) == set(setup.named)


@pytest.mark.parametrize("method", METHODS)
def test_new_methods_resume_and_replay_bit_for_bit(tmp_path, method):
    extra = [f"optim.method={method}"] + (["optim.queries=2"] if method == "fzoo" else [])
    if method == "hizoo":
        extra.append("optim.hessian_smooth=0.01")  # H moves, so its checkpoint matters
    straight = tmp_path / "straight"
    train(load_config(None, TINY + extra + ["train.steps=6", "train.save_every=3", "task.test=0",
                                            f"train.output_dir={straight}"]))
    half = tmp_path / "half"
    train(load_config(None, TINY + extra + ["train.steps=3", "train.save_every=3", "task.test=0",
                                            f"train.output_dir={half}"]))
    cfg6 = load_config(None, TINY + extra + ["train.steps=6", "train.save_every=3", "task.test=0",
                                             f"train.output_dir={half}"])
    train(cfg6)  # resumes from step 3
    a = load_file(str(straight / "ckpt-last" / "weights.safetensors"))
    b = load_file(str(half / "ckpt-last" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = replay(straight)
    assert report["bitwise_equal"], report
