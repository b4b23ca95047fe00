"""FZOO, HiZOO and Sparse-MeZO: their updates equal the papers' formulas, their expectations,
the memory they keep, and their errors."""

import math

import pytest
import torch

import zotune
import zotune.schemes
from zotune.estimators.gaussian import draw_leaf
from zotune.estimators.magnitude import pack_bits, unpack_bits
from zotune.schemes import Central, CentralWithCurvature, OneSidedNormalised, make_scheme


def quadratic(w, a, b):
    return lambda: 0.5 * ((a @ w - b) ** 2).sum()


def problem(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    return a, b, w


# ---------------------------------------------------------------- schemes


def test_schemes_turn_losses_into_the_papers_coefficients():
    assert Central().coefficients(None, [[3.0, 1.0]], 0.5).coeffs == [2.0]
    c = OneSidedNormalised().coefficients(1.0, [[2.0], [4.0]], 1e-3)
    assert c.coeffs == [1.0 / 1.0, 3.0 / 1.0]  # sigma of (2, 4) is 1
    h = CentralWithCurvature().coefficients(1.0, [[1.5, 0.7]], 0.1)
    assert h.coeffs == pytest.approx([(1.5 - 0.7) / 0.2])
    assert h.aux == pytest.approx([abs(1.5 + 0.7 - 2.0) / (2 * 0.01)])
    # equal perturbed losses carry no information: a zero step, not a division by zero
    assert OneSidedNormalised().coefficients(1.0, [[2.0], [2.0]], 1e-3).coeffs == [0.0, 0.0]
    assert math.isnan(OneSidedNormalised().coefficients(float("nan"), [[2.0], [3.0]], 1e-3).coeffs[0])
    with pytest.raises(ValueError, match="Did you mean 'central'"):
        make_scheme("centrl")


# ---------------------------------------------------------------- FZOO


def test_fzoo_update_equals_its_formula():
    a, b, w0 = problem()
    w = torch.nn.Parameter(w0.clone())
    lr, eps, n = 0.01, 1e-3, 4
    opt = zotune.FZOO([("w", w)], lr=lr, eps=eps, queries=n, seed=7)
    loss = quadratic(w, a, b)
    with torch.no_grad():
        opt.step(loss)
    u = [draw_leaf(7, 0, j, 0, w0, distribution="rademacher") for j in range(n)]
    f = quadratic(w0, a, b)
    l0 = float(f())
    ls = [float(quadratic(w0 + eps * uj, a, b)()) for uj in u]
    sigma = torch.tensor(ls, dtype=torch.float64).std(unbiased=False).item()
    expected = w0 - lr / n * sum((lj - l0) / sigma * uj for lj, uj in zip(ls, u))
    assert set(u[0].tolist()) == {-1.0, 1.0}
    assert torch.allclose(w.detach(), expected, atol=1e-12, rtol=0)
    assert opt.forward_passes == n + 1 == opt.forward_passes_per_step
    assert float(opt.last_record["loss"]) == pytest.approx(l0)  # FZOO reports L(x)


def test_fzoo_keeps_no_buffer_and_learns_a_quadratic():
    a, b, w0 = problem(8, seed=3)
    w = torch.nn.Parameter(w0.clone())
    opt = zotune.FZOO([("w", w)], lr=0.01, queries=8)
    loss = quadratic(w, a, b)
    start = float(loss())
    for _ in range(300):
        opt.step(loss)
    assert float(loss()) < 0.2 * start
    assert all(not s for s in opt.state.values())  # stateless rule, no model-size buffer
    assert opt.estimator.state_dict() == {}


def test_fzoo_refuses_one_query_dual_evaluation_and_jvp():
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="needs at least 2 query directions per step, got queries=1"):
        zotune.FZOO([w], queries=1)
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="conservative"):
        zotune.ZOOptimizer([w], "gaussian", "sgd", scheme="one_sided_normalised", conservative=True)
    with pytest.raises(ValueError, match="measures directional derivatives"):
        zotune.ZOOptimizer(m.named_parameters(), zotune.make_estimator("forward", module=m), "sgd",
                           scheme="one_sided_normalised")


