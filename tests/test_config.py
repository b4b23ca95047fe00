"""Configs: YAML + overrides, validated whole; schedules; the method registry."""

import pytest
import torch

import zotune
from zotune.config import ConfigError, load_config, parse_overrides
from zotune.methods import METHODS, build_optimizer
from zotune.schedules import lr_multiplier
from zotune.testing import copies_closure


def test_overrides_parse_numbers_booleans_and_lists():
    out = parse_overrides(["optim.lr=1e-5", "train.steps=10", "train.resume=false", "optim.betas=[0.8, 0.9]",
                           "task.template=none", "model.gguf_file="])
    assert out == {"optim": {"lr": 1e-5, "betas": [0.8, 0.9]}, "train": {"steps": 10, "resume": False},
                   "task": {"template": "none"}, "model": {"gguf_file": None}}
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_overrides(["lr=1e-5"])


def test_recipe_and_overrides_combine_and_every_error_is_listed(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {method: lozo, lr: 2.0e-5}\ntrain: {steps: 7}\n")
    cfg = load_config(recipe, ["train.steps=9"])
    assert (cfg.optim.method, cfg.optim.lr, cfg.train.steps) == ("lozo", 2e-5, 9)
    recipe.write_text("optim: {methd: lozo, lr: fast}\ntrian: {}\nmodel: {dtype: float8}\n")
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    msg = str(e.value)
    for part in ("Did you mean 'method'", "optim.lr: expected float, got 'fast'", "Did you mean 'train'",
                 "model.dtype: Unknown dtype 'float8'"):
        assert part in msg, (part, msg)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    recipe.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(recipe)


@pytest.mark.parametrize("overrides, message", [
    (["trainable.zo_layers=2", "trainable.scheme=lora"], "needs trainable.scheme: full"),
    (["model.dtype=bfloat16", "optim.method=fo-adam"], "needs a ZO method"),
    (["optim.warmup_steps=50", "train.steps=10"], "exceeds train.steps"),
    (["train.grad_accum=32"], "cannot exceed train.batch_size"),
    (["optim.sparsity=1.5"], "optim.sparsity must be in [0, 1)"),
    (["train.objective=mse"], "Unknown objective 'mse'"),
    (["optim.perturbation=swp"], "Did you mean 'swap'"),
    (["trainable.scheme=prefix", "trainable.prompt_init_text=It was"], "scheme 'prefix' has none"),
    (["trainable.scheme=lora", "trainable.prefix_values_only=true"], "needs trainable.scheme: prefix"),
    (["trainable.scheme=prefix", "trainable.prefix_values_only=true", "optim.method=fo-adam"],
     "'fo-adam' has none"),
    (["trainable.scheme=prefix", "trainable.prefix_values_only=yes please"], "must be true or false"),
    (["trainable.scheme=prompt", "trainable.prompt_init_text='  '"], "must be a non-empty text"),
])
def test_cross_field_rules(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_fingerprint_tracks_what_defines_the_trajectory():
    a = load_config(None, [])
    assert a.fingerprint() == load_config(None, ["train.steps=5", "train.output_dir=x"]).fingerprint()
    assert a.fingerprint() != load_config(None, ["optim.lr=2e-6"]).fingerprint()
    assert a.fingerprint() != load_config(None, ["train.batch_size=8"]).fingerprint()
    prompt = load_config(None, ["trainable.scheme=prompt"])
    assert prompt.fingerprint() != load_config(None, ["trainable.scheme=prompt",
                                                      "trainable.prompt_init_text=It was"]).fingerprint()


@pytest.mark.parametrize("name", list(METHODS))
def test_every_registered_method_builds_and_steps(name):
    # a real matrix (8 -> 6): Linear(3, 1) once hid a shape bug of sparse masks over LOZO
    model = torch.nn.Linear(8, 6)
    masks = METHODS[name].sparse_masks  # random masks where the registry says they combine
    cfg = load_config(None, [f"optim.method={name}", "optim.lr=1e-3", "train.batch_size=8"]
                      + (["optim.sparsity=0.1"] if masks else []))
    opt = build_optimizer(cfg.optim, dict(model.named_parameters()), model)
    x = torch.randn(8, 8)
    before = model.weight.detach().clone()

    closure = copies_closure(lambda copies: model(x.repeat(copies, 1)).pow(2).mean(1))  # per-example: 8 rows
    loss = opt.step(closure if METHODS[name].per_example_only else lambda: model(x).pow(2).mean())
    assert torch.isfinite(torch.as_tensor(loss))
    assert not torch.equal(model.weight.detach(), before), name
    if masks:
        assert type(opt.estimator).__name__ == "Sparse"


def test_lr_schedules_with_warmup():
    f = lr_multiplier("cosine", total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [round(f(s), 3) for s in (0, 1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1) and f(6) == pytest.approx(0.55)
    assert lr_multiplier("constant", 10)(9) == 1.0
    with pytest.raises(ValueError, match="Did you mean 'linear'"):
        lr_multiplier("lienar", 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_multiplier("linear", 10, warmup_steps=11)
    opt = zotune.MeZO([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier("linear", 4))
    lrs = []
    for _ in range(4):
        opt.step(lambda: torch.tensor(0.0))
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("recipe", sorted((__import__("pathlib").Path(__file__).parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_recipe_is_a_valid_config(recipe):
    cfg = load_config(recipe)  # raises ConfigError listing every problem
    first_line = recipe.read_text().splitlines()[0]
    assert first_line == f"# zotune train recipes/{recipe.name}"  # each recipe is headed by its command
    assert cfg.train.output_dir.endswith(recipe.stem)
