"""Per-example directions (GRZO-style): each example of the batch its own direction, two copies in one
forward: dense z_j (PerExampleMeZO) or low-rank U_j V_j^T as side terms of one shared forward
(PerExampleLowRank, EGGROLL-style)."""

import math

import pytest
import torch

import zotune
from zotune.estimators import Direction
from zotune.evaluation import InPlace, PerExample, Probe
from zotune.schemes import make_scheme
from zotune.testing import assert_resumes_and_replays, copies_closure

B, R = 4, 2  # examples per batch; rank of a low-rank direction
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


def example_loss(w, b, j):
    return float(((X[j] @ w.T + (0 if b is None else b) - T[j]) ** 2).mean())


def closure_of(layer, calls=None, x=X, t=T):
    """The closure protocol: per-example losses of ``copies`` copies of the batch, from one forward."""
    inner = copies_closure(lambda copies: ((layer(x.repeat(copies, 1)) - t.repeat(copies, 1)) ** 2).mean(1))

    def closure(copies=1, per_example=False):
        if calls is not None:
            calls.append((copies, per_example))
        return inner(copies, per_example)
    return closure


def make(layer, lr=0.05, eps=1e-3, **kw):
    return zotune.PerExampleMeZO(layer.named_parameters(), lr=lr, eps=eps, batch_size=B, module=layer, **kw)


def make_lowrank(layer, lr=0.05, eps=1e-3, **kw):
    return zotune.PerExampleLowRank(layer.named_parameters(), lr=lr, eps=eps, batch_size=B, rank=R, module=layer,
                                    **kw)


def test_one_step_equals_the_per_example_formula():
    layer = linear()
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    lr, eps = 0.05, 1e-3
    opt = make(layer, lr, eps)
    calls = []
    opt.step(closure_of(layer, calls))
    assert calls == [(2, True)]  # both copies of the batch in ONE forward
    assert opt.forward_passes == opt.forward_passes_per_step == 2  # MeZO's cost
    z = [(opt.estimator.leaf_direction(Direction(0, j), 0, w0).z.view_as(w0),
          opt.estimator.leaf_direction(Direction(0, j), 1, b0).z) for j in range(B)]
    c = [(example_loss(w0 + eps * zw, b0 + eps * zb, j) - example_loss(w0 - eps * zw, b0 - eps * zb, j)) / (2 * eps)
         for j, (zw, zb) in enumerate(z)]
    torch.testing.assert_close(layer.weight, w0 - lr / B * sum(cj * zw for cj, (zw, _) in zip(c, z)), rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias, b0 - lr / B * sum(cj * zb for cj, (_, zb) in zip(c, z)), rtol=0, atol=1e-12)
    assert opt.last_record["coeffs"] == pytest.approx(c, rel=1e-6)
    assert len(set(opt.last_record["coeffs"])) == B  # every example its own direction


def _estimates(per_example: bool, steps: int):
    """The estimate g of each step at a fixed point (lr 0), rebuilt from the record's coefficients."""
    layer = linear()
    if per_example:
        opt = make(layer, lr=0.0, eps=1e-4)
    else:
        opt = zotune.MeZO(layer.named_parameters(), lr=0.0, eps=1e-4)
    closure = closure_of(layer)
    plain = lambda: closure()  # noqa: E731
    out = []
    for s in range(steps):
        opt.step(closure if per_example else plain)
        c = opt.last_record["coeffs"]
        dirs = opt.estimator.directions(s)
        g = sum(cj * torch.cat([opt.estimator.leaf_direction(d, i, p).z.flatten()
                                for i, p in enumerate(opt.leaves)]) for cj, d in zip(c, dirs)) / len(dirs)
        out.append(g)
    return torch.stack(out)


def _example_gradients():
    layer = linear()
    w, b = layer.weight.detach().clone().requires_grad_(True), layer.bias.detach().clone().requires_grad_(True)
    rows = []
    for j in range(B):
        gw, gb = torch.autograd.grad(((X[j] @ w.T + b - T[j]) ** 2).mean(), (w, b))
        rows.append(torch.cat([gw.flatten(), gb]))
    return torch.stack(rows)


