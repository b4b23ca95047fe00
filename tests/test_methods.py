"""One method registry (zotune.methods.METHODS) read by everything that needs to know about
methods: config validation, the memory model, the command line, the presets and the studies.

Adding a method is one registry entry plus its preset class; this table says what else is
missing (memory terms for a new estimator or rule, a preset whose defaults disagree ...).
"""

from __future__ import annotations

import inspect

import pytest
import torch

import zotune
from zotune.bench import memory_model as mm
from zotune.cli import main as cli_main
from zotune.config import ConfigError, load_config, validate
from zotune.methods import COMMON_DEFAULTS, METHODS, build_optimizer
from zotune.presets import PRESETS
from zotune.testing import copies_closure

NAMES = list(METHODS)


@pytest.fixture(scope="module")
def shape():
    from transformers import LlamaConfig

    return mm.model_shape(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))


@pytest.mark.parametrize("name", NAMES)
def test_every_method_is_known_to_validate(name):
    m = METHODS[name]
    cfg = load_config(None, [f"optim.method={name}"])  # raises ConfigError on any problem
    assert validate(cfg) == []
    for key, value in COMMON_DEFAULTS.items():  # unset fields take the method's defaults
        if key == "queries" and m.per_example_only:  # one direction per example
            value = cfg.train.batch_size
        assert getattr(cfg.optim, key) == m.defaults.get(key, value)
    if m.family == "fo":
        with pytest.raises(ConfigError, match=f"model.dtype bfloat16 needs a ZO method: {name}"):
            load_config(None, [f"optim.method={name}", "model.dtype=bfloat16"])
    elif not m.half_precision:
        with pytest.raises(ConfigError, match=f"{name} needs float32 weights"):
            load_config(None, [f"optim.method={name}", "model.dtype=bfloat16"])
    else:
        load_config(None, [f"optim.method={name}", "model.dtype=bfloat16"])
    offload = [f"optim.method={name}", "model.offload=mmap"]
    if m.streamable:
        load_config(None, offload)
    else:
        with pytest.raises(ConfigError, match=f"model.offload needs a two-point ZO method \\(not '{name}'\\)"):
            load_config(None, offload)
    sparse = [f"optim.method={name}", "optim.sparsity=0.5"]
    if m.sparse_masks or "sparsity" in m.reads:
        load_config(None, sparse)
    else:
        with pytest.raises(ConfigError, match=f"does not combine with {name}"):
            load_config(None, sparse)


def test_validate_names_an_unknown_method_with_the_registry():
    with pytest.raises(ConfigError, match="Did you mean 'zo-adam'"):
        load_config(None, ["optim.method=zo-adma"])


@pytest.mark.parametrize("name", NAMES)
def test_every_method_is_known_to_the_memory_model(name, shape):
    assert mm.METHODS[name] == (METHODS[name].family, METHODS[name].description)
    p = mm.predict(shape, name, seq_len=8, batch=2)
    assert p.method == name and p.peak_bytes >= p.weights_bytes > 0
    # the method's own state terms come from its parts, not from its name
    m, n = METHODS[name], shape.total_params
    if m.family == "fo":
        assert p.state_bytes == (2 * 4 * n if m.rule == "adam" else 0)  # momentum 0: FO-SGD keeps none
    elif m.rule == "momentum":
        assert p.state_bytes == 4 * n
    elif m.rule == "adam":
        assert p.state_bytes == 2 * 4 * n
    elif m.estimator == "hessian":
        assert p.state_bytes == 4 * n
    elif m.stateless:
        assert p.state_bytes == 0


def test_the_memory_table_lists_every_method(shape):
    assert [p.method for p in mm.predict_table(shape, "all", seq_len=8, batch=2)] == ["inference", *NAMES]


