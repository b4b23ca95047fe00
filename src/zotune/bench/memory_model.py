"""Predict the peak memory of a fine-tuning step from a model's config, without loading weights.

The terms follow ZO-Bench (Zhang et al., 2024, "Revisiting Zeroth-Order Optimization for
Memory-Efficient LLM Fine-Tuning: A Benchmark"), Table 5 and Appendix C.1:
``peak = weight memory |x| + optimizer state + dynamic memory (gradients and optimizer
temporaries)``, where ``|x|`` is the bytes of the parameters, ``|x_l|`` those of layer ``l`` and
``|a_l|`` the activations layer ``l`` keeps for the backward pass. Two variants:

* ``variant="paper"``: Table 5 (full tuning), Table A2 (LoRA: ``eps`` for the adapter) and the
  FP16 / F16 rows, exactly as printed, with ``|a_l|`` from :func:`activation_bytes_per_layer`.
* ``variant="zotune"`` (default): what zotune's own implementation allocates. ZO directions are
  drawn in chunks of ``chunk_size`` elements (``zotune.estimators.base.DEFAULT_CHUNK``), so
  ZO-SGD's dynamic memory is one chunk, not ``max_l |x_l|``; a ZO step keeps no activations
  between layers, so its peak is ``|x| + state + max(forward working set, dynamic)``; an FO
  step's activations and gradients are followed through the backward pass layer by layer.

Example::

    from zotune.bench.memory_model import predict, predict_table, format_table
    p = predict("smollm2-135m", "mezo", seq_len=64, batch=16)
    print(p.peak_bytes / 2**20, p.formula)
    print(format_table(predict_table("smollm2-135m", "all", dtype="bfloat16")))

    python -m zotune.bench.memory_model --model smollm2-135m --method all --seq-len 64 --batch 16

What the accounting assumes (estimates, not guarantees):

* tensor bytes only (what ``torch.cuda.max_memory_allocated`` or
  :class:`zotune.bench.profile.AllocationTracker` count): no allocator slack, CUDA context,
  kernel workspaces or Python process;
* transformers 5 models in eval mode (no dropout) with SDPA attention on padded batches (k/v
  repeated for grouped-query attention; no ``seq x seq`` probabilities kept), the loss of
  ``zotune.lm`` (logits only at the scored positions); activations as read off the tensors
  autograd saves (:func:`activation_bytes_per_layer`) and a no-grad forward's working set
  (:func:`forward_working_set`), both checked against AllocationTracker on tiny models;
* OPT is pre-LayerNorm (every size except opt-350m); LoRA adapts the attention query and
  value (zotune.params defaults); prefix tuning's longer keys are ignored, prompt tuning's
  virtual tokens lengthen the sequence;
* zotune variant: one chunk buffer per worker thread, half-precision ZO steps perturb "just in
  time" (a perturbed copy of the module that runs) and round updates stochastically in float32
  per chunk (LOZO updates a half-precision matrix whole).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from zotune._validate import check_int, check_range, unknown_choice
from zotune.errors import ZotuneError
from zotune.estimators.base import DEFAULT_CHUNK  # elements per chunk of a dense ZO direction
from zotune.methods import METHODS as _REGISTRY
from zotune.params import SCHEMES as TRAINABLE_SCHEMES

__all__ = [
    "Activations",
    "DTYPES",
    "METHODS",
    "MemoryModelError",
    "ModelShape",
    "ParamTensor",
    "Prediction",
    "SCHEMES",
    "VARIANTS",
    "activation_bytes_per_layer",
    "adapter_tensors",
    "trainable_tensors",
    "build_parser",
    "forward_working_set",
    "format_table",
    "load_config",
    "main",
    "model_shape",
    "predict",
    "predict_table",
]

MiB = 2**20



class MemoryModelError(ZotuneError, ValueError):
    """A request the memory model cannot answer (an unknown method, dtype, model type ...)."""


# method -> (family, description): zotune's methods (zotune.methods.METHODS, whose estimator and
# rule select the terms below) and "inference". "zo": forward passes only; "fo": backpropagation.
METHODS: dict[str, tuple[str, str]] = {
    "inference": ("none", "one forward pass without gradients (the floor every method pays)"),
    **{name: (m.family, m.description) for name, m in _REGISTRY.items()},
}
VARIANTS = ("zotune", "paper")
# dtype -> (bytes of weights, gradients and optimizer state; bytes of activations)
DTYPES: dict[str, tuple[int, int]] = {
    "float32": (4, 4),
    "bfloat16": (2, 2),  # F16 in the paper: half-precision weights
    "float16": (2, 2),
    "fp16-mixed": (4, 2),  # FP16 in the paper: float32 weights, 16-bit autocast (FO methods)
    "bf16-mixed": (4, 2),
}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_MIXED = ("fp16-mixed", "bf16-mixed")

# LoRA's default targets (peft's per-architecture table), as in zotune.params.
_LORA_TARGETS = {"llama": ("q_proj", "v_proj"), "opt": ("q_proj", "v_proj"), "gpt2": ("c_attn",),
                 "bert": ("query", "value")}
_FAMILIES = {"llama": "llama", "opt": "opt", "gpt2": "gpt2", "bert": "bert", "roberta": "bert"}

# Activations of a non-gated MLP (in units of tokens x intermediate), per activation function:
# SAVED: what autograd keeps, as (for the input's gradient, for fc2's weight gradient only: the
# activation's output); relu saves its output, which fc2 shares; gelu_new is written in Python
# in transformers (0.5 x (1 + tanh(...))) and keeps four intermediates.
# WORK: the most that is alive at once in a no-grad forward (input, output, temporaries).
_ACT_SAVED = {"relu": (1, 0), "gelu": (1, 1), "gelu_pytorch_tanh": (1, 1), "silu": (1, 1),
              "swish": (1, 1), "quick_gelu": (2, 1), "gelu_new": (4, 1), "gelu_fast": (4, 1)}
_ACT_WORK = {"relu": 2, "gelu": 2, "gelu_pytorch_tanh": 2, "silu": 2, "swish": 2, "quick_gelu": 3,
             "gelu_new": 4, "gelu_fast": 4}
_F32 = 4  # norm statistics, softmax log-sum-exp and log-probabilities are float32


# ----------------------------------------------------------------------------------- shapes
class ParamTensor(NamedTuple):
    """One parameter tensor: its name (as transformers names it), shape, block (``"embed"``,
    the input side; a layer index; or ``"head"``, final norm and LM head), and whether it is a
    normalisation layer's gain or bias (what ``trainable.scheme: norms`` trains)."""

    name: str
    shape: tuple[int, ...]
    block: str | int
    norm: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes a memory prediction needs, read from a transformers config (see :func:`model_shape`).

    ``tensors`` lists every parameter once (a tied LM head is the embedding matrix, listed once),
    with the names and shapes transformers gives them; the counts below are derived from it.
    """

    name: str
    model_type: str
    family: str  # llama | opt | gpt2 | bert
    kind: str  # causal | masked
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    activation: str
    params_per_layer: int
    total_params: int
    tensors: tuple[ParamTensor, ...] = dataclasses.field(repr=False)

    @property
    def embedding_params(self) -> int:
        return sum(t.numel for t in self.tensors if t.block == "embed")

    @property
    def head_params(self) -> int:
        """Final norm, masked-LM transform and an untied LM head (a tied one is in the embedding)."""
        return sum(t.numel for t in self.tensors if t.block == "head")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def load_config(model: Any):
    """A transformers ``PretrainedConfig`` for ``model``: a config object (returned as is), an
    offline alias, a local folder, a ``.gguf`` file or a hub name. Reads no weights.

    Aliases: the converted checkpoint folder ``zotune.models.cache_root() / alias`` when it
    exists (what ``load_model`` writes on first use); otherwise the config is read from the
    installed package: the GGUF header (metadata only, no tensors), or its ``config.json``.
    """
    from transformers import AutoConfig, PretrainedConfig

    from zotune.models import ALIASES, ModelLoadError, alias_folder, cache_root

    if isinstance(model, PretrainedConfig):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise MemoryModelError(f"model must be a name, a path or a transformers config, got {type(model).__name__}")
    name = str(model)
    try:
        if name.lower() in ALIASES:
            alias = name.lower()
            cached = cache_root() / alias
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(str(cached))
            spec = ALIASES[alias]
            return AutoConfig.from_pretrained(str(alias_folder(alias)), gguf_file=spec.gguf_file)
        path = Path(name).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(name if not path.exists() else str(path))
    except ModelLoadError:
        raise
    except OSError as err:
        raise ModelLoadError(
            f"could not read a config for {name!r}: pass a local folder with config.json, a .gguf file, "
            f"a transformers config, or an offline alias ({', '.join(sorted(ALIASES))}). ({err})"
        ) from err


def model_shape(model: Any, *, kind: str | None = None) -> ModelShape:
    """The :class:`ModelShape` of ``model`` (anything :func:`load_config` takes, or a ModelShape).

    Parameter shapes are computed for LLaMA-style (q, k, v, o; gate/up/down MLP; RMSNorms),
    OPT and GPT-2 (biases, LayerNorms, fc1/fc2, learned positions) and BERT/RoBERTa (masked-LM
    head) configs; other model types raise :class:`MemoryModelError` (a ``ValueError``).
    """
    if isinstance(model, ModelShape):
        return model
    config = load_config(model)
    model_type = getattr(config, "model_type", None)
    if model_type not in _FAMILIES:
        raise MemoryModelError(unknown_choice("model_type (memory model)", str(model_type), _FAMILIES))
    family = _FAMILIES[model_type]
    if kind is None:
        from zotune.models import detect_kind

        kind = detect_kind(config)
    name = model if isinstance(model, (str, os.PathLike)) else getattr(config, "name_or_path", "") or model_type
    c = config
    tied = bool(getattr(c, "tie_word_embeddings", True))
    if family == "llama":
        h, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        hd = getattr(c, "head_dim", None) or h // heads
        dims = dict(vocab=c.vocab_size, hidden=h, intermediate=c.intermediate_size, layers=layers,
                    heads=heads, kv_heads=kv, head_dim=hd, activation=str(c.hidden_act))
        tensors = _llama_tensors(c, h, layers, heads * hd, kv * hd, tied)
    elif family == "opt":
        h, heads = c.hidden_size, c.num_attention_heads
        dims = dict(vocab=c.vocab_size, hidden=h, intermediate=c.ffn_dim, layers=c.num_hidden_layers,
                    heads=heads, kv_heads=heads, head_dim=h // heads, activation=str(c.activation_function))
        tensors = _opt_tensors(c, tied)
    elif family == "gpt2":
        h, heads = c.n_embd, c.n_head
        inner = c.n_inner or 4 * h
        dims = dict(vocab=c.vocab_size, hidden=h, intermediate=inner, layers=c.n_layer, heads=heads,
                    kv_heads=heads, head_dim=h // heads, activation=str(c.activation_function))
        tensors = _gpt2_tensors(c, inner, tied)
    else:
        h, heads = c.hidden_size, c.num_attention_heads
        dims = dict(vocab=c.vocab_size, hidden=h, intermediate=c.intermediate_size,
                    layers=c.num_hidden_layers, heads=heads, kv_heads=heads, head_dim=h // heads,
                    activation=str(c.hidden_act))
        tensors = _bert_tensors(c, model_type, tied)
    per_layer = sum(t.numel for t in tensors if t.block == 0)
    return ModelShape(
        name=str(name), model_type=model_type, family=family, kind=kind, tied=tied,
        params_per_layer=per_layer, total_params=sum(t.numel for t in tensors), tensors=tuple(tensors),
        **dims,
    )  # fmt: skip


def _linear(prefix: str, out: int, inp: int, block, bias: bool) -> list[ParamTensor]:
    ts = [ParamTensor(f"{prefix}.weight", (out, inp), block)]
    return ts + [ParamTensor(f"{prefix}.bias", (out,), block)] if bias else ts


def _norm(prefix: str, h: int, block, bias: bool = True) -> list[ParamTensor]:
    ts = [ParamTensor(f"{prefix}.weight", (h,), block, norm=True)]
    return ts + [ParamTensor(f"{prefix}.bias", (h,), block, norm=True)] if bias else ts


def _llama_tensors(c, h: int, layers: int, hq: int, hkv: int, tied: bool) -> list[ParamTensor]:
    ab, mb = bool(getattr(c, "attention_bias", False)), bool(getattr(c, "mlp_bias", False))
    i = c.intermediate_size
    ts = [ParamTensor("model.embed_tokens.weight", (c.vocab_size, h), "embed")]
    for l in range(layers):
        p = f"model.layers.{l}"
        ts += _linear(f"{p}.self_attn.q_proj", hq, h, l, ab) + _linear(f"{p}.self_attn.k_proj", hkv, h, l, ab)
        ts += _linear(f"{p}.self_attn.v_proj", hkv, h, l, ab) + _linear(f"{p}.self_attn.o_proj", h, hq, l, ab)
        ts += _linear(f"{p}.mlp.gate_proj", i, h, l, mb) + _linear(f"{p}.mlp.up_proj", i, h, l, mb)
        ts += _linear(f"{p}.mlp.down_proj", h, i, l, mb)
        ts += _norm(f"{p}.input_layernorm", h, l, False) + _norm(f"{p}.post_attention_layernorm", h, l, False)
    ts += _norm("model.norm", h, "head", False)
    if not tied:
        ts.append(ParamTensor("lm_head.weight", (c.vocab_size, h), "head"))
    return ts


def _opt_tensors(c, tied: bool) -> list[ParamTensor]:
    h, f, wep = c.hidden_size, c.ffn_dim, c.word_embed_proj_dim
    bias, affine = bool(getattr(c, "enable_bias", True)), bool(getattr(c, "layer_norm_elementwise_affine", True))
    d = "model.decoder"
    ts = [ParamTensor(f"{d}.embed_tokens.weight", (c.vocab_size, wep), "embed"),
          ParamTensor(f"{d}.embed_positions.weight", (c.max_position_embeddings + 2, h), "embed")]  # OPT offset 2
    if wep != h:
        ts += [ParamTensor(f"{d}.project_out.weight", (wep, h), "head"),
               ParamTensor(f"{d}.project_in.weight", (h, wep), "embed")]
    if c.do_layer_norm_before and not getattr(c, "_remove_final_layer_norm", False) and affine:
        ts += _norm(f"{d}.final_layer_norm", h, "head")
    for l in range(c.num_hidden_layers):
        p = f"{d}.layers.{l}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            ts += _linear(f"{p}.self_attn.{proj}", h, h, l, bias)
        if affine:
            ts += _norm(f"{p}.self_attn_layer_norm", h, l)
        ts += _linear(f"{p}.fc1", f, h, l, bias) + _linear(f"{p}.fc2", h, f, l, bias)
        if affine:
            ts += _norm(f"{p}.final_layer_norm", h, l)
    if not tied:
        ts.append(ParamTensor("lm_head.weight", (c.vocab_size, wep), "head"))
    return ts


def _gpt2_tensors(c, inner: int, tied: bool) -> list[ParamTensor]:
    h = c.n_embd
    if getattr(c, "add_cross_attention", False):
        raise MemoryModelError("GPT-2 configs with cross-attention are not modelled")
    ts = [ParamTensor("transformer.wte.weight", (c.vocab_size, h), "embed"),
          ParamTensor("transformer.wpe.weight", (c.n_positions, h), "embed")]
    for l in range(c.n_layer):
        p = f"transformer.h.{l}"
        # Conv1D stores its weight as (in, out)
        ts += _norm(f"{p}.ln_1", h, l)
        ts += [ParamTensor(f"{p}.attn.c_attn.weight", (h, 3 * h), l), ParamTensor(f"{p}.attn.c_attn.bias", (3 * h,), l)]
        ts += [ParamTensor(f"{p}.attn.c_proj.weight", (h, h), l), ParamTensor(f"{p}.attn.c_proj.bias", (h,), l)]
        ts += _norm(f"{p}.ln_2", h, l)
        ts += [ParamTensor(f"{p}.mlp.c_fc.weight", (h, inner), l), ParamTensor(f"{p}.mlp.c_fc.bias", (inner,), l)]
        ts += [ParamTensor(f"{p}.mlp.c_proj.weight", (inner, h), l), ParamTensor(f"{p}.mlp.c_proj.bias", (h,), l)]
    ts += _norm("transformer.ln_f", h, "head")
    if not tied:
        ts.append(ParamTensor("lm_head.weight", (c.vocab_size, h), "head"))
    return ts


def _bert_tensors(c, model_type: str, tied: bool) -> list[ParamTensor]:
    h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
    e = f"{model_type}.embeddings"
    ts = [ParamTensor(f"{e}.word_embeddings.weight", (v, h), "embed"),
          ParamTensor(f"{e}.position_embeddings.weight", (c.max_position_embeddings, h), "embed"),
          ParamTensor(f"{e}.token_type_embeddings.weight", (c.type_vocab_size, h), "embed")]
    ts += _norm(f"{e}.LayerNorm", h, "embed")
    for l in range(c.num_hidden_layers):
        p = f"{model_type}.encoder.layer.{l}"
        for proj in ("query", "key", "value"):
            ts += _linear(f"{p}.attention.self.{proj}", h, h, l, True)
        ts += _linear(f"{p}.attention.output.dense", h, h, l, True) + _norm(f"{p}.attention.output.LayerNorm", h, l)
        ts += _linear(f"{p}.intermediate.dense", i, h, l, True)
        ts += _linear(f"{p}.output.dense", h, i, l, True) + _norm(f"{p}.output.LayerNorm", h, l)
    # masked-LM head: dense + LayerNorm + decoder (tied to the embeddings) with a bias of its own
    head = "lm_head" if model_type == "roberta" else "cls.predictions"
    transform = "lm_head" if model_type == "roberta" else "cls.predictions.transform"
    ts += _linear(f"{transform}.dense", h, h, "head", True)
    ts += _norm(f"{transform}.layer_norm" if model_type == "roberta" else f"{transform}.LayerNorm", h, "head")
    ts.append(ParamTensor(f"{head}.bias", (v,), "head"))
    if not tied:  # untied, the decoder has its own weight and bias
        ts += _linear(f"{head}.decoder", v, h, "head", True)
    return ts


def _check_scheme(scheme: str) -> None:
    if scheme in TRAINABLE_SCHEMES and scheme not in SCHEMES:
        raise MemoryModelError(f"the memory model has no terms for scheme {scheme!r} yet; it covers "
                               f"{', '.join(SCHEMES)} (a zotune train run reports its measured peak memory)")
    if scheme not in SCHEMES:
        raise MemoryModelError(unknown_choice("scheme", str(scheme), SCHEMES))


def adapter_tensors(shape: ModelShape, scheme: str, *, lora_r: int = 8, prefix_tokens: int = 5,
                    prompt_tokens: int = 10) -> list[ParamTensor]:
    """The tensors a peft scheme trains (zotune.params defaults): LoRA ``A`` (r x in) and ``B``
    (out x r) on the attention query and value projections; prefix tuning's
    (tokens, layers * 2 * kv_dim) table; prompt tuning's (tokens, hidden) table."""
    if scheme == "lora":
        targets = _LORA_TARGETS[shape.family]
        out = []
        for t in shape.tensors:
            parts = t.name.split(".")
            if len(t.shape) == 2 and parts[-1] == "weight" and parts[-2] in targets:
                # Linear weights are (out, in); GPT-2's Conv1D weights are (in, out)
                o, i = (t.shape[1], t.shape[0]) if shape.family == "gpt2" else t.shape
                stem = t.name[: -len(".weight")]
                out += [ParamTensor(f"{stem}.lora_A.default.weight", (lora_r, i), t.block),
                        ParamTensor(f"{stem}.lora_B.default.weight", (o, lora_r), t.block)]
        return out
    if scheme == "prefix":
        return [ParamTensor("prompt_encoder.default.embedding.weight",
                       (prefix_tokens, shape.layers * 2 * shape.kv_dim), "embed")]
    if scheme == "prompt":
        return [ParamTensor("prompt_encoder.default.embedding.weight", (prompt_tokens, shape.hidden), "embed")]
    return []


