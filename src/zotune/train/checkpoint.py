"""Checkpoints written atomically: a kill at any moment leaves the previous one intact.

A checkpoint is a folder: ``weights.safetensors`` (the trainable tensors only),
``optimizer.safetensors`` + ``optimizer.json`` (the optimizer's state: its tensors, and the
structure around them) and ``meta.json`` (step, config fingerprint, model fingerprint,
metrics). It is built in a temporary sibling folder, flushed to disk, then swapped in with
renames; a reader that finds the swap half done (a kill between the two renames) takes the
previous copy.

Nothing is ever unpickled: a pickle file (``torch.load`` without ``weights_only``) can run
code, so a checkpoint from someone else must not be one. A folder holding a pickle file (such
as the ``optimizer.pt`` that zotune wrote before) is refused with the reason.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from zotune.errors import ZotuneError
from zotune.train.logger import to_json

#: the optimizer state: tensors in one file, the structure around them (JSON) in another
OPT_TENSORS, OPT_STRUCTURE = "optimizer.safetensors", "optimizer.json"
#: files that would have to be unpickled to be read; a checkpoint holding one is refused
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_FORMAT = 1


class CheckpointError(ZotuneError, RuntimeError):
    """A checkpoint that cannot be used for this run (another model or config, or damaged)."""


# --- optimizer state <-> (tensors, JSON) ---------------------------------------------------
# JSON carries None, bools, ints, strings, finite floats and string-keyed dicts as themselves;
# everything else is a one-key object: {"__tensor__": key in the safetensors file},
# {"__tuple__": [...]}, {"__float__": "inf" | "-inf" | "nan"} (strict JSON has no Infinity) and
# {"__dict__": [[key, value], ...]} for dicts with other keys (torch's integer parameter ids)
# or with a key that looks like one of these tags.
_TAGS = ("__tensor__", "__tuple__", "__float__", "__dict__")


def encode_state(state, tensors: dict[str, torch.Tensor] | None = None, where: str = "state"):
    """``(structure, tensors)``: ``structure`` is JSON-ready, tensors are named ``"0"``, ``"1"`` ..."""
    tensors = {} if tensors is None else tensors
    if state is None or isinstance(state, (bool, str)):
        return state, tensors
    if isinstance(state, int):
        return int(state), tensors
    if isinstance(state, float):
        return (float(state) if math.isfinite(state) else {"__float__": repr(float(state))}), tensors
    if isinstance(state, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = state.detach().cpu()
        return {"__tensor__": key}, tensors
    if isinstance(state, (list, tuple)):
        items = [encode_state(v, tensors, f"{where}[{i}]")[0] for i, v in enumerate(state)]
        if isinstance(state, list):
            return items, tensors
        if type(state) is not tuple:  # a NamedTuple would come back as a plain tuple
            raise CheckpointError(f"cannot store {where}: a {type(state).__name__} (use a dict or a tuple)")
        return {"__tuple__": items}, tensors
    if isinstance(state, dict):
        plain = all(isinstance(k, str) and k not in _TAGS for k in state)
        pairs = [(k, encode_state(v, tensors, f"{where}[{k!r}]")[0]) for k, v in state.items()]
        if plain:
            return dict(pairs), tensors
        for k, _ in pairs:
            if not (k is None or isinstance(k, (bool, int, float, str, tuple))):
                raise CheckpointError(f"cannot store {where}: key {k!r} of type {type(k).__name__}")
        return {"__dict__": [[encode_state(k, tensors, where)[0], v] for k, v in pairs]}, tensors
    raise CheckpointError(
        f"cannot store {where}: a {type(state).__name__} ({state!r:.60}); optimizer state holds "
        "tensors, numbers, strings, None, and lists / tuples / dicts of them"
    )


def _own_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor alone on its storage (safetensors refuses shared storage); copies only views."""
    seen, out = set(), {}
    for k, t in tensors.items():
        storage = t.untyped_storage()
        whole = t.is_contiguous() and t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if not whole or t.numel() == 0 or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def decode_state(structure, tensors: dict[str, torch.Tensor]):
    """The inverse of :func:`encode_state`."""
    if isinstance(structure, list):
        return [decode_state(v, tensors) for v in structure]
    if not isinstance(structure, dict):
        return structure
    if len(structure) == 1:
        (tag, value), = structure.items()
        if tag == "__tensor__":
            if value not in tensors:
                raise CheckpointError(f"tensor {value!r} of the optimizer state is missing")
            return tensors[value]
        if tag == "__tuple__":
            return tuple(decode_state(v, tensors) for v in value)
        if tag == "__float__":
            return float(value)
        if tag == "__dict__":
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value}
    return {k: decode_state(v, tensors) for k, v in structure.items()}


