"""trainable.scheme: top_layers and train.head_cache with it: the first trained layer's inputs are
cached once; the losses, the trajectory and the dev metric are the model's own, the model comes
back whole, and every case the cache does not cover is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import ConfigError, load_config
from zotune.lm import choice_loss, encode_choices
from zotune.params import num_layers, select_trainable, top_layers_parameters
from zotune.train.head_cache import HeadCacheError
from zotune.train.layer_cache import LayerCache
from zotune.train.loop import build, build_head_cache, evaluate_split, replay, train

from tiny_runs import DATA, straight_and_resumed, tiny_setup, tiny_sst2  # tests/ is on the path (its conftest)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = tiny_sst2("top_layers", dev=16, test=0, lr=1e-2)


def _setup(*extra):
    return tiny_setup(TINY, *extra)


def _cache(setup, cfg) -> LayerCache:
    cache = LayerCache(setup.loaded, setup.named, cfg, "cpu", "classification", setup.data.spec.metric)
    cache.add("train", setup.data.train, 8)
    cache.add("dev", setup.data.dev, 8)
    return cache


def _shake(named, seed=0):
    """Move every trained tensor, so the cached losses are compared away from the starting point."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in named.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_top_layers_selects_the_last_layers_and_the_final_norm():
    cfg, setup = _setup("optim.method=mezo")
    total = num_layers(setup.model)
    assert total == 2
    names = set(top_layers_parameters(setup.model, layers=1))
    assert "model.norm.weight" in names
    assert all(n == "model.norm.weight" or n.startswith("model.layers.1.") for n in names)
    assert {n for n in setup.model.state_dict() if n.startswith("model.layers.1.")} <= names
    assert set(setup.named) == names  # the config's default is one layer
    both = top_layers_parameters(setup.model, layers=2)
    assert any(n.startswith("model.layers.0.") for n in both) and "model.embed_tokens.weight" not in both


@pytest.mark.parametrize("layers, message", [(3, "has 2 numbered layers"), (0, "integer >= 1")])
def test_top_layers_refuses_more_layers_than_the_model_has(layers, message):
    _, setup = _setup("optim.method=mezo")
    with pytest.raises(ValueError, match=message):
        top_layers_parameters(setup.model, layers=layers)


def test_schemes_without_options_still_refuse_them():
    _, setup = _setup("optim.method=mezo", "trainable.scheme=full")
    with pytest.raises(ValueError, match="scheme 'full' takes no options"):
        select_trainable(setup.loaded, "full", layers=1)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_cached_losses_are_the_models_own_for_one_copy_copies_and_per_example(model):
    cfg, setup = _setup("optim.method=mezo", f"model.name={model}")
    cache = _cache(setup, cfg)
    rows = [3, 0, 7, 12]
    examples = [setup.data.train[i] for i in rows]
    cb = encode_choices(setup.loaded.tokenizer, [e.choices for e in examples], [e.label for e in examples],
                        cfg.task.max_length)
    _shake(setup.named)
    closure = cache.closure(rows)
    with torch.no_grad():
        assert float(closure()) == pytest.approx(float(choice_loss(setup.loaded, cb)), abs=1e-5)
        torch.testing.assert_close(closure(copies=3), choice_loss(setup.loaded, cb, copies=3), atol=1e-5, rtol=0)
        torch.testing.assert_close(closure(copies=2, per_example=True),
                                   choice_loss(setup.loaded, cb, copies=2, per_example=True), atol=1e-5, rtol=0)


def test_the_cache_runs_only_the_trained_layers_and_gives_the_model_back_whole():
    cfg, setup = _setup("optim.method=mezo")
    cache = _cache(setup, cfg)
    ran = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
               for i, layer in enumerate(setup.model.model.layers)]
    try:
        with torch.no_grad():
            cache.closure([0, 1])()
        assert ran == [1]
        assert len(setup.model.model.layers) == 2
        ran.clear()
        evaluate_split(setup, setup.data.dev[:2], "dev")  # the model itself: every layer
        assert ran == [0, 1]
    finally:
        for h in handles:
            h.remove()


