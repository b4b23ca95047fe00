"""Just-in-time ("swap") perturbation and stochastic rounding for half-precision weights."""

import pytest
import torch

import zotune
from zotune.perturb import stochastic_round_


def mlp(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


X = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(32, 1, generator=torch.Generator().manual_seed(2))


def loss_of(model):
    return lambda: ((model(X.to(model[0].weight.dtype)).float() - Y) ** 2).mean()


def test_swap_evaluates_the_same_losses_without_writing_the_weights():
    a, b = mlp(torch.float64), mlp(torch.float64)  # float64: only rounding order differs
    inplace = zotune.MeZO(a.named_parameters(), lr=1e-2, eps=1e-3)
    swap = zotune.MeZO(b.named_parameters(), lr=1e-2, eps=1e-3, module=b, perturbation="swap")
    seen = []
    # a forward hook registered first runs before zotune's: it sees the weights the layer used
    b[0].register_forward_hook(lambda m, args, out: seen.append(m.weight.detach().clone()))
    before = b[0].weight.detach().clone()
    swap.step(loss_of(b))
    inplace.step(loss_of(a))
    # inside the closure the module saw x + eps z and x - eps z; the Parameter itself was restored
    z = swap.estimator.full_direction(zotune.estimators.Direction(0, 0), 0, b[0].weight)
    assert torch.allclose(seen[0], before + 1e-3 * z, atol=1e-12)
    assert torch.allclose(seen[1], before - 1e-3 * z, atol=1e-12)
    c = swap.last_record["coeffs"][0]
    assert torch.allclose(b[0].weight, before - 1e-2 * c * z, atol=1e-12)  # only the update
    for _ in range(9):
        swap.step(loss_of(b))
        inplace.step(loss_of(a))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-10)


def test_swap_keeps_bfloat16_weights_exact_where_inplace_drifts():
    drift = {}
    for mode in ("inplace", "swap"):
        model = mlp(torch.bfloat16)
        before = [p.detach().clone() for p in model.parameters()]
        opt = zotune.MeZO(model.named_parameters(), lr=0.0, eps=1e-2, module=model, perturbation=mode)
        for _ in range(20):
            opt.step(loss_of(model))
        drift[mode] = max((p.float() - q.float()).abs().max().item() for p, q in zip(model.parameters(), before))
    assert drift["swap"] == 0.0
    assert drift["inplace"] > 0.0  # +eps, -2eps, +eps does not come back in bfloat16


def test_stochastic_rounding_keeps_updates_below_the_resolution_in_expectation():
    w = torch.ones(4096, dtype=torch.bfloat16)
    value = torch.full((4096,), 1.0 - 1e-3)  # bfloat16 spacing below 1.0 is 2**-8 ~ 3.9e-3
    assert torch.equal(value.to(torch.bfloat16), w)  # round to nearest loses the update
    stochastic_round_(w, value, torch.Generator().manual_seed(0))
    assert set(w.float().unique().tolist()) == {1.0, 1.0 - 2**-8}
    assert w.float().mean().item() == pytest.approx(1.0 - 1e-3, abs=2e-4)
    exact = torch.tensor([0.5, -2.0, 0.0])
    out = torch.empty(3, dtype=torch.float16)
    assert torch.equal(stochastic_round_(out, exact, torch.Generator()), exact.half())


def test_bfloat16_mezo_with_swap_and_stochastic_rounding_trains():
    model = mlp(torch.bfloat16)
    opt = zotune.MeZO(model.named_parameters(), lr=2e-3, eps=1e-2, module=model, perturbation="swap")
    loss = loss_of(model)
    start = float(loss())
    for _ in range(150):
        opt.step(loss)
    assert float(loss()) < 0.8 * start


