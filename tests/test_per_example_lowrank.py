"""Per-example low-rank directions (EGGROLL side terms x GRZO per-example): example j's U_j V_j^T,
both copies of the batch in one forward, each plain layer run once over all rows."""

import math

import pytest
import torch

import zotune
from zotune.estimators import Direction
from zotune.evaluation import InPlace, PerExample, Probe
from zotune.schemes import make_scheme
from zotune.testing import assert_resumes_and_replays, copies_closure

B, R = 4, 2
G = torch.Generator().manual_seed(0)
X = torch.randn(B, 5, generator=G, dtype=torch.float64)
T = torch.randn(B, 3, generator=G, dtype=torch.float64)


def linear(seed=0, bias=True):
    layer = torch.nn.Linear(5, 3, bias=bias).double().requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return layer


def closure_of(layer, calls=None, x=X, t=T):
    inner = copies_closure(lambda copies: ((layer(x.repeat(copies, 1)) - t.repeat(copies, 1)) ** 2).mean(1))

    def closure(copies=1, per_example=False):
        if calls is not None:
            calls.append((copies, per_example))
        return inner(copies, per_example)
    return closure


def make(layer, lr=0.05, eps=1e-3, **kw):
    return zotune.PerExampleLowRank(layer.named_parameters(), lr=lr, eps=eps, batch_size=B, rank=R, module=layer,
                                    **kw)


def example_loss(w, b, j):
    return float(((X[j] @ w.T + (0 if b is None else b) - T[j]) ** 2).mean())


@pytest.mark.parametrize("bias", [False, True])  # weight alone: one batched forward; with a bias: per example
def test_one_step_equals_the_per_example_low_rank_formula(bias):
    layer = linear(bias=bias)
    w0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone() if bias else None
    lr, eps = 0.05, 1e-3
    opt = make(layer, lr, eps)
    calls = []
    opt.step(closure_of(layer, calls))
    assert calls == [(2, True)] and opt.forward_passes == 2  # both copies in ONE forward: MeZO's cost
    est = opt.estimator
    e = [est.leaf_direction(Direction(0, j), 0, w0) for j in range(B)]
    e = [f.u @ f.v.T for f in e]
    z = [est.leaf_direction(Direction(0, j), 1, b0).z if bias else None for j in range(B)]
    c = [(example_loss(w0 + eps * e[j], None if z[j] is None else b0 + eps * z[j], j)
          - example_loss(w0 - eps * e[j], None if z[j] is None else b0 - eps * z[j], j)) / (2 * eps) for j in range(B)]
    torch.testing.assert_close(layer.weight, w0 - lr / B * sum(c[j] * e[j] / R for j in range(B)), rtol=0, atol=1e-12)
    if bias:
        torch.testing.assert_close(layer.bias, b0 - lr / B * sum(c[j] * z[j] for j in range(B)), rtol=0, atol=1e-12)
    assert opt.last_record["coeffs"] == pytest.approx(c, rel=1e-6)
    assert len(set(opt.last_record["coeffs"])) == B  # every example its own direction
    assert all(torch.linalg.matrix_rank(m) == R for m in e)


def _estimates(cls, steps: int, **kw):
    """The estimate of each step at a fixed point (lr 0), rebuilt from the record's coefficients."""
    layer = linear(bias=False)
    opt = cls(layer.named_parameters(), lr=0.0, eps=1e-5, rank=R, module=layer, **kw)
    w = layer.weight.detach().clone()
    out = []
    for s in range(steps):
        opt.step(closure_of(layer))
        c = opt.last_record["coeffs"]
        dirs = [opt.estimator.leaf_direction(Direction(s, j), 0, w) for j in range(len(c))]
        out.append(sum(cj * f.u @ f.v.T / R for cj, f in zip(c, dirs)).flatten() / len(c))
    return torch.stack(out)


def _batch_gradient():
    layer = linear(bias=False).requires_grad_(True)
    ((layer(X) - T) ** 2).mean(1).mean().backward()
    return layer.weight.grad.flatten()


