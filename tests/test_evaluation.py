"""The evaluation protocol: every mode behind one call, copies in one forward, replay without forwards."""

import inspect
import re

import pytest
import torch

import zotune
from zotune import evaluation, step


def mlp(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    return model


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.randn(16, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def closure_of(model, calls=None):
    """``copies`` runs the rows that many times over in one forward; one loss per copy."""
    def closure(copies=1):
        if calls is not None:
            calls.append(copies)
        err = ((model(X.repeat(copies, 1)) - Y.repeat(copies, 1)) ** 2).view(copies, -1).mean(1)
        return err[0] if copies == 1 else err
    return closure


def test_the_step_has_no_branch_on_the_mode_or_the_estimator_kind():
    source = inspect.getsource(step)
    assert not re.search(r"perturbation\s*[!=]=|\.kind\b|\blive\b", source)
    assert not re.search(r"isinstance\([^)]*(Dense|LowRank|Grad)\b", source)
    assert len(source.splitlines()) < 673 // 2  # well under half of the step before the reshape


@pytest.mark.parametrize("mode,cls", [("inplace", evaluation.InPlace), ("swap", evaluation.Swap),
                                      ("dual", evaluation.Copies)])
def test_each_mode_is_an_evaluation_object(mode, cls):
    model = mlp()
    opt = zotune.MeZO(model.named_parameters(), module=model, perturbation=mode)
    assert type(opt.evaluation) is cls and opt.perturbation == mode
    fg = zotune.ForwardGrad(model.named_parameters(), module=model)
    assert type(fg.evaluation) is evaluation.ForwardMode


@pytest.mark.parametrize("preset,kw", [("MeZO", {"queries": 3}), ("LOZO", {"rank": 2, "queries": 2}),
                                       ("ZOAdam", {"queries": 2})])
def test_copies_evaluate_every_query_of_a_step_in_one_forward(preset, kw):
    a, b = mlp(), mlp()
    make = getattr(zotune, preset)
    inplace = make(a.named_parameters(), lr=1e-2, eps=1e-3, **kw)
    copies = make(b.named_parameters(), lr=1e-2, eps=1e-3, module=b, perturbation="dual", **kw)
    q = kw["queries"]
    calls = []
    for _ in range(4):
        la = inplace.step(closure_of(a))
        lb = copies.step(closure_of(b, calls))
        assert float(la) == pytest.approx(float(lb), rel=1e-10)
        assert copies.last_record["coeffs"] == pytest.approx(inplace.last_record["coeffs"], rel=1e-6, abs=1e-9)
    assert calls == [2 * q] * 4  # one forward of 2q copies per step
    assert copies.forward_passes == inplace.forward_passes == 4 * 2 * q == 4 * copies.forward_passes_per_step
    for p, r in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("mode", ["inplace", "swap", "dual", "side"])
def test_replay_runs_no_forward_and_rebuilds_every_mode_bit_for_bit(mode):
    def make(m):
        if mode == "side":
            return zotune.LOZO(m.named_parameters(), lr=1e-2, eps=1e-3, rank=2, module=m, perturbation=mode)
        return zotune.MeZO(m.named_parameters(), lr=1e-2, eps=1e-3, queries=2, module=m, perturbation=mode)

    trained = mlp()
    opt = make(trained)
    records = []
    for _ in range(4):
        opt.step(closure_of(trained))
        records.append(opt.last_record)
    rebuilt = mlp()
    opt2 = make(rebuilt)
    seen = []
    rebuilt.register_forward_pre_hook(lambda m, args: seen.append(1))
    for r in records:
        opt2.replay(r)
    assert seen == [] and opt2.forward_passes == 0
    assert opt2.steps_taken == 4 and opt2.last_record["coeffs"] == records[-1]["coeffs"]
    for p, r in zip(trained.parameters(), rebuilt.parameters()):
        assert torch.equal(p, r)


def test_a_skipped_step_in_place_puts_the_weights_back_and_replays_the_same():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = zotune.MeZO(model.named_parameters(), lr=1e-2)
    calls = {"n": 0}

    def second_is_nan():
        calls["n"] += 1
        return torch.tensor(float("nan") if calls["n"] == 2 else 1.0)

    opt.step(second_is_nan)
    record = opt.last_record
    assert record["skipped"] and opt.skipped_steps == 1
    rebuilt = mlp()
    opt2 = zotune.MeZO(rebuilt.named_parameters(), lr=1e-2)
    opt2.replay(record)
    for p, q, r in zip(model.parameters(), rebuilt.parameters(), before):
        assert torch.equal(p, q)  # the in-place writes (+eps z, -2 eps z, +eps z) repeated exactly
        torch.testing.assert_close(p, r, rtol=0, atol=1e-12)
    assert opt2.skipped_steps == 1  # the replayed optimizer counts it as the live one did


def test_copies_errors_name_the_closure_contract():
    model = mlp()
    opt = zotune.MeZO(model.named_parameters(), module=model, perturbation="dual", queries=2)
    with pytest.raises(ValueError, match=r"calls closure\(copies=4\)"):
        opt.step(lambda: closure_of(model)())
    with pytest.raises(ValueError, match="must return 4 losses"):
        opt.step(lambda copies=1: closure_of(model)(copies)[:2])
    with pytest.raises(ValueError, match="do not split into 4 copies"):
        opt.step(lambda copies=1: ((model(X[:3]) - Y[:3]) ** 2).mean().repeat(4))
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("preset,kw,copies", [("FZOO", {"queries": 8, "distribution": "gaussian"}, 9),
                                              ("HiZOO", {"hessian_smooth": 1e-2}, 3)])
def test_any_scheme_evaluates_its_base_point_and_queries_as_copies_in_one_forward(preset, kw, copies):
    """FZOO: L(x) and its 8 one-sided points as 9 copies; HiZOO: L(x), L(x +- eps z) as 3."""
    a, b = mlp(), mlp()
    make = getattr(zotune, preset)
    inplace = make(a.named_parameters(), lr=1e-2, eps=1e-3, **kw)
    together = make(b.named_parameters(), lr=1e-2, eps=1e-3, module=b, perturbation="dual", **kw)
    calls = []
    for _ in range(3):
        la = inplace.step(closure_of(a))
        lb = together.step(closure_of(b, calls))
        assert float(la) == pytest.approx(float(lb), rel=1e-12)  # the base copy is x itself
        assert together.last_record["coeffs"] == pytest.approx(inplace.last_record["coeffs"], rel=1e-6, abs=1e-9)
    assert calls == [copies] * 3 and together.forward_passes == 3 * copies == 3 * together.forward_passes_per_step
    for p, r in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)