def test_expectation_is_the_batch_gradient_and_the_noise_is_lower_as_predicted():
    gj = _example_gradients()
    g = gj.mean(0)
    d = gj.shape[1]
    n = 3000
    per = _estimates(True, n)
    shared = _estimates(False, n)
    # unbiased: the mean estimate is the batch gradient, within its standard error
    se = per.std(0) / math.sqrt(n)
    assert bool(((per.mean(0) - g).abs() < 4 * se + 1e-9).all())
    # second moments, exact for a quadratic: per-example (1/B^2)(sum_j (d+2)|g_j|^2 + sum_{j!=k} g_j.g_k),
    # shared (d+2)|g|^2 (MeZO's single direction)
    gram = gj @ gj.T
    want_per = ((d + 2) * gram.diagonal().sum() + (gram.sum() - gram.diagonal().sum())) / B ** 2
    want_shared = (d + 2) * g.dot(g)
    got_per, got_shared = per.pow(2).sum(1).mean(), shared.pow(2).sum(1).mean()
    assert float(got_per) == pytest.approx(float(want_per), rel=0.12)
    assert float(got_shared) == pytest.approx(float(want_shared), rel=0.2)


def test_lower_noise_than_mezo_when_the_examples_disagree():
    # the examples' gradients spread widely about a small mean (T >> G): the regime of a real batch
    # MeZO's noise d (G + T/B) against d (G + T) / B: per-example lower whenever B > 1
    g = _example_gradients().mean(0)
    per, shared = _estimates(True, 2000), _estimates(False, 2000)
    noise_per = (per - g).pow(2).sum(1).mean()
    noise_shared = (shared - g).pow(2).sum(1).mean()
    assert float(noise_per) < float(noise_shared)


@pytest.mark.parametrize("new, bias, steps", [(make, True, 300), (make_lowrank, False, 400)], ids=["dense", "lowrank"])
def test_converges_on_a_small_regression_problem(new, bias, steps):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64)
    true = torch.randn(3, 5, generator=g, dtype=torch.float64)
    t = x @ true.T
    layer = linear(bias=bias)
    opt = new(layer, lr=0.05, eps=1e-3)
    first = None
    for s in range(steps):
        rows = torch.arange(s * B, (s + 1) * B) % 64
        loss = float(opt.step(closure_of(layer, x=x[rows], t=t[rows])))
        first = loss if first is None else first
    final = float(((layer(x) - t) ** 2).mean())
    assert final < 0.05 * first


@pytest.mark.parametrize("new", [make, make_lowrank], ids=["dense", "lowrank"])
def test_state_dict_round_trip_and_replay_bit_for_bit(new):
    state = assert_resumes_and_replays(linear, new, closure_of)
    assert all(v == {} for v in state["state"].values())  # stateless: nothing model-sized kept


@pytest.mark.parametrize("new", [make, make_lowrank], ids=["dense", "lowrank"])
def test_a_non_finite_example_loss_leaves_the_weights_untouched(new):
    layer = linear()
    before = layer.weight.detach().clone()
    opt = new(layer)

    def bad(copies=1, per_example=False):
        out = closure_of(layer)(copies, per_example)
        out = out.clone()
        out.view(-1)[1] = float("nan")
        return out

    opt.step(bad)
    assert torch.equal(layer.weight, before) and opt.skipped_steps == 1


@pytest.mark.parametrize("preset", [zotune.PerExampleMeZO, zotune.PerExampleLowRank], ids=["dense", "lowrank"])
def test_a_preset_needs_its_module_and_one_direction_per_example(preset):
    layer = linear()
    with pytest.raises(ValueError, match="needs module="):
        preset(layer.named_parameters(), batch_size=B)
    with pytest.raises(ValueError, match="queries is batch_size"):
        preset(layer.named_parameters(), batch_size=B, queries=2, module=layer)
    small = linear()
    with pytest.raises(ValueError, match="one direction per example"):
        preset(small.named_parameters(), batch_size=B, module=small).step(closure_of(small, x=X[:2], t=T[:2]))


