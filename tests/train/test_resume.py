"""Resume equivalence: a run stopped mid-way and resumed from its last checkpoint ends with the
weights of an uninterrupted run, bit for bit, for every lr schedule and optimizer family.

The runs are in-process: a crash is an exception raised by the optimizer's ``step`` (the weights
and the checkpoint on disk are then what a ``kill -9`` at that moment leaves); the one
``kill -9`` of a real process is in ``test_loop.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import load_config
from zotune.testing import Crash, crash_at_step
from zotune.train.loop import build, load_data, train

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

STEPS, SAVE_EVERY, CRASH_AT = 6, 2, 3  # the crash loses step 2 (saved at 2 done), redone on resume
TINY = [
    "model.name=tiny-llama", "task.name=sst2", "task.train=48", "task.dev=0", "task.test=0",
    f"task.data_root={DATA}", "task.max_length=48", "train.batch_size=4", "optim.lr=3e-4",
    "train.progress=false", "train.tensorboard=false", "train.eval_at_start=false",
    f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}",
]
METHODS = {
    "mezo": [],
    "lozo-m": ["optim.method=lozo", "optim.momentum=0.9", "optim.interval=3"],  # V resampled at 0, 3
    "zo-adam": ["optim.method=zo-adam"],
    "hybrid": ["trainable.zo_layers=1", "optim.fo_lr=1e-2"],
}
SCHEDULES = {
    "warmup": ["optim.schedule=constant", "optim.warmup_steps=3"],  # the crash falls inside warmup
    "linear": ["optim.schedule=linear", "optim.warmup_steps=1"],
    "cosine": ["optim.schedule=cosine"],
}


@pytest.fixture(scope="module")
def data():
    return load_data(load_config(None, TINY))


def _run(overrides, data, crash_at=None):
    cfg = load_config(None, overrides)
    setup = build(cfg, data=data)
    if crash_at is not None:
        crash_at_step(setup.optimizer, crash_at)
    return train(cfg, setup=setup)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("method", METHODS)
def test_resume_after_a_crash_equals_an_uninterrupted_run_bit_for_bit(tmp_path, data, method, schedule):
    common = TINY + METHODS[method] + SCHEDULES[schedule]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(common + [f"train.output_dir={straight}"], data)
    with pytest.raises(Crash):
        _run(common + [f"train.output_dir={crashed}"], data, crash_at=CRASH_AT)
    resumed = _run(common + [f"train.output_dir={crashed}"], data)
    a = load_file(str(straight / "ckpt-last" / "weights.safetensors"))
    b = load_file(str(crashed / "ckpt-last" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["start_step"] == SAVE_EVERY
