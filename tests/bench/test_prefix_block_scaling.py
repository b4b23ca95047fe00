"""benchmarks/prefix_block_scaling.py: SGD, per-block RMS steps, block-shared and per-entry Adam on a prefix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def _table_and_grad(layers=3, tokens=2, width=4):
    table = torch.zeros(tokens, layers * 2 * width)
    grad = torch.randn(tokens, layers, 2, width, generator=torch.Generator().manual_seed(0))
    grad *= torch.tensor([1.0, 10.0, 100.0])[None, :, None, None]  # blocks 100x apart
    return table, grad.reshape(tokens, -1)


def test_sgd_steps_along_the_gradient(benchmark_script):
    pb = benchmark_script("prefix_block_scaling")
    table, grad = _table_and_grad()
    pb.make_rule("sgd", table, 3, 0.5)(grad)
    assert torch.equal(table, -0.5 * grad)


def test_a_block_rms_step_moves_every_block_by_lr_per_entry(benchmark_script):
    """First step: v_hat is the block's mean squared gradient, so each block's step has RMS lr
    whatever its gradient's scale (SGD's would differ 100x between the blocks)."""
    pb = benchmark_script("prefix_block_scaling")
    table, grad = _table_and_grad()
    pb.make_rule("block-rms", table, 3, 0.01)(grad)
    moved = table.view(2, 3, 2, -1).square().mean(dim=(0, 3)).sqrt()
    assert torch.allclose(moved, torch.full((3, 2), 0.01), rtol=1e-5)
    direction = -table.view(2, 3, 2, -1) / grad.view(2, 3, 2, -1)  # same direction as the gradient in a block
    assert (direction > 0).all()


def test_adam_first_step_is_lr_times_the_sign_and_block_adam_shares_v(benchmark_script):
    pb = benchmark_script("prefix_block_scaling")
    table, grad = _table_and_grad()
    pb.make_rule("adam", table, 3, 0.01)(grad)
    assert torch.allclose(table, -0.01 * grad.sign(), atol=1e-6)
    shared, _ = _table_and_grad()
    rule = pb.make_rule("block-adam", shared, 3, 0.01)
    rule(grad)
    assert rule.v.shape == (3, 2)
    moved = shared.view(2, 3, 2, -1).square().mean(dim=(0, 3)).sqrt()
    assert torch.allclose(moved, torch.full((3, 2), 0.01), rtol=1e-4)


def test_an_unknown_rule_or_lr_is_refused(benchmark_script, tmp_path):
    pb = benchmark_script("prefix_block_scaling")
    with pytest.raises(SystemExit, match="unknown rule 'lamb'"):
        pb.main(["--rules", "lamb", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="RULE=LR"):
        pb.main(["--lr", "adam", "--out", str(tmp_path / "x.json")])


def test_runs_on_a_tiny_model_and_resumes(tmp_path, monkeypatch, benchmark_script):
    pb = benchmark_script("prefix_block_scaling")
    monkeypatch.setattr(pb, "BASE", [b for b in pb.BASE if not b.startswith(("model.", "task.train", "task.dev",
                                                                              "task.test", "task.max", "train.batch"))]
                        + ["model.name=tiny-llama", f"task.data_root={DATA}", "task.train=16", "task.dev=4",
                           "task.test=4", "task.max_length=48", "train.batch_size=4", "train.eval_batch_size=4"])
    out = tmp_path / "b.json"
    assert pb.main(["--rules", "sgd,block-rms", "--steps", "2", "--eval-every", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["rule"] for r in data["runs"]] == ["sgd", "block-rms"]
    assert all(len(r["curve"]) == 2 and 0 <= r["best_dev"] <= 1 for r in data["runs"])
    assert "date" in data["meta"]
    calls = []
    monkeypatch.setattr(pb, "run_rule", lambda *a: calls.append(a))
    assert pb.main(["--rules", "sgd", "--steps", "2", "--out", str(out)]) == 0
    assert calls == []  # already measured: kept, not rerun