def test_fzoo_swap_evaluation_equals_in_place():
    torch.manual_seed(0)
    m1 = torch.nn.Linear(4, 3).double()
    m2 = torch.nn.Linear(4, 3).double()
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(5, 4, dtype=torch.float64)
    o1 = zotune.FZOO(m1.named_parameters(), lr=0.01, queries=3)
    o2 = zotune.FZOO(m2.named_parameters(), lr=0.01, queries=3, module=m2, perturbation="swap")
    for _ in range(3):
        o1.step(lambda: (m1(x) ** 2).mean())
        o2.step(lambda: (m2(x) ** 2).mean())
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-12)


def test_fzoo_data_parallel_reduces_the_losses_not_the_coefficients():
    """sigma is a statistic of the global losses: ranks average losses, then normalise."""
    a, b, w0 = problem()
    seen = []

    def reduce(t):  # a second rank whose losses are 1.0 higher, averaged
        seen.append(t.clone())
        return t + 0.5

    w = torch.nn.Parameter(w0.clone())
    opt = zotune.FZOO([("w", w)], lr=0.01, queries=3, reduce=reduce)
    opt.step(quadratic(w, a, b))
    assert seen[0].numel() == 4  # L(x) and three perturbed losses
    w2 = torch.nn.Parameter(w0.clone())
    zotune.FZOO([("w", w2)], lr=0.01, queries=3).step(quadratic(w2, a, b))
    # a constant shift of every loss leaves (L_j - L_0) / sigma, so the update, unchanged
    assert torch.allclose(w.detach(), w2.detach(), atol=1e-12)


def test_fzoo_nonfinite_loss_leaves_the_weights_unchanged():
    w = torch.nn.Parameter(torch.ones(4))
    before = w.detach().clone()
    opt = zotune.FZOO([("w", w)], lr=0.1, queries=2, max_nonfinite=5)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] == 2 else (w ** 2).sum()

    opt.step(flaky)
    assert opt.skipped_steps == 1
    assert torch.equal(w.detach(), before)


# ---------------------------------------------------------------- HiZOO


def test_hizoo_two_steps_equal_the_reference_formulas():
    a, b, w0 = problem()
    w = torch.nn.Parameter(w0.clone())
    lr, eps, alpha = 0.01, 1e-2, 0.3
    opt = zotune.HiZOO([("w", w)], lr=lr, eps=eps, hessian_smooth=alpha, seed=5)
    loss = quadratic(w, a, b)
    x, h = w0.clone(), torch.ones_like(w0)
    for step in range(2):
        opt.step(loss)
        z = draw_leaf(5, step, 0, 0, w0)
        f = lambda v: float(quadratic(v, a, b)())  # noqa: E731
        lp, lm, l0 = f(x + eps * z / h.sqrt()), f(x - eps * z / h.sqrt()), f(x)
        h = (1 - alpha) * h + alpha * abs(lp + lm - 2 * l0) / (2 * eps**2) * h * z * z
        x = x - lr * (lp - lm) / (2 * eps) * z / h.sqrt()
        assert torch.allclose(w.detach(), x, atol=1e-10, rtol=0), step
        assert torch.allclose(opt.estimator.hessian[0].double(), h, rtol=1e-6)
    assert opt.forward_passes == 6


