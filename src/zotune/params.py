"""Which tensors train: all of them, the normalisation gains, or peft adapters (LoRA, prefix, prompt),
and the ZO/FO split.

The optimizers work on an ordered mapping ``name -> Parameter``; this module builds it.

Example::

    lm, params = select_trainable(lm, "lora", r=16)            # lm: a LoadedModel; only the LoRA tensors
    zo, fo = hybrid_split(lm.model, params, zo_layers=4)       # ZO-Bench Table 7 hybrid
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from zotune._validate import check_int, unknown_choice
from zotune.models import LoadedModel, require_loaded

SCHEMES = ("full", "norms", "final_norm", "top_layers", "lora", "prefix", "prompt")

# peft defaults for each scheme; any peft config field can be overridden through **options.
# LoRA's target modules come from peft's own per-architecture table (attention q and v
# projections: q_proj/v_proj for LLaMA and OPT, c_attn for GPT-2, query/value for RoBERTa).
# Dropout is 0 because a ZO step compares two forward passes that must differ only by the
# perturbation.
SCHEME_DEFAULTS: dict[str, dict] = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "prefix": {"num_virtual_tokens": 5},
    "prompt": {"num_virtual_tokens": 10},
}

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")
# Parameters outside the numbered layers that sit on the input side of the network.
_INPUT_SIDE = re.compile(r"embed|(?:^|\.)(?:wte|wpe|project_in|prompt_encoder)(?:\.|$)")


def layer_of(name: str) -> int | None:
    """The transformer layer index in a parameter name, or None outside the layers.

    Matches ``model.layers.3.``, ``model.decoder.layers.3.``, ``transformer.h.3.``,
    ``roberta.encoder.layer.3.`` and the same names under peft's ``base_model.model.`` prefix.
    """
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def unique_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter once, in registration order: a tied tensor (LM head = embeddings) appears
    under its first name only, so a ZO step perturbs it once rather than twice."""
    seen: set[tuple] = set()
    named = {}
    for name, p in model.named_parameters():  # already skips repeats of one Parameter object
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape), p.stride())
        if p.numel() > 0 and key in seen:
            continue  # a distinct Parameter viewing the same memory
        seen.add(key)
        named[name] = p
    return named


def norm_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The tensors of the model's normalisation layers (RMSNorm / LayerNorm gains and biases), in
    registration order: a few tens of thousands of entries on a 135 M model, so a ZO estimate's
    dimension is a prefix's while each gain still rescales a feature of every layer."""
    named = {}
    for module_name, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for name, p in module.named_parameters(recurse=False):
                named[f"{module_name}.{name}" if module_name else name] = p
    return named


def _unique_norm_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    norms = norm_parameters(model)
    return {n: p for n, p in unique_parameters(model).items() if n in norms}