def test_swap_replay_is_exact_and_errors_are_clear():
    trained, rebuilt = mlp(), mlp()
    opt = zotune.LOZO(trained.named_parameters(), lr=1e-2, module=trained, perturbation="swap", rank=2)
    records = []
    for _ in range(5):
        opt.step(loss_of(trained))
        records.append(opt.last_record)
    opt2 = zotune.LOZO(rebuilt.named_parameters(), lr=1e-2, module=rebuilt, perturbation="swap", rank=2)
    for r in records:
        opt2.replay(r)
    for p, q in zip(trained.parameters(), rebuilt.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="needs the nn.Module"):
        zotune.MeZO(mlp().named_parameters(), perturbation="swap")
    with pytest.raises(ValueError, match="not parameters of the module"):
        zotune.MeZO(mlp().named_parameters(), perturbation="swap", module=mlp())
    with pytest.raises(ValueError, match="Did you mean 'swap'"):
        zotune.MeZO(mlp().named_parameters(), perturbation="swp")


def dual_loss_of(model):
    """A closure for perturbation='dual': ``copies`` runs the rows that many times in one batch."""
    def closure(copies=1):
        x = X.to(model[0].weight.dtype).repeat(copies, 1)
        err = ((model(x).float() - Y.repeat(copies, 1)) ** 2).view(copies, -1).mean(1)
        return err[0] if copies == 1 else err
    return closure


@pytest.mark.parametrize("preset,kw", [("MeZO", {}), ("LOZO", {"rank": 2}), ("ZOAdam", {})])
def test_dual_gives_the_inplace_trajectory_in_one_forward_per_query(preset, kw):
    a, b = mlp(torch.float64), mlp(torch.float64)
    make = getattr(zotune, preset)
    inplace = make(a.named_parameters(), lr=1e-2, eps=1e-3, **kw)
    dual = make(b.named_parameters(), lr=1e-2, eps=1e-3, module=b, perturbation="dual", **kw)
    calls = []
    b.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    for _ in range(10):
        la = inplace.step(loss_of(a))
        lb = dual.step(dual_loss_of(b))
        assert abs(float(la) - float(lb)) < 1e-9
        assert dual.last_record["coeffs"] == pytest.approx(inplace.last_record["coeffs"], rel=1e-6, abs=1e-9)
    assert calls == [2 * len(X)] * 10  # one forward of doubled rows per step
    assert dual.forward_passes == inplace.forward_passes == 20
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-10)


def test_dual_never_writes_bfloat16_weights_and_its_pair_is_symmetric():
    seen = []

    class Recording(torch.nn.Linear):  # sees the weights each half runs with
        def forward(self, x):
            seen.append(self.weight.detach().clone())
            return super().forward(x)

    model = mlp(torch.bfloat16)
    model[0].__class__ = Recording
    before = [p.detach().clone() for p in model.parameters()]
    opt = zotune.MeZO(model.named_parameters(), lr=0.0, eps=1e-2, module=model, perturbation="dual")
    for _ in range(5):
        opt.step(dual_loss_of(model))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    plus, minus = seen[0].double(), seen[1].double()
    # the halves are x + eps z and 2 x - (x + eps z): symmetric about x up to one rounding
    x = before[0].double()
    assert ((plus + minus - 2 * x).abs() <= 2.0 ** -8 * (x.abs() + 1e-2)).all()
    assert not torch.equal(plus, minus)


def test_dual_errors_are_clear():
    model = mlp()
    opt = zotune.MeZO(model.named_parameters(), module=model, perturbation="dual")
    with pytest.raises(ValueError, match=r"closure\(copies=2\)"):
        opt.step(loss_of(model))  # a plain closure: no `copies`
    with pytest.raises(ValueError, match="must return 2 losses"):
        opt.step(lambda copies=1: dual_loss_of(model)(copies)[:1])
    with pytest.raises(ValueError, match="2 copies of the rows differ"):
        opt.step(lambda copies=1: torch.stack([loss_of(model)()] * 2))  # forgot to double the rows
    with pytest.raises(ValueError, match="do not split into 2 copies"):
        opt.step(lambda copies=1: torch.stack([((model(X[:3]) - Y[:3]) ** 2).mean()] * 2))
    assert all("forward" not in m.__dict__ for m in model.modules())  # the wrappers were removed

    class Nested(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(1))
            self.inner = torch.nn.Linear(2, 2)

    nested = Nested()
    with pytest.raises(ValueError, match="must not nest"):
        zotune.MeZO(nested.named_parameters(), module=nested, perturbation="dual")
    with pytest.raises(ValueError, match="two-point estimators only"):
        zotune.ForwardGrad(model.named_parameters(), module=model, perturbation="dual")


