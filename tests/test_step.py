"""The optimizer facade: every preset trains, resume is exact, replay is exact, errors are clear."""

import copy
import math

import pytest
import torch

import zotune
from zotune.reference import mezo_step


class TinyMLP(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = torch.nn.Linear(5, 16)
        self.l2 = torch.nn.Linear(16, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def regression_data(seed=1, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = (x @ torch.randn(5, 1, generator=g)).tanh()
    return x, y


X, Y = regression_data()


def mlp_loss(model):
    return lambda: ((model.l2(torch.tanh(model.l1(X))) - Y) ** 2).mean()


PRESET_CASES = {
    "mezo": lambda m: zotune.MeZO(m.named_parameters(), lr=2e-3, eps=1e-3),
    "mezo-q4": lambda m: zotune.MeZO(m.named_parameters(), lr=2e-3, eps=1e-3, queries=4),
    "sign": lambda m: zotune.ZOSGDSign(m.named_parameters(), lr=2e-3),
    "sign-elementwise": lambda m: zotune.ZOSGDSign(m.named_parameters(), lr=2e-3, mode="elementwise"),
    "momentum": lambda m: zotune.ZOSGDMomentum(m.named_parameters(), lr=2e-4),
    "conservative": lambda m: zotune.ZOSGDConservative(m.named_parameters(), lr=2e-3),
    "adam": lambda m: zotune.ZOAdam(m.named_parameters(), lr=3e-3),
    "lozo": lambda m: zotune.LOZO(m.named_parameters(), lr=4e-3, rank=2, interval=5),
    "lozo-m": lambda m: zotune.LOZO(m.named_parameters(), lr=4e-3, rank=2, interval=5, momentum=0.9),
    "forward-grad": lambda m: zotune.ForwardGrad(m.named_parameters(), module=m, lr=2e-3),
    "blockwise": lambda m: zotune.ZOOptimizer(m.named_parameters(), "blockwise", "sgd", lr=2e-3),
    "sparse": lambda m: zotune.ZOOptimizer(
        m.named_parameters(), zotune.make_estimator("sparse", sparsity=0.2), "sgd", lr=2e-3
    ),
    "fzoo": lambda m: zotune.FZOO(m.named_parameters(), lr=2e-3, queries=4),
    "hizoo": lambda m: zotune.HiZOO(m.named_parameters(), lr=2e-3, hessian_smooth=1e-3),
    "sparse-mezo": lambda m: zotune.SparseMeZO(m.named_parameters(), lr=2e-3, sparsity=0.5),
    "fo-sgd": lambda m: zotune.FOSGD(m.parameters(), lr=0.05),
    "fo-adam": lambda m: zotune.FOAdam(m.parameters(), lr=0.01),
}


@pytest.mark.parametrize("name", list(PRESET_CASES))
def test_every_preset_reduces_the_loss_of_a_small_mlp(name):
    model = TinyMLP()
    loss = mlp_loss(model)
    opt = PRESET_CASES[name](model)
    start = float(loss())
    for _ in range(150):
        opt.step(loss)
    end = float(loss())
    assert end < 0.8 * start, (name, start, end)


def test_every_preset_solves_least_squares():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 8, generator=g), torch.randn(30, generator=g)
    best = float(((a @ torch.linalg.lstsq(a, b).solution - b) ** 2).mean())
    for cls, lr in [(zotune.MeZO, 0.02), (zotune.ZOAdam, 0.01), (zotune.LOZO, 0.02), (zotune.ZOSGDConservative, 0.02)]:
        w = torch.nn.Parameter(torch.zeros(8, 1))
        opt = cls([("w", w)], lr=lr)
        loss = lambda: ((a @ w).squeeze(1) - b).pow(2).mean()  # noqa: E731
        start = float(loss())
        for _ in range(600):
            opt.step(loss)
        assert float(loss()) - best < 0.1 * (start - best), cls.__name__


@pytest.mark.parametrize("name", [n for n in PRESET_CASES if not n.startswith("fo-")])
def test_state_dict_roundtrip_then_continue_equals_straight_run_bit_for_bit(name):
    straight = TinyMLP()
    opt = PRESET_CASES[name](straight)
    for _ in range(8):
        opt.step(mlp_loss(straight))

    first = TinyMLP()
    opt1 = PRESET_CASES[name](first)
    for _ in range(4):
        opt1.step(mlp_loss(first))
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt1.state_dict())

    resumed = TinyMLP(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved_model)
    opt2 = PRESET_CASES[name](resumed)
    opt2.load_state_dict(saved_opt)
    for _ in range(4):
        opt2.step(mlp_loss(resumed))
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), (name, n)


