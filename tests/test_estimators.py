"""Statistical and mechanical checks of the estimators on small analytic problems."""

import pytest
import torch

import zotune
from zotune.estimators import (
    Blockwise,
    Direction,
    Gaussian,
    LowRankEstimator,
    Sparse,
    layer_block_key,
    make_estimator,
)


def quadratic(seed=0, d=6):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    h = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    a = torch.randn(d, generator=g, dtype=torch.float64)
    return h, a


def sample_estimates(make_opt, x0, loss_of, n):
    """Draw n independent estimates g at x0 by taking lr=1 steps and resetting x to x0."""
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    opt = make_opt(params)
    out = []
    for _ in range(n):
        opt.step(lambda: loss_of(params))
        out.append([x - p.detach().clone() for x, p in zip(x0, params)])
        with torch.no_grad():
            for p, x in zip(params, x0):
                p.copy_(x)
    return out


def test_gaussian_mean_approaches_true_gradient_and_variance_falls_with_q():
    h, a = quadratic()
    x0 = [torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))]
    true = h @ x0[0] + a

    def loss_of(ps):
        x = ps[0]
        return 0.5 * x @ h @ x + a @ x

    errs = {}
    for q in (1, 8):
        est = sample_estimates(lambda ps: zotune.MeZO(ps, lr=1.0, eps=1e-4, queries=q, seed=q), x0, loss_of, 3000)
        g = torch.stack([e[0] for e in est])
        rel = (g.mean(0) - true).norm() / true.norm()
        assert rel < (0.12 if q == 1 else 0.05), (q, rel)
        errs[q] = ((g - true) ** 2).sum(1).mean()
    # variance of the RGE is O(d / q): eight queries cut it about eightfold
    assert 5.0 < errs[1] / errs[8] < 12.0


def test_rademacher_directions_are_signs_and_unbiased():
    x0 = [torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)]
    target = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)

    def loss_of(ps):
        return ((ps[0] - target) ** 2).sum()

    true = 2 * (x0[0] - target)
    make = lambda ps: zotune.ZOOptimizer(ps, estimator="rademacher", lr=1.0, eps=1e-4)  # noqa: E731
    g = torch.stack([e[0] for e in sample_estimates(make, x0, loss_of, 2000)])
    assert (g.mean(0) - true).norm() / true.norm() < 0.1
    est = make_estimator("rademacher")
    est.bind(["x"], [torch.zeros(100)], 0)
    z = est.leaf_direction(Direction(0, 0), 0, torch.zeros(100)).z
    assert set(z.tolist()) == {-1.0, 1.0}


def test_lowrank_estimate_has_rank_at_most_r_and_is_unbiased():
    g0 = torch.Generator().manual_seed(3)
    target = torch.randn(8, 6, generator=g0, dtype=torch.float64)
    x0 = [torch.zeros(8, 6, dtype=torch.float64)]

    def loss_of(ps):
        return ((ps[0] - target) ** 2).sum() / 2

    make = lambda ps: zotune.LOZO(ps, lr=1.0, eps=1e-4, rank=2, interval=1)  # noqa: E731
    est = sample_estimates(make, x0, loss_of, 4000)
    for e in est[:20]:
        assert torch.linalg.matrix_rank(e[0]) <= 2
    mean = torch.stack([e[0] for e in est]).mean(0)
    true = x0[0] - target
    assert (mean - true).norm() / true.norm() < 0.15