def test_gradients_reach_the_trained_layer_through_the_cache():
    cfg, setup = _setup("optim.method=fo-sgd")
    cache = _cache(setup, cfg)
    loss = cache.closure([0, 1, 2, 3])()
    loss.backward()
    grad = setup.named["model.layers.1.mlp.up_proj.weight"].grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_candidates_after_different_contexts_are_cached_too():
    cfg, setup = _setup("optim.method=mezo", "task.name=copa", "task.max_length=64")
    cache = _cache(setup, cfg)
    assert len(cache.hidden) >= 2 * 32  # one sequence per (premise, alternative)
    examples = setup.data.train[:4]
    cb = encode_choices(setup.loaded.tokenizer, [e.choices for e in examples], [e.label for e in examples],
                        cfg.task.max_length)
    _shake(setup.named, seed=1)
    with torch.no_grad():
        assert float(cache.closure([0, 1, 2, 3])()) == pytest.approx(float(choice_loss(setup.loaded, cb)), abs=1e-5)


def test_the_cached_dev_metric_is_the_models():
    cfg, setup = _setup("optim.method=mezo")
    cache = _cache(setup, cfg)
    _shake(setup.named, seed=2)
    mine = cache.evaluate("dev", setup.data.dev, setup.data.spec.metric)
    theirs = evaluate_split(setup, setup.data.dev, "dev")
    assert mine["accuracy"] == theirs["accuracy"] and mine["n"] == theirs["n"] == 16


def test_a_sequence_outside_the_cache_is_an_error_not_a_wrong_loss():
    cfg, setup = _setup("optim.method=mezo")
    cache = LayerCache(setup.loaded, setup.named, cfg, "cpu", "classification", setup.data.spec.metric)
    cache.add("train", setup.data.train[:8], 8)
    cache.examples["train"] = setup.data.train  # rows 8.. were never run through the trunk
    with pytest.raises(HeadCacheError, match="not in the cache"):
        cache.closure([20])()
    assert len(setup.model.model.layers) == 2  # put back after the error


