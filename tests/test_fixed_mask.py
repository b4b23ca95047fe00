"""FixedMask: perturb (and update) only the entries of fixed masks, e.g. a prefix's values."""

from __future__ import annotations

import pytest
import torch

import zotune
from zotune.estimators import FixedMask, Gaussian
from zotune.estimators.gaussian import draw_leaf
from zotune.params import prefix_value_masks, select_trainable
from zotune.testing import tiny_model


def quadratic(w, a, b):
    return lambda: 0.5 * ((a @ w.view(-1) - b) ** 2).sum()


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)
    return a, b, w


MASK = torch.tensor([[True, False, True], [False, False, True]])


def test_two_steps_equal_mezo_on_the_masked_direction():
    """x <- x - lr ((L(x + eps m z) - L(x - eps m z)) / (2 eps)) m z, z regenerated from the seed."""
    a, b, w0 = problem()
    w = torch.nn.Parameter(w0.clone())
    lr, eps = 0.05, 1e-3
    opt = zotune.ZOOptimizer([("w", w)], FixedMask(Gaussian(), {"w": MASK}), "sgd", lr=lr, eps=eps, seed=3)
    x = w0.clone()
    f = lambda v: float(quadratic(v, a, b)())  # noqa: E731
    for step in range(2):
        opt.step(quadratic(w, a, b))
        mz = draw_leaf(3, step, 0, 0, w0) * MASK
        x = x - lr * (f(x + eps * mz) - f(x - eps * mz)) / (2 * eps) * mz
        assert torch.allclose(w.detach(), x, atol=1e-10, rtol=0), step
    assert torch.equal(w.detach()[~MASK], w0[~MASK])  # entries outside the mask never move
    assert opt.estimator.kept_fraction() == pytest.approx(3 / 6)


def test_the_expected_step_is_the_masked_gradient():
    a, b, w0 = problem(1)
    w = w0.clone().requires_grad_(True)
    quadratic(w, a, b)().backward()
    total, trials = torch.zeros_like(w0), 2000
    for seed in range(trials):
        p = torch.nn.Parameter(w0.clone())
        zotune.ZOOptimizer([("w", p)], FixedMask(Gaussian(), {"w": MASK}), "sgd", lr=1.0, eps=1e-4,
                           seed=seed).step(quadratic(p, a, b))
        total += w0 - p.detach()
    mean = total / trials
    assert torch.equal(mean[~MASK], torch.zeros_like(mean[~MASK]))
    assert torch.allclose(mean[MASK], w.grad[MASK], atol=0.2 * w.grad.abs().max().item())


def test_a_masked_run_learns_a_quadratic_and_keeps_no_buffer():
    a, b, w0 = problem(2)
    w = torch.nn.Parameter(w0.clone())
    opt = zotune.ZOOptimizer([("w", w)], FixedMask(Gaussian(), {"w": MASK}), "sgd", lr=0.02, eps=1e-3, seed=0)
    start = float(quadratic(w, a, b)())
    for _ in range(300):
        opt.step(quadratic(w, a, b))
    assert float(quadratic(w, a, b)()) < 0.7 * start
    assert set(opt.estimator.state_dict()) == {"inner"}  # the masks are rebuilt from the layout, not saved


@pytest.mark.parametrize("masks, message", [
    ({"w": MASK.float()}, "boolean tensor"),
    ({"w": torch.zeros(2, 3, dtype=torch.bool)}, "keeps no entry"),
    ({"w": torch.ones(3, 2, dtype=torch.bool)}, "has shape"),
    ({"v": MASK}, "not trained"),
])
def test_bad_masks_are_refused(masks, message):
    w = torch.nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=message):
        zotune.ZOOptimizer([("w", w)], FixedMask(Gaussian(), masks), "sgd")


def test_low_rank_directions_are_refused():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="needs dense directions"):
        zotune.ZOOptimizer([("w", w)], FixedMask(zotune.make_estimator("lowrank", rank=1),
                                                 {"w": torch.ones(4, 3, dtype=torch.bool)}), "sgd")


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_the_value_mask_covers_exactly_the_prefix_values(arch):
    """peft's prefix table is (tokens, layers * 2 * kv): layer-major, each layer's key then its
    value. Started from real activations, the masked entries are the cache's values, the rest its keys."""
    lm, named = select_trainable(tiny_model(arch, seed=0), "prefix", num_virtual_tokens=3, init_seed=5,
                                 prefix_init="activations")
    (name, table), = named.items()
    (mname, mask), = prefix_value_masks(lm, named).items()
    assert mname == name and mask.shape == table.shape and mask.float().mean() == 0.5
    g = torch.Generator().manual_seed(5)
    base = lm.model.get_base_model()
    ids = torch.randint(0, base.get_input_embeddings().weight.shape[0], (1, 3), generator=g)
    with torch.no_grad():
        cache = base(input_ids=ids, use_cache=True).past_key_values
    values = torch.cat([layer.values[0].permute(1, 0, 2).reshape(3, -1) for layer in cache.layers], dim=1)
    keys = torch.cat([layer.keys[0].permute(1, 0, 2).reshape(3, -1) for layer in cache.layers], dim=1)
    torch.testing.assert_close(table.detach()[mask].view(3, -1), values)
    torch.testing.assert_close(table.detach()[~mask].view(3, -1), keys)


def test_value_masks_need_a_prefix():
    lm, named = select_trainable(tiny_model("llama"), "lora")
    with pytest.raises(ValueError, match="causal LM's prefix"):
        prefix_value_masks(lm, named)


@pytest.mark.parametrize("method, message", [("lozo", "fixed perturbation masks does not combine with lozo"),
                                             ("fo-adam", "for ZO methods")])
def test_build_optimizer_refuses_masks_a_method_cannot_take(method, message):
    from zotune.config import load_config
    from zotune.methods import build_optimizer

    w = torch.nn.Parameter(torch.zeros(2, 3))
    o = load_config(None, [f"optim.method={method}", "optim.lr=1e-3"]).optim
    with pytest.raises(ValueError, match=message):
        build_optimizer(o, {"w": w}, masks={"w": MASK})