def trainable_tensors(shape: ModelShape, scheme: str, top_layers: int | None = None,
                      **adapter_sizes: int) -> list[ParamTensor]:
    """What ``scheme`` trains: every tensor (``full``), the normalisation layers' gains and biases
    (``norms``), the last one's before the LM head (``final_norm``), every tensor of the last
    ``top_layers`` layers and the final norm (``top_layers``, default 1), or a peft adapter's
    tensors (:func:`adapter_tensors`, sized by ``adapter_sizes``; LoRA in the last ``top_layers``
    layers only when given)."""
    _check_scheme(scheme)
    first = _first_trained_layer(shape, scheme, top_layers)
    return [t for t in SCHEME_TERMS[scheme].select(shape, adapter_sizes)
            if not isinstance(t.block, int) or t.block >= first]


class _Kept(NamedTuple):
    """What a backward may keep, by what needs it (:func:`activation_bytes_per_layer`); a scheme's
    :attr:`SchemeTerms.keeps` sums the parts its gradients need."""

    needed: int  # a layer's, for its input's gradient
    weight: int  # a layer's, for its weights' gradients only
    embedding: int  # the input side (BERT's embedding LayerNorm input)
    head_needed: int
    head_weight: int
    gain_layer: int  # what a layer's norm gains' gradients add (LLaMA's RMSNorm keeps its x-hat; 0 elsewhere)
    gain_head: int  # the same for the final norm
    lora: int  # a LoRA layer's: the adapted projections' input and LoRA's T x r hidden activations