def test_lowrank_v_changes_exactly_every_interval():
    p = torch.zeros(7, 5)
    est = LowRankEstimator(rank=3, interval=4)
    est.bind(["w"], [p], run_seed=0)
    vs = [est.leaf_direction(Direction(t, 0), 0, p).v for t in range(12)]
    us = [est.leaf_direction(Direction(t, 0), 0, p).u for t in range(12)]
    for t in range(1, 12):
        same = torch.equal(vs[t], vs[t - 1])
        assert same == (t % 4 != 0), t
        assert not torch.equal(us[t], us[t - 1])
    assert vs[0].shape == (5, 3) and us[0].shape == (7, 3)
    # vectors fall back to dense gaussian directions
    est.bind(["b"], [torch.zeros(5)], 0)
    assert est.leaf_direction(Direction(0, 0), 0, torch.zeros(5)).z.shape == (5,)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lozo_update_uses_the_measured_direction_on_every_step(momentum):
    """For a linear loss <A, X> the two-point difference is exact: c = <A, U V^T>. The update of
    LOZO must be -lr c U V^T / r with that same U and V, on resample steps too."""
    a = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = torch.nn.Parameter(torch.zeros(6, 5, dtype=torch.float64))
    opt = zotune.LOZO([("x", x)], lr=0.01, eps=1e-3, rank=2, interval=3, momentum=momentum)
    est = opt.estimator
    n_state = torch.zeros(6, 2, dtype=torch.float64)
    for t in range(10):
        before = x.detach().clone()
        opt.step(lambda: (a * x).sum())
        d = est.leaf_direction(Direction(t, 0), 0, x)
        uvt = d.u @ d.v.T
        c = opt.last_record["coeffs"][0]
        assert c == pytest.approx(float((a * uvt).sum()), rel=1e-6)
        delta = x.detach() - before
        if momentum == 0:
            assert torch.allclose(delta, -0.01 * c * uvt / 2, atol=1e-12)
        else:
            if t % 3 == 0 and t > 0:
                v_old = est.v(0, t // 3 - 1, x)
                n_state = n_state @ (v_old.T @ d.v) / 5
            n_state = momentum * n_state + (1 - momentum) * c * d.u / 2
            assert torch.allclose(delta, -0.01 * n_state @ d.v.T, atol=1e-12)


def test_perturb_then_restore_leaves_float32_weights_unchanged():
    torch.manual_seed(0)
    params = [torch.randn(64, 32), torch.randn(32), torch.randn(16, 64)]
    original = [p.clone() for p in params]
    for est in (Gaussian(), LowRankEstimator(rank=4), Blockwise(), Sparse(Gaussian(), 0.3)):
        for p, o in zip(params, original):
            p.copy_(o)
        est.bind(["l0.w", "l0.b", "l1.w"], params, run_seed=5)
        for d in est.directions(3):
            est.perturb_(params, d, 1e-3)
            est.perturb_(params, d, -2e-3)
            est.perturb_(params, d, 1e-3)
        for p, o in zip(params, original):
            # three roundings of about half an ulp each: a few ulps at most, never drift
            ulp = torch.finfo(torch.float32).eps * o.abs().clamp_min(1e-3)
            assert ((p - o).abs() <= 4 * ulp).all(), type(est).__name__


def test_blockwise_one_query_per_block_perturbs_only_that_block():
    names = ["model.embed.weight", "model.layers.0.w", "model.layers.0.b", "model.layers.1.w", "head.weight"]
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in names]
    seen = []

    def loss():
        seen.append(tuple(bool(p.abs().max() > 1e-5) for p in params))
        return sum((p - 1).pow(2).sum() for p in params)

    opt = zotune.ZOOptimizer(list(zip(names, params)), estimator="blockwise", lr=0.1)
    assert opt.estimator.block_names == ["model.embed", "model.layers.0", "model.layers.1", "head"]
    opt.step(loss)
    assert opt.forward_passes == 8 == opt.forward_passes_per_step
    expected = [(1, 0, 0, 0, 0), (0, 1, 1, 0, 0), (0, 0, 0, 1, 0), (0, 0, 0, 0, 1)]
    assert [tuple(map(int, s)) for s in seen[::2]] == expected
    assert all(p.abs().sum() > 0 for p in params)  # every block updated in one step
    assert layer_block_key("transformer.h.11.attn.c_attn.weight") == "transformer.h.11"


def test_sparse_keep_ratios_follow_weight_magnitudes_and_masks_regenerate():
    big = torch.full((1000,), 5.0) + torch.rand(1000, generator=torch.Generator().manual_seed(0))
    small = torch.rand(1000, generator=torch.Generator().manual_seed(1)) * 0.1
    est = Sparse(Gaussian(), sparsity=0.5)
    est.bind(["big", "small"], [big, small], run_seed=0)
    assert est.keep[0] > 0.95 and est.keep[1] < 0.05
    est = Sparse(Gaussian(), sparsity=0.2)
    mixed = torch.randn(20000, generator=torch.Generator().manual_seed(2))
    est.bind(["w"], [mixed], run_seed=0)
    assert est.keep[0] == pytest.approx(0.8, abs=0.02)
    z1 = est.leaf_direction(Direction(2, 0), 0, mixed).z
    z2 = est.leaf_direction(Direction(2, 0), 0, mixed).z
    assert torch.equal(z1, z2)
    assert (z1 == 0).float().mean().item() == pytest.approx(0.2, abs=0.02)


def test_forward_gradient_coefficient_is_the_exact_directional_derivative():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    loss = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
    opt = zotune.ForwardGrad(list(model.named_parameters()), module=model, lr=0.1)
    grads = torch.autograd.grad(loss(), list(model.parameters()))
    opt.step(loss)
    est = opt.estimator
    zs = [est.full_direction(Direction(0, 0), i, p) for i, p in enumerate(model.parameters())]
    exact = sum((g * z).sum() for g, z in zip(grads, zs))
    assert opt.last_record["coeffs"][0] == pytest.approx(float(exact), rel=1e-5)


def test_unknown_estimator_says_did_you_mean():
    with pytest.raises(ValueError, match="Did you mean 'gaussian'"):
        make_estimator("gausian")
    with pytest.raises(ValueError, match="rank must be an integer >= 1, got 0"):
        LowRankEstimator(rank=0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        Sparse(Gaussian(), 1.0)
    with pytest.raises(ValueError, match="distribution"):
        Gaussian(distribution="uniform")