def test_side_terms_give_the_inplace_lozo_trajectory_without_writing_matrices():
    from zotune.lm import encode_pairs, pair_loss
    from zotune.models import as_loaded
    from zotune.testing import tiny_model

    models = [tiny_model("llama").model for _ in range(2)]  # tied embedding + LM head: both owners hooked
    batch = encode_pairs(tiny_model("llama").tokenizer, [("the movie was", " great"), ("a bad film", " no")], 32)
    for m in models:
        m.requires_grad_(False)
    a, b = models
    inplace = zotune.LOZO(a.named_parameters(), lr=1e-3, eps=1e-2, rank=2, interval=3, momentum=0.9)
    side = zotune.LOZO(b.named_parameters(), lr=1e-3, eps=1e-2, rank=2, interval=3, momentum=0.9,
                       module=b, perturbation="side")
    assert side.evaluation.perturbation.side and side.evaluation.perturbation.in_place  # matrices as side terms, norms in place
    matrix = b.model.layers[0].mlp.up_proj.weight
    seen = []
    b.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.clone()))
    for _ in range(7):
        before = matrix.detach().clone()
        la = inplace.step(lambda: pair_loss(as_loaded(a), batch))
        lb = side.step(lambda: pair_loss(as_loaded(b), batch))
        assert float(la) == pytest.approx(float(lb), rel=1e-5)
        assert all(torch.equal(w, before) for w in seen[-2:])  # both evaluations ran on the unwritten matrix
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    model = mlp()
    with pytest.raises(ValueError, match="low-rank directions"):
        zotune.MeZO(model.named_parameters(), module=model, perturbation="side")


def test_dual_perturbs_large_matrices_row_block_by_row_block(monkeypatch):
    """Matrices drawn in several chunks (here: 100-element chunks, rows of 64) are never copied
    whole: Linear outputs and Embedding rows are computed block by block, a chunk's partial last
    row carried over; the trajectory is the in-place one."""
    import zotune.perturb as zp
    from zotune.estimators import Gaussian
    from zotune.lm import encode_pairs, pair_loss
    from zotune.models import as_loaded
    from zotune.testing import tiny_model

    lm = tiny_model("llama")
    batch = encode_pairs(lm.tokenizer, [("the movie was", " great"), ("a bad film", " no")], 32)
    a, b = tiny_model("llama").model, lm.model
    for m in (a, b):
        m.requires_grad_(False)
    blocked = []
    real = zp._row_blocked
    monkeypatch.setattr(zp, "_row_blocked", lambda mod, *x: blocked.append(type(mod).__name__) or real(mod, *x))
    inplace = zotune.ZOOptimizer(a.named_parameters(), Gaussian(chunk_size=100), "sgd", lr=1e-3, eps=1e-2)
    dual = zotune.ZOOptimizer(b.named_parameters(), Gaussian(chunk_size=100), "sgd", lr=1e-3, eps=1e-2,
                              module=b, perturbation="dual")
    for _ in range(3):
        la = inplace.step(lambda: pair_loss(as_loaded(a), batch))
        lb = dual.step(lambda copies=1: pair_loss(as_loaded(b), batch, copies=copies))
        assert float(la) == pytest.approx(float(lb), rel=1e-5)
    assert {"Linear", "Embedding"} <= set(blocked)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