def test_a_closure_without_per_example_losses_and_a_base_point_scheme_are_refused():
    small = linear()
    with pytest.raises(ValueError, match="per_example=True"):
        make(small).step(lambda copies=1: closure_of(small)(copies))
    with pytest.raises(ValueError, match="base point|loss at x"):
        zotune.ZOOptimizer(small.named_parameters(), zotune.make_estimator("gaussian", queries=B), "sgd",
                           module=small, perturbation="per_example", scheme="one_sided_normalised")


def test_per_example_losses_average_to_the_copies_losses_on_a_tiny_causal_lm():
    from zotune.lm import choice_loss, encode_choices, encode_pairs, pair_loss
    from zotune.testing import tiny_model

    lm = tiny_model("llama")
    lm.model.requires_grad_(False)
    pairs = [("the movie was", " great"), ("a dull film that goes on", " bad and long"), ("fine", " ok")]
    batch = encode_pairs(lm.tokenizer, pairs, 32)
    per = pair_loss(lm, batch, copies=2, per_example=True)
    assert per.shape == (2, 3)
    torch.testing.assert_close(per.mean(1), pair_loss(lm, batch, copies=2))
    torch.testing.assert_close(pair_loss(lm, batch, per_example=True).mean(), pair_loss(lm, batch))
    cb = encode_choices(lm.tokenizer, [[("a", " yes"), ("a", " no")], [("b c", " yes"), ("b c", " no")]], [0, 1], 32)
    per = choice_loss(lm, cb, copies=2, per_example=True)
    assert per.shape == (2, 2)
    torch.testing.assert_close(per.mean(1), choice_loss(lm, cb, copies=2))


@pytest.mark.parametrize("scheme", ["prefix", "prompt", "lora", "norms"])
def test_each_example_sees_its_own_direction_on_a_tiny_causal_lm(scheme):
    """Example j's losses in the one forward equal evaluating it alone at x +- eps z_j in place."""
    from zotune.evaluation import InPlace
    from zotune.lm import encode_pairs, pair_loss
    from zotune.params import select_trainable
    from zotune.testing import tiny_model

    loaded, named = select_trainable(tiny_model("llama"), scheme, init_seed=0)
    model = loaded.model.requires_grad_(False)
    pairs = [("the movie was", " great"), ("a dull film", " bad"), ("it is fine", " ok")]
    batch = encode_pairs(loaded.tokenizer, pairs, 32)
    opt = zotune.PerExampleMeZO(list(named.items()), module=model, batch_size=3, eps=1e-2)
    before = {k: v.detach().clone() for k, v in named.items()}
    dirs, central = opt.estimator.directions(0), make_scheme("central")
    together = PerExample(opt.estimator, opt.leaves, opt.names, model, central).measure(
        Probe(lambda copies=1, per_example=False: pair_loss(loaded, batch, copies=copies, per_example=per_example)),
        dirs, central, 1e-2)
    assert all(torch.equal(v, before[k]) for k, v in named.items())  # no weight written
    assert together.forward_passes == 2
    inplace = InPlace(opt.estimator, opt.leaves, fuse=False)
    for j, d in enumerate(dirs):
        alone = inplace.measure(Probe(lambda: pair_loss(loaded, batch, per_example=True)[0, j]), [d], central, 1e-2)
        assert together.rows[j] == pytest.approx(alone.rows[0], rel=1e-5, abs=1e-6)
    # and the examples' shares: a copy's mean is the batch loss at that copy's points
    assert len({round(x, 7) for row in together.rows for x in row}) == 6