@pytest.mark.parametrize("name", ["mezo", "mezo-q4", "conservative", "adam", "lozo-m", "blockwise", "sign",
                                  "fzoo", "hizoo", "sparse-mezo"])
def test_replay_from_records_rebuilds_the_weights_bit_for_bit(name):
    trained = TinyMLP()
    opt = PRESET_CASES[name](trained)
    records = []
    for _ in range(6):
        opt.step(mlp_loss(trained))
        records.append(opt.last_record)
    rebuilt = TinyMLP()
    opt2 = PRESET_CASES[name](rebuilt)
    for r in records:
        opt2.replay(r)
    for a, b in zip(trained.parameters(), rebuilt.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="record is for step 0"):
        opt2.replay(records[0])


def test_fast_mezo_matches_the_papers_algorithm_1():
    # float64, so that the only difference left is the order of roundings (fused restore)
    fast, ref = TinyMLP().double(), TinyMLP().double()
    x, y = X.double(), Y.double()

    def loss_of(m):
        return lambda: ((m.l2(torch.tanh(m.l1(x))) - y) ** 2).mean()

    opt = zotune.MeZO(fast.named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3)
    ref_params = list(ref.parameters())
    for t in range(10):
        opt.step(loss_of(fast))
        c = mezo_step(ref_params, loss_of(ref), t, lr=1e-2, eps=1e-3, seed=3, weight_decay=0.1)
        assert c == pytest.approx(opt.last_record["coeffs"][0], rel=1e-8)
    for a, b, init in zip(fast.parameters(), ref.parameters(), TinyMLP().double().parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
        assert (a - init).abs().max() > 1e-4  # and both really moved


def test_mezo_costs_two_forwards_and_three_parameter_passes_per_query():
    model = TinyMLP()
    calls = {"forward": 0, "chunks": 0}
    loss = mlp_loss(model)

    def counted():
        calls["forward"] += 1
        return loss()

    # a chunk size smaller than l1.weight, so that a leaf spans several chunks
    est = zotune.make_estimator("gaussian", queries=3, chunk_size=32)
    opt = zotune.ZOOptimizer(model.named_parameters(), est, "sgd", lr=1e-3)
    real = est.leaf_direction

    def spy(*args, **kwargs):
        calls["chunks"] += 1
        return real(*args, **kwargs)

    est.leaf_direction = spy
    opt.step(counted)
    chunks_per_pass = sum(est.num_chunks(i) for i in range(len(opt.leaves)))
    assert chunks_per_pass > len(opt.leaves)
    assert calls["forward"] == 6 == opt.forward_passes_per_step
    # per query: perturb, perturb, restore (the last restore fused into the update pass),
    # plus the update pass regenerating each query's direction once
    assert calls["chunks"] == chunks_per_pass * (3 * 3 - 1 + 3)


def test_directions_do_not_depend_on_how_they_are_consumed():
    """Chunked regeneration gives the same direction whether drawn whole or chunk by chunk."""
    est = zotune.make_estimator("gaussian", chunk_size=7)
    p = torch.zeros(5, 6)
    est.bind(["w"], [p], 0)
    d = zotune.estimators.Direction(3, 0)
    whole = est.full_direction(d, 0, p)
    params = [p.clone()]
    est.perturb_(params, d, 1.0)
    assert torch.equal(params[0], whole)
    from zotune.estimators.gaussian import draw_leaf

    assert torch.equal(draw_leaf(0, 3, 0, 0, p, chunk_size=7), whole)


def test_param_groups_have_their_own_lr_and_weight_decay_skips_vectors_by_default():
    model = TinyMLP()
    frozen_like = [p.detach().clone() for p in model.l1.parameters()]
    opt = zotune.MeZO(
        [{"params": list(model.l1.named_parameters()), "lr": 0.0},
         {"params": list(model.l2.named_parameters()), "weight_decay": 0.5}],
        lr=0.0,
    )
    bias = model.l2.bias.detach().clone()
    weight = model.l2.weight.detach().clone()
    opt.param_groups[1]["lr"] = 0.1
    # zero loss difference: only weight decay moves the weights
    opt.step(lambda: torch.tensor(1.0))
    for a, b in zip(model.l1.parameters(), frozen_like):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(model.l2.weight, weight * (1 - 0.1 * 0.5), atol=1e-6)
    assert torch.allclose(model.l2.bias, bias, atol=1e-6)


def test_nonfinite_loss_leaves_weights_unchanged_then_raises():
    model = TinyMLP()
    before = [p.detach().clone() for p in model.parameters()]
    opt = zotune.MeZO(model.named_parameters(), lr=1e-3, max_nonfinite=3)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        return torch.tensor(float("nan")) if calls["n"] % 2 == 0 else torch.tensor(1.0)

    for _ in range(2):
        loss = opt.step(flaky)
        assert math.isnan(float(loss))
    assert opt.skipped_steps == 2 and opt.updates == 0
    for a, b in zip(model.parameters(), before):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(zotune.NonFiniteLossError, match="3 steps in a row"):
        opt.step(flaky)
    for a, b in zip(model.parameters(), before):
        assert torch.allclose(a, b, atol=1e-6)
    # a finite step resets the count
    opt2 = zotune.MeZO(model.named_parameters(), lr=1e-3, max_nonfinite=2)
    opt2.step(lambda: torch.tensor(float("inf")))
    opt2.step(mlp_loss(model))
    assert opt2.nonfinite_in_row == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -1.0}, "lr must be finite and >= 0, got -1.0"),
        ({"eps": 0.0}, "eps must be finite and > 0, got 0.0"),
        ({"weight_decay": float("nan")}, "weight_decay must be finite"),
        ({"estimator": "lowrnak"}, "Did you mean 'lowrank'"),
        ({"rule": "adamw"}, "Did you mean 'adam'"),
        ({"rule": "adam", "conservative": True}, "conservative=True needs a stateless rule"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"max_nonfinite": 0}, "max_nonfinite must be an integer >= 1"),
    ],
)
def test_invalid_hyperparameters_raise_value_error_naming_them(kwargs, message):
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("'", ".")):
        zotune.ZOOptimizer([w], **kwargs)