def final_norm_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The gain (and bias) of the last normalisation layer outside the numbered layers: the one
    between the last layer and the LM head (LLaMA's ``model.norm``, GPT-2's ``ln_f``, OPT's
    ``final_layer_norm``, RoBERTa's ``lm_head.layer_norm``).

    Why: with the head frozen, a candidate's logit is ``sum_j W_yj gamma_j h_j`` (h the last hidden
    state, normalised), so a change of the gains ``gamma`` changes two candidates' logit difference
    by ``sum_j (W_aj - W_bj) h_j d_gamma_j``: a linear probe on the last hidden state, read through
    the model's own head, in ``hidden_size`` entries (576 on SmolLM2-135M, a hundredth of a 5-token
    prefix). A two-point estimate's noise grows with the entries it perturbs."""
    last: dict[str, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if "norm" not in type(module).__name__.lower() or layer_of(module_name) is not None:
            continue
        own = {f"{module_name}.{n}" if module_name else n: p for n, p in module.named_parameters(recurse=False)}
        if own:
            last = own
    kept = unique_parameters(model)
    return {n: p for n, p in last.items() if n in kept}


def top_layers_parameters(model: torch.nn.Module, layers: int = 1) -> dict[str, torch.nn.Parameter]:
    """Every tensor of the last ``layers`` numbered layers and of the final norm above them (not
    the LM head or the embeddings).

    Why: with ``train.head_cache`` (:class:`zotune.train.layer_cache.LayerCache`) the frozen layers
    below run once, and a loss costs ``layers`` layers of the model's forward instead of all of
    them: a whole layer's capacity (3.5 M entries a SmolLM2-135M layer) at a thirteenth of a
    forward's cost (``benchmarks/cache_speed.py``), where the final norm alone is a linear probe."""
    layers = check_int("layers", layers, minimum=1)
    total = num_layers(model)
    if layers > total:
        raise ValueError(f"scheme 'top_layers': layers={layers} but {type(model).__name__} has {total} numbered layers")
    kept = unique_parameters(model)
    named = {n: p for n, p in kept.items() if layer_of(n) is not None and layer_of(n) >= total - layers}
    named.update(final_norm_parameters(model))
    return named


def _no_options(scheme: str, select):
    def without(model: torch.nn.Module, **options) -> dict[str, torch.nn.Parameter]:
        if options:
            raise ValueError(f"scheme {scheme!r} takes no options, got {sorted(options)}")
        return select(model)

    return without


#: schemes that train some of the base model's own tensors, and which: no adapter, so a run exports
#: a plain model folder. Each takes the model and the scheme's options
OWN_TENSOR_SCHEMES = {"full": _no_options("full", unique_parameters),
                      "norms": _no_options("norms", _unique_norm_parameters),
                      "final_norm": _no_options("final_norm", final_norm_parameters),
                      "top_layers": top_layers_parameters}

PREFIX_INITS = ("random", "activations")


def _virtual_table(wrapped) -> torch.nn.Parameter:
    """The table of a peft prompt-learning model's virtual tokens (prefix: their keys and values;
    prompt: their input embeddings)."""
    return wrapped.prompt_encoder[wrapped.active_adapter].embedding.weight


def _prefix_from_activations(wrapped, seed: int | None) -> None:
    """Set a prefix-tuning model's prefix to the keys and values the base model computes for
    ``num_virtual_tokens`` real tokens (drawn from the vocabulary with ``seed``), as MeZO's
    ``init_by_real_act`` does: the model then starts exactly as if those tokens preceded every
    input. peft's random N(0, 1) prefix is far from any real key or value and disturbs a small
    model (SmolLM2-135M's SST-2 loss 0.69 -> 1.67 at step 0)."""
    config = wrapped.peft_config[wrapped.active_adapter]
    base = wrapped.get_base_model()
    n = config.num_virtual_tokens
    g = torch.Generator().manual_seed(0 if seed is None else seed)
    vocab = base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, n), generator=g).to(base.get_input_embeddings().weight.device)
    with torch.no_grad():
        cache = base(input_ids=ids, use_cache=True).past_key_values
        # per layer (key, value), each [1, kv_heads, n, head_dim] -> the embedding's row layout:
        # [n, layers * 2 * kv_heads * head_dim], layer-major, key before value (peft's get_prompt)
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
        rows = kv.permute(3, 0, 1, 2, 4).reshape(n, -1)
        embedding = _virtual_table(wrapped)
        if rows.shape != embedding.shape:
            raise ValueError(f"prefix init from activations: the cache gives {tuple(rows.shape)}, the prefix "
                             f"is {tuple(embedding.shape)} (a model whose cache peft lays out differently)")
        embedding.copy_(rows.to(embedding.dtype))