def test_dual_copies_of_a_prompt_each_see_their_own_point():
    """Regression: peft's get_prompt embeds one row and repeats it, so perturbation='dual' on a prompt
    failed (the encoder saw 1 row for 2 copies); the prompt is now embedded per row."""
    from zotune.evaluation import Copies, InPlace
    from zotune.lm import encode_pairs, pair_loss
    from zotune.params import select_trainable
    from zotune.testing import tiny_model

    loaded, named = select_trainable(tiny_model("llama"), "prompt", init_seed=0)
    model = loaded.model.requires_grad_(False)
    batch = encode_pairs(loaded.tokenizer, [("the movie was", " great"), ("a dull film", " bad")], 32)
    opt = zotune.MeZO(list(named.items()), eps=1e-2)
    dirs, central = opt.estimator.directions(0), make_scheme("central")
    together = Copies(opt.estimator, opt.leaves, opt.names, model).measure(
        Probe(lambda copies=1: pair_loss(loaded, batch, copies=copies)), dirs, central, 1e-2)
    alone = InPlace(opt.estimator, opt.leaves, fuse=False).measure(
        Probe(lambda: pair_loss(loaded, batch)), dirs, central, 1e-2)
    assert together.rows[0] == pytest.approx(alone.rows[0], rel=1e-5)
    assert together.rows[0][0] != together.rows[0][1]


def test_config_sets_one_query_per_example_and_refuses_what_cannot_work():
    from zotune.config import ConfigError, load_config

    cfg = load_config(None, ["optim.method=per-example", "train.batch_size=8"])
    assert cfg.optim.queries == 8
    cfg = load_config(None, ["optim.method=mezo", "optim.perturbation=per_example", "train.batch_size=8"])
    assert cfg.optim.queries == 8  # any method with dense directions can use it
    cases = [
        (["optim.method=per-example", "optim.queries=4", "train.batch_size=8"], "queries must equal train.batch_size"),
        (["optim.method=per-example", "train.grad_accum=2"], "whole batch in one forward"),
        (["optim.method=fzoo", "optim.perturbation=per_example"], "a central difference per direction"),
        (["optim.method=lozo", "optim.perturbation=per_example"], "a central difference per direction"),
        (["optim.method=per-example", "optim.perturbation=dual"], "evaluates with 'per_example'"),
        (["optim.method=per-example", "trainable.zo_layers=2"], "hybrid ZO/FO"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_memory_model_counts_both_copies_of_the_batch_and_no_model_size_buffer():
    from transformers import LlamaConfig

    from zotune.bench import memory_model as mm

    shape = mm.model_shape(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2))
    per = mm.predict(shape, "per-example", scheme="prefix", seq_len=16, batch=4)
    mezo_rows = mm.predict(shape, "mezo", scheme="prefix", seq_len=16, batch=8)  # the same 2 x 4 rows
    assert per.activation_bytes == mezo_rows.activation_bytes
    assert per.state_bytes == 0 and per.batch == 4
    assert "perturbed module copy" in per.formula


# ------------------------------------------------------------ low-rank directions (PerExampleLowRank)
@pytest.mark.parametrize("bias", [False, True])  # weight alone: one batched forward; with a bias: per example
def test_one_step_equals_the_per_example_low_rank_formula(bias):
    layer = linear(bias=bias)
    w0 = layer.weight.detach().clone()
    b0 = layer.bias.detach().clone() if bias else None
    lr, eps = 0.05, 1e-3
    opt = make_lowrank(layer, lr, eps)
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


def _lowrank_estimates(cls, steps: int, **kw):
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
    per = _lowrank_estimates(zotune.PerExampleLowRank, n, batch_size=B)
    se = per.std(0) / math.sqrt(n)
    assert bool(((per.mean(0) - g).abs() < 4 * se + 1e-9).all())  # E[c_j U_j V_j^T / r] = the gradient
    # the same two copies of the batch, one shared low-rank member for all examples (population, N = 1)
    shared = _lowrank_estimates(zotune.PopulationLowRank, n, queries=1, perturbation="dual")
    se = shared.std(0) / math.sqrt(n)
    assert bool(((shared.mean(0) - g).abs() < 4 * se + 1e-9).all())
    assert float((per - g).pow(2).sum(1).mean()) < float((shared - g).pow(2).sum(1).mean())


def test_low_rank_directions_need_plain_layers():
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
