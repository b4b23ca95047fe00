"""The memory model: parameter shapes against real models, the ZO-Bench Table 5 formulas computed
by hand, and the activation accounting against allocations measured with AllocationTracker."""

from __future__ import annotations

import copy

import pytest
import torch

from zotune.bench import memory_model as mm
from zotune.bench.memory_model import (
    activation_bytes_per_layer,
    format_table,
    model_shape,
    predict,
    predict_table,
)
from zotune.bench.profile import AllocationTracker
from zotune.lm import Batch, pair_loss
from zotune.models import ALIASES, cache_root
from zotune.testing import tiny_model

ARCHS = ("llama", "opt", "gpt2", "roberta")


def _auto(kind):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM


@pytest.fixture(scope="module")
def tiny():
    return {arch: tiny_model(arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def synthetic():
    """A small LLaMA shape with grouped-query attention and an untied head."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    return model_shape(config)


# ------------------------------------------------------------------------- parameter shapes
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_shapes_match_the_model_built_from_the_config(tiny, arch, tied):
    config = copy.deepcopy(tiny[arch].model.config)
    config.tie_word_embeddings = tied
    with torch.device("meta"):  # shapes only, no memory
        model = _auto(tiny[arch].kind).from_config(config)
    shape = model_shape(config)
    assert {t.name: t.shape for t in shape.tensors} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert shape.total_params == sum(p.numel() for p in model.parameters())  # tied tensors once
    assert shape.params_per_layer == sum(p.numel() for n, p in model.named_parameters() if ".0." in n)
    assert shape.tied is tied


def test_smollm2_parameter_count():
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    shape = model_shape(config)
    assert shape.total_params == 134_515_008
    assert shape.params_per_layer == 3_540_096


@pytest.mark.skipif(not (cache_root() / "smollm2-135m" / "config.json").is_file(), reason="SmolLM2 not converted yet")
def test_smollm2_alias_reads_the_cached_config():
    shape = model_shape("smollm2-135m")
    assert (shape.total_params, shape.layers, shape.kv_heads, shape.tied) == (134_515_008, 30, 3, True)
    assert "smollm2-135m" in ALIASES


@pytest.mark.parametrize("arch", ARCHS)
def test_adapter_sizes_match_peft(arch):
    from zotune.params import select_trainable

    for scheme in ("lora", "prefix", "prompt"):
        lm = tiny_model(arch)  # select_trainable wraps the model in place: a fresh one each time
        _, named = select_trainable(lm, scheme)
        p = predict(lm.model.config, "mezo", scheme=scheme)
        assert p.trainable_params == sum(t.numel() for t in named.values()), scheme


# --------------------------------------------------------------------------------- formulas
def _paper(shape, method, **kw):
    return predict(shape, method, variant="paper", **kw)


def test_table5_formulas_by_hand(synthetic):
    s, seq, batch = synthetic, 64, 8
    x = s.total_params * 4
    max_tensor = max(t.numel for t in s.tensors) * 4  # MeZO regenerates z one tensor at a time
    act = activation_bytes_per_layer(s, batch, seq, 4)
    # blocks: embedding (+ the shared attention mask), each layer, the head
    a = [act.embedding + act.shared] + [act.per_layer] * s.layers + [act.head]
    x_l = [s.embedding_params * 4] + [s.params_per_layer * 4] * s.layers + [s.head_params * 4]
    assert sum(x_l) == x
    kw = dict(seq_len=seq, batch=batch)
    fo_dynamic = sum(max(ai, xi) for ai, xi in zip(a, x_l))
    assert _paper(s, "fo-sgd", **kw).peak_bytes == x + fo_dynamic
    assert _paper(s, "fo-adam", **kw).peak_bytes == x + fo_dynamic + 3 * x
    assert _paper(s, "fo-adam", foreach=False, **kw).peak_bytes == x + fo_dynamic + 2 * x
    assert _paper(s, "forward-grad", **kw).peak_bytes == x + x + max(a)
    for method in ("mezo", "zo-sgd-sign", "zo-sgd-cons", "zo-sgd-block"):
        assert _paper(s, method, **kw).peak_bytes == x + max_tensor
    assert _paper(s, "zo-sgd-momentum", **kw).peak_bytes == x + max_tensor + x
    p = _paper(s, "zo-adam", **kw)
    assert (p.weights_bytes, p.dynamic_bytes, p.state_bytes) == (x, max_tensor, 2 * x)
    assert p.peak_bytes == x + max_tensor + 2 * x
    # FP16 mixed precision: |x| + max(1/2 |a| + 1/2 |x|, sum_l max(1/2 |a_l|, |x_l|))
    mixed = max(sum(a) / 2 + x / 2, sum(max(ai / 2, xi) for ai, xi in zip(a, x_l)))
    assert _paper(s, "fo-sgd", dtype="fp16-mixed", **kw).peak_bytes == int(x + mixed)


def test_half_precision_halves_the_zo_rows(synthetic):
    for method in ("mezo", "zo-sgd-momentum", "zo-adam"):
        full = _paper(synthetic, method)
        half = _paper(synthetic, method, dtype="bfloat16")
        assert 2 * half.peak_bytes == full.peak_bytes
        assert 2 * half.state_bytes == full.state_bytes and 2 * half.weights_bytes == full.weights_bytes


def test_zo_sgd_does_not_grow_with_sequence_length_but_fo_sgd_does(synthetic):
    short, long = 32, 1024
    assert _paper(synthetic, "mezo", seq_len=short).peak_bytes == _paper(synthetic, "mezo", seq_len=long).peak_bytes
    fo = predict(synthetic, "fo-sgd", seq_len=long).peak_bytes - predict(synthetic, "fo-sgd", seq_len=short).peak_bytes
    zo = predict(synthetic, "mezo", seq_len=long).peak_bytes - predict(synthetic, "mezo", seq_len=short).peak_bytes
    assert fo > 0 and zo >= 0
    assert zo < fo / synthetic.layers  # ZO pays one layer's working set, FO keeps every layer's activations


def test_zotune_zo_sgd_needs_one_chunk_not_the_largest_tensor(synthetic):
    largest = max(t.numel for t in synthetic.tensors)
    p = predict(synthetic, "mezo", chunk_size=1000)
    assert p.dynamic_bytes == 1000 * 4
    assert predict(synthetic, "mezo", chunk_size=1000, workers=3).dynamic_bytes == 3 * 1000 * 4
    assert predict(synthetic, "mezo").dynamic_bytes == largest * 4  # the default chunk is larger
    assert _paper(synthetic, "mezo").dynamic_bytes == largest * 4
    adam = predict(synthetic, "zo-adam", chunk_size=1000)
    assert adam.dynamic_bytes == 3 * 1000 * 4  # the chunk, g and the bias-corrected v_{t-1}
    fwd = predict(synthetic, "inference").activation_bytes
    assert p.peak_bytes == p.weights_bytes + fwd + 1000 * 4  # the forward dominates here


def test_lora_reduces_state_to_the_adapter(synthetic):
    r, h, hq, hkv = 8, synthetic.hidden, synthetic.q_dim, synthetic.kv_dim
    adapter = synthetic.layers * (r * (h + hq) + r * (h + hkv))  # A (r x in) and B (out x r) on q and v
    for method, state in (("zo-adam", 2), ("zo-sgd-momentum", 1), ("fo-adam", 2), ("mezo", 0)):
        p = predict(synthetic, method, scheme="lora", lora_r=r, foreach=False)
        assert p.trainable_params == adapter
        assert p.state_bytes == state * adapter * 4, method
        assert p.weights_bytes == (synthetic.total_params + adapter) * 4
    full, lora = predict(synthetic, "fo-sgd"), predict(synthetic, "fo-sgd", scheme="lora")
    assert lora.dynamic_bytes == adapter * 4 < full.dynamic_bytes  # gradients of the adapter only
    assert lora.activation_bytes < full.activation_bytes  # frozen linears keep no inputs


def test_lozo_state_is_low_rank(synthetic):
    mats = [t for t in synthetic.tensors if len(t.shape) == 2]
    v = sum(t.shape[1] * 2 for t in mats) * 4
    assert predict(synthetic, "lozo", lozo_rank=2).state_bytes == v
    n = sum(t.shape[0] * 2 for t in mats) * 4
    vectors = sum(t.numel for t in synthetic.tensors if len(t.shape) == 1) * 4
    assert predict(synthetic, "lozo", lozo_rank=2, momentum=0.9).state_bytes == v + n + vectors


def test_table_and_all_methods(synthetic):
    preds = predict_table(synthetic, "all", seq_len=32, batch=4)
    assert [p.method for p in preds] == list(mm.METHODS)
    table = format_table(preds)
    assert table.count("\n") == len(preds) + 1 and "| zo-adam |" in table
    assert [p.method for p in predict_table(synthetic, "all", dtype="fp16-mixed")] == ["fo-sgd", "fo-adam"]


# ------------------------------------------------------------------------ against measurement
def _batch(kind: str, vocab: int, batch: int, seq: int) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[::2, :3] = 0  # left padding on every other row, as encode_pairs makes
    lengths = mask.sum(1)
    cont = torch.zeros(batch, seq, dtype=torch.bool)
    cont[:, -1 if kind == "causal" else seq // 2] = True  # one scored token per row
    labels = torch.where(cont, ids, torch.full_like(ids, -100))
    return Batch(ids, mask, cont, labels, lengths, kind)


BATCH, SEQ = 4, 48


def _measured(lm, trainable: set | None = None) -> tuple[int, int]:
    """Allocation peaks of one batch through ``lm`` (the weights exist already): (forward without
    autograd, forward and backward with gradients for the ``trainable`` names only; None: all)."""
    if trainable is not None:
        for name, p in lm.model.named_parameters():
            p.requires_grad_(name in trainable)
    data = _batch(lm.kind, len(lm.tokenizer), BATCH, SEQ)
    with torch.no_grad(), AllocationTracker() as forward:
        pair_loss(lm, data)
    with AllocationTracker() as step:  # activations + gradients
        pair_loss(lm, data).backward()
    return forward.peak_bytes, step.peak_bytes


@pytest.mark.parametrize("arch", ARCHS)
def test_fo_sgd_and_inference_predictions_match_measured_allocations(arch):
    lm = tiny_model(arch)  # fresh: backward writes .grad
    forward, step = _measured(lm)
    fo = predict(lm.model.config, "fo-sgd", seq_len=SEQ, batch=BATCH)
    paper = predict(lm.model.config, "fo-sgd", seq_len=SEQ, batch=BATCH, variant="paper")
    inference = predict(lm.model.config, "inference", seq_len=SEQ, batch=BATCH)
    assert 0.5 < (fo.peak_bytes - fo.weights_bytes) / step < 2.0
    assert 0.5 < paper.dynamic_bytes / step < 2.0
    assert 0.5 < inference.activation_bytes / forward < 2.0
    assert fo.weights_bytes == sum(p.numel() for p in lm.model.parameters()) * 4


@pytest.mark.parametrize("scheme", ["norms", "final_norm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_fo_sgd_on_the_norms_matches_measured_allocations(arch, scheme):
    """Only the gains need gradients: the backward keeps less than full tuning's, as measured."""
    from zotune.params import OWN_TENSOR_SCHEMES

    lm = tiny_model(arch)
    _, step = _measured(lm, set(OWN_TENSOR_SCHEMES[scheme](lm.model)))
    pred = predict(lm.model.config, "fo-sgd", scheme=scheme, seq_len=SEQ, batch=BATCH)
    full = predict(lm.model.config, "fo-sgd", seq_len=SEQ, batch=BATCH)
    assert 0.5 < (pred.peak_bytes - pred.weights_bytes) / step < 2.0
    assert pred.peak_bytes < full.peak_bytes


def test_the_final_norm_keeps_nothing_in_the_layers(synthetic):
    """A backward that stops at the last norm needs no layer's activations: only the head's."""
    final = activation_bytes_per_layer(synthetic, 4, 32, 4, scheme="final_norm")
    norms = activation_bytes_per_layer(synthetic, 4, 32, 4, scheme="norms")
    assert final.per_layer == 0 and final.embedding == 0
    assert final.head == norms.head
    gains = synthetic.hidden * 4
    assert predict(synthetic, "fo-adam", scheme="final_norm").state_bytes == 2 * gains
    assert predict(synthetic, "mezo", scheme="final_norm").trainable_params == synthetic.hidden


# ----------------------------------------------------------------------------------- errors
def test_errors_say_what_to_pass(synthetic):
    with pytest.raises(ValueError, match="Did you mean 'mezo'"):
        predict(synthetic, "mezzo")
    with pytest.raises(ValueError, match="Did you mean 'lora'"):
        predict(synthetic, "mezo", scheme="loar")
    with pytest.raises(ValueError, match="Did you mean 'bfloat16'"):
        predict(synthetic, "mezo", dtype="bfloat61")
    with pytest.raises(ValueError, match="Did you mean 'paper'"):
        predict(synthetic, "mezo", variant="papers")
    with pytest.raises(ValueError, match="seq_len"):
        predict(synthetic, "mezo", seq_len=0)
    with pytest.raises(ValueError, match="batch"):
        predict(synthetic, "fo-sgd", batch=-2)
    with pytest.raises(ValueError, match="first-order"):
        predict(synthetic, "mezo", dtype="fp16-mixed")
    from transformers import T5Config

    with pytest.raises(ValueError, match="model_type"):
        model_shape(T5Config())


def test_main_prints_the_table_and_reports_errors(tmp_path, capsys, synthetic):
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4).save_pretrained(tmp_path)  # fmt: skip
    assert mm.main(["--model", str(tmp_path), "--method", "all", "--seq-len", "16", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "| fo-adam |" in out and "| inference |" in out
    assert mm.main(["--model", str(tmp_path), "--method", "zo-adma"]) == 2
    assert "Did you mean 'zo-adam'" in capsys.readouterr().err
    assert mm.main(["--model", str(tmp_path), "--method", "mezo", "--seq-len", "0"]) == 2
    assert "seq_len must be an integer >= 1, got 0" in capsys.readouterr().err
    assert mm.main(["--model", str(tmp_path / "absent")]) == 2  # a ModelLoadError: one line
    assert "could not read a config" in capsys.readouterr().err


def test_main_lets_a_bug_keep_its_traceback(tmp_path, monkeypatch):
    """Only zotune's own errors are one line: a ValueError or OSError from a bug propagates."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4).save_pretrained(tmp_path)  # fmt: skip
    for bug in (ValueError("a bug"), OSError("another bug")):
        def broken(*args, **kwargs):
            raise bug

        monkeypatch.setattr(mm, "predict_table", broken)
        with pytest.raises(type(bug), match="bug"):
            mm.main(["--model", str(tmp_path), "--method", "mezo"])


def test_methods_without_memory_terms_are_refused_by_name(synthetic, monkeypatch):
    """A registered method built from an estimator the model has no terms for is refused, not
    predicted as if it were MeZO."""
    import dataclasses

    from zotune.methods import METHODS

    new = dataclasses.replace(METHODS["mezo"], name="new-zo", estimator="population")
    monkeypatch.setitem(mm._REGISTRY, "new-zo", new)
    monkeypatch.setitem(mm.METHODS, "new-zo", ("zo", "a new method"))
    with pytest.raises(mm.MemoryModelError, match="no terms for 'new-zo' \\(estimator 'population'"):
        predict(synthetic, "new-zo")


def test_new_methods_state_fzoo_none_hizoo_one_float32_copy_sparse_mezo_bits(synthetic):
    s = synthetic
    n = s.total_params
    mats = sum(t.numel for t in s.tensors if len(t.shape) >= 2)
    assert predict(s, "fzoo", queries=8).state_bytes == 0
    assert predict(s, "hizoo").state_bytes == 4 * n
    assert predict(s, "hizoo", dtype="bfloat16").state_bytes == 4 * n  # H stays float32
    assert predict(s, "sparse-mezo").state_bytes == (mats + 7) // 8
    # half-precision weights keep float32 optimizer state in zotune (the paper's table halves it)
    assert predict(s, "zo-adam", dtype="bfloat16").state_bytes == 2 * 4 * n


def test_half_precision_lozo_needs_no_whole_matrix_float32_copy(synthetic):
    """Issue 9 defect 11: the model assumed a float32 copy of the largest matrix."""
    largest = max(t.numel for t in synthetic.tensors if len(t.shape) == 2)
    half = predict(synthetic, "lozo", dtype="bfloat16", chunk_size=1 << 12, workers=1)
    assert half.dynamic_bytes < 4 * largest


def test_a_scheme_without_memory_terms_is_refused_by_name(synthetic, monkeypatch):
    """A scheme zotune.params trains but this model has no terms for is refused, not predicted as full."""
    monkeypatch.setattr(mm, "SCHEMES", ("full", "lora", "prefix", "prompt"))
    with pytest.raises(mm.MemoryModelError, match="no terms for scheme 'norms' yet"):
        predict(synthetic, "mezo", scheme="norms")


def test_an_unknown_scheme_is_refused_by_name(synthetic):
    with pytest.raises(mm.MemoryModelError, match="Did you mean 'lora'"):
        predict(synthetic, "mezo", scheme="lroa")


@pytest.mark.parametrize("scheme", ["norms", "final_norm"])
@pytest.mark.parametrize("arch", ARCHS)
def test_norms_scheme_trains_exactly_the_norm_tensors_zotune_selects(tiny, arch, scheme):
    """The memory model's norms are zotune.params' (every family's gains and biases, once; the final
    norm's alone)."""
    from zotune.params import OWN_TENSOR_SCHEMES

    lm = tiny[arch]
    selected = OWN_TENSOR_SCHEMES[scheme](lm.model)
    predicted = mm.trainable_tensors(model_shape(lm.model.config), scheme)
    assert {t.name: t.shape for t in predicted} == {n: tuple(p.shape) for n, p in selected.items()}
    assert predict(lm.model.config, "mezo", scheme=scheme).trainable_params == sum(p.numel() for p in selected.values())


def test_norms_state_is_the_gains_and_activations_between_frozen_and_full(synthetic):
    """ZO-Adam's moments and FO-Adam's gradients are the gains' size; a backward through a frozen
    base keeps what the inputs' gradients need plus (LLaMA) RMSNorm's normalised inputs."""
    gains = sum(t.numel for t in synthetic.tensors if t.norm) * 4
    assert predict(synthetic, "zo-adam", scheme="norms").state_bytes == 2 * gains
    assert predict(synthetic, "fo-adam", scheme="norms").state_bytes == 2 * gains
    acts = {s: activation_bytes_per_layer(synthetic, 4, 32, 4, scheme=s).per_layer for s in ("prefix", "norms", "full")}
    assert acts["prefix"] < acts["norms"] < acts["full"]
    assert acts["norms"] - acts["prefix"] == 2 * 4 * 32 * synthetic.hidden * 4  # two RMSNorms' outputs x hat


@pytest.mark.parametrize("scheme", ["full", "prefix"])
def test_an_iterate_average_adds_one_copy_of_what_trains(synthetic, scheme):
    """train.average_decay keeps one more copy of the trained tensors: the whole model for full
    tuning (MeZO's memory doubles), the prefix's table for prefix tuning."""
    plain = predict(synthetic, "mezo", scheme=scheme)
    avg = predict(synthetic, "mezo", scheme=scheme, average=True)
    copy = 4 * plain.trainable_params
    assert avg.state_bytes - plain.state_bytes == copy and avg.peak_bytes - plain.peak_bytes == copy
    assert "iterate average" in avg.formula
    if scheme == "full":
        assert copy == 4 * synthetic.total_params
    with pytest.raises(mm.MemoryModelError, match="no iterate average"):
        predict(synthetic, "mezo", average=True, variant="paper")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", [1, 2])
def test_top_layers_trains_exactly_what_zotune_selects(tiny, arch, layers):
    """The last layers' tensors and the final norm (scheme top_layers), and LoRA limited to the
    last layers, as zotune.params selects them."""
    from zotune.params import select_trainable, top_layers_parameters

    lm = tiny[arch]
    selected = top_layers_parameters(lm.model, layers)
    predicted = mm.trainable_tensors(model_shape(lm.model.config), "top_layers", layers)
    assert {t.name: t.shape for t in predicted} == {n: tuple(p.shape) for n, p in selected.items()}
    _, lora = select_trainable(tiny_model(arch), "lora", top_layers=layers)
    assert predict(lm.model.config, "mezo", scheme="lora", top_layers=layers).trainable_params == \
        sum(p.numel() for p in lora.values())


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_fo_sgd_on_the_top_layer_matches_measured_allocations(arch):
    """The backward stops at the lowest trained layer: less than full tuning's, as measured."""
    from zotune.params import top_layers_parameters

    lm = tiny_model(arch)
    _, step = _measured(lm, set(top_layers_parameters(lm.model, 1)))
    pred = predict(lm.model.config, "fo-sgd", scheme="top_layers", seq_len=SEQ, batch=BATCH)
    full = predict(lm.model.config, "fo-sgd", seq_len=SEQ, batch=BATCH)
    assert 0.5 < (pred.peak_bytes - pred.weights_bytes) / step < 2.0
    assert pred.activation_bytes < full.activation_bytes


def test_top_layers_keep_activations_only_above_the_first_trained_layer(synthetic):
    one = predict(synthetic, "fo-adam", scheme="top_layers")
    two = predict(synthetic, "fo-adam", scheme="top_layers", top_layers=2)
    per_layer = activation_bytes_per_layer(synthetic, 16, 64, 4, scheme="top_layers").per_layer
    assert two.activation_bytes - one.activation_bytes == per_layer  # one more layer keeps its own
    layer = sum(t.numel for t in synthetic.tensors if t.block == synthetic.layers - 1) * 4
    assert one.state_bytes == 2 * (layer + synthetic.hidden * 4)  # Adam's moments: the layer and the final norm
    assert predict(synthetic, "mezo", scheme="top_layers").state_bytes == 0
    lora_all, lora_top = (predict(synthetic, "fo-adam", scheme="lora", top_layers=k).activation_bytes
                          for k in (None, 1))
    assert lora_top < lora_all
    with pytest.raises(mm.MemoryModelError, match="top_layers applies to schemes top_layers and lora"):
        predict(synthetic, "mezo", scheme="prefix", top_layers=1)
    with pytest.raises(mm.MemoryModelError, match="has 3 layers"):
        predict(synthetic, "mezo", scheme="top_layers", top_layers=4)


def test_every_trainable_scheme_has_memory_terms():
    """Each scheme zotune.params trains has one SchemeTerms: what it trains and what a backward keeps."""
    from zotune.params import SCHEMES as TRAINABLE

    assert set(TRAINABLE) <= set(mm.SCHEME_TERMS)
    assert {s for s, terms in mm.SCHEME_TERMS.items() if terms.own} == {"full", "norms", "final_norm", "top_layers"}
    assert {s for s, terms in mm.SCHEME_TERMS.items() if terms.layered} == {"top_layers", "lora"}


def test_head_cache_rows_are_kept_state_and_refused_where_no_cache_applies(synthetic):
    kw = dict(scheme="top_layers", seq_len=32, top_layers=1)
    base, cached = predict(synthetic, "mezo", **kw), predict(synthetic, "mezo", cached_rows=1000, **kw)
    assert cached.state_bytes - base.state_bytes == 1000 * 32 * 64 * 4  # rows x tokens x hidden x float32
    assert cached.peak_bytes - base.peak_bytes == 1000 * 32 * 64 * 4 and "head cache" in cached.formula
    norm = predict(synthetic, "fzoo", scheme="final_norm", cached_rows=1000, dtype="bfloat16")
    plain = predict(synthetic, "fzoo", scheme="final_norm", dtype="bfloat16")
    assert norm.state_bytes - plain.state_bytes == 1000 * 64 * 2  # one vector a row, in the model's dtype
    with pytest.raises(mm.MemoryModelError, match="cached_rows.*not for 'lora'"):
        predict(synthetic, "mezo", scheme="lora", cached_rows=10)
    with pytest.raises(mm.MemoryModelError, match="cached_rows must be an integer >= 0"):
        predict(synthetic, "mezo", scheme="final_norm", cached_rows=-1)