@dataclasses.dataclass(frozen=True)
class SchemeTerms:
    """What the memory model knows of a trainable scheme: ``own`` (it trains the base model's own
    tensors; a peft scheme adds its own), ``select(shape, adapter_sizes)`` (the tensors it trains
    over all layers), ``keeps(kept)`` (per layer, embedding and head bytes a backward keeps, from a
    :class:`_Kept`), ``layered`` (``trainable.top_layers`` applies) and ``default_top`` (the layers
    trained when it is unset; None: all)."""

    own: bool
    select: Callable[[ModelShape, dict], list[ParamTensor]]
    keeps: Callable[[_Kept], tuple[int, int, int]]
    layered: bool = False
    default_top: int | None = None


def _adapter(scheme: str) -> Callable[[ModelShape, dict], list[ParamTensor]]:
    return lambda shape, sizes: adapter_tensors(shape, scheme, **sizes)


def _frozen_base(k: _Kept) -> tuple[int, int, int]:
    """An adapter outside the base model's tensors (prefix, prompt): only the inputs' gradients."""
    return k.needed, k.embedding, k.head_needed


#: the trainable schemes this model has terms for
SCHEME_TERMS: dict[str, SchemeTerms] = {
    "full": SchemeTerms(True, lambda shape, _: list(shape.tensors),
                        lambda k: (k.needed + k.weight, k.embedding, k.head_needed + k.head_weight)),
    "norms": SchemeTerms(True, lambda shape, _: [t for t in shape.tensors if t.norm],
                         lambda k: (k.needed + k.gain_layer, k.embedding, k.head_needed + k.gain_head)),
    # the backward stops at the last norm: no layer keeps anything
    "final_norm": SchemeTerms(True, lambda shape, _: [t for t in shape.tensors if t.norm and t.block == "head"],
                              lambda k: (0, 0, k.head_needed + k.gain_head)),
    # a trained layer keeps full tuning's; the head what the final norm's gain needs; nothing below the layers
    "top_layers": SchemeTerms(True, lambda shape, _: [t for t in shape.tensors if isinstance(t.block, int)
                                                      or (t.norm and t.block == "head")],
                              lambda k: (k.needed + k.weight, 0, k.head_needed + k.gain_head),
                              layered=True, default_top=1),
    "lora": SchemeTerms(False, _adapter("lora"), lambda k: (k.needed + k.lora, k.embedding, k.head_needed),
                        layered=True),
    "prefix": SchemeTerms(False, _adapter("prefix"), _frozen_base),
    "prompt": SchemeTerms(False, _adapter("prompt"), _frozen_base),
}
SCHEMES = tuple(SCHEME_TERMS)