def test_expectation_is_the_batch_gradient_and_lower_noise_than_one_shared_member():
    g = _batch_gradient()
    n = 3000
    per = _estimates(zotune.PerExampleLowRank, n, batch_size=B)
    se = per.std(0) / math.sqrt(n)
    assert bool(((per.mean(0) - g).abs() < 4 * se + 1e-9).all())  # E[c_j U_j V_j^T / r] = the gradient
    # the same two copies of the batch, one shared low-rank member for all examples (population, N = 1)
    shared = _estimates(zotune.PopulationLowRank, n, queries=1, perturbation="dual")
    se = shared.std(0) / math.sqrt(n)
    assert bool(((shared.mean(0) - g).abs() < 4 * se + 1e-9).all())
    assert float((per - g).pow(2).sum(1).mean()) < float((shared - g).pow(2).sum(1).mean())


def test_converges_on_a_small_regression_problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    true = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = x @ true.T
    layer = linear(bias=False)
    opt = make(layer, lr=0.05, eps=1e-3)
    first = None
    for s in range(400):
        rows = torch.arange(s * B, (s + 1) * B) % 64
        loss = float(opt.step(closure_of(layer, x=x[rows], t=t[rows])))
        first = loss if first is None else first
    assert float(((x @ layer.weight.T - t) ** 2).mean()) < 0.05 * first


def test_state_dict_round_trip_and_replay_bit_for_bit():
    state = assert_resumes_and_replays(linear, make, closure_of)
    assert all(v == {} for v in state["state"].values())  # stateless: nothing model-sized kept


def test_a_non_finite_example_loss_leaves_the_weights_untouched():
    layer = linear()
    before = layer.weight.detach().clone()
    opt = make(layer)

    def bad(copies=1, per_example=False):
        out = closure_of(layer)(copies, per_example).clone()
        out.view(-1)[2] = float("inf")
        return out

    opt.step(bad)
    assert torch.equal(layer.weight, before) and opt.skipped_steps == 1


def test_errors_are_specific():
    layer = linear()
    with pytest.raises(ValueError, match="needs module="):
        zotune.PerExampleLowRank(layer.named_parameters(), batch_size=B)
    with pytest.raises(ValueError, match="queries is batch_size"):
        zotune.PerExampleLowRank(layer.named_parameters(), batch_size=B, queries=2, module=layer)
    with pytest.raises(ValueError, match="one direction per example"):
        make(layer).step(closure_of(layer, x=X[:2], t=T[:2]))
    class Scaled(torch.nn.Linear):  # its own forward: a matrix direction is a side term of plain layers only
        def forward(self, x):
            return 2 * super().forward(x)

    odd = Scaled(5, 3).double()
    with pytest.raises(ValueError, match="plain nn.Linear"):
        zotune.PerExampleLowRank(odd.named_parameters(), batch_size=B, module=odd)


def _tiny(scheme):
    from zotune.lm import encode_pairs
    from zotune.params import select_trainable
    from zotune.testing import tiny_model

    loaded, named = select_trainable(tiny_model("llama"), scheme, init_seed=0)
    model = loaded.model.requires_grad_(False)
    pairs = [("the movie was", " great"), ("a dull film", " bad"), ("it is fine", " ok")]
    return loaded, model, named, encode_pairs(loaded.tokenizer, pairs, 32)


def _per_example_rows(loaded, model, named, batch, batched: bool):
    from zotune.lm import pair_loss

    opt = zotune.PerExampleLowRank(list(named.items()), module=model, batch_size=3, rank=R, eps=1e-2)
    central = make_scheme("central")
    evaluation = PerExample(opt.estimator, opt.leaves, opt.names, model, central)
    evaluation.perturbation.batch_side_terms = batched
    out = evaluation.measure(
        Probe(lambda copies=1, per_example=False: pair_loss(loaded, batch, copies=copies, per_example=per_example)),
        opt.estimator.directions(0), central, 1e-2)
    return opt, out


@pytest.mark.parametrize("scheme", ["full", "lora"])
def test_each_example_sees_its_own_low_rank_direction_on_a_tiny_causal_lm(scheme):
    """Example j's losses in the one forward equal evaluating it alone at x +- eps E_j in place."""
    from zotune.lm import pair_loss

    loaded, model, named, batch = _tiny(scheme)
    before = {k: v.detach().clone() for k, v in named.items()}
    opt, together = _per_example_rows(loaded, model, named, batch, batched=True)
    assert all(torch.equal(v, before[k]) for k, v in named.items())  # no weight written
    assert together.forward_passes == 2
    inplace = InPlace(opt.estimator, opt.leaves, fuse=False)
    central = make_scheme("central")
    for j, d in enumerate(opt.estimator.directions(0)):
        alone = inplace.measure(Probe(lambda: pair_loss(loaded, batch, per_example=True)[0, j]), [d], central, 1e-2)
        assert together.rows[j] == pytest.approx(alone.rows[0], rel=1e-5, abs=1e-6)
    assert len({round(x, 7) for row in together.rows for x in row}) == 6