@pytest.mark.parametrize("method", ["mezo", "per-example", "fo-sgd"])
def test_a_cached_run_follows_the_uncached_trajectory(tmp_path, method):
    common = TINY + [f"optim.method={method}", "train.steps=8", "train.save_every=8", "train.eval_every=4"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    a = train(load_config(None, common + [f"train.output_dir={plain}"]))
    b = train(load_config(None, common + [f"train.output_dir={cached}", "train.head_cache=true"]))
    wa = load_file(str(plain / "ckpt-last" / "weights.safetensors"))
    wb = load_file(str(cached / "ckpt-last" / "weights.safetensors"))
    start = build(load_config(None, common)).named
    name = "model.layers.1.self_attn.q_proj.weight"
    assert not torch.equal(wa[name], start[name].detach())  # it trained
    for n in start:
        torch.testing.assert_close(wb[n], wa[n], atol=1e-5, rtol=0)
    assert b["steps"] == a["steps"] == 8
    assert b["head_cache"]["trunk_forward_passes"] == 32 // 4 + 16 // 8
    assert b["head_cache"]["rows"] == {"train": 32, "dev": 16}
    assert b["best_dev"]["value"] == a["best_dev"]["value"]


def test_lora_in_the_last_layers_only_runs_cached_on_the_uncached_trajectory(tmp_path):
    common = TINY + ["optim.method=mezo", "trainable.scheme=lora", "trainable.top_layers=1", "train.steps=6",
                     "train.save_every=6", "train.eval_every=3"]
    setup = build(load_config(None, common))
    assert setup.named and all(".layers.1." in n and "lora_" in n for n in setup.named)
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    a = train(load_config(None, common + [f"train.output_dir={plain}"]))
    b = train(load_config(None, common + [f"train.output_dir={cached}", "train.head_cache=true"]))
    wa = load_file(str(plain / "ckpt-last" / "weights.safetensors"))
    wb = load_file(str(cached / "ckpt-last" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and wa
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], atol=1e-5, rtol=0)
    assert b["head_cache"]["rows"] == {"train": 32, "dev": 16} and a["steps"] == b["steps"] == 6


def test_a_cached_run_resumes_and_replays_bit_for_bit(tmp_path):
    common = TINY + ["optim.method=mezo", "train.head_cache=true", "train.save_every=3"]
    a, b, straight = straight_and_resumed(common, tmp_path)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert replay(straight)["bitwise_equal"]
    assert json.loads((straight / "config.json").read_text())["trainable"]["scheme"] == "top_layers"


def test_every_layer_training_leaves_nothing_to_cache():
    cfg, setup = _setup("optim.method=mezo", "trainable.top_layers=2")
    with pytest.raises(HeadCacheError, match="nothing frozen below"):
        LayerCache(setup.loaded, setup.named, cfg, "cpu", "classification", "accuracy")


def test_a_trained_embedding_is_refused():
    cfg, setup = _setup("optim.method=mezo")
    embed = setup.model.get_input_embeddings().weight
    with pytest.raises(HeadCacheError, match="not in a layer or the final norm"):
        LayerCache(setup.loaded, {**setup.named, "model.embed_tokens.weight": embed}, cfg, "cpu", "classification",
                   "accuracy")


def test_a_layer_that_runs_differently_in_the_cut_list_is_refused():
    cfg, setup = _setup("optim.method=mezo")
    layers = setup.model.model
    first = layers.layers[1]

    def by_position(module, args, out):  # as a per-index setting would (config.layer_types[i]: sliding windows)
        if layers.layers[0] is module:
            return (out[0] + 0.5, *out[1:]) if isinstance(out, tuple) else out + 0.5
        return out

    handle = first.register_forward_hook(by_position)
    try:
        cache = LayerCache(setup.loaded, setup.named, cfg, "cpu", "classification", "accuracy")
        with pytest.raises(HeadCacheError, match="do not take the previous layer's"):
            cache.add("train", setup.data.train, 8)
    finally:
        handle.remove()


def test_generation_tasks_are_refused():
    cfg, setup = _setup("optim.method=mezo")
    squad = load_config(None, TINY + ["optim.method=mezo", "task.name=squad", "task.max_length=128"])
    gen = build(squad)
    with pytest.raises(HeadCacheError, match="scores candidates"):
        build_head_cache(gen, "nll")
    with pytest.raises(HeadCacheError, match="generates new tokens"):
        LayerCache(gen.loaded, gen.named, squad, "cpu", "nll", "f1").add("train", gen.data.train, 4)


@pytest.mark.parametrize("extra, message", [
    (["trainable.scheme=prefix"], "final_norm or top_layers"),
    (["trainable.scheme=lora"], "lora with trainable.top_layers"),
    (["trainable.scheme=full", "trainable.top_layers=2"], "scheme 'full' has none"),
    (["trainable.top_layers=0"], "integer >= 1"),
    (["trainable.top_layers=true"], "integer >= 1"),
])
def test_config_errors_name_what_to_change(extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, TINY + ["optim.method=mezo", "train.head_cache=true"] + extra)


def test_the_memory_model_bounds_the_cache_it_keeps():
    """predict(cached_rows=...) counts each cached sequence at seq_len tokens: an upper bound on the
    cache's own bytes, and exact for sequences of that length."""
    from zotune.bench.memory_model import predict

    cfg, setup = _setup("optim.method=mezo")
    cache = _cache(setup, cfg)
    config = setup.loaded.model.config
    longest = max(len(key) for key in cache.hidden)
    kw = dict(scheme="top_layers", seq_len=longest, batch=8, top_layers=1)
    extra = (predict(config, "mezo", cached_rows=len(cache.hidden), **kw).state_bytes
             - predict(config, "mezo", **kw).state_bytes)
    assert extra == len(cache.hidden) * longest * config.hidden_size * 4
    assert 0 < cache.bytes <= extra
    tokens = sum(len(key) for key in cache.hidden)
    assert cache.bytes == tokens * config.hidden_size * 4  # what the bound assumes per token