def _first_trained_layer(shape: ModelShape, scheme: str, top_layers: int | None) -> int:
    """The lowest layer a ``top_layers`` run trains (0 for a run over all layers): the backward of a
    first-order step stops there, and nothing below it keeps activations."""
    terms = SCHEME_TERMS[scheme]
    if top_layers is None:
        return 0 if terms.default_top is None else shape.layers - terms.default_top
    if not terms.layered:
        layered = [name for name, t in SCHEME_TERMS.items() if t.layered]
        raise MemoryModelError(f"top_layers applies to schemes {' and '.join(layered)}, not {scheme!r}")
    try:
        k = check_int("top_layers", top_layers)
    except ValueError as e:
        raise MemoryModelError(str(e)) from None
    if k > shape.layers:
        raise MemoryModelError(f"top_layers={k}: {shape.name} has {shape.layers} layers")
    return shape.layers - k


# ------------------------------------------------------------------------------ activations
class Activations(NamedTuple):
    """Bytes of activations that autograd keeps for the backward pass (see
    :func:`activation_bytes_per_layer`)."""

    per_layer: int  # one transformer layer (all layers are alike)
    embedding: int  # the input side (BERT's embedding LayerNorm input)
    head: int  # final norm, LM head input, log-probabilities of the scored positions
    shared: int  # saved once and used by every layer: the attention mask

    def total(self, layers: int) -> int:
        return self.embedding + layers * self.per_layer + self.head + self.shared


def _tokens(batch: int, seq_len: int, logits_positions: int | None) -> tuple[int, int]:
    t = batch * seq_len
    n = batch if logits_positions is None else check_int("logits_positions", logits_positions)
    return t, n


def activation_bytes_per_layer(shape: ModelShape, batch: int, seq_len: int, dtype_bytes: int, *,
                               logits_positions: int | None = None, scheme: str = "full",
                               lora_r: int = 8) -> Activations:
    """Activations a backward pass keeps, per transformer layer and for the head (an estimate).

    With ``T = batch * seq_len`` tokens, hidden ``h``, attention width ``hq = heads * head_dim``,
    MLP width ``i`` and ``b = dtype_bytes``, a layer keeps (read off autograd's saved tensors of
    the transformers 5 models in eval mode with SDPA attention; no dropout):

    * what the gradient of the layer's *input* needs: the norms' inputs and float32 statistics;
      q, k, v as passed to SDPA (k and v repeated to all heads for grouped-query attention:
      zotune's batches are padded, so transformers repeats k/v rather than use SDPA's GQA mode),
      its output and float32 log-sum-exp (``batch x heads x seq``; the flash / memory-efficient
      kernels keep no ``seq x seq`` probabilities; the math fallback would, and is not modelled);
      the activation function's inputs (LLaMA: gate, silu(gate) and up, ``3 T i``);
    * what only the *weights'* gradients need: the inputs of the linear layers (the norm
      outputs, the MLP product or activation output) and RMSNorm's normalised input.

    With ``scheme="full"`` that is, per layer: LLaMA ``2 T h (4 + 2b) + 4 T hq b + 4 T i b``
    (RMSNorm saves its input upcast to float32); OPT ``4 T h b + 4 T hq b + T i b`` (relu keeps
    only its output); GPT-2 ``9 T h b + 5 T i b`` (fused qkv, a q copy, gelu_new's Python
    intermediates); BERT/RoBERTa ``4 T h b + 4 T hq b + 2 T i b``. With a frozen base
    (``lora``, ``prefix``, ``prompt``) the second group is not kept, except the input of the
    LoRA-adapted projections and LoRA's ``T x r`` hidden activations. Training only the gains
    (``norms``) adds to the frozen base's what their gradients need: LLaMA's RMSNorm multiplies
    its gain by the normalised input, which it keeps (``T h b`` per norm, the final norm's in the
    head); LayerNorm's fused backward uses the input and statistics it keeps anyway.

    The head keeps the final norm's input, the LM-head input rows and the float32
    log-probabilities of the scored positions. zotune computes logits only at the continuation
    positions (``logits_to_keep``): ``logits_positions`` scored tokens (default ``batch``, one
    per row) plus one extra column per row; masked LMs run their LM head on all ``T`` positions.
    The attention mask (``batch x seq x seq``) is counted once, in ``shared``.
    """
    batch = check_int("batch", batch)
    seq_len = check_int("seq_len", seq_len)
    b = check_int("dtype_bytes", dtype_bytes)
    _check_scheme(scheme)
    T, n = _tokens(batch, seq_len, logits_positions)
    h, hq, i, V = shape.hidden, shape.q_dim, shape.intermediate, shape.vocab
    lse = batch * shape.heads * seq_len * _F32
    stats = 2 * T * _F32  # LayerNorm mean and rstd
    rows = n + batch  # LM-head rows of a causal LM
    logp = n * V * _F32
    act_needed, act_weight = _ACT_SAVED.get(shape.activation, (1, 1))
    embedding = 0
    # needed: for the input's gradient; weight: for the weights' gradients only
    if shape.family == "llama":
        needed = 2 * (T * h * _F32 + T * _F32) + 4 * T * hq * b + lse + 3 * T * i * b
        weight = 2 * 2 * T * h * b + T * i * b
        head_needed, head_weight = T * h * _F32 + T * _F32 + logp, T * h * b + rows * h * b
    elif shape.family in ("opt", "gpt2"):
        attn = 4 * T * hq * b if shape.family == "opt" else (3 * T * h + 2 * T * hq) * b
        needed = 2 * (T * h * b + stats) + attn + lse + act_needed * T * i * b
        weight = 2 * T * h * b + act_weight * T * i * b
        head_needed, head_weight = T * h * b + stats + logp, rows * h * b
    else:  # bert / roberta: post-norm; the layer input is saved by q, k, v
        needed = 2 * (T * h * b + stats) + 4 * T * hq * b + lse + act_needed * T * i * b
        weight = 2 * T * h * b + act_weight * T * i * b
        embedding = T * h * b + stats
        head_needed, head_weight = 2 * T * h * b + stats + logp, 2 * T * h * b
    llama = shape.family == "llama"  # RMSNorm keeps its x-hat for its gain's gradient (two a layer, one in the head)
    kept = _Kept(needed, weight, embedding, head_needed, head_weight,
                 gain_layer=2 * T * h * b if llama else 0, gain_head=T * h * b if llama else 0,
                 # lora_A keeps its input (the targets' input) and lora_B lora_A's output
                 lora=T * h * b + len(_LORA_TARGETS[shape.family]) * T * lora_r * b)
    layer, embedding, head = SCHEME_TERMS[scheme].keeps(kept)
    shared = batch * seq_len * seq_len * b
    return Activations(int(layer), int(embedding), int(head), int(shared))