def test_batched_side_terms_give_the_per_copy_losses_and_run_each_layer_once():
    loaded, model, named, batch = _tiny("full")
    calls = []
    proj = model.model.layers[0].mlp.up_proj
    original = proj.forward
    proj.forward = lambda x: (calls.append(x.shape[0]), original(x))[1]
    try:
        _, batched = _per_example_rows(loaded, model, named, batch, batched=True)
        assert calls == [6]  # one call over both copies of the 3 examples
        calls.clear()
        _, per_copy = _per_example_rows(loaded, model, named, batch, batched=False)
        assert calls == [1] * 6  # one call per example and copy
    finally:
        del proj.forward
    flat = lambda m: [x for row in m.rows for x in row]  # noqa: E731
    assert flat(batched) == pytest.approx(flat(per_copy), rel=1e-5)


def test_tied_embedding_and_head_get_one_side_term_each_per_example():
    """An Embedding's side term U_j[ids] V_j^T per example, and the tied head's (x V_j) U_j^T, batched."""
    from zotune.lm import pair_loss
    from zotune.testing import tiny_model

    loaded = tiny_model("gpt2")  # tied input / output embeddings
    model = loaded.model.requires_grad_(False)
    from zotune.lm import encode_pairs
    batch = encode_pairs(loaded.tokenizer, [("the movie was", " great"), ("a dull film", " bad")], 32)
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    opt = zotune.PerExampleLowRank([("wte", wte)], module=model, batch_size=2, rank=R, eps=1e-2)
    central = make_scheme("central")
    together = PerExample(opt.estimator, opt.leaves, opt.names, model, central).measure(
        Probe(lambda copies=1, per_example=False: pair_loss(loaded, batch, copies=copies, per_example=per_example)),
        opt.estimator.directions(0), central, 1e-2)
    inplace = InPlace(opt.estimator, opt.leaves, fuse=False)
    for j, d in enumerate(opt.estimator.directions(0)):
        alone = inplace.measure(Probe(lambda: pair_loss(loaded, batch, per_example=True)[0, j]), [d], central, 1e-2)
        assert together.rows[j] == pytest.approx(alone.rows[0], rel=1e-5, abs=1e-6)


def test_config_sets_one_query_per_example_and_population_takes_per_example():
    from zotune.config import ConfigError, load_config

    cfg = load_config(None, ["optim.method=per-example-lowrank", "train.batch_size=8"])
    assert cfg.optim.queries == 8
    cfg = load_config(None, ["optim.method=population", "optim.perturbation=per_example", "train.batch_size=8"])
    assert cfg.optim.queries == 8
    for overrides, message in [
        (["optim.method=per-example-lowrank", "optim.queries=4", "train.batch_size=8"], "queries must equal"),
        (["optim.method=per-example-lowrank", "train.grad_accum=2"], "whole batch in one forward"),
        (["optim.method=per-example-lowrank", "optim.perturbation=side"], "evaluates with 'per_example'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_trains_a_tiny_causal_lm_with_all_weights_through_the_recipe(tmp_path):
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
        "optim.method=per-example-lowrank", "train.steps=2", "train.save_every=2",
        f"train.output_dir={tmp_path / 'run'}"])
    setup = build(cfg)
    before = {n: p.detach().clone() for n, p in setup.named.items()}
    train(cfg, setup=setup)
    assert isinstance(setup.optimizer.evaluation, PerExample)
    assert setup.optimizer.forward_passes == 2 * 2  # two copies of the batch a step
    moved = [n for n, p in setup.named.items() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)


def test_memory_model_keeps_no_model_size_buffer_and_copies_no_matrix():
    from transformers import LlamaConfig

    from zotune.bench import memory_model as mm

    shape = mm.model_shape(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    low = mm.predict(shape, "per-example-lowrank", seq_len=16, batch=4)
    dense = mm.predict(shape, "per-example", seq_len=16, batch=4)
    assert low.state_bytes == 0 and low.batch == 4
    assert "per-example factors" in low.formula
    assert low.peak_bytes < dense.peak_bytes  # no perturbed copy of the embedding matrix
