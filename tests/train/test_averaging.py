"""train.average_decay: an exponential average of the trained tensors, evaluated in their place."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import ConfigError, load_config
from zotune.testing import Crash, crash_at_step
from zotune.train.averaging import IterateAverage
from zotune.train.checkpoint import load_checkpoint
from zotune.train.loop import build, load_data, train

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def test_the_average_is_the_exponential_sum_of_the_iterates():
    theta = torch.tensor([1.0, -2.0, 4.0])
    avg = IterateAverage({"w": theta}, decay=0.75)
    seen = [theta.clone()]
    for k in range(5):
        theta.add_(torch.tensor([0.5, 1.0 * k, -3.0]))
        avg.update()
        seen.append(theta.clone())
    # a_k = d^k theta_0 + sum_{j=1..k} (1 - d) d^(k-j) theta_j
    d, k = 0.75, 5
    want = d ** k * seen[0] + sum((1 - d) * d ** (k - j) * seen[j] for j in range(1, k + 1))
    assert torch.allclose(avg.average["w"], want, atol=1e-6)
    assert avg.updates == 5


def test_swapped_shows_the_average_and_gives_the_weights_back_bit_for_bit():
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    b = torch.randn(3, generator=torch.Generator().manual_seed(1))
    avg = IterateAverage({"w": w, "b": b}, decay=0.5)
    w.mul_(3.0)
    b.add_(1.0)
    avg.update()
    before = {"w": w.clone(), "b": b.clone()}
    inside = {}
    with avg.swapped():
        inside = {"w": w.clone(), "b": b.clone()}
    assert torch.equal(inside["w"], avg.average["w"]) and torch.equal(inside["b"], avg.average["b"])
    assert torch.equal(w, before["w"]) and torch.equal(b, before["b"])
    with pytest.raises(RuntimeError), avg.swapped():  # an error inside still gives the weights back
        raise RuntimeError
    assert torch.equal(w, before["w"])
    avg.apply()
    assert torch.equal(w, avg.average["w"])


def test_state_round_trip_and_refusals():
    w = torch.ones(3)
    avg = IterateAverage({"w": w}, decay=0.9)
    w.mul_(2.0)
    avg.update()
    other = IterateAverage({"w": torch.zeros(3)}, decay=0.9)
    other.load_state_dict(avg.state_dict())
    assert torch.equal(other.average["w"], avg.average["w"]) and other.updates == 1
    with pytest.raises(ValueError, match="decay"):
        IterateAverage({"w": w}, decay=0.5).load_state_dict(avg.state_dict())
    with pytest.raises(ValueError, match="holds"):
        IterateAverage({"v": w}, decay=0.9).load_state_dict(avg.state_dict())
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            IterateAverage({"w": w}, decay=bad)


def test_on_a_noisy_quadratic_the_average_jitters_as_predicted():
    """SGD with noisy gradients on f(x) = ||x||^2 / 2 is an AR(1) process x_k = rho x_(k-1) + noise,
    rho = 1 - lr, around the minimum. Its exponential average with decay d has, once settled, the
    variance of x times (1 - d)(1 + rho d) / ((1 + d)(1 - rho d)): 0.33 here, so the average's loss is a
    third of the weights'."""
    gen = torch.Generator().manual_seed(0)
    lr, d = 0.1, 0.95
    x = torch.full((4000,), 5.0)
    avg = IterateAverage({"x": x}, decay=d)
    raw, averaged = [], []
    for k in range(800):
        x.sub_(lr * (x + torch.randn(x.shape, generator=gen)))
        avg.update()
        if k >= 400:
            raw.append(float(x.square().mean()))
            averaged.append(float(avg.average["x"].square().mean()))
    rho = 1 - lr
    predicted = (1 - d) * (1 + rho * d) / ((1 + d) * (1 - rho * d))
    assert sum(averaged) / sum(raw) == pytest.approx(predicted, rel=0.1)


