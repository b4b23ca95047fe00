"""Checkpoints written atomically: a kill at any moment leaves the previous one intact.

A checkpoint is a folder: ``weights.safetensors`` (the trainable tensors only), ``optimizer.pt``
and ``meta.json`` (step, config fingerprint, model fingerprint, metrics). It is built in a
temporary sibling folder, flushed to disk, then swapped in with renames; a reader that finds
the swap half done (a kill between the two renames) takes the previous copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (another model or config, or damaged)."""


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


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], optimizer_state: dict | None, meta: dict) -> Path:
    """Atomically write (or replace) the checkpoint folder ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    prev = path.with_name(f"{path.name}.prev")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(flat, str(tmp / "weights.safetensors"))
    with open(tmp / "weights.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    if optimizer_state is not None:
        _write_file(tmp / "optimizer.pt", lambda f: torch.save(optimizer_state, f))
    _write_file(tmp / "meta.json", lambda f: f.write(json.dumps(meta, indent=2, default=str).encode()))
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


def load_checkpoint(path: str | Path, *, map_location="cpu") -> tuple[dict, dict | None, dict]:
    """Read ``(tensors, optimizer_state, meta)``; raises :class:`CheckpointError` if unusable."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        meta = json.loads((found / "meta.json").read_text())
        tensors = load_file(str(found / "weights.safetensors"), device=str(map_location))
        opt_path = found / "optimizer.pt"
        opt = torch.load(opt_path, map_location=map_location, weights_only=False) if opt_path.exists() else None
    except Exception as e:  # damaged files: say which checkpoint
        raise CheckpointError(f"checkpoint {found} is damaged: {e}") from e
    return tensors, opt, meta