def test_hizoo_keeps_one_model_size_buffer_and_with_alpha_zero_is_mezo():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = zotune.HiZOO(model.named_parameters(), hessian_smooth=0.0, seed=1)
    buffers = opt.estimator.hessian
    assert sum(h.numel() for h in buffers) == sum(p.numel() for p in model.parameters())
    assert all(h.dtype == torch.float32 for h in buffers)
    # alpha = 0: H stays ones and the update is MeZO's (one extra forward pass for L(x))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    twin.load_state_dict(model.state_dict())
    mezo = zotune.MeZO(twin.named_parameters(), seed=1, lr=1e-6)
    x = torch.randn(3, 4)
    for _ in range(3):
        opt.step(lambda: model(x).pow(2).mean())
        mezo.step(lambda: twin(x).pow(2).mean())
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-7)
    assert all(torch.equal(h, torch.ones_like(h)) for h in buffers)


def test_hizoo_half_precision_hessian_is_float32():
    w = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    opt = zotune.HiZOO([("w", w)], lr=1e-3, hessian_smooth=0.5)
    opt.step(lambda: (w.float() ** 2).sum())
    assert opt.estimator.hessian[0].dtype == torch.float32
    assert torch.isfinite(opt.estimator.hessian[0]).all()


# ---------------------------------------------------------------- Sparse-MeZO


def test_bits_pack_and_unpack():
    m = torch.rand(37, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_bits(m)
    assert packed.numel() == 5
    assert torch.equal(unpack_bits(packed, 37).bool(), m)


def test_sparse_mezo_moves_only_small_weights():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(20, 10, generator=g)
    w = torch.nn.Parameter(w0.clone())
    opt = zotune.SparseMeZO([("w", w)], lr=1e-2, sparsity=0.75)
    tau = opt.estimator.thresholds[0]
    assert (w0.abs() <= tau).float().mean().item() == pytest.approx(0.25, abs=0.02)
    x = torch.randn(8, 10, generator=g)
    opt.step(lambda: (x @ w.T).pow(2).mean())
    moved = (w.detach() != w0)
    assert torch.equal(moved, w0.abs() <= tau)
    assert opt.estimator.kept_fraction([w]) == pytest.approx(0.25, abs=0.02)


def test_sparse_mezo_keeps_training_a_zero_initialised_matrix():
    """LoRA's B starts at zero: every |w| equals the threshold 0, so after its first step every
    entry was above it and the matrix froze (Sparse-MeZO on LoRA changed no test row of SST-2).
    A leaf with no magnitude differences at bind time has no small weights to pick: it trains whole."""
    g = torch.Generator().manual_seed(0)
    b = torch.nn.Parameter(torch.zeros(6, 4))
    a = torch.nn.Parameter(torch.randn(4, 5, generator=g))
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 6, generator=g)
    opt = zotune.SparseMeZO([("lora_B", b), ("lora_A", a)], lr=1e-2, sparsity=0.75)
    assert opt.estimator.thresholds[0] is None and opt.estimator.thresholds[1] is not None
    before = b.detach().clone()
    for _ in range(3):
        opt.step(lambda: (x @ (b @ a).T - y).pow(2).mean())
        assert (b.detach() != before).all()  # every entry moves at every step
        before = b.detach().clone()


def test_sparse_mezo_expectation_is_the_masked_gradient():
    a, b, w0 = problem(6, seed=1)
    w0 = w0.float()
    a, b = a.float(), b.float()
    w = w0.clone().requires_grad_(True)
    quadratic(w, a, b)().backward()
    grad = w.grad.clone()
    mask = (w0.abs() <= zotune.estimators.magnitude.magnitude_threshold(w0, 0.5, 0)).float()
    total = torch.zeros_like(w0)
    trials = 3000
    for seed in range(trials):
        p = torch.nn.Parameter(w0.clone().view(2, 3))  # a matrix, so it is masked
        opt = zotune.SparseMeZO([("w", p)], lr=1.0, eps=1e-3, sparsity=0.5, seed=seed)
        opt.step(lambda: quadratic(p.view(-1), a, b)())
        total += (w0 - p.detach().view(-1))
    mean = total / trials
    masked_now = (p.detach().view(-1) != w0).float()
    assert torch.equal(masked_now, mask * (masked_now > 0))
    expected = grad * masked_now
    assert torch.allclose(mean, expected, atol=0.25 * grad.abs().max().item())
    assert (mean[masked_now == 0] == 0).all()


