"""Starting points: every method has one for every scheme, each says where it comes from, and a
config that leaves lr / eps unset gets them (one that sets them keeps its own)."""

import logging

import pytest

from zotune.config import ConfigError, load_config
from zotune.defaults import SCHEME_EPS, starting_point
from zotune.methods import METHODS
from zotune.params import SCHEMES


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_and_scheme_has_a_positive_starting_point_with_evidence(method):
    assert set(SCHEME_EPS) == set(SCHEMES)
    for scheme in SCHEMES:
        start = starting_point(method, scheme)
        assert start.lr > 0 and start.eps > 0
        assert start.evidence.split(":")[0] in ("measured", "derived")


def test_measured_values_are_the_benchmarks_dev_choices():
    assert starting_point("mezo").lr == 3e-5 and starting_point("mezo").measured
    assert starting_point("fzoo").lr == 1e-3 and "sst2-convergence" in starting_point("fzoo").evidence
    lora = starting_point("fzoo", "lora")
    assert (lora.lr, lora.eps, lora.measured) == (1e-2, 1e-2, True)
    assert starting_point("fzoo", "prefix").lr == 0.1
    # MeZO on LoRA: its probe's pick on SST-2 dev (the ratio of MeZO's own OPT grids, ~100x full, agreed)
    lora = starting_point("mezo", "lora")
    assert (lora.lr, lora.eps, lora.measured) == (3e-3, 1e-2, True) and "mezo-lora-wide" in lora.evidence
    # other gradient-sized steps on LoRA follow that measured ratio
    assert starting_point("zo-sgd-cons", "lora").lr == pytest.approx(3e-3)
    assert "measured: MeZO on LoRA" in starting_point("zo-sgd-cons", "lora").evidence
    assert starting_point("zo-adam", "lora").lr == pytest.approx(5e-3)  # normalised: FZOO's measured ratio
    assert starting_point("mezo", "prefix").eps == 1e-1
    # MeZO on the prefix: 0.01 measured at equal time on SST-2 dev (0.1 never learned; OPT's grids' ratio gave 0.3)
    prefix = starting_point("mezo", "prefix")
    assert (prefix.lr, prefix.measured) == (1e-2, True) and "equal-time" in prefix.evidence
    # other gradient-sized steps on the prefix / prompt follow MeZO's measured prefix ratio
    assert starting_point("forward-grad", "prefix").lr == pytest.approx(1e-2)
    # MeZO on the final norm: its probe's pick on SST-2 dev; other gradient-sized steps follow its ratio
    final = starting_point("mezo", "final_norm")
    assert (final.lr, final.eps, final.measured) == (3e-2, 1e-2, True) and "tune" in final.evidence
    assert starting_point("forward-grad", "final_norm").lr == pytest.approx(3e-2)

def test_a_prompt_starts_a_tenth_as_far_as_the_prefix_its_entries_being_a_tenth_the_size():
    """A prompt starts from token embeddings (rms 0.13 on SmolLM2-135M), a prefix from activations
    (1.5; benchmarks/trainable_scale.py): eps and a normalised step a tenth of the prefix's."""
    assert starting_point("mezo", "prompt").eps == pytest.approx(starting_point("mezo", "prefix").eps / 10)
    assert starting_point("zo-adam", "prompt").lr == pytest.approx(starting_point("zo-adam", "prefix").lr / 10)
    assert starting_point("fzoo", "prompt").lr == pytest.approx(starting_point("fzoo", "prefix").lr / 10)


def test_mezo_on_the_prompt_is_measured_and_other_gradient_steps_follow_its_ratio():
    """MeZO's prompt lr is the dev probe's pick that moved SST-2 in 250 steps (3e-3: 100x full tuning's,
    30x what the square-of-the-entries'-size argument gave); gradient-sized methods take its ratio."""
    prompt = starting_point("mezo", "prompt")
    assert (prompt.lr, prompt.eps, prompt.measured) == (3e-3, 1e-2, True) and "sst2-convergence" in prompt.evidence
    assert starting_point("forward-grad", "prompt").lr == pytest.approx(3e-3)
    assert starting_point("zo-sgd-momentum", "prompt").lr == pytest.approx(3e-4)
    assert not starting_point("forward-grad", "prompt").measured


def test_a_config_without_lr_gets_the_starting_point_and_says_so(caplog):
    with caplog.at_level(logging.DEBUG, logger="zotune.methods"):
        cfg = load_config(None, ["optim.method=fzoo", "trainable.scheme=lora"])
    assert (cfg.optim.lr, cfg.optim.eps) == (1e-2, 1e-2)
    assert "optim.lr / eps not set: 0.01 / 0.01 for fzoo on lora (measured" in caplog.text
    cfg = load_config(None, ["optim.method=mezo", "optim.lr=1e-6"])
    assert (cfg.optim.lr, cfg.optim.eps) == (1e-6, 1e-3)  # what the recipe sets wins
    assert cfg.to_dict()["optim"]["lr"] == 1e-6


