"""torch-style ``params`` (tensors, named pairs, mappings, group dicts) as named groups of leaves."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def named_param_groups(params) -> tuple[list[dict], list[str]]:
    """Normalise torch-style ``params`` into groups of plain tensors plus leaf names.

    Accepts an iterable of tensors, of ``(name, tensor)`` pairs, a mapping ``name -> tensor``,
    or a list of group dicts whose ``"params"`` is any of those (other keys: per-group
    ``lr``, ``weight_decay``).
    """
    if isinstance(params, torch.Tensor):
        raise ValueError("params must be an iterable of tensors or dicts, got a single Tensor")
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    if not items:
        raise ValueError("params is empty: the optimizer has nothing to train")
    raw_groups = items if isinstance(items[0], Mapping) else [{"params": items}]
    groups, names = [], []
    for gi, group in enumerate(raw_groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise ValueError(f"param group {gi} must be a dict with a 'params' key, got {group!r}")
        tensors = []
        plist = group["params"]
        entries = list(plist.items()) if isinstance(plist, Mapping) else list(plist)
        for k, entry in enumerate(entries):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], torch.Tensor):
                name, t = entry
            elif isinstance(entry, torch.Tensor):
                name, t = f"group{gi}.param{k}", entry
            else:
                raise ValueError(f"param group {gi} entry {k} is not a tensor or (name, tensor) pair: {entry!r}")
            if not t.is_floating_point():
                raise ValueError(f"parameter {name!r} has dtype {t.dtype}; only floating tensors can be trained")
            tensors.append(t)
            names.append(str(name))
        groups.append({**group, "params": tensors})
    return groups, names