# --- files ----------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], optimizer_state: dict | None, meta: dict) -> Path:
    """Atomically write (or replace) the checkpoint folder ``path``."""
    path = Path(path)
    meta_text = to_json(meta, indent=2, default=str)  # strict JSON like every file a run writes: NaN -> null
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    prev = path.with_name(f"{path.name}.prev")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(tmp / "weights.safetensors", {k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    if optimizer_state is not None:
        structure, opt_tensors = encode_state(optimizer_state, where="optimizer_state")
        _save_tensors(tmp / OPT_TENSORS, _own_storage(opt_tensors))
        text = json.dumps({"format": _FORMAT, "state": structure}, allow_nan=False)
        _write_file(tmp / OPT_STRUCTURE, lambda f: f.write(text.encode()))
    _write_file(tmp / "meta.json", lambda f: f.write(meta_text.encode()))
    _fsync_dir(tmp)
    if path.exists():
        if prev.exists():
            shutil.rmtree(prev)
        os.replace(path, prev)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if prev.exists():
        shutil.rmtree(prev)
    return path


def find_checkpoint(path: str | Path) -> Path | None:
    """The usable checkpoint at ``path`` (or its previous copy after an interrupted swap)."""
    path = Path(path)
    for candidate in (path, path.with_name(f"{path.name}.prev")):
        if (candidate / "meta.json").is_file() and (candidate / "weights.safetensors").is_file():
            return candidate
    return None


def _refuse_pickles(found: Path) -> None:
    pickles = sorted(f.name for f in found.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if not pickles:
        return
    if "optimizer.pt" in pickles:
        raise CheckpointError(
            f"checkpoint {found} holds optimizer.pt, a pickle file written by an older zotune; this one "
            "stores optimizer state as safetensors + JSON and does not unpickle (a pickle can run code). "
            "Start the run again (or delete optimizer.pt to use the weights with `zotune eval`)"
        )
    raise CheckpointError(
        f"checkpoint {found} holds {', '.join(pickles)}: pickle files are never loaded (they can run "
        "code); a zotune checkpoint is only safetensors and JSON"
    )


def _existing(path: str | Path) -> Path:
    """The checkpoint folder at ``path``, or a :class:`CheckpointError` saying there is none."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no checkpoint at {path} (a folder with meta.json and weights.safetensors)")
    return found


def read_meta(path: str | Path) -> dict:
    """A checkpoint's ``meta.json`` (step, fingerprint, results) without reading its tensors."""
    found = _existing(path)
    try:
        return json.loads((found / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {found} is damaged: meta.json: {e}") from e


def copy_weights(path: str | Path, named: dict[str, torch.Tensor]) -> dict:
    """Copy a checkpoint's tensors into ``named`` (name -> tensor) one tensor at a time, and
    return its ``meta``: no second copy of the weights is held at once (reading all of them
    first, as :func:`load_checkpoint` does, costs the model's memory again for a moment). A name
    of ``named`` that the checkpoint lacks is an error naming it, raised before any copy.
    """
    from safetensors import safe_open

    found = _existing(path)
    _refuse_pickles(found)
    meta = read_meta(found)
    try:
        with safe_open(str(found / "weights.safetensors"), framework="pt", device="cpu") as f:
            have = set(f.keys())
            missing = sorted(set(named) - have)
            if missing:
                raise CheckpointError(f"checkpoint {found} has no tensor {missing[0]!r} (another scheme or model?)")
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(f.get_tensor(name))
    except CheckpointError:
        raise
    except Exception as e:  # damaged files: say which checkpoint
        raise CheckpointError(f"checkpoint {found} is damaged: {e}") from e
    return meta


def load_checkpoint(path: str | Path, *, map_location="cpu") -> tuple[dict, dict | None, dict]:
    """Read ``(tensors, optimizer_state, meta)``; raises :class:`CheckpointError` if unusable."""
    found = _existing(path)
    _refuse_pickles(found)
    try:
        meta = json.loads((found / "meta.json").read_text())
        tensors = load_file(str(found / "weights.safetensors"), device=str(map_location))
        saved = json.loads((found / OPT_STRUCTURE).read_text()) if (found / OPT_STRUCTURE).exists() else None
    except Exception as e:  # damaged files: say which checkpoint
        raise CheckpointError(f"checkpoint {found} is damaged: {e}") from e
    if saved is None:
        return tensors, None, meta
    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        got = saved.get("format") if isinstance(saved, dict) else None
        raise CheckpointError(f"checkpoint {found}: {OPT_STRUCTURE} has format {got!r}; this zotune reads {_FORMAT}")
    try:
        opt = decode_state(saved["state"], load_file(str(found / OPT_TENSORS), device=str(map_location)))
    except Exception as e:
        raise CheckpointError(f"checkpoint {found} is damaged: {e}") from e
    return tensors, opt, meta