def test_errors_name_what_is_unknown():
    with pytest.raises(ValueError, match="no starting point for method 'nope'"):
        starting_point("nope")
    with pytest.raises(ValueError, match="unknown trainable scheme 'half'"):
        starting_point("mezo", "half")
    with pytest.raises(ConfigError) as e:  # an unknown method is one error, not also "lr must be > 0"
        load_config(None, ["optim.method=mezzo"])
    assert "optim.method" in str(e.value) and "optim.lr" not in str(e.value)


def test_zo_adam_moves_along_the_gradient_as_zo_sign_does_at_equal_lr_so_it_shares_its_lr():
    """Why ZO-Adam starts at ZO-Sign's lr, not FO-Adam's: on ZO estimates ``c z`` (``c = g . z``),
    Adam's ``m / sqrt(v)`` moves along ``g / ||g||`` by about 1 per unit lr and ZO-Sign's
    ``sign(c) z`` by sqrt(2 / pi) ~ 0.8, while Adam's noise per coordinate is a fifth of sign's."""
    import torch

    from zotune.rules.adam import adam
    from zotune.rules.base import DenseGrad
    from zotune.rules.sgd import sign

    gen = torch.Generator().manual_seed(0)
    d = 2000
    g = 0.5 * torch.randn(d, generator=gen)
    unit = g / g.norm()
    rule, sign_rule = adam(), sign()
    state = rule.init(torch.zeros(d))
    adam_along, sign_along, adam_rms = [], [], []
    for step in range(1, 301):
        z = torch.randn(d, generator=gen)
        c = float(g @ z)
        u = rule.update(DenseGrad(z, c), state, None, step).dense()
        if step > 20:  # past Adam's first steps, where m / sqrt(v) is +-1 per coordinate
            adam_along.append(float(u @ unit))
            sign_along.append(float(sign_rule.coeff(torch.tensor(c)) * z @ unit))  # ZO-Sign's step: coeff(c) z
            adam_rms.append(float(u.pow(2).mean().sqrt()))
    adam_mean = sum(adam_along) / len(adam_along)
    sign_mean = sum(sign_along) / len(sign_along)
    assert abs(sign_mean - (2 / torch.pi) ** 0.5) < 0.1
    assert 0.7 < adam_mean < 1.2 and 0.8 < adam_mean / sign_mean < 1.5
    assert sum(adam_rms) / len(adam_rms) < 0.35  # sign(c) z has rms 1 per coordinate
    assert starting_point("zo-adam").lr == starting_point("zo-sgd-sign").lr


def test_block_wise_noise_is_a_blocks_share_of_a_whole_model_direction():
    """ZO-SGD-Block's starting lr is MeZO's times the number of blocks: one query per block makes
    the estimate's noise ||g_b||^2 (d_b + 1) per block, about 1/B of one whole-model direction's
    ||g||^2 (d + 1), so B times the lr keeps a step's noise per forward pass where MeZO's is
    (a step costs 2B forwards). Measured on a linear loss split into 8 equal blocks."""
    import torch

    import zotune

    blocks, width = 8, 16
    g = torch.linspace(-1, 1, blocks * width, dtype=torch.float64).view(blocks, width) + 0.3

    def noise(estimator, seeds=300):
        total = 0.0
        for seed in range(seeds):
            params = [torch.nn.Parameter(torch.zeros(width, dtype=torch.float64)) for _ in range(blocks)]
            opt = zotune.ZOOptimizer([(f"model.layers.{b}.w", p) for b, p in enumerate(params)],
                                     estimator=estimator, lr=1.0, eps=1e-3, seed=seed)
            opt.step(lambda: sum((p * g[b]).sum() for b, p in enumerate(params)))
            estimate = -torch.stack([p.detach() for p in params])  # one step of lr 1 from zero
            total += float((estimate - g).pow(2).sum())
        return total / seeds

    ratio = noise("blockwise") / noise("gaussian")
    assert 0.5 / blocks < ratio < 2.0 / blocks  # expected (16 + 1) / (128 + 1) = 0.13
    assert starting_point("zo-sgd-block").lr == pytest.approx(30 * starting_point("mezo").lr)
    assert starting_point("zo-sgd-block", "lora").lr == pytest.approx(30 * starting_point("mezo", "lora").lr)
    # a prefix or a prompt is one tensor, so one block: MeZO's own estimate and lr
    assert starting_point("zo-sgd-block", "prefix").lr == starting_point("mezo", "prefix").lr
    assert starting_point("zo-sgd-block", "prompt").lr == pytest.approx(starting_point("mezo", "prompt").lr)