TINY = ["model.name=tiny-llama", "task.name=sst2", "task.train=32", "task.dev=0", "task.test=8",
        f"task.data_root={DATA}", "task.max_length=48", "train.batch_size=4", "optim.lr=3e-3", "optim.eps=1e-2",
        "trainable.scheme=prefix", "train.progress=false", "train.tensorboard=false", "train.eval_at_start=false",
        "train.steps=6", "train.save_every=2"]


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")
def test_a_run_steps_the_weights_as_without_it_and_tests_the_average(tmp_path):
    data = load_data(load_config(None, TINY))
    plain_cfg = load_config(None, TINY + [f"train.output_dir={tmp_path / 'plain'}"])
    plain = build(plain_cfg, data=data)
    iterates, real = [], plain.optimizer.step

    def step(closure):
        loss = real(closure)
        iterates.append({k: p.detach().clone() for k, p in plain.named.items()})
        return loss

    plain.optimizer.step = step
    start = {k: p.detach().clone() for k, p in plain.named.items()}
    train(plain_cfg, setup=plain)

    avg_cfg = load_config(None, TINY + ["train.average_decay=0.6", f"train.output_dir={tmp_path / 'avg'}"])
    averaged = build(avg_cfg, data=data)
    result = train(avg_cfg, setup=averaged)
    # the weights themselves follow the same trajectory, bit for bit
    a = load_file(str(tmp_path / "plain" / "ckpt-last" / "weights.safetensors"))
    b = load_file(str(tmp_path / "avg" / "ckpt-last" / "weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # what was tested (left in the model) is the average of the iterates
    for k, p in averaged.named.items():
        want = start[k].clone()
        for it in iterates:
            want.mul_(0.6).add_(it[k], alpha=0.4)
        assert torch.allclose(p.detach(), want, atol=1e-6), k
        assert not torch.equal(p.detach(), b[k])
    assert result["test"]
    _, state, _ = load_checkpoint(tmp_path / "avg" / "ckpt-last")
    assert state["average"]["updates"] == 6 and state["average"]["decay"] == 0.6


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")
def test_resume_restores_the_average_bit_for_bit(tmp_path):
    over = TINY + ["train.average_decay=0.8", "task.dev=8", "train.eval_every=2"]
    data = load_data(load_config(None, over))

    def run(out, crash_at=None):
        cfg = load_config(None, over + [f"train.output_dir={out}"])
        setup = build(cfg, data=data)
        if crash_at is not None:
            crash_at_step(setup.optimizer, crash_at)
        return train(cfg, setup=setup)

    straight = run(tmp_path / "straight")
    with pytest.raises(Crash):
        run(tmp_path / "crashed", crash_at=3)
    resumed = run(tmp_path / "crashed")
    assert resumed["start_step"] == 2
    for ckpt in ("ckpt-last", "ckpt-best"):
        a, sa, _ = load_checkpoint(tmp_path / "straight" / ckpt)
        b, sb, _ = load_checkpoint(tmp_path / "crashed" / ckpt)
        assert all(torch.equal(a[k], b[k]) for k in a), ckpt
        if sa is not None:
            assert all(torch.equal(sa["average"]["average"][k], sb["average"]["average"][k]) for k in a)
    assert resumed["test"] == straight["test"] and resumed["best_dev"] == straight["best_dev"]


def test_config_checks_and_fingerprint():
    assert load_config(None, ["train.average_decay=0"]).fingerprint() == load_config(None, []).fingerprint()
    assert load_config(None, ["train.average_decay=0.9"]).fingerprint() != load_config(None, []).fingerprint()
    for bad in ("1.0", "-0.1", "true"):
        with pytest.raises(ConfigError, match=r"train.average_decay must be in \[0, 1\)"):
            load_config(None, [f"train.average_decay={bad}"])
    with pytest.raises(ConfigError, match="train.average_decay keeps a copy"):
        load_config(None, ["train.average_decay=0.9", "model.offload=mmap"])
