"""Export a tuned model as standard folders that transformers and peft load without zotune.

    zotune export runs/mezo-sst2 --out exported/sst2           # the checkpoint the run tested
    zotune export runs/mezo-sst2/ckpt-last --out exported/last  # one checkpoint
    zotune export runs/lora-sst2 --merge --out exported/merged  # LoRA folded into the weights
    zotune export runs/mezo-sst2 --from-log --out exported/log  # rebuilt from steps.jsonl

A checkpoint holds only the trained tensors; export rebuilds the base model from the run's
``config.json`` (the same model, dtype and trainable scheme), copies the tensors in and saves:

- ``full``: a plain ``save_pretrained`` folder (``config.json``, ``model.safetensors``,
  tokenizer) for ``AutoModelForCausalLM`` / ``AutoModelForMaskedLM``. Tied weights stay tied
  (the LM head is saved once, as the embeddings, and ``tie_word_embeddings`` says so).
- ``lora`` / ``prefix`` / ``prompt``: a peft adapter folder (``adapter_config.json``,
  ``adapter_model.safetensors``, tokenizer) for ``PeftModel.from_pretrained(base, folder)``;
  with ``merge=True`` LoRA is folded into the base weights and saved as for ``full``.

Only safetensors are written, and no ``quantization_config`` (a model converted from a .gguf
holds plain floats). The folder is built beside ``out`` and renamed into place when complete.
``export_info.json`` in it records where the weights came from.

Loading the result, with no zotune installed::

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("exported/sst2")
    # adapters: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "exported/lora")
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune.errors import ZotuneError

log = logging.getLogger("zotune.export")

INFO_FILE = "export_info.json"


class ExportError(ZotuneError, ValueError):
    """An export that cannot be done as asked; the message says what to pass instead."""


@dataclass
class Source:
    """Where the tuned tensors come from: a checkpoint folder, or the run's step log (replay)."""

    run_dir: Path
    checkpoint: Path | None  # None: rebuilt from steps.jsonl
    reason: str  # why this checkpoint (or the log) was chosen, for the log line and export_info


# ----------------------------------------------------------------------------- finding the source
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} cannot be read as JSON: {e}") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def _tested_checkpoint(run: Path) -> tuple[Path | None, str]:
    """The checkpoint whose test score ``results.json`` reports (best dev, else last), else the last."""
    from zotune.train.checkpoint import find_checkpoint
    from zotune.train.loop import BEST, LAST

    last, best = find_checkpoint(run / LAST), find_checkpoint(run / BEST)
    results = run / "results.json"
    if results.is_file():
        tested = _read_json(results).get("tested_step")
        for found in (best, last):
            if found is not None and _read_json(found / "meta.json").get("step") == tested:
                return found, f"the checkpoint the run tested (step {tested}, results.json)"
    if last is not None:
        return last, "the run's last checkpoint"
    return best, "the run's best dev checkpoint"


def find_source(path: str | os.PathLike, *, from_log: bool = False) -> Source:
    """Resolve ``path`` (a run folder or a checkpoint folder inside one) to a :class:`Source`.

    A run folder gives the checkpoint its ``results.json`` reports as tested (the best dev
    checkpoint when there was one), else its last; with no checkpoint, or ``from_log=True``,
    the weights are rebuilt from ``steps.jsonl`` (:func:`zotune.train.loop.replay`).
    """
    from zotune.train.checkpoint import find_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise ExportError(f"{str(path)!r} does not exist: pass a run folder (train.output_dir) or a checkpoint in it")
    if not p.is_dir():
        raise ExportError(f"{str(path)!r} is a file: pass a run folder (train.output_dir) or a checkpoint folder in it")
    ckpt = find_checkpoint(p)
    if ckpt is not None:  # a checkpoint folder: its run folder holds the config
        if from_log:
            raise ExportError(f"from_log rebuilds a run from its step log: pass the run folder {p.parent}, "
                              f"not the checkpoint {p}")
        if not (p.parent / "config.json").is_file():
            raise ExportError(f"checkpoint {p} has no config.json beside it (in {p.parent}): export rebuilds "
                              "the model from the run's config; keep the checkpoint inside its run folder")
        return Source(p.parent, ckpt, f"checkpoint {p.name}")
    if not (p / "config.json").is_file():
        raise ExportError(f"{p} is not a zotune run or checkpoint folder: a run folder holds config.json "
                          "(and ckpt-last/, steps.jsonl); a checkpoint holds meta.json and weights.safetensors")
    if not from_log:
        found, reason = _tested_checkpoint(p)
        if found is not None:
            return Source(p, found, reason)
    if not (p / "steps.jsonl").is_file():
        raise ExportError(f"run folder {p} has no checkpoint and no steps.jsonl to rebuild the weights from")
    why = "rebuilt from steps.jsonl (from_log)" if from_log else "rebuilt from steps.jsonl (the run has no checkpoint)"
    return Source(p, None, why)


def check_out(out: str | os.PathLike) -> Path:
    """``out`` must not exist, or be an empty folder: an export never overwrites anything."""
    o = Path(out).expanduser()
    if o.exists() and not o.is_dir():
        raise ExportError(f"--out {str(out)!r} is a file; pass a new folder")
    if o.is_dir() and any(o.iterdir()):
        raise ExportError(f"--out {str(out)!r} exists and is not empty; pass a new folder (nothing is overwritten)")
    return o