def test_bad_params_and_missing_closure_errors():
    with pytest.raises(ValueError, match="params is empty"):
        zotune.MeZO([])
    with pytest.raises(ValueError, match="only floating tensors"):
        zotune.MeZO([torch.zeros(3, dtype=torch.long)])
    opt = zotune.MeZO([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="need a closure"):
        opt.step()
    with pytest.raises(ValueError, match="rank must be"):
        zotune.LOZO([torch.nn.Parameter(torch.zeros(3, 3))], rank=0)
    with pytest.raises(ValueError, match="module must be"):
        zotune.ForwardGrad([torch.nn.Parameter(torch.zeros(3))], module="model")


def test_loading_a_checkpoint_of_another_configuration_is_refused():
    model = TinyMLP()
    sd = zotune.MeZO(model.named_parameters(), seed=1).state_dict()
    with pytest.raises(ValueError, match="seed was 1, now 2"):
        zotune.MeZO(model.named_parameters(), seed=2).load_state_dict(sd)
    with pytest.raises(ValueError, match="estimator was"):
        zotune.LOZO(model.named_parameters(), seed=1).load_state_dict(sd)


def test_reduce_receives_the_projected_gradients_and_its_result_is_used():
    model = TinyMLP()
    seen = []

    def reduce(c):
        seen.append(c.clone())
        return c * 0  # as if the other workers' differences cancelled ours

    before = [p.detach().clone() for p in model.parameters()]
    opt = zotune.MeZO(model.named_parameters(), lr=1.0, queries=2, reduce=reduce)
    opt.step(mlp_loss(model))
    assert seen[0].shape == (2,) and seen[0].dtype == torch.float64
    for a, b in zip(model.parameters(), before):
        assert torch.allclose(a, b, atol=1e-6)


def test_hybrid_trains_shallow_by_zo_and_deep_by_fo():
    model = TinyMLP()
    zo = zotune.MeZO(model.l1.named_parameters(), lr=2e-3)
    fo = zotune.FOSGD(model.l2.parameters(), lr=0.05)
    opt = zotune.HybridOptimizer(zo, fo)
    assert not model.l1.weight.requires_grad and model.l2.weight.requires_grad
    loss = mlp_loss(model)
    l1_before = model.l1.weight.detach().clone()
    start = float(loss())
    for _ in range(50):
        opt.step(loss)
    assert float(loss()) < 0.8 * start
    assert not torch.equal(model.l1.weight, l1_before)
    assert opt.forward_passes_per_step == 3


def test_bfloat16_lozo_update_goes_in_row_blocks_without_a_float32_matrix(monkeypatch):
    """A half-precision matrix's low-rank update is written in float32 row blocks of about one
    chunk, each rounded stochastically: the step allocates far less than the matrix in float32,
    and each weight lands on one of the two bfloat16 neighbours of the exact update."""
    from zotune.bench.profile import AllocationTracker
    from zotune.estimators import Direction

    monkeypatch.setenv("ZOTUNE_THREADS", "1")  # the tracker sees one thread's allocations
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 256, generator=g)
    layer = torch.nn.Linear(256, 512, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer.weight.copy_(torch.randn(512, 256, generator=g) * 0.05)
    start = layer.weight.detach().float().clone()
    est = zotune.estimators.make_estimator("lowrank", rank=2, interval=5, chunk_size=1 << 12)
    # side terms: the evaluations never write the matrix, so only the update touches it
    opt = zotune.ZOOptimizer(layer.named_parameters(), est, "sgd", lr=1e-1, eps=1e-2, weight_decay=0.1,
                             module=layer, perturbation="side")
    with AllocationTracker() as tracker:
        opt.step(lambda: float((layer(x.bfloat16()).float() ** 2).mean()))
    assert tracker.peak_bytes < 0.25 * start.numel() * 4  # no float32 copy of the 512 KiB matrix
    ld = est.leaf_direction(Direction(0, 0), 0, layer.weight)
    c = opt.last_record["coeffs"][0]
    exact = start * (1 - 1e-1 * 0.1) - 1e-1 * c / 2 * (ld.u.float() @ ld.v.float().T)
    got = layer.weight.detach().float()
    assert (got - start).abs().max() > 1e-4  # the step did change the weights
    lo = exact.to(torch.bfloat16).float()
    neighbour = torch.nextafter(exact.to(torch.bfloat16), torch.where(lo > exact, -1.0, 1.0).to(torch.bfloat16)).float()
    assert ((got == lo) | (got == neighbour)).float().mean() > 0.999  # float32 row-block arithmetic
    assert abs(float((got - exact).mean())) < 1e-6  # rounded up or down without bias


def test_a_nonfinite_estimate_of_a_finite_loss_is_named_as_such():
    """Forward-Grad's coefficient is the directional derivative: it can be non-finite while the
    loss is finite (sqrt at 0). The error used to say "the loss was non-finite (0.0)"."""

    class SqrtAbs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))

        def forward(self):
            return torch.sqrt(self.w.abs()).sum()

    model = SqrtAbs()
    opt = zotune.ForwardGrad(model.named_parameters(), module=model, lr=1e-3, max_nonfinite=1)
    with pytest.raises(zotune.NonFiniteLossError) as err:
        opt.step(model)
    message = str(err.value)
    assert "estimate was non-finite" in message and "loss 0" in message and "the loss was non-finite" not in message
    assert torch.equal(model.w, torch.zeros(3))