def test_sparse_mezo_refuses_low_rank_directions():
    w = torch.nn.Parameter(torch.zeros(4, 3))
    est = zotune.estimators.MagnitudeMasked(zotune.make_estimator("lowrank", rank=1))
    with pytest.raises(ValueError, match="needs dense directions"):
        zotune.ZOOptimizer([("w", w)], est, "sgd")


# ---------------------------------------------------------------- registry and validation


def test_sparse_masks_refuse_low_rank_directions_on_a_real_matrix():
    """Issue 9 defect 1: LOZO with sparsity crashed on any matrix whose shapes do not broadcast."""
    layer = torch.nn.Linear(8, 6)
    est = zotune.estimators.Sparse(zotune.make_estimator("lowrank", rank=2), sparsity=0.5)
    with pytest.raises(ValueError, match="sparse needs dense directions"):
        zotune.ZOOptimizer(layer.named_parameters(), est, "sgd")


@pytest.mark.parametrize("overrides, message", [
    (["optim.method=lozo", "optim.sparsity=0.5"], "does not combine with lozo"),
    (["optim.method=fzoo", "optim.queries=1"], "fzoo needs at least 2 directions"),
    (["optim.method=hizoo", "optim.hessian_smooth=1.5"], "hessian_smooth must be in"),
    (["optim.distribution=uniform"], "distribution"),
])
def test_validate_refuses_unsupported_method_options(overrides, message):
    from zotune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_methods_fill_their_own_defaults_and_build():
    from zotune.config import load_config
    from zotune.methods import build_optimizer

    cfg = load_config(None, ["optim.method=fzoo"])
    assert (cfg.optim.queries, cfg.optim.distribution) == (8, "rademacher")
    assert load_config(None, ["optim.method=fzoo", "optim.queries=4"]).optim.queries == 4
    assert load_config(None, ["optim.method=sparse-mezo"]).optim.sparsity == 0.75
    assert load_config(None, ["optim.method=mezo"]).optim.queries == 1
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    for name, kind in (("fzoo", zotune.schemes.OneSidedNormalised), ("hizoo", zotune.schemes.CentralWithCurvature)):
        opt = build_optimizer(load_config(None, [f"optim.method={name}", "optim.lr=1e-3"]).optim,
                              dict(layer.named_parameters()), module=layer)
        assert isinstance(opt.scheme, kind)
        opt.step(lambda: layer(x).pow(2).mean())
    opt = build_optimizer(load_config(None, ["optim.method=sparse-mezo"]).optim, dict(layer.named_parameters()))
    assert isinstance(opt.estimator, zotune.estimators.MagnitudeMasked)


# ---------------------------------------------------------------- issue 9 defects 3, 6, 7


@pytest.mark.parametrize("preset, key", [(zotune.ZOAdam, "exp_avg_sq"), (zotune.ZOSGDMomentum, "momentum")])
def test_half_precision_optimizer_state_is_float32_and_does_not_overflow(preset, key):
    """Defect 6: buffers in float16 overflowed on g^2 (c ~ 1e3 gives g^2 ~ 1e6 > 65504)."""
    w = torch.nn.Parameter(torch.zeros(64, dtype=torch.float16))
    opt = preset([("w", w)], lr=1e-4, eps=1e-2)
    target = torch.full((64,), 300.0)
    for _ in range(3):
        opt.step(lambda: ((w.float() - target) ** 2).sum())
    state = opt.state[w][key]
    assert state.dtype == torch.float32
    assert torch.isfinite(state).all() and torch.isfinite(w).all()