# ----------------------------------------------------------------------------- rebuilding
def _tensors(source: Source) -> tuple[dict[str, torch.Tensor], dict]:
    """(trained tensors, facts for export_info): read from the checkpoint, or replayed from the log."""
    from zotune.train.checkpoint import load_checkpoint

    if source.checkpoint is not None:
        tensors, _, meta = load_checkpoint(source.checkpoint)
        return tensors, {"step": meta.get("step"), "model_fingerprint": meta.get("model_fingerprint"),
                         "scheme": meta.get("scheme")}
    from safetensors.torch import load_file

    from zotune.train.loop import replay

    with tempfile.TemporaryDirectory(prefix="zotune-export-") as tmp:
        report = replay(source.run_dir, Path(tmp) / "weights.safetensors")
        tensors = load_file(str(Path(tmp) / "weights.safetensors"))
    report.pop("written", None)  # the temporary file, gone now
    return tensors, {"step": report["steps"], "replay": report}


def _hub_reference(cfg) -> str:
    """What a user passes to ``from_pretrained`` to get the base model of an adapter export."""
    from zotune.models import ALIASES, _resolve_source

    name = cfg.model.name
    if name.startswith("tiny-"):
        return name  # built in memory by zotune.testing.tiny_model; save it to load it elsewhere
    if name.lower() in ALIASES:
        return _resolve_source(name, None, None)[0]  # the converted offline folder
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def export(path: str | os.PathLike, out: str | os.PathLike, *, merge: bool = False, from_log: bool = False) -> dict:
    """Write the tuned model of ``path`` (run or checkpoint folder) to the new folder ``out``.

    Returns what ``export_info.json`` holds (format, source, step, files). Raises
    :class:`ExportError` naming the argument for a missing / unusable source, an ``out`` that
    exists and is not empty, or ``merge`` with a scheme other than LoRA.
    """
    from zotune.config import from_dict
    from zotune.models import forget_gguf_quantization
    from zotune.params import OWN_TENSOR_SCHEMES, select_trainable
    from zotune.train.loop import load_base, scheme_options

    source = find_source(path, from_log=from_log)
    o = check_out(out)
    cfg = from_dict(_read_json(source.run_dir / "config.json"))
    scheme = cfg.trainable.scheme
    if merge and scheme != "lora":
        raise ExportError(f"merge folds LoRA into the base weights; this run's scheme is {scheme!r}, which is "
                          "exported as " + ("a plain model folder already" if scheme in OWN_TENSOR_SCHEMES
                                            else "a peft adapter folder (drop --merge)"))
    log.info("exporting %s: %s", source.run_dir, source.reason)
    tensors, facts = _tensors(source)

    loaded = load_base(cfg.model, device="cpu")
    if facts.get("model_fingerprint") not in (None, loaded.fingerprint):
        raise ExportError(f"{source.checkpoint} was written for model {facts['model_fingerprint']}, but the run's "
                          f"config.json names {cfg.model.name!r} {loaded.fingerprint}")
    if facts.get("scheme") not in (None, scheme):
        raise ExportError(f"{source.checkpoint} holds scheme {facts['scheme']!r} tensors, but the run's "
                          f"config.json says trainable.scheme={scheme!r}")
    loaded, named = select_trainable(loaded, scheme, **scheme_options(cfg))
    model = loaded.model
    missing, extra = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
    if missing or extra:
        raise ExportError(f"the tensors of {source.checkpoint or 'the replay'} do not fit scheme {scheme!r} of "
                          f"{cfg.model.name!r}: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(tensors[name])

    if scheme in OWN_TENSOR_SCHEMES or merge:
        if merge:
            model = model.merge_and_unload()  # W + (alpha / r) B A, the LoRA layers removed
        fmt = "transformers (LoRA merged)" if merge else "transformers"
    else:
        model.peft_config["default"].base_model_name_or_path = _hub_reference(cfg)
        fmt = "peft"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forget_gguf_quantization(base)

    o.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{o.name}.tmp-", dir=o.parent))
    try:
        if fmt == "peft":
            # zotune's adapters never train the embedding layers: no hub lookup of the base's vocabulary
            model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        else:
            model.save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
        _check_written(tmp)
        info = {
            "format": fmt,
            "kind": loaded.kind,
            "base_model": _hub_reference(cfg) if fmt == "peft" else cfg.model.name,
            "run_dir": str(source.run_dir.resolve()),
            "checkpoint": str(source.checkpoint.resolve()) if source.checkpoint else None,
            "source": source.reason,
            "step": facts.get("step"),
            "method": cfg.optim.method,
            "scheme": scheme,
            "task": cfg.task.name,
            "dtype": cfg.model.dtype,
            **({"replay": facts["replay"]} if "replay" in facts else {}),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        info["files"] = sorted(f.name for f in tmp.iterdir())
        for f in [tmp, *tmp.rglob("*")]:  # mkdtemp makes 0700
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        if o.is_dir():
            o.rmdir()  # empty (check_out)
        os.replace(tmp, o)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["out"] = str(o)
    return info


def _check_written(folder: Path) -> None:
    """Safetensors only, and no quantization_config: what other tools need to load the folder."""
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickles:
        raise RuntimeError(f"export wrote pickle files {pickles}; only safetensors are expected (a bug)")
    config = folder / "config.json"
    if config.is_file() and "quantization_config" in _read_json(config):
        raise RuntimeError(f"export wrote quantization_config into {config} (a bug: the weights are plain floats)")
