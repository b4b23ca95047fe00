"""Population low-rank estimator (EGGROLL-style): N low-rank members as N copies in one forward."""

import pytest
import torch

import zotune
from zotune.estimators import Direction
from zotune.evaluation import Copies, InPlace, PerExample, Probe
from zotune.schemes import make_scheme
from zotune.testing import assert_resumes_and_replays

G = torch.Generator().manual_seed(0)
X = torch.randn(8, 5, generator=G, dtype=torch.float64)
T = torch.randn(8, 4, generator=G, dtype=torch.float64)


def linear(seed=0):
    layer = torch.nn.Linear(5, 4).double().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return layer


def quadratic(w, b):
    return float(((X @ w.T + b - T) ** 2).mean())


def copies_closure(layer, calls=None):
    def closure(copies=1):
        if calls is not None:
            calls.append(copies)
        out = layer(X.repeat(copies, 1))
        err = ((out - T.repeat(copies, 1)) ** 2).view(copies, -1).mean(1)
        return err[0] if copies == 1 else err
    return closure


@pytest.mark.parametrize("scheme", ["central", "one_sided_normalised"])
def test_one_step_equals_the_population_update_formula_on_a_quadratic(scheme):
    layer = linear()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    n, r, lr, eps = 3, 2, 0.05, 1e-3
    opt = zotune.PopulationLowRank(layer.named_parameters(), lr=lr, eps=eps, queries=n, rank=r, scheme=scheme,
                                   module=layer)
    calls = []
    opt.step(copies_closure(layer, calls))
    assert calls == [2 * n if scheme == "central" else n + 1]  # every member in ONE forward
    est = opt.estimator
    members = []
    for k in range(n):
        e = est.leaf_direction(Direction(0, k), 0, w0)
        members.append((e.u @ e.v.T, est.leaf_direction(Direction(0, k), 1, b0).z))
    if scheme == "central":
        c = [(quadratic(w0 + eps * e, b0 + eps * z) - quadratic(w0 - eps * e, b0 - eps * z)) / (2 * eps)
             for e, z in members]
    else:
        base = quadratic(w0, b0)
        losses = torch.tensor([quadratic(w0 + eps * e, b0 + eps * z) for e, z in members], dtype=torch.float64)
        c = ((losses - base) / losses.std(unbiased=False)).tolist()
    expected_w = w0 - lr / n * sum(ck * e / r for ck, (e, _) in zip(c, members))
    expected_b = b0 - lr / n * sum(ck * z for ck, (_, z) in zip(c, members))
    torch.testing.assert_close(layer.weight, expected_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias, expected_b, rtol=0, atol=1e-12)
    assert opt.last_record["coeffs"] == pytest.approx(c, rel=1e-6)
    assert members[0][0].shape == (4, 5) and torch.linalg.matrix_rank(members[0][0]) == r


def test_copies_give_the_losses_of_sequential_in_place_evaluations_on_a_tiny_causal_lm():
    from zotune.lm import encode_pairs, pair_loss
    from zotune.models import as_loaded
    from zotune.testing import tiny_model

    lm = tiny_model("llama")
    model = lm.model.requires_grad_(False)
    batch = encode_pairs(lm.tokenizer, [("the movie was", " great"), ("a dull film", " bad")], 32)
    named = dict(model.named_parameters())
    opt = zotune.PopulationLowRank(list(named.items()), module=model, queries=4, rank=2)
    before = {k: v.clone() for k, v in named.items()}
    dirs, scheme = opt.estimator.directions(0), make_scheme("central")
    seen = []
    model.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    together = Copies(opt.estimator, opt.leaves, opt.names, model).measure(
        Probe(lambda copies=1: pair_loss(as_loaded(model), batch, copies=copies)), dirs, scheme, 1e-2)
    assert seen == [8 * 2]  # one forward of 2N = 8 copies of the 2 rows
    assert all(torch.equal(v, before[k]) for k, v in named.items())  # no weight written
    one_by_one = InPlace(opt.estimator, opt.leaves, fuse=False).measure(
        Probe(lambda: pair_loss(as_loaded(model), batch)), dirs, scheme, 1e-2)
    assert together.forward_passes == one_by_one.forward_passes == 8
    flat = [x for row in together.rows for x in row]
    assert flat == pytest.approx([x for row in one_by_one.rows for x in row], rel=1e-5)
    assert len(set(flat)) == 8  # the members really differ


