"""A benchmark's JSON record: its rows with the machine, software and date they were measured on.

Why: every number in the docs comes from a script's JSON, and a number without its machine and
date cannot be compared with a later one; one writer keeps the scripts' records alike.

    write_record("benchmarks/results/x.json", {"rows": rows}, model="smollm2-135m")
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
from pathlib import Path

import torch

__all__ = ["cpu_model", "machine_meta", "write_record"]


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), or the platform's processor string: two
    sessions' timings compare only on the same CPU, and "x86_64" does not say which."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_meta(**extra) -> dict:
    """Date (UTC), machine and CPU model, torch threads, the versions of torch, transformers and
    peft (transformers is not pinned, and a forward's speed depends on it), and ``extra``."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.machine(), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft"), **extra}


def write_record(path: str | Path, payload: dict, **meta) -> dict:
    """Write ``{"meta": machine_meta(**meta), **payload}`` as JSON to ``path`` (folders made); returns it."""
    record = {"meta": machine_meta(**meta), **payload}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return record