def prefix_value_masks(loaded: LoadedModel, named: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """For a prefix-tuned causal LM: the trained prefix table's name -> a boolean mask of its
    value entries (True) against its key entries, in peft's layout (columns layer-major, each
    layer's key before its value, as ``_prefix_from_activations`` writes them). What
    ``trainable.prefix_values_only`` perturbs: the values carry most of the prefix's gradient."""
    loaded = require_loaded(loaded, "prefix_value_masks")
    if loaded.adapter != "PREFIX_TUNING" or loaded.kind != "causal":
        raise ValueError(f"value masks are for a causal LM's prefix (scheme 'prefix'); this model's adapter is "
                         f"{loaded.adapter!r} on a {loaded.kind} model")
    wrapped = loaded.model
    embedding = _virtual_table(wrapped)
    config = wrapped.peft_config[wrapped.active_adapter]
    layers = config.num_layers
    n, width = embedding.shape
    if width % (2 * layers):
        raise ValueError(f"a prefix of width {width} does not split into keys and values of {layers} layers")
    mask = torch.zeros(n, layers, 2, width // (2 * layers), dtype=torch.bool, device=embedding.device)
    mask[:, :, 1] = True
    found = [name for name, p in named.items() if p is embedding]
    if len(found) != 1:
        raise ValueError("the prefix table is not among the trained tensors")
    return {found[0]: mask.reshape(n, width)}


def _prompt_from_text(wrapped, tokenizer, text: str) -> None:
    """Set a prompt-tuning model's virtual tokens to the input embeddings of ``text``'s tokens,
    repeated to fill them or cut to fit (peft's ``TEXT`` init, with the run's own tokenizer rather
    than one loaded by name): the model starts out as if that text preceded every input, rather
    than a string of sampled tokens (on SST-2 both start where the base model does:
    benchmarks/prompt_init.py)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt_init_text {text!r} has no tokens")
    config = wrapped.peft_config[wrapped.active_adapter]
    n = config.num_virtual_tokens * config.num_transformer_submodules
    ids = (ids * -(-n // len(ids)))[:n]
    table = wrapped.get_base_model().get_input_embeddings().weight
    embedding = _virtual_table(wrapped)
    with torch.no_grad():
        embedding.copy_(table[torch.tensor(ids, device=table.device)].to(embedding.dtype))


def select_trainable(
    loaded: LoadedModel, scheme: str = "full", *, init_seed: int | None = None, prefix_init: str = "random",
    prompt_init_text: str | None = None, **options
) -> tuple[LoadedModel, dict[str, torch.nn.Parameter]]:
    """Choose what trains; returns (the model to use from now on, ordered name -> trainable Parameter).

    ``full``: every parameter, tied weights once. ``norms``: the normalisation layers' gains (and
    biases), LayerNorm tuning (Zhao et al., 2024: "Tuning LayerNorm in Attention"). ``final_norm``:
    the last one's only, before the head (:func:`final_norm_parameters`). ``top_layers``: the last
    ``layers`` layers (option, default 1) and the final norm (:func:`top_layers_parameters`). ``lora`` / ``prefix`` / ``prompt``: wraps the
    model with peft (modifying it in place; use the returned :class:`~zotune.models.LoadedModel`,
    whose ``model`` is the wrapper and whose ``adapter`` / ``prompt_learning`` say so: decided
    here, from the config that made it) and returns only the adapter tensors. ``options``
    override ``SCHEME_DEFAULTS`` with any field of the peft config class (``r``, ``lora_alpha``,
    ``target_modules``, ``num_virtual_tokens``, ...); ``lora`` also takes ``top_layers=k``: adapters in
    the last ``k`` layers only, so ``train.head_cache`` can run the layers below once. Parameters outside the mapping get
    ``requires_grad=False``. ``init_seed``: the adapters' random init (peft draws it from torch's
    global RNG) is drawn from this seed instead, leaving the global RNG as it was, so a run's
    starting adapters are a function of its config (a replay rebuilds them); None: peft's draw.
    ``prefix_init`` (prefix tuning of a causal LM): ``"random"`` (peft's) or ``"activations"``
    (the keys and values of real tokens, as MeZO initialises its prefixes; what ``zotune train`` uses).
    ``prompt_init_text`` (prompt tuning): start the virtual tokens as this text's tokens (None: the
    ``prompt_tuning_init`` of the options, peft's random vectors by default).
    """
    loaded = require_loaded(loaded, "select_trainable")
    model = loaded.model
    if scheme not in SCHEMES:
        raise ValueError(unknown_choice("scheme", str(scheme), SCHEMES))
    if prefix_init not in PREFIX_INITS:
        raise ValueError(unknown_choice("prefix_init", str(prefix_init), PREFIX_INITS))
    if prompt_init_text is not None and scheme != "prompt":
        raise ValueError(f"prompt_init_text starts the virtual tokens of scheme 'prompt'; scheme {scheme!r} has none")
    if loaded.adapter is not None or hasattr(model, "peft_config"):
        raise ValueError("the model already has peft adapters; call select_trainable on the plain model")
    if scheme in OWN_TENSOR_SCHEMES:
        try:
            named = OWN_TENSOR_SCHEMES[scheme](model, **options)
        except TypeError as err:  # an option the scheme does not take
            raise ValueError(f"scheme {scheme!r}: {err}") from err
        if not named:
            raise ValueError(f"scheme {scheme!r} selects no tensors of {type(model).__name__} (no module whose "
                             "class name contains 'Norm' has parameters"
                             + (" outside the numbered layers)" if scheme == "final_norm" else ")"))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in named.values():
            p.requires_grad_(True)
        return loaded, named

    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model

    config_cls = {"lora": LoraConfig, "prefix": PrefixTuningConfig, "prompt": PromptTuningConfig}[scheme]
    if scheme == "lora" and "top_layers" in options:  # adapters in the last k layers only (peft's layers_to_transform)
        options = dict(options)
        k, total = check_int("top_layers", options.pop("top_layers")), num_layers(model)
        if k > total:
            raise ValueError(f"scheme 'lora': top_layers={k} but {type(model).__name__} has {total} numbered layers")
        options["layers_to_transform"] = list(range(total - k, total))
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for key in options:
        if key not in fields:
            raise ValueError(unknown_choice(f"option for scheme '{scheme}'", key, fields))
    kwargs = {**SCHEME_DEFAULTS[scheme], **options}
    if "task_type" not in kwargs:
        if loaded.kind == "causal":
            kwargs["task_type"] = TaskType.CAUSAL_LM
        elif scheme != "lora":
            # peft has no masked-LM task; its feature-extraction wrapper prepends the virtual
            # tokens and returns the base model's (MLM) outputs unchanged.
            kwargs["task_type"] = TaskType.FEATURE_EXTRACTION
    config = config_cls(**kwargs)
    try:
        with torch.random.fork_rng(devices=[]):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            wrapped = get_peft_model(model, config)
        if scheme == "prefix" and prefix_init == "activations" and loaded.kind == "causal":
            _prefix_from_activations(wrapped, init_seed)
        if prompt_init_text is not None:
            _prompt_from_text(wrapped, loaded.tokenizer, prompt_init_text)
    except ValueError as err:
        raise ValueError(
            f"peft could not apply scheme '{scheme}' to {type(model).__name__}: {err} "
            "(for lora, pass target_modules=[...] naming the attention projections)"
        ) from err
    named = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    if not named:
        raise ValueError(f"scheme '{scheme}' left no trainable tensors in {type(model).__name__}")
    adapter = str(getattr(config.peft_type, "value", config.peft_type))
    return dataclasses.replace(loaded, model=wrapped, adapter=adapter,
                               prompt_learning=bool(config.is_prompt_learning)), named


@contextmanager
def without_adapters(loaded: LoadedModel) -> Iterator[LoadedModel]:
    """The model as it was before :func:`select_trainable` added adapters, for as long as the
    ``with`` lasts: what "zero-shot" means for a LoRA, prefix or prompt run. A prefix from real
    activations changes what the model computes (as if real tokens came first), and a trained
    adapter does, so a baseline measured through them is not the base model's.

        with without_adapters(lm) as base:
            evaluate(base, ...)
    """
    loaded = require_loaded(loaded, "without_adapters")
    if loaded.adapter is None:
        yield loaded
    elif loaded.prompt_learning:  # peft prepends its virtual tokens around an untouched base model
        yield dataclasses.replace(loaded, model=loaded.model.get_base_model(), adapter=None, prompt_learning=False)
    else:  # LoRA layers live inside the base model: switched off in place, back on afterwards
        with loaded.model.disable_adapter():
            yield dataclasses.replace(loaded, adapter=None)


def num_layers(model: torch.nn.Module) -> int:
    """Number of transformer layers, from the layer indices in the parameter names."""
    found = [layer_of(n) for n, _ in model.named_parameters()]
    found = [i for i in found if i is not None]
    return max(found) + 1 if found else 0


def hybrid_split(
    model: torch.nn.Module, named_params: Mapping[str, torch.nn.Parameter], zo_layers: int
) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
    """Split trainable tensors into (ZO, FO) mappings: ZO-Bench's hybrid of Table 7.

    The first ``zo_layers`` transformer layers and everything on the input side (embeddings,
    peft's virtual-token encoder) are tuned by ZO; deeper layers, final norm and head by first
    order, so backpropagation only runs through the top of the network. A head tied to the
    embeddings is one tensor, named (and split) as the embeddings.
    """
    total = num_layers(model)
    if isinstance(zo_layers, bool) or not isinstance(zo_layers, int):
        raise ValueError(f"zo_layers must be an integer in [0, {total}], got {zo_layers!r}")
    if not 0 <= zo_layers <= total:
        raise ValueError(f"zo_layers={zo_layers} is outside [0, {total}]: the model has {total} transformer layers")
    zo, fo = {}, {}
    for name, p in named_params.items():
        layer = layer_of(name)
        if layer is None:
            side = zo if _INPUT_SIDE.search(name) else fo
        else:
            side = zo if layer < zo_layers else fo
        side[name] = p
    return zo, fo