@pytest.mark.parametrize("method, overrides, evaluation, passes", [
    ("population", ["optim.queries=3", "optim.perturbation=dual"], Copies, 2 * 6),  # 2 x 3 members a step
    ("per-example-lowrank", [], PerExample, 2 * 2),  # one member per example: two copies of the batch a step
])
def test_trains_a_tiny_causal_lm_with_full_fine_tuning_through_the_recipe(tmp_path, method, overrides, evaluation,
                                                                          passes):
    from pathlib import Path

    from zotune.config import load_config
    from zotune.train.loop import build, train

    data = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    if not data.is_dir():
        pytest.skip("shared data not found beside the repo")
    cfg = load_config(None, [
        "model.name=tiny-llama", "task.name=sst2", "task.train=16", "task.dev=0", "task.test=0",
        f"task.data_root={data}", "task.max_length=32", "train.batch_size=4", "optim.lr=3e-4",
        "train.progress=false", "train.tensorboard=false", "train.eval_at_start=false",
        f"optim.method={method}", *overrides, "train.steps=2",
        "train.save_every=2", f"train.output_dir={tmp_path / 'run'}"])
    setup = build(cfg)
    before = {n: p.detach().clone() for n, p in setup.named.items()}
    train(cfg, setup=setup)
    assert type(setup.optimizer.evaluation) is evaluation
    assert setup.optimizer.forward_passes == passes
    moved = [n for n, p in setup.named.items() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)  # full fine-tuning: every tensor moved


def mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model.requires_grad_(False)


def make(model):
    return zotune.PopulationLowRank(model.named_parameters(), lr=1e-2, eps=1e-3, queries=3, module=model)


def test_state_dict_round_trip_and_replay_bit_for_bit_and_no_model_size_state():
    saved = assert_resumes_and_replays(mlp, make, copies_closure, before=3, after=3)
    state_bytes = sum(t.numel() * t.element_size() for s in saved["state"].values() for t in s.values()
                      if torch.is_tensor(t))
    assert state_bytes == 0 and saved["zo"]["estimator_state"] == {}  # directions regenerate from seeds


def test_a_non_finite_member_loss_never_touches_the_weights():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = make(model)

    def one_bad_copy(copies=1):
        losses = copies_closure(model)(copies)
        return torch.cat([losses[:-1], torch.tensor([float("nan")], dtype=losses.dtype)])

    loss = opt.step(one_bad_copy)
    assert opt.last_record["skipped"] and opt.skipped_steps == 1 and torch.isnan(loss)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_modules_without_side_terms_are_refused_clearly():
    class Scaled(torch.nn.Linear):  # its own forward: the side term would not be its output's
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(Scaled(5, 4))
    with pytest.raises(ValueError, match=r"'0.weight' belongs to a Scaled.*perturbation='inplace'"):
        zotune.PopulationLowRank(model.named_parameters(), module=model)
    zotune.PopulationLowRank(model.named_parameters())  # in place needs no side terms
    with pytest.raises(ValueError, match="rank must be"):
        zotune.PopulationLowRank(mlp().named_parameters(), rank=0)
    with pytest.raises(ValueError, match="needs at least 2 query"):
        zotune.PopulationLowRank(mlp().named_parameters(), queries=1, scheme="one_sided_normalised")


def test_low_rank_momentum_is_refused_with_a_population_and_kept_with_lozo():
    # LOZO-M's momentum lives in one V shared for `interval` steps; a population draws its own V
    # per member and step, so the pair once failed at the second step with an AttributeError
    from zotune.estimators import LowRankEstimator, PopulationLowRank
    from zotune.rules import lowrank_momentum

    net = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="lowrank_momentum needs .*shared_subspace.* population_lowrank"):
        zotune.ZOOptimizer(list(net.named_parameters()), PopulationLowRank(queries=2, rank=1), lowrank_momentum(0.9))
    zotune.ZOOptimizer(list(net.named_parameters()), LowRankEstimator(rank=1), lowrank_momentum(0.9))


def test_a_chain_needs_what_its_rules_need():
    from zotune.rules import chain, lowrank_momentum, sgd

    assert chain(sgd(), lowrank_momentum(0.9)).needs == frozenset({"shared_subspace"})
    assert chain(sgd()).needs == frozenset()
