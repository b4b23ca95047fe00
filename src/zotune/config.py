"""Run configuration: typed dataclasses, read from YAML recipes, overridden from the command line,
and validated as a whole before any heavy work (every problem reported at once).

A recipe is plain YAML with up to five sections matching the dataclasses below::

    model: {name: smollm2-135m, dtype: float32}
    task: {name: sst2, train: 1000, dev: 500, test: 1000}
    optim: {method: mezo, lr: 1.0e-5, eps: 1.0e-3}
    trainable: {scheme: full}
    train: {steps: 500, batch_size: 16, output_dir: runs/mezo-sst2}

Any field can be overridden as ``section.field=value`` (value parsed as YAML).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zotune._validate import unknown_choice
from zotune.errors import ZotuneError


class ConfigError(ZotuneError, ValueError):
    """A configuration that cannot run; the message lists every problem found."""


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # hub name, local folder, .gguf file, or an offline alias
    dtype: str = "float32"  # float32 | bfloat16 | float16 (ZO methods can tune half precision: "F16")
    device: str = "cpu"  # cpu | cuda | cuda:N
    gguf_file: str | None = None
    # Streamed weights (ZO2-style, zotune.streamed): keep trained tensors in memory-mapped files
    # ("mmap", CPU runs) or host memory ("host", GPU runs) and bring each module in once per step.
    offload: str = "none"  # none | mmap | host
    offload_dir: str | None = None  # where "mmap" files go (default: <output_dir>/offload)
    device_map: str | dict | None = None  # auto | balanced | balanced_low_0 | sequential | {module: device} (accelerate)


@dataclass
class TaskConfig:
    name: str = "sst2"
    template: str | None = None  # None: the task's default ("zotune": the papers' prompt); "mezo": MeZO's
    #   code exactly; "none": no prompt (no task alignment). `zotune tasks` lists them.
    data_root: str | None = None  # folder with the shared data layout (default: $ZOTUNE_DATA or ../shared/data)
    train_file: str | None = None
    eval_file: str | None = None  # a labeled validation file: test comes from it
    train: int = 1000  # MeZO's protocol: 1,000 train / 500 dev / 1,000 test, sampled with split_seed
    dev: int = 500
    test: int = 1000
    split_seed: int = 0
    max_length: int | None = None  # tokens per example (context cut from the left, with a warning);
    #   None: the task's default (TaskSpec.max_length, e.g. SST-2 64, BoolQ 384)
    scoring: str | None = None  # sum | mean: candidates ranked by summed or per-token mean log-likelihood;
    #   None: the template's (mean for "mezo", as MeZO's run.py; sum otherwise, as the loss trains)
    hub: bool = False  # load the data set from the Hugging Face hub (needs `datasets` and network)


@dataclass
class OptimConfig:
    method: str = "mezo"  # see zotune.methods.METHODS
    lr: float | None = None  # None: the method's starting point for the scheme (zotune.defaults; zotune tune probes one)
    eps: float | None = None  # None: as lr (1e-3 full, 1e-2 LoRA, 1e-1 prefix / prompt)
    weight_decay: float = 0.0
    queries: int | None = None  # directions per step (None: the method's default; FZOO 8, others 1)
    seed: int = 0
    schedule: str = "constant"  # constant | linear | cosine
    schedule_over: str = "steps"  # steps: the decay spans train.steps | seconds: it spans train.max_seconds
    warmup_steps: int = 0
    rank: int = 2  # LOZO
    interval: int = 50  # LOZO: V resampled every `interval` steps
    momentum: float = 0.0  # LOZO-M (> 0), ZO-SGD-MMT beta (used when method is zo-sgd-momentum)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # ZO-Adam / FO-Adam
    sign_mode: str = "scalar"  # ZO-SGD-Sign
    distribution: str | None = None  # gaussian | rademacher (None: the method's; FZOO rademacher)
    sparsity: float | None = None  # > 0: random sparse masks (ZO-Bench Table 8); sparse-mezo: fraction of each matrix left alone (default 0.75)
    hessian_smooth: float | None = None  # HiZOO: alpha of H <- (1 - alpha) H + alpha h H z^2 (default 1e-6)
    max_nonfinite: int = 3
    fo_lr: float | None = None  # hybrid: lr of the FO part (default: lr)
    perturbation: str = "auto"  # inplace | swap | dual | side | per_example | auto (swap for half weights)


@dataclass
class TrainableConfig:
    scheme: str = "full"  # full | norms (the normalisation gains) | final_norm (the last one's) | top_layers | lora | prefix | prompt
    top_layers: int | None = None  # top_layers: how many of the last layers train (None: 1); lora: adapters
    #   in the last k layers only (None: every layer)
    lora_r: int = 8
    lora_alpha: int = 16
    prefix_tokens: int = 5
    prompt_tokens: int = 10
    prompt_init_text: str | None = None  # prompt: start from this text's tokens (None: sampled vocabulary rows)
    prefix_values_only: bool = False  # prefix, ZO: perturb (so train) the prefix's values, not its keys
    zo_layers: int | None = None  # hybrid ZO/FO: first k layers by ZO, the rest by FO (FO-SGD)


@dataclass
class TrainConfig:
    steps: int = 1000
    max_seconds: float = 0.0  # time budget: stop once this many training seconds (the steps' own
    #   time, evaluations and checkpoints left out) are spent, resumed runs included; 0: none
    batch_size: int = 16
    grad_accum: int = 1  # micro-batches per step; each perturbed loss is summed over them
    eval_every: int = 0  # evaluate on dev every N steps (0: only at the end)
    eval_batch_size: int = 32
    save_every: int = 100  # checkpoint every N steps (and at the end)
    log_every: int = 10
    output_dir: str = "runs/default"
    eval_at_start: bool = True  # zero-shot test accuracy before training
    resume: bool = True  # continue from output_dir's last checkpoint if there is one
    progress: bool = True
    tensorboard: bool = True
    data_seed: int = 0  # order of the training examples
    average_decay: float = 0.0  # evaluate an exponential moving average of the trained tensors with this
    #   decay instead of the tensors themselves (zotune.train.averaging; one trained-size buffer); 0: off
    head_cache: bool = False  # trainable.scheme final_norm / top_layers: run the frozen trunk once over the train
    #   and dev rows and take every loss from its cached output (zotune.train.head_cache, .layer_cache); same trajectory
    objective: str = "auto"  # classification (cross-entropy among the candidates, MeZO's loss for
    #   classification / multiple choice) | nll (log-likelihood of the gold continuation) | auto:
    #   classification when every example has the same number (> 1) of candidates, else nll


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainable: TrainableConfig = field(default_factory=TrainableConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, sections=("model", "task", "optim", "trainable")) -> str:
        """A hash of what determines the trajectory (a resume must match it)."""
        d = {k: v for k, v in self.to_dict().items() if k in sections}
        if "model" in d:  # where weights are kept does not change the trajectory
            d["model"] = {k: v for k, v in d["model"].items() if k not in ("offload", "offload_dir", "device_map")}
        d["train"] = {k: self.train.__dict__[k] for k in ("batch_size", "grad_accum", "data_seed", "objective")}
        if d.get("optim", {}).get("schedule_over") == "steps":  # the default: older runs keep their fingerprints
            d["optim"] = {k: v for k, v in d["optim"].items() if k != "schedule_over"}
        if self.train.average_decay:  # only when on, so runs without it keep their fingerprints
            d["train"]["average_decay"] = self.train.average_decay
        if self.train.head_cache:  # the same trajectory up to rounding: a resume must not mix the two
            d["train"]["head_cache"] = True
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


#: the schemes train.head_cache can run: what trains sits above a frozen trunk
CACHED_SCHEMES = ("final_norm", "top_layers")

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {
    "model": ModelConfig, "task": TaskConfig, "optim": OptimConfig,
    "trainable": TrainableConfig, "train": TrainConfig,
}


def _optional_kind(section: str, key: str) -> Any:
    """A zero of the type a ``T | None`` field holds (float for ``float | None``), else None."""
    hint = {f.name: f.type for f in dataclasses.fields(_SECTION_TYPES[section])}.get(key, "")
    kind = str(hint).split("|")[0].strip()
    return {"float": 0.0, "int": 0}.get(kind)


def _coerce(section: str, key: str, value: Any, current: Any, errors: list[str]) -> Any:
    """Check a value's type against the field's current (default) value, or for a field whose
    default is None, against the type it holds (YAML reads ``1e-5`` as a string)."""
    if current is None and section in _SECTION_TYPES:
        current = _optional_kind(section, key)
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            errors.append(f"{section}.{key}: expected true/false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, type(current)) or isinstance(value, bool) != isinstance(current, bool):
        errors.append(f"{section}.{key}: expected {type(current).__name__}, got {value!r}")
    return value


def from_dict(data: dict, errors: list[str] | None = None) -> Config:
    """Build a Config from nested dicts; unknown sections or keys are errors ('Did you mean')."""
    own = errors is None
    errors = [] if own else errors
    cfg = Config()
    for section, values in (data or {}).items():
        if section not in _SECTION_TYPES:
            errors.append(unknown_choice("config section", section, _SECTION_TYPES))
            continue
        if not isinstance(values, dict):
            errors.append(f"{section}: expected a mapping of fields, got {values!r}")
            continue
        target = getattr(cfg, section)
        names = {f.name for f in dataclasses.fields(target)}
        for key, value in values.items():
            if key not in names:
                errors.append(f"{section}: " + unknown_choice("field", key, names))
                continue
            setattr(target, key, _coerce(section, key, value, getattr(target, key), errors))
    given = (data or {}).get("task")
    _task_defaults(cfg.task, set(given) if isinstance(given, dict) else set())
    if own and errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return cfg


def _task_defaults(task: TaskConfig, given: set = frozenset()) -> None:
    """Fill ``max_length`` and ``scoring`` left unset with the task's and template's defaults,
    and for a task file the split sizes and eval file it sets that the recipe (``given``: the
    ``task`` keys it has) does not (an unknown task or template is left for :func:`validate`)."""
    from zotune.tasks import get_task
    from zotune.tasks.definitions import template_scoring
    from zotune.tasks.file_task import FileTaskSpec

    if not isinstance(task.name, str):
        return
    try:
        spec = get_task(task.name)
    except (KeyError, ZotuneError):
        return
    if isinstance(spec, FileTaskSpec):
        for key, value in spec.config_defaults().items():
            if key not in given:
                setattr(task, key, value)
    if task.max_length is None:
        task.max_length = spec.max_length
    template = spec.templates.get(task.template or spec.default_template)
    if task.scoring is None and template is not None:
        task.scoring = template_scoring(template)


def parse_overrides(overrides: list[str]) -> dict:
    """``["optim.lr=1e-5", "train.steps=10"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.field=value (e.g. optim.lr=1e-5)")
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        if isinstance(value, str) and raw.strip():
            try:  # YAML reads 1e-5 as a string; numbers are what users mean
                value = float(raw) if any(c in raw for c in ".eE") else int(raw)
            except ValueError:
                pass
        out.setdefault(section, {})[name] = value
    return out


def read_yaml_mapping(p: Path, expected: str) -> dict:
    """A YAML file's top-level mapping (empty file: {}); bad YAML or another shape is a ConfigError
    naming the file, since recipes and grids are what users write by hand."""
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of {expected}, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML recipe (optional), apply overrides, and validate the whole config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data = read_yaml_mapping(p, "sections")
    for section, values in parse_overrides(overrides or []).items():
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            data[section] = {}
        data[section].update(values)
    errors: list[str] = []
    cfg = from_dict(data, errors)
    errors += validate(cfg)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return cfg


def validate(cfg: Config) -> list[str]:
    """Every problem with ``cfg`` that can be found without loading a model or data."""
    from zotune.methods import ALL_SCHEMES, METHODS, resolve_optim
    from zotune.schedules import SCHEDULES

    errors = []
    o, t, tr, m, k = cfg.optim, cfg.train, cfg.trainable, cfg.model, cfg.task
    method = METHODS.get(o.method)
    per_example = o.perturbation == "per_example" or (method is not None and method.per_example_only)
    if per_example and o.queries is None:
        o.queries = t.batch_size  # one direction per example
    resolve_optim(o, tr.scheme)
    if method is None:
        errors.append("optim.method: " + unknown_choice("method", o.method, METHODS))
    else:
        if isinstance(o.queries, int) and o.queries < method.min_queries:
            errors.append(f"optim.queries: {o.method} needs at least {method.min_queries} directions per step, "
                          f"got {o.queries}")
        if o.sparsity and not method.sparse_masks and "sparsity" not in method.reads:
            errors.append(f"optim.sparsity (random sparse masks) does not combine with {o.method}: "
                          "its directions are not dense per-entry draws")
        if tr.scheme in ALL_SCHEMES and tr.scheme not in method.schemes:
            errors.append(f"trainable.scheme {tr.scheme!r}: {o.method} supports {', '.join(method.schemes)}")
    if o.distribution not in ("gaussian", "rademacher"):
        errors.append("optim.distribution: " + unknown_choice("distribution", str(o.distribution),
                                                              ("gaussian", "rademacher")))
    if not isinstance(o.hessian_smooth, (int, float)) or not 0 <= o.hessian_smooth < 1:
        errors.append(f"optim.hessian_smooth must be in [0, 1), got {o.hessian_smooth!r}")
    if o.schedule not in SCHEDULES:
        errors.append("optim.schedule: " + unknown_choice("schedule", o.schedule, SCHEDULES))
    if o.schedule_over not in ("steps", "seconds"):
        errors.append("optim.schedule_over: " + unknown_choice("schedule_over", str(o.schedule_over),
                                                               ("steps", "seconds")))
    elif o.schedule_over == "seconds" and not (isinstance(t.max_seconds, (int, float)) and t.max_seconds > 0):
        errors.append("optim.schedule_over=seconds spans the time budget: set train.max_seconds > 0 "
                      f"(got {t.max_seconds!r})")
    for name in ("lr", "eps"):
        v = getattr(o, name)
        if v is None and method is None:
            continue  # an unknown method has no starting point: its own error says so
        if not isinstance(v, (int, float)) or not v > 0:
            errors.append(f"optim.{name} must be > 0, got {v!r}")
    if not isinstance(o.weight_decay, (int, float)) or o.weight_decay < 0:
        errors.append(f"optim.weight_decay must be >= 0, got {o.weight_decay!r}")
    if not 0 <= o.sparsity < 1:
        errors.append(f"optim.sparsity must be in [0, 1), got {o.sparsity!r}")
    if not 0 <= o.momentum < 1:
        errors.append(f"optim.momentum must be in [0, 1), got {o.momentum!r}")
    for section, obj, names in (
        ("optim", o, ("queries", "rank", "interval", "max_nonfinite")),
        ("train", t, ("steps", "batch_size", "grad_accum", "eval_batch_size", "save_every", "log_every")),
        ("task", k, ("max_length",) if k.max_length is not None else ()),  # None: the task's
    ):
        for name in names:
            v = getattr(obj, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                errors.append(f"{section}.{name} must be an integer >= 1, got {v!r}")
    for name in ("train", "dev", "test"):
        v = getattr(k, name)
        if not isinstance(v, int) or v < 0:
            errors.append(f"task.{name} must be an integer >= 0, got {v!r}")
    if isinstance(t.batch_size, int) and isinstance(t.grad_accum, int) and t.grad_accum > t.batch_size:
        errors.append(f"train.grad_accum ({t.grad_accum}) cannot exceed train.batch_size ({t.batch_size})")
    if isinstance(t.max_seconds, bool) or not isinstance(t.max_seconds, (int, float)) or not t.max_seconds >= 0:
        errors.append(f"train.max_seconds must be a number of seconds >= 0 (0: no time budget), got {t.max_seconds!r}")
    if isinstance(t.average_decay, bool) or not isinstance(t.average_decay, (int, float)) or not 0 <= t.average_decay < 1:
        errors.append(f"train.average_decay must be in [0, 1) (0: no average), got {t.average_decay!r}")
    elif t.average_decay and m.offload != "none":
        errors.append("train.average_decay keeps a copy of the trained tensors in memory; model.offload streams "
                      "them from disk to avoid exactly that: pick one")
    if not isinstance(t.head_cache, bool):
        errors.append(f"train.head_cache must be true or false, got {t.head_cache!r}")
    elif t.head_cache:
        if tr.scheme not in CACHED_SCHEMES and not (tr.scheme == "lora" and tr.top_layers is not None):
            errors.append(f"train.head_cache caches what the frozen layers give the trained ones, so only the top may "
                          f"train: set trainable.scheme: final_norm or top_layers, or lora with trainable.top_layers "
                          f"(got {tr.scheme!r})")
        if t.grad_accum != 1:
            errors.append(f"train.head_cache evaluates each batch whole: set train.grad_accum: 1 (got {t.grad_accum!r})")
        if t.objective == "nll":
            errors.append("train.head_cache scores the candidates (train.objective: classification or auto), "
                          "not the gold continuation's likelihood (nll)")
        if m.offload != "none":
            errors.append("train.head_cache runs the trunk once and never again; model.offload streams it for every "
                          "forward: pick one")
    if not isinstance(t.eval_every, int) or t.eval_every < 0:
        errors.append(f"train.eval_every must be an integer >= 0, got {t.eval_every!r}")
    if not isinstance(o.warmup_steps, int) or o.warmup_steps < 0:
        errors.append(f"optim.warmup_steps must be an integer >= 0, got {o.warmup_steps!r}")
    elif isinstance(t.steps, int) and o.warmup_steps > t.steps:
        errors.append(f"optim.warmup_steps ({o.warmup_steps}) exceeds train.steps ({t.steps})")
    if t.objective not in ("auto", "nll", "classification"):
        errors.append("train.objective: " + unknown_choice("objective", t.objective, ("auto", "nll", "classification")))
    perturbations = ("auto", "inplace", "swap", "dual", "side", "per_example")
    if o.perturbation not in perturbations:
        errors.append("optim.perturbation: " + unknown_choice("perturbation", o.perturbation, perturbations))
    if method is not None and method.perturbation not in (None, o.perturbation) and o.perturbation != "auto":
        errors.append(f"optim.perturbation: {o.method} evaluates with {method.perturbation!r}; leave it auto "
                      f"(got {o.perturbation!r})")
    if per_example and method is not None:
        if not method.per_example:
            errors.append(f"optim.perturbation=per_example is for methods with a central difference per direction "
                          f"and directions drawn fresh each step; {o.method} has not (see `zotune methods`)")
        if o.queries != t.batch_size:
            errors.append(f"optim.queries: per-example directions are one per example, so queries must equal "
                          f"train.batch_size ({t.batch_size}), got {o.queries!r} (leave it unset)")
        if t.grad_accum != 1:
            errors.append(f"train.grad_accum: per-example directions need the whole batch in one forward "
                          f"(grad_accum 1), got {t.grad_accum!r}")
        if tr.zo_layers is not None:
            errors.append("trainable.zo_layers (hybrid ZO/FO) does not combine with per-example directions")
        if m.offload != "none":
            errors.append("model.offload does not combine with per-example directions")
    if tr.scheme not in ALL_SCHEMES:
        errors.append("trainable.scheme: " + unknown_choice("scheme", tr.scheme, ALL_SCHEMES))
    if tr.prefix_values_only is not False:
        if tr.prefix_values_only is not True:
            errors.append(f"trainable.prefix_values_only must be true or false, got {tr.prefix_values_only!r}")
        elif tr.scheme != "prefix":
            errors.append(f"trainable.prefix_values_only needs trainable.scheme: prefix, got {tr.scheme!r}")
        elif method is not None and not method.sparse_masks:
            errors.append(f"trainable.prefix_values_only masks a ZO method's dense directions; {o.method!r} "
                          "has none (the methods that take optim.sparsity do)")
    if tr.top_layers is not None:
        if tr.scheme not in ("top_layers", "lora"):
            errors.append(f"trainable.top_layers counts the last layers that train (scheme top_layers) or get LoRA "
                          f"adapters (scheme lora); scheme {tr.scheme!r} has none")
        elif isinstance(tr.top_layers, bool) or not isinstance(tr.top_layers, int) or tr.top_layers < 1:
            errors.append(f"trainable.top_layers must be an integer >= 1, got {tr.top_layers!r}")
    if tr.prompt_init_text is not None:
        if tr.scheme != "prompt":
            errors.append(f"trainable.prompt_init_text starts a prompt's virtual tokens; scheme {tr.scheme!r} has none")
        elif not isinstance(tr.prompt_init_text, str) or not tr.prompt_init_text.strip():
            errors.append(f"trainable.prompt_init_text must be a non-empty text, got {tr.prompt_init_text!r}")
    if tr.zo_layers is not None:
        if tr.scheme != "full":
            errors.append("trainable.zo_layers (hybrid ZO/FO) needs trainable.scheme: full")
        if method is not None and method.family != "zo":
            errors.append(f"trainable.zo_layers needs a ZO method, got {o.method!r}")
    offloads = ("none", "mmap", "host")
    if m.offload not in offloads:
        errors.append("model.offload: " + unknown_choice("offload", m.offload, offloads))
    elif m.offload != "none":
        if method is not None and not method.streamable:
            errors.append(f"model.offload needs a two-point ZO method (not {o.method!r}): streamed modules "
                          "compute both perturbed halves while resident")
        if o.perturbation not in ("auto", "dual"):
            errors.append(f"model.offload needs optim.perturbation: dual (or auto), got {o.perturbation!r}")
        if tr.zo_layers is not None:
            errors.append("model.offload does not combine with trainable.zo_layers (hybrid ZO/FO)")
        if m.device_map is not None:
            errors.append("model.offload and model.device_map are two ways to place weights: pick one")
    from zotune.models import DEVICE_MAPS

    if m.device_map is not None and not isinstance(m.device_map, dict) and m.device_map not in DEVICE_MAPS:
        errors.append("model.device_map: " + unknown_choice("device_map", str(m.device_map), DEVICE_MAPS)
                      + " (or a {module: device} mapping)")
    dtypes = ("float32", "bfloat16", "float16")
    if m.dtype not in dtypes:
        errors.append("model.dtype: " + unknown_choice("dtype", m.dtype, dtypes))
    elif m.dtype != "float32" and method is not None and method.family != "zo":
        errors.append(f"model.dtype {m.dtype} needs a ZO method: {o.method} uses autograd (train in float32)")
    elif m.dtype != "float32" and method is not None and not method.half_precision:
        errors.append(f"model.dtype {m.dtype}: {o.method} needs float32 weights (its trial writes round in half "
                      "precision, so keeping x would not give x back)")
    if not (m.device == "cpu" or m.device == "auto" or str(m.device).startswith("cuda")):
        errors.append(f"model.device must be cpu, cuda, cuda:N or auto, got {m.device!r}")
    from zotune.tasks import get_task
    from zotune.tasks.file_task import FileTaskSpec, check_task_data

    try:
        spec = get_task(k.name)
        if k.template is not None and k.template not in spec.templates:
            errors.append("task.template: " + unknown_choice(f"template of {spec.name}", k.template, spec.templates))
        elif isinstance(spec, FileTaskSpec) and not k.hub:  # a field the data lacks, before any model loads
            errors += [f"task.name: {e}" for e in check_task_data(spec, k.template, k.data_root, k.train_file,
                                                                   k.eval_file)]
    except (KeyError, ZotuneError) as e:
        errors.append(f"task.name: {e.args[0] if isinstance(e, KeyError) and e.args else e}")
    if k.scoring not in (None, "sum", "mean"):
        errors.append("task.scoring: " + unknown_choice("scoring", str(k.scoring), ("sum", "mean")))
    return errors
