"""benchmarks/base_zero_shot.py: an adapter run's zero-shot rows re-measured on the base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zotune.config import load_config
from zotune.train.loop import train

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")
TINY = [
    "model.name=tiny-llama", "task.name=sst2", "task.train=16", "task.dev=0", "task.test=16",
    f"task.data_root={DATA}", "task.max_length=48", "train.batch_size=4", "optim.lr=1e-9", "train.steps=1",
    "train.save_every=1", "train.progress=false", "train.tensorboard=false", "train.eval_batch_size=16",
]


def test_older_prefix_runs_get_the_base_models_rows_and_keep_theirs(tmp_path, benchmark_script):
    script = benchmark_script("base_zero_shot")
    full, prefix = tmp_path / "full", tmp_path / "prefix"
    train(load_config(None, TINY + [f"train.output_dir={full}"]))
    train(load_config(None, TINY + ["trainable.scheme=prefix", f"train.output_dir={prefix}"]))
    rows_path = prefix / "test_rows.json"
    rows = json.loads(rows_path.read_text())
    through_prefix = [1.0 - x for x in rows["zero_shot"]]  # as an older run measured them: other rows
    rows_path.write_text(json.dumps({**rows, "zero_shot": through_prefix}))
    assert script.main([str(prefix), str(full)]) == 0
    rows = json.loads(rows_path.read_text())
    assert rows["zero_shot"] == json.loads((full / "test_rows.json").read_text())["zero_shot"]
    assert rows["zero_shot_through_adapters"] == through_prefix
    assert script.remeasure(prefix) is None and script.remeasure(full) is None  # done once; full runs skipped