def forward_working_set(shape: ModelShape, batch: int, seq_len: int, dtype_bytes: int, *,
                        logits_positions: int | None = None) -> dict[str, int]:
    """Largest tensors alive at once in a forward pass without gradients (an estimate), by part.

    Returns bytes for ``held`` (embedding outputs the model's forward keeps in local variables
    until it returns: LLaMA 1, OPT and GPT-2 2 (tokens and positions), BERT none, times
    ``T h``), ``layer`` (the larger of a layer's attention and MLP phases), ``head`` and
    ``shared`` (the attention mask). The transient peak of a forward is
    ``shared + held + max(layer, head)``.

    A layer's phase counts what its ``forward`` still references: the layer input (kept by the
    model's loop), the residual, the norm output, then attention's q, k, v (and k, v repeated
    for grouped-query attention while SDPA runs), its output and the output projection; or the
    MLP's intermediates (LLaMA: silu(gate), up and their product, 3 T i; relu / gelu: 2 T i;
    gelu_new 4 T i). The head's is the larger of the LM-head call (norm input and output, the
    kept rows, logits rows x vocab) and the scoring (selected logits and their float32
    log-softmax); a masked LM's logits cover all ``T`` positions. Checked against
    :class:`zotune.bench.profile.AllocationTracker` on the tiny models of ``zotune.models``.
    """
    batch = check_int("batch", batch)
    seq_len = check_int("seq_len", seq_len)
    b = check_int("dtype_bytes", dtype_bytes)
    T, n = _tokens(batch, seq_len, logits_positions)
    h, hq, hkv, i, V = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate, shape.vocab
    work = _ACT_WORK.get(shape.activation, 2)
    if shape.family == "llama":
        held = T * h
        repeat = 2 * T * hq if hkv < hq else 0
        attn = 2 * T * h + T * (hq + 2 * hkv) + T * hq + max(repeat, T * h)
        mlp = 3 * T * h + 3 * T * i
    elif shape.family == "opt":
        held = 2 * T * h
        attn = 3 * T * h + 4 * T * hq
        mlp = 3 * T * h + work * T * i
    elif shape.family == "gpt2":
        held = 2 * T * h
        attn = 3 * T * h + 3 * T * h + 2 * T * hq
        mlp = 4 * T * h + work * T * i
    else:
        held = 0
        attn = 2 * T * h + 4 * T * hq
        mlp = 2 * T * h + work * T * i
    scored = n * V * (b + (_F32 if b != _F32 else 0) + _F32)  # selected (+ float copy) + log-softmax
    if shape.kind == "masked":
        head = max(2 * T * h * b + T * V * b, T * V * b + scored)
    else:
        rows = n + batch
        head = max(2 * T * h * b + rows * (h + V) * b, rows * V * b + n * V * b, scored)
    return {"held": int(held * b), "layer": int(max(attn, mlp) * b), "head": int(head),
            "shared": batch * seq_len * seq_len * b}


# ------------------------------------------------------------------------------ prediction
@dataclasses.dataclass(frozen=True)
class Prediction:
    """Predicted memory of one training step (bytes).

    ``peak_bytes`` is not always the sum of the parts: in the zotune variant a ZO step's forward
    working set and its update temporaries are alive at different times (``max``), as are an FO
    step's activations and its optimizer temporaries. ``formula`` says how they combine.
    """

    model: str
    method: str
    scheme: str
    dtype: str
    variant: str
    seq_len: int
    batch: int
    trainable_params: int
    weights_bytes: int  # |x|: every parameter (adapters included)
    state_bytes: int  # optimizer state kept between steps (momentum, Adam moments, LOZO's V, N)
    dynamic_bytes: int  # gradients and optimizer temporaries (Table 5's "Dynamic Mem")
    activation_bytes: int  # FO: kept for backward; ZO / inference: forward working set
    peak_bytes: int
    formula: str

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MiB


def _resolve_dtype(dtype: str) -> str:
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise MemoryModelError(unknown_choice("dtype", str(dtype), DTYPES))
    return name


def _blocks(shape: ModelShape) -> list[str | int]:
    return ["embed", *range(shape.layers), "head"]


#: scheme -> tokens a cached sequence keeps (train.head_cache): every token's input of the first
#: trained layer (zotune.train.layer_cache), or the final norm's input at the scored position
#: (zotune.train.head_cache)
_CACHED_TOKENS: dict[str, tuple[Callable[[int], int], str]] = {
    "top_layers": (lambda seq_len: seq_len, "rows x seq x hidden"),
    "final_norm": (lambda seq_len: 1, "rows x hidden"),
}