def test_bfloat16_momentum_keeps_increments_below_bfloat16_resolution():
    """The buffer equals the float64 sum of the same increments (a bfloat16 one drifts by ~1e-2)."""
    w = torch.nn.Parameter(torch.zeros(256, dtype=torch.bfloat16))
    opt = zotune.ZOSGDMomentum([("w", w)], lr=0.0, eps=1e-2, beta=0.999, seed=3)
    exact = torch.zeros(256, dtype=torch.float64)
    for step in range(40):
        opt.step(lambda: (w.float() * 3.0).sum())
        c = opt.last_record["coeffs"][0]
        exact = 0.999 * exact + c * draw_leaf(3, step, 0, 0, w.detach()).double()
    m = opt.state[w]["momentum"]
    assert torch.allclose(m.double(), exact, rtol=1e-5, atol=1e-4)


def test_conservative_keeps_x_without_weight_decay_and_refuses_half_precision():
    """Defect 7: weight decay was applied even when x was kept; half precision broke 'keep x'."""
    w = torch.nn.Parameter(torch.ones(10))
    opt = zotune.ZOSGDConservative([("w", torch.nn.Parameter(torch.ones(2, 5)))], lr=0.1, weight_decay=0.5)
    m = opt.leaves[0]
    calls = {"n": 0}

    def best_at_x():  # L(x) lowest: the third evaluation of the step is x itself
        calls["n"] += 1
        return torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0][(calls["n"] - 1) % 5])

    opt.step(best_at_x)
    assert opt.last_record["choice"] == 0
    assert torch.allclose(m, torch.ones(2, 5), atol=1e-6)  # no (1 - lr wd) shrink
    with pytest.raises(ValueError, match="needs float32 weights"):
        zotune.ZOSGDConservative([("w", torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)))])
    from zotune.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="zo-sgd-cons needs float32 weights"):
        load_config(None, ["optim.method=zo-sgd-cons", "model.dtype=bfloat16"])
    del w


def test_conservative_ranks_choose_the_same_point():
    """Defect 3: each rank picked its own best of three without reducing the losses."""
    import threading

    barrier = threading.Barrier(2)
    box: dict = {}

    def make_reduce(rank):
        def reduce(t):  # an all-reduce mean over the two thread "ranks"
            box[rank] = t.clone()
            barrier.wait()
            out = (box[0] + box[1]) / 2
            barrier.wait()
            return out
        return reduce

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g)
    models = [torch.nn.Linear(6, 1) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [zotune.ZOSGDConservative(m.named_parameters(), lr=0.05, reduce=make_reduce(r)) for r, m in enumerate(models)]
    signs = [1.0, -0.5]  # rank 1's loss is opposed: alone it would prefer the other point

    def run(r):
        for _ in range(6):
            opts[r].step(lambda: signs[r] * models[r](x).pow(2).mean())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def test_add_param_group_after_construction_is_refused():
    """Issue 9 defect 13: a later group was silently accepted and never trained."""
    opt = zotune.MeZO([("a", torch.nn.Parameter(torch.zeros(3)))])
    with pytest.raises(ValueError, match="add_param_group is not supported after construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    assert len(opt.param_groups) == 1


def test_registries_name_a_bad_argument_but_keep_real_type_errors():
    """Issue 9 defect 18 (registry part): any TypeError used to become 'bad kwargs'."""
    with pytest.raises(ValueError, match="rule 'momentum': .*unexpected keyword argument 'bta'"):
        zotune.make_rule("momentum", bta=0.9)
    with pytest.raises(ValueError, match="estimator 'lowrank': .*'rnak'"):
        zotune.make_estimator("lowrank", rnak=2)
    from zotune import rules

    def broken(beta=0.9):
        return None + 1  # a bug inside the builder

    rules.RULES["broken"] = broken
    try:
        with pytest.raises(TypeError, match="unsupported operand"):
            zotune.make_rule("broken")
    finally:
        del rules.RULES["broken"]
