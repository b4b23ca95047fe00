"""train.head_cache: the final norm's inputs cached once; the losses, the trajectory and the dev
metric are the model's own, and every case it does not cover is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import ConfigError, load_config
from zotune.train.checkpoint import CheckpointError
from zotune.lm import choice_loss, encode_choices
from zotune.train.head_cache import HeadCache, HeadCacheError
from zotune.train.loop import build, evaluate_split, replay, train

from tiny_runs import DATA, straight_and_resumed, tiny_setup, tiny_sst2  # tests/ is on the path (its conftest)

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = tiny_sst2("final_norm", dev=16, test=0, lr=1e-1)


def _setup(*extra):
    return tiny_setup(TINY, *extra)


def _cache(setup, cfg) -> HeadCache:
    cache = HeadCache(setup.loaded, list(setup.named.values()), cfg.task.max_length)
    cache.add("train", setup.data.train, 8)
    cache.add("dev", setup.data.dev, 8)
    return cache


def test_cached_losses_are_the_models_own_for_one_copy_copies_and_per_example():
    cfg, setup = _setup("optim.method=mezo")
    cache = _cache(setup, cfg)
    rows = [3, 0, 7, 12]
    examples = [setup.data.train[i] for i in rows]
    cb = encode_choices(setup.loaded.tokenizer, [e.choices for e in examples], [e.label for e in examples],
                        cfg.task.max_length)
    closure = cache.closure(rows)
    with torch.no_grad():
        setup.named["model.norm.weight"].mul_(torch.linspace(0.5, 1.5, setup.named["model.norm.weight"].numel()))
        assert float(closure()) == pytest.approx(float(choice_loss(setup.loaded, cb)), abs=1e-5)
        torch.testing.assert_close(closure(copies=3), choice_loss(setup.loaded, cb, copies=3), atol=1e-5, rtol=0)
        torch.testing.assert_close(closure(copies=2, per_example=True),
                                   choice_loss(setup.loaded, cb, copies=2, per_example=True), atol=1e-5, rtol=0)


def test_the_cache_keeps_one_row_per_example_and_counts_its_trunk_passes():
    cfg, setup = _setup("optim.method=mezo")
    cache = _cache(setup, cfg)
    hidden = setup.model.config.hidden_size
    assert cache.inputs["train"].shape == (32, hidden) and cache.inputs["dev"].shape == (16, hidden)
    assert cache.candidates["train"].shape == (32, 2) and cache.labels["train"].shape == (32,)
    assert cache.forward_passes == 4 + 2  # 32 / 8 and 16 / 8 rows a pass (this test caches 8 rows at a time)


def test_the_cached_dev_metric_is_the_models(tmp_path):
    cfg, setup = _setup("optim.method=mezo")
    cache = _cache(setup, cfg)
    with torch.no_grad():
        setup.named["model.norm.weight"].mul_(torch.linspace(-1.0, 2.0, setup.named["model.norm.weight"].numel()))
    mine = cache.evaluate("dev", setup.data.dev, setup.data.spec.metric)
    theirs = evaluate_split(setup, setup.data.dev, "dev")
    assert mine["accuracy"] == theirs["accuracy"] and mine["n"] == theirs["n"] == 16


@pytest.mark.parametrize("method", ["mezo", "per-example", "fo-sgd"])
def test_a_cached_run_follows_the_uncached_trajectory(tmp_path, method):
    common = TINY + [f"optim.method={method}", "train.steps=8", "train.save_every=8", "train.eval_every=4"]
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    a = train(load_config(None, common + [f"train.output_dir={plain}"]))
    b = train(load_config(None, common + [f"train.output_dir={cached}", "train.head_cache=true"]))
    wa = load_file(str(plain / "ckpt-last" / "weights.safetensors"))["model.norm.weight"]
    wb = load_file(str(cached / "ckpt-last" / "weights.safetensors"))["model.norm.weight"]
    start = build(load_config(None, common)).named["model.norm.weight"].detach()
    assert not torch.equal(wa, start)  # it trained
    torch.testing.assert_close(wb, wa, atol=1e-4, rtol=0)
    assert b["steps"] == a["steps"] == 8
    assert b["head_cache"]["trunk_forward_passes"] == 32 // 4 + 16 // 4 and b["head_cache"]["rows"] == {"train": 32, "dev": 16}
    assert "head_cache" not in a


def test_a_cached_run_resumes_and_replays_bit_for_bit(tmp_path):
    common = TINY + ["optim.method=mezo", "train.head_cache=true", "train.save_every=3"]
    a, b, straight = straight_and_resumed(common, tmp_path)
    assert torch.equal(a["model.norm.weight"], b["model.norm.weight"])
    assert replay(straight)["bitwise_equal"]
    assert json.loads((straight / "config.json").read_text())["train"]["head_cache"] is True


def test_a_run_without_the_cache_does_not_resume_one_with_it(tmp_path):
    common = TINY + ["optim.method=mezo", "train.save_every=2", f"train.output_dir={tmp_path / 'run'}"]
    train(load_config(None, common + ["train.steps=2"]))
    with pytest.raises(CheckpointError):
        train(load_config(None, common + ["train.steps=4", "train.head_cache=true"]))


@pytest.mark.parametrize("extra, message", [
    (["trainable.scheme=prefix"], "trainable.scheme: final_norm"),
    (["train.grad_accum=2"], "train.grad_accum: 1"),
    (["train.objective=nll"], "not the gold continuation"),
    (["model.offload=mmap"], "model.offload"),
    (["train.head_cache=yes please"], "true or false"),
])
def test_config_errors_name_what_to_change(extra, message):
    overrides = TINY + ["optim.method=mezo", "train.head_cache=true"] + extra
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_candidates_after_different_contexts_are_refused():
    cfg, setup = _setup("optim.method=mezo", "task.name=copa", "task.max_length=256")
    cache = HeadCache(setup.loaded, list(setup.named.values()), cfg.task.max_length)
    with pytest.raises(HeadCacheError, match="single tokens after a shared context"):
        cache.add("train", setup.data.train, 8)


def test_a_head_that_is_not_lm_head_of_the_norm_is_refused():
    cfg, setup = _setup("optim.method=mezo")
    head = setup.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, _a, out: out * 2.0)  # a logit scale the cache cannot see
    try:
        cache = HeadCache(setup.loaded, list(setup.named.values()), cfg.task.max_length)
        with pytest.raises(HeadCacheError, match="not lm_head"):
            cache.add("train", setup.data.train, 8)
    finally:
        handle.remove()


def test_trained_tensors_of_several_modules_are_refused():
    cfg, setup = _setup("optim.method=mezo")
    other = next(p for n, p in setup.model.named_parameters() if n not in setup.named)
    with pytest.raises(HeadCacheError, match="one module"):
        HeadCache(setup.loaded, [*setup.named.values(), other], cfg.task.max_length)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-opt"])
def test_other_families_final_norms_cache_to_the_same_loss(model):
    cfg, setup = _setup("optim.method=mezo", f"model.name={model}")
    cache = HeadCache(setup.loaded, list(setup.named.values()), cfg.task.max_length)
    cache.add("train", setup.data.train, 8)
    examples = setup.data.train[:4]
    cb = encode_choices(setup.loaded.tokenizer, [e.choices for e in examples], [e.label for e in examples],
                        cfg.task.max_length)
    with torch.no_grad():
        assert float(cache.closure([0, 1, 2, 3])()) == pytest.approx(float(choice_loss(setup.loaded, cb)), abs=1e-5)