def predict(
    model: Any,
    method: str,
    scheme: str = "full",
    seq_len: int = 64,
    batch: int = 16,
    dtype: str = "float32",
    lora_r: int = 8,
    prefix_tokens: int = 5,
    *,
    prompt_tokens: int = 10,
    logits_positions: int | None = None,
    variant: str = "zotune",
    chunk_size: int = DEFAULT_CHUNK,
    workers: int = 1,
    queries: int | None = None,
    lozo_rank: int = 2,
    momentum: float = 0.0,
    foreach: bool = True,
    average: bool = False,
    top_layers: int | None = None,
    cached_rows: int = 0,
) -> Prediction:
    """Predict the peak memory of one step of ``method`` on ``model`` (no weights are loaded).

    Args:
        model: a config source for :func:`load_config`, a ``PretrainedConfig`` or a :class:`ModelShape`.
        method: one of :data:`METHODS` (zotune's method names, plus ``"inference"``).
        scheme: ``full`` | ``norms`` | ``final_norm`` | ``lora`` | ``prefix`` | ``prompt`` (what trains;
            zotune.params defaults).
        seq_len, batch: tokens per example (prompt tuning adds ``prompt_tokens``) and examples per step.
        dtype: ``float32``; ``bfloat16`` / ``float16`` (F16: half-precision weights, activations,
            gradients and state); ``fp16-mixed`` / ``bf16-mixed`` (FP16: float32 weights with
            16-bit autocast; first-order methods only, as in the paper).
        logits_positions: scored positions per batch (default ``batch``: one per example).
        variant: ``"zotune"`` (what zotune allocates) or ``"paper"`` (Table 5 / A2 as printed).
        chunk_size: elements per chunk of a ZO direction (zotune variant).
        workers: threads drawing chunks at once, each with its own buffers (zotune on CPU uses
            ``ZOTUNE_THREADS``, default all cores; on CUDA chunks run in order: 1).
        queries: directions per step (q-RGE); more than one needs a gradient buffer per chunk
            (None: the method's default, e.g. FZOO's 8).
        lozo_rank: LOZO's rank ``r``. momentum: ``> 0`` makes ``lozo`` LOZO-M and gives ``fo-sgd``
            a momentum buffer (``zo-sgd-momentum`` always has one).
        foreach: FO-Adam's multi-tensor update, which needs one extra model-size temporary
            (the paper's "FO-Adam" vs "FO-Adam w/o fast foreach").
        average: ``train.average_decay`` is on: one more copy of the trainable tensors, kept for
            the whole run (:mod:`zotune.train.averaging`; zotune variant only, the papers have none).
        top_layers: ``trainable.top_layers``: the layers ``top_layers`` trains (default 1), or LoRA
            limited to the last ones.
        cached_rows: ``train.head_cache``: the token sequences its cache keeps for the whole run
            (train and dev rows; one per candidate where the candidates follow different contexts).
            ``top_layers`` keeps the first trained layer's input, ``hidden`` values a token, each
            sequence counted at ``seq_len`` tokens (the cache keeps real tokens only: an upper
            bound); ``final_norm`` keeps one ``hidden``-wide vector a row.
    """
    if method not in METHODS:
        raise MemoryModelError(unknown_choice("method", str(method), METHODS))
    spec = _REGISTRY.get(method)
    if spec is not None and spec.family == "zo" and (spec.estimator not in ESTIMATORS or spec.rule not in RULES):
        raise MemoryModelError(
            f"the memory model has no terms for {method!r} (estimator {spec.estimator!r}, rule {spec.rule!r}): "
            f"it accounts for estimators {', '.join(ESTIMATORS)} and rules {', '.join(RULES)}"
        )
    _check_scheme(scheme)
    if variant not in VARIANTS:
        raise MemoryModelError(unknown_choice("variant", str(variant), VARIANTS))
    per_example = spec is not None and spec.per_example_only
    if queries is None:  # per-example directions: one per example
        queries = batch if per_example else spec.defaults.get("queries", 1) if spec is not None else 1
    dtype = _resolve_dtype(dtype)
    try:
        seq_len = check_int("seq_len", seq_len)
        batch = check_int("batch", batch)
        for arg, value in (("lora_r", lora_r), ("prefix_tokens", prefix_tokens), ("prompt_tokens", prompt_tokens),
                           ("chunk_size", chunk_size), ("workers", workers), ("queries", queries),
                           ("lozo_rank", lozo_rank)):
            check_int(arg, value)
        if logits_positions is not None:
            check_int("logits_positions", logits_positions)
        momentum = check_range("momentum", momentum, 0.0, 1.0)
        cached_rows = check_int("cached_rows", cached_rows, minimum=0)
    except ValueError as e:  # the argument checks above name the argument: a user error
        raise MemoryModelError(str(e)) from None
    if cached_rows and scheme not in _CACHED_TOKENS:
        raise MemoryModelError(f"cached_rows: train.head_cache caches the frozen trunk for the schemes "
                               f"{', '.join(_CACHED_TOKENS)}, not for {scheme!r}")
    family = METHODS[method][0]
    if dtype in _MIXED and family != "fo":
        raise MemoryModelError(
            f"dtype {dtype!r} (autocast mixed precision) applies to first-order methods (fo-sgd, fo-adam); "
            f"for {method!r} use 'bfloat16' or 'float16' weights (the paper's F16) or 'float32'"
        )
    shape = model_shape(model)
    wb, ab = DTYPES[dtype]
    seq = seq_len + (prompt_tokens if scheme == "prompt" else 0)
    sizes = {"lora_r": lora_r, "prefix_tokens": prefix_tokens, "prompt_tokens": prompt_tokens}
    trainable = trainable_tensors(shape, scheme, top_layers, **sizes)
    added = [] if SCHEME_TERMS[scheme].own else trainable  # a peft scheme's tensors are new ones
    n_params = shape.total_params + sum(t.numel for t in added)
    ctx = _Context(
        shape=shape, method=method, estimator=spec.estimator if spec else None, rule=spec.rule if spec else None,
        scheme=scheme, dtype=dtype, variant=variant, wb=wb, ab=ab,
        batch=2 * batch if per_example else batch,  # per-example: both copies of the batch in one forward
        seq=seq, logits_positions=logits_positions, trainable=trainable,
        weights=n_params * wb, chunk=chunk_size, workers=workers, queries=queries, rank=lozo_rank,
        momentum=float(momentum), foreach=bool(foreach), lora_r=lora_r, per_example=per_example,
        first_layer=_first_trained_layer(shape, scheme, top_layers),
    )  # fmt: skip
    if family == "none":
        parts = _inference(ctx)
    elif family == "fo":
        parts = _first_order(ctx)
    else:
        parts = _ESTIMATOR_TERMS[ctx.estimator].model(ctx)
    state, dynamic, act, peak, formula = parts
    if cached_rows:
        tokens, terms = _CACHED_TOKENS[scheme]
        cache = cached_rows * tokens(seq_len) * shape.hidden * ab
        state, peak = state + cache, peak + cache
        formula = f"{formula} + head cache ({terms})"
    if average:
        if variant == "paper":
            raise MemoryModelError("average: the papers' tables have no iterate average; use variant 'zotune'")
        state, peak, formula = state + ctx.eps, peak + ctx.eps, f"{formula} + iterate average (|trainable|)"
    return Prediction(
        model=shape.name, method=method, scheme=scheme, dtype=dtype, variant=variant, seq_len=seq_len,
        batch=batch, trainable_params=sum(t.numel for t in trainable), weights_bytes=int(ctx.weights),
        state_bytes=int(state), dynamic_bytes=int(dynamic), activation_bytes=int(act), peak_bytes=int(peak),
        formula=formula,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Context:
    shape: ModelShape
    method: str
    estimator: str | None  # the method's (zotune.methods.METHODS); None for inference / first order
    rule: str | None
    scheme: str
    dtype: str
    variant: str
    wb: int  # bytes per weight / gradient / state element
    ab: int  # bytes per activation element
    batch: int
    seq: int
    logits_positions: int | None
    trainable: list[ParamTensor]
    weights: int
    chunk: int
    workers: int
    queries: int
    rank: int
    momentum: float
    foreach: bool
    lora_r: int
    per_example: bool = False  # rows of the forward are 2 copies of the batch; modules run perturbed copies
    first_layer: int = 0  # the lowest trained layer (top_layers): nothing below keeps activations

    @property
    def eps(self) -> int:
        """Bytes of the trainable tensors (|x| for full tuning, the adapter's for peft schemes)."""
        return sum(t.numel for t in self.trainable) * self.wb

    def per_block(self) -> dict[str | int, int]:
        """Trainable bytes per block (|x_l|)."""
        out = {k: 0 for k in _blocks(self.shape)}
        for t in self.trainable:
            out[t.block] += t.numel * self.wb
        return out

    def largest(self) -> int:
        """Elements of the largest trainable tensor."""
        return max((t.numel for t in self.trainable), default=0)

    def activations(self, dtype_bytes: int | None = None) -> Activations:
        return activation_bytes_per_layer(self.shape, self.batch, self.seq, dtype_bytes or self.ab,
                                          logits_positions=self.logits_positions, scheme=self.scheme,
                                          lora_r=self.lora_r)

    def working_set(self, dtype_bytes: int | None = None) -> int:
        ws = forward_working_set(self.shape, self.batch, self.seq, dtype_bytes or self.ab,
                                 logits_positions=self.logits_positions)
        return ws["shared"] + ws["held"] + max(ws["layer"], ws["head"])

    @property
    def half(self) -> bool:
        return self.wb == 2


def _block_acts(act: Activations, shape: ModelShape, first_layer: int = 0) -> dict[str | int, int]:
    """Activations kept per block; layers below ``first_layer`` (and the embedding) keep none:
    the backward stops at the lowest trained layer."""
    out: dict[str | int, int] = {"embed": (act.embedding if first_layer == 0 else 0) + act.shared}
    out.update({l: act.per_layer if l >= first_layer else 0 for l in range(shape.layers)})
    out["head"] = act.head
    return out


def _inference(ctx: _Context):
    fwd = ctx.working_set()
    return 0, 0, fwd, ctx.weights + fwd, "|x| + forward working set (no grad)"


def _first_order(ctx: _Context):
    shape, eps = ctx.shape, ctx.eps
    adam = ctx.rule == "adam"
    mixed = ctx.dtype in _MIXED
    state = 2 * eps if adam else (eps if ctx.momentum > 0 else 0)
    foreach_tmp = eps if adam and ctx.foreach else 0
    grads = ctx.per_block()
    if ctx.variant == "paper":
        # Table 5 / A1 / A2: activations a_l at full precision, halved by FP16 (1/2 a_l) and by F16
        a_full = _block_acts(ctx.activations(4), shape, ctx.first_layer)
        scale = 0.5 if (mixed or ctx.half) else 1.0
        acts = {k: v * scale for k, v in a_full.items()}
        per_layer = sum(max(acts[k], grads[k]) for k in acts)
        if mixed:
            dynamic = max(sum(acts.values()) + ctx.weights / 2, per_layer)
            dyn_text = "max(1/2|a| + 1/2|x|, sum_l max(1/2|a_l|, |x_l|))"
        else:
            dynamic = per_layer
            dyn_text = "sum_l max(|a_l|, |x_l|)"
        state_text = " + 2|x|" if adam else (" + |x| (momentum)" if state else "")
        fe_text = " + |x| (foreach)" if foreach_tmp else ""
        if ctx.scheme != "full":
            dyn_text, state_text = dyn_text.replace("|x_l|", "|e_l|"), state_text.replace("|x|", "|e|")
            fe_text = fe_text.replace("|x|", "|e|")
        # Table 5 counts the foreach temporaries in the optimizer-state column (FO-Adam: 3|x|)
        state += foreach_tmp
        peak = ctx.weights + dynamic + state
        return state, dynamic, sum(acts.values()), peak, f"|x| + {dyn_text}{state_text}{fe_text}"
    # zotune: follow the backward pass. Forward order: embed, layers, head; the backward visits
    # them in reverse, freeing a block's activations as it writes the block's gradients. A tied
    # LM head's gradient (the embedding matrix) is written first, at the head.
    acts = _block_acts(ctx.activations(), shape, ctx.first_layer)
    if mixed:  # autocast keeps a 16-bit copy of each linear layer's weight for the backward
        for t in shape.tensors:
            if len(t.shape) == 2 and t.block != "embed":  # embedding lookups are not cast
                acts[t.block] += t.numel * ctx.ab
        if shape.tied:
            acts["head"] += shape.vocab * shape.hidden * ctx.ab
    ws = forward_working_set(shape, ctx.batch, ctx.seq, ctx.ab, logits_positions=ctx.logits_positions)
    blocks = _blocks(shape)
    if shape.tied and ctx.scheme == "full":
        emb = next(t for t in shape.tensors if t.block == "embed")
        grads["embed"] -= emb.numel * ctx.wb
        grads["head"] += emb.numel * ctx.wb
    total_acts = sum(acts.values())
    fwd_peak = total_acts - acts["head"] + ws["head"]
    # the head's backward also writes the gradient of the whole logits tensor (zeros, then the
    # scored rows put in), beside its forward working set
    rows = ctx.batch * ctx.seq if shape.kind == "masked" else (ctx.logits_positions or ctx.batch) + ctx.batch
    head_work = ws["head"] + rows * shape.vocab * ctx.ab
    # a tied embedding gets a second, dense gradient from the lookup's backward (last of all),
    # summed into the head's: two embedding-sized transients at the very end of the backward
    emb_work = 2 * shape.vocab * shape.hidden * ctx.wb if (shape.tied and ctx.scheme == "full") else 0
    bwd_peak, kept, written = 0, total_acts, 0
    for k in reversed(blocks):
        work = head_work if k == "head" else (max(ws["layer"], emb_work) if k == "embed" else ws["layer"])
        written += grads[k]
        bwd_peak = max(bwd_peak, kept + written + work)
        kept -= acts[k]
    step_peak = sum(grads.values()) + foreach_tmp
    dynamic = sum(grads.values()) + foreach_tmp
    peak = ctx.weights + state + max(fwd_peak, bwd_peak, step_peak)
    st = " + 2|e| (Adam moments)" if adam else (" + |e| (momentum)" if state else "")
    fe = " + |e| foreach temporaries" if foreach_tmp else ""
    text = f"|x|{st} + max(activations + gradients through the backward, |e| grads{fe})"
    return state, dynamic, total_acts, peak, text


def _forward_grad(ctx: _Context):
    eps = ctx.eps
    if ctx.variant == "paper":
        a = max(_block_acts(ctx.activations(4), ctx.shape, ctx.first_layer).values()) * (0.5 if ctx.half else 1.0)
        peak = ctx.weights + eps + a
        e = "|x|" if ctx.scheme == "full" else "|e|"
        return 0, eps, a, peak, f"|x| + {e} (z) + max_l |a_l|"
    # zotune: the whole direction z (|e|) is built before torch.func.jvp, leaf by leaf (each
    # leaf's chunks, then their concatenation); the JVP forward carries a tangent beside every
    # primal (twice the forward working set); the update redraws z chunk by chunk.
    built, build_peak = 0, 0
    for t in ctx.trainable:
        build_peak = max(build_peak, built + 2 * t.numel * ctx.wb)
        built += t.numel * ctx.wb
    fwd = 2 * ctx.working_set()
    chunk = min(ctx.chunk, ctx.largest()) * ctx.wb * ctx.workers
    peak = ctx.weights + max(eps + fwd, build_peak, chunk)
    return 0, eps, fwd, peak, "|x| + |e| (z) + 2 x forward working set (primal + tangent)"


def _dense_state(ctx: _Context, copies: int) -> int:
    """Bytes of ``copies`` trainable-size buffers of optimizer state; zotune keeps them in float32
    for half-precision weights, the paper's table halves them."""
    state_b = 4 if ctx.half and ctx.variant == "zotune" else ctx.wb
    return copies * (ctx.eps // ctx.wb) * state_b


def _hessian_state(ctx: _Context) -> tuple[int, str]:
    return (ctx.eps // ctx.wb) * (8 if ctx.wb == 8 else 4), "|H| (float32)"


def _mask_state(ctx: _Context) -> tuple[int, str]:
    mats = sum(t.numel for t in ctx.trainable if len(t.shape) >= 2)
    return (mats + 7) // 8, "mask bits (|e| / 32 in float32)"


def _lowrank_state(ctx: _Context) -> tuple[int, str]:
    """V (n x r) per matrix, kept for ``interval`` steps; LOZO-M adds N (m x r) per matrix and a
    dense momentum for the other tensors."""
    mats = [t for t in ctx.trainable if len(t.shape) == 2]
    v = sum(t.shape[1] * min(ctx.rank, *t.shape) for t in mats) * ctx.wb
    if ctx.momentum > 0:
        n = sum(t.shape[0] * min(ctx.rank, *t.shape) for t in mats) * ctx.wb
        dense = sum(t.numel for t in ctx.trainable if len(t.shape) != 2) * ctx.wb
        return v + n + dense, "sum V (n r) + sum N (m r) + |vectors|"
    return v, "sum V (n r)"


def _no_state(ctx: _Context) -> tuple[int, str]:
    return 0, ""


def _zo_state(ctx: _Context) -> tuple[int, str]:
    """What the rule and the estimator keep between steps (a method has at most one of them)."""
    copies, rule_text = _RULE_TERMS[ctx.rule].state
    if copies:
        return _dense_state(ctx, copies), rule_text
    return _ESTIMATOR_TERMS[ctx.estimator].state(ctx)


def _zeroth_order(ctx: _Context):
    state, state_text = _zo_state(ctx)
    full = ctx.scheme == "full"
    x_l = "|x_l|" if full else "|e_l|"
    terms = _ESTIMATOR_TERMS[ctx.estimator]
    factored = terms.factored  # LOZO: matrices get U V^T factors, not dense chunks
    mats = [t for t in ctx.trainable if len(t.shape) == 2]
    vecs = [t for t in ctx.trainable if len(t.shape) != 2]
    if ctx.variant == "paper":
        # Table 5 / A2: one tensor's direction at a time (MeZO's reference code regenerates z per
        # parameter tensor, so l ranges over tensors); F16 halves every term.
        if factored:
            u = max((t.shape[0] * min(ctx.rank, *t.shape) for t in mats), default=0)
            dynamic = max(u, max((t.numel for t in vecs), default=0)) * ctx.wb
            text = f"|x| + max_l |U_l| + {state_text}"
        else:
            dynamic = ctx.largest() * ctx.wb
            text = f"|x| + max_l {x_l}" + (f" + {state_text}" if state_text else "")
        fwd = ctx.working_set()
        return state, dynamic, fwd, ctx.weights + dynamic + state, text
    # zotune: a scratch buffer of one chunk per worker thread (kept between steps), the
    # direction regenerated into it; rules and half-precision rounding add per-chunk temporaries.
    dense_unit = min(ctx.chunk, max((t.numel for t in (vecs if factored else ctx.trainable)), default=0))
    scratch = dense_unit * ctx.wb * ctx.workers
    unit = dense_unit
    per_unit = 0  # temporaries per element of a unit, bytes
    if factored:
        u = max((t.shape[0] * min(ctx.rank, *t.shape) for t in mats), default=0) * ctx.wb
        scratch += u * ctx.workers  # U (m x r) drawn per matrix
        # half precision: matrices are updated in float32 row blocks of about one chunk, each
        # rounded stochastically (no whole-matrix float32 copy), so the unit stays a chunk
    if ctx.queries > 1:
        per_unit += ctx.wb  # the averaged g of several directions
    per_unit += _RULE_TERMS[ctx.rule].chunk_temporaries(ctx) + terms.chunk_temporaries(ctx)
    if ctx.half:
        # float32 work copy, stochastic rounding: nearest / other (16-bit) and float32 copies,
        # the rounding probability and uniform draws
        per_unit += 4 + 2 + 4 + 2 + 4 + 4 + 4
    update = scratch + unit * per_unit * ctx.workers
    fwd = ctx.working_set()
    # half weights: zotune perturbs "just in time" (swap), and per-example directions run each example
    # with its own perturbed copy: a perturbed copy of one module's trained tensors exists while it runs
    swap = 0
    swap_text = " + perturbed module copy"
    if ctx.per_example and terms.per_example_factors:
        # low-rank per-example directions: a matrix's are side terms, every row's U_j, V_j stacked
        # (ctx.batch rows: both copies); only the other tensors get per-example copies
        factors = max((sum(t.shape) * min(ctx.rank, *t.shape) for t in mats), default=0) * ctx.batch
        swap = (factors + max((t.numel for t in vecs), default=0)) * ctx.wb
        swap_text = " + per-example factors U_j, V_j of one matrix"
    elif ctx.half or ctx.per_example:
        swap = max((t.numel for t in ctx.trainable), default=0) * ctx.wb
    forward = fwd + scratch + swap
    peak = ctx.weights + state + max(forward, update)
    st = f" + {state_text}" if state_text else ""
    swap_text = swap_text if swap else ""
    text = f"|x|{st} + max(forward working set{swap_text} + chunk, chunk + update temporaries)"
    return state, update, fwd, peak, text


@dataclasses.dataclass(frozen=True)
class _EstimatorTerms:
    """An estimator's memory terms, beyond a dense direction regenerated a chunk at a time.

    ``model`` computes the whole prediction (Forward-Grad's JVP has its own); ``state`` is what
    it keeps between steps; ``chunk_temporaries`` the bytes it adds per element of an update
    chunk; ``factored``: matrices' directions are U V^T factors (LOZO), drawn as factors rather
    than dense chunks; ``per_example_factors``: per-example directions are side terms U_j, V_j, so
    a matrix gets no perturbed copy per example.
    """

    model: Callable[[_Context], tuple] = _zeroth_order
    state: Callable[[_Context], tuple[int, str]] = _no_state
    chunk_temporaries: Callable[[_Context], int] = lambda ctx: 0
    factored: bool = False
    per_example_factors: bool = False


@dataclasses.dataclass(frozen=True)
class _RuleTerms:
    """An update rule's memory terms: ``state`` = (trainable-size buffers it keeps, formula);
    ``chunk_temporaries``: bytes per element of an update chunk."""

    state: tuple[int, str] = (0, "")
    chunk_temporaries: Callable[[_Context], int] = lambda ctx: 0


# The estimators and rules whose memory this model accounts for (zotune.methods.METHODS names them);
# a method built from anything else is refused (MemoryModelError) until its terms are added here.
_ESTIMATOR_TERMS: dict[str, _EstimatorTerms] = {
    "gaussian": _EstimatorTerms(),
    "blockwise": _EstimatorTerms(),
    "lowrank": _EstimatorTerms(state=_lowrank_state, factored=True),
    "forward": _EstimatorTerms(model=_forward_grad),
    "hessian": _EstimatorTerms(state=_hessian_state, chunk_temporaries=lambda ctx: 4),  # H^{-1/2} of the chunk
    # the unpacked mask and its cast to the weights' dtype
    "magnitude": _EstimatorTerms(state=_mask_state, chunk_temporaries=lambda ctx: 1 + ctx.wb),
    "population_lowrank": _EstimatorTerms(per_example_factors=True),
}
_RULE_TERMS: dict[str, _RuleTerms] = {
    "sgd": _RuleTerms(),
    "sign": _RuleTerms(),
    "momentum": _RuleTerms(state=(1, "|e|")),
    # g * scale and the bias-corrected v_{t-1} per chunk element
    "adam": _RuleTerms(state=(2, "2|e|"), chunk_temporaries=lambda ctx: 2 * ctx.wb),
    "lowrank_momentum": _RuleTerms(),  # LOZO-M's momentum lives in the low-rank estimator's state
}
ESTIMATORS = tuple(_ESTIMATOR_TERMS)
RULES = tuple(_RULE_TERMS)


def predict_table(model: Any, methods: str | Iterable[str] = "all", **kw) -> list[Prediction]:
    """:func:`predict` for several methods (``"all"``: every method that applies to ``dtype``)."""
    shape = model_shape(model)  # read the config once
    if isinstance(methods, str):
        if methods == "all":
            mixed = _resolve_dtype(kw.get("dtype", "float32")) in _MIXED
            methods = [m for m, (fam, _) in METHODS.items() if fam == "fo" or not mixed]
        else:
            methods = [methods]
    return [predict(shape, m, **kw) for m in methods]


def format_table(preds: Sequence[Prediction]) -> str:
    """A markdown table of predictions, in MiB."""
    head = "| method | scheme | dtype | weights | state | dynamic | activations | peak | formula |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for p in preds:
        sizes = (p.weights_bytes, p.state_bytes, p.dynamic_bytes, p.activation_bytes, p.peak_bytes)
        cells = [p.method, p.scheme, p.dtype, *(f"{v / MiB:,.1f}" for v in sizes), p.formula]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zotune memory",
        description="Predict the peak memory of a fine-tuning step from the model's config (no weights loaded).",
    )
    p.add_argument("--model", required=True, help="an alias (smollm2-135m), a local folder, a .gguf file or a hub name")
    p.add_argument("--method", default="all", help=f"one of {', '.join(METHODS)}, or 'all'")
    p.add_argument("--scheme", default="full", help=f"one of {', '.join(SCHEMES)}")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example")
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    p.add_argument("--variant", default="zotune", help="zotune (what zotune allocates) or paper (ZO-Bench Table 5)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--prefix-tokens", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=10)
    p.add_argument("--top-layers", type=int, default=None,
                   help="layers trained by scheme top_layers (default 1), or LoRA in the last N layers only")
    p.add_argument("--logits-positions", type=int, default=None, help="scored positions per batch (default: batch)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="elements per ZO direction chunk")
    p.add_argument("--workers", type=int, default=1, help="threads drawing chunks at once (CPU)")
    p.add_argument("--momentum", type=float, default=0.0, help="> 0: LOZO-M, FO-SGD with momentum")
    p.add_argument("--foreach", action=argparse.BooleanOptionalAction, default=True,
                   help="FO-Adam's multi-tensor update (one extra model-size temporary)")
    p.add_argument("--average", action="store_true",
                   help="train.average_decay is on: one more copy of the trainable tensors")
    p.add_argument("--cached-rows", type=int, default=0,
                   help="train.head_cache: token sequences its cache keeps (train + dev rows; top_layers, final_norm)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``zotune memory --model M --method X --scheme S --seq-len N --batch B --dtype D``: print the table."""
    args = build_parser().parse_args(argv)
    try:
        shape = model_shape(args.model)
        preds = predict_table(
            shape, args.method, scheme=args.scheme, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype,
            lora_r=args.lora_r, prefix_tokens=args.prefix_tokens, prompt_tokens=args.prompt_tokens,
            logits_positions=args.logits_positions, variant=args.variant, chunk_size=args.chunk_size,
            workers=args.workers, momentum=args.momentum, foreach=args.foreach, average=args.average,
            top_layers=args.top_layers, cached_rows=args.cached_rows,
        )  # fmt: skip
    except ZotuneError as e:  # what the user asked for (a bug keeps its traceback)
        print(f"zotune memory: error: {e}", file=sys.stderr)
        return 2
    print(
        f"{shape.name}: {shape.model_type}, {shape.total_params:,} parameters, {shape.layers} layers, "
        f"hidden {shape.hidden}, vocab {shape.vocab}{', tied embeddings' if shape.tied else ''}; "
        f"seq_len {args.seq_len}, batch {args.batch}, {preds[0].variant} variant (MiB)"
    )
    print(format_table(preds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
