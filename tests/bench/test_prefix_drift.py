"""benchmarks/prefix_drift.py: a MeZO run's distance from its start against the random walk of its steps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_the_walk_adds_squared_step_lengths(benchmark_script):
    pd = benchmark_script("prefix_drift")
    steps = [{"step": 0, "coeffs": [2.0], "lrs": [0.1]}, {"step": 1, "coeffs": [-1.0], "lrs": [0.1], "skipped": True},
             {"step": 2, "coeffs": [1.0], "lrs": [0.05]}]
    walk = pd.walk_distances(steps, d=100)
    assert walk == pytest.approx([math.sqrt(4.0), math.sqrt(4.0), math.sqrt(4.0 + 0.25)])  # (lr c)^2 d
    with pytest.raises(ValueError, match="one-query"):
        pd.walk_distances([{"step": 0, "coeffs": [1.0, 2.0], "lrs": [0.1]}], d=10)


def _run(tmp_path, lr, steps, seed=3):
    from zotune.config import load_config
    from zotune.train.loop import train

    out = tmp_path / f"run-{lr}"
    cfg = load_config(None, [
        "model.name=tiny-llama", "task.name=sst2", f"task.data_root={DATA}", "task.train=32", "task.dev=4",
        "task.test=4", "task.max_length=48", "train.batch_size=4", "trainable.scheme=prefix", "optim.method=mezo",
        f"optim.lr={lr}", "optim.eps=1e-2", f"optim.seed={seed}", f"train.steps={steps}", "train.eval_every=2",
        f"train.save_every={steps}", "train.progress=false", "train.tensorboard=false", "train.eval_at_start=false",
        f"train.output_dir={out}"])
    train(cfg)
    return out


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")
def test_the_rebuilt_start_is_the_runs_and_the_distance_follows_the_walk(tmp_path, benchmark_script):
    pd = benchmark_script("prefix_drift")
    # a run that barely moves: the rebuilt start is its start, up to the float32 rounding that perturbing
    # and restoring leaves (~1e-7 an entry; another start would be ~start_norm away)
    still = pd.measure(_run(tmp_path, 1e-12, 2))
    assert all(c["distance"] < 1e-5 * still["start_norm"] for c in still["checkpoints"])
    moved = pd.measure(_run(tmp_path, 0.5, 12))
    last = next(c for c in moved["checkpoints"] if c["checkpoint"] == "ckpt-last")
    assert last["step"] == 12 and last["distance"] > 0
    # independent Gaussian steps: the distance is the walk's up to ||z||^2 / d and cross terms, ~1/sqrt(d)
    assert last["distance"] == pytest.approx(last["random_walk"], rel=0.15)
    out = tmp_path / "drift.json"
    assert pd.main([str(tmp_path / "run-0.5"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["entries"] == moved["entries"]


def test_other_methods_are_refused(tmp_path, benchmark_script):
    pd = benchmark_script("prefix_drift")
    (tmp_path / "config.json").write_text(json.dumps({"optim": {"method": "fzoo"}}))
    with pytest.raises(ValueError, match="fzoo"):
        pd.measure(tmp_path)