@pytest.mark.parametrize("name", NAMES)
def test_every_method_is_in_the_command_line_help(name, capsys):
    assert cli_main(["methods"]) == 0
    listing = capsys.readouterr().out
    m = METHODS[name]
    line = next(line for line in listing.splitlines() if line.split() and line.split()[0] == name)
    assert f"zotune.{m.preset}" in line and m.rule in line and all(flag in line for flag in m.flags())
    assert m.description in listing
    # the columns line up, the longest name (per-example-lowrank) included
    rows = [row for row in listing.splitlines() if row and not row.startswith(" ")]
    assert len({row.index(" zotune.") for row in rows}) == 1
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert name in capsys.readouterr().out.replace("-\n", "-").replace("\n", " ").replace("  ", "")
    with pytest.raises(SystemExit):
        mm.main(["--help"])
    assert name in capsys.readouterr().out.replace("-\n", "-").replace("\n", " ").replace("  ", "")


def _preset_kwargs(name: str, o, model) -> dict:
    if METHODS[name].family == "fo":
        return {"lr": o.lr}
    if METHODS[name].per_example_only:
        return {"lr": o.lr, "module": model, "batch_size": o.queries}
    return {"lr": o.lr, **({"module": model} if name == "forward-grad" else {})}


@pytest.mark.parametrize("name", NAMES)
def test_every_method_has_a_preset_that_takes_the_same_step(name):
    """``zotune.<Preset>(params, lr=...)`` with its own defaults is the registry's method with
    the config's defaults: one step from each gives the same weights, bit for bit."""
    m = METHODS[name]
    cls = PRESETS[name]
    assert cls is getattr(zotune, m.preset)
    sig = inspect.signature(cls)
    for key, value in m.defaults.items():  # the preset's own defaults are the registry's
        assert sig.parameters[key].default == value, (name, key)
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = [p.detach().clone() for p in models[0].parameters()]
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    o = load_config(None, [f"optim.method={name}", "optim.lr=1e-2", "train.batch_size=4"]).optim
    built = build_optimizer(o, dict(models[0].named_parameters()), models[0])
    params = list(models[1].parameters()) if m.family == "fo" else list(models[1].named_parameters())
    preset = cls(params, **_preset_kwargs(name, o, models[1]))

    def loss_of(model):  # the closure protocol: copies of the batch, and (per-example) each example's loss
        return copies_closure(lambda copies: model(x.repeat(copies, 1)).pow(2).mean(1))

    for _ in range(2):
        built.step(loss_of(models[0]))
        preset.step(loss_of(models[1]))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, b) for a, b in zip(models[0].parameters(), start)), f"{name} did not move"


@pytest.mark.parametrize("name", NAMES)
def test_every_method_is_known_to_the_studies(name):
    from zotune.bench.studies import _parse_method, _title

    assert _parse_method(name, None) == name
    assert _title(name) == METHODS[name].title


def test_build_refuses_options_a_method_cannot_take():
    o = load_config(None, ["optim.method=mezo"]).optim
    o.method, o.sparsity = "lozo", 0.5  # past validation: the builder still refuses
    with pytest.raises(ValueError, match="optim.sparsity=0.5 \\(random sparse masks\\) does not combine with lozo"):
        build_optimizer(o, dict(torch.nn.Linear(4, 3).named_parameters()))
    o.sparsity = 0.0
    o.method = "fzoo"
    with pytest.raises(ValueError, match="cannot train streamed weights"):
        build_optimizer(o, dict(torch.nn.Linear(4, 3).named_parameters()), streamed=True)


def test_a_method_not_safe_under_data_parallel_is_refused_before_joining_ranks(monkeypatch):
    import dataclasses

    from zotune.train import run

    monkeypatch.setitem(METHODS, "mezo", dataclasses.replace(METHODS["mezo"], data_parallel=False))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(run, "init_from_env", lambda **kw: pytest.fail("joined the ranks"))
    with pytest.raises(ConfigError, match="'mezo' is not safe under data parallel"):
        run.run_training(load_config(None, ["optim.method=mezo"]))
