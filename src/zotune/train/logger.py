"""Run logging: JSONL metrics (always), TensorBoard scalars (optional, no account needed), and
the ZO step log that ``zotune replay`` rebuilds the tuned weights from. Only rank 0 writes.

Every JSON file a run writes is strict JSON (:func:`to_json`): a non-finite number (a NaN
loss, a best dev score that never was) is written as ``null``, never as ``NaN`` or
``-Infinity``, which strict readers refuse.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

log = logging.getLogger("zotune")


def finite_or_none(value):
    """``value`` with every non-finite float inside it (dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def to_json(value, **kwargs) -> str:
    """Strict JSON text of ``value`` (``allow_nan=False``; non-finite floats become null)."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted: a handler that kept the
    stderr of its creation wrote into a closed stream once that one was replaced (pytest's
    capture, a notebook's redirection) and printed "--- Logging error ---" instead."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns one; the current stderr is used instead
        pass


def setup_console_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(level)


class RunLogger:
    """Appends JSON lines to ``metrics.jsonl`` (and ``steps.jsonl`` for ZO step records) and
    mirrors scalars to TensorBoard when available."""

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, enabled: bool = True) -> None:
        self.dir = Path(out_dir)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except Exception as e:  # tensorboard missing or broken: JSONL still has everything
                log.warning("TensorBoard logging off: %s", e)

    def _append(self, name: str, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.dir / name, "a") as f:
            f.write(to_json(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self, step: int, **values) -> None:
        self._append("metrics.jsonl", {"step": step, **values})
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def step_record(self, record: dict) -> None:
        self._append("steps.jsonl", record)

    def truncate_after(self, step: int) -> None:
        """Drop log lines of steps >= ``step`` (those after the checkpoint a resume starts from)."""
        if not self.enabled:
            return
        for name, key in (("steps.jsonl", "step"), ("metrics.jsonl", "step")):
            path = self.dir / name
            if not path.exists():
                continue
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                limit = step if name == "steps.jsonl" else step + 1
                if rec.get(key, -1) < limit or rec.get("phase") == "zero-shot":
                    kept.append(line)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(k + "\n" for k in kept))
            os.replace(tmp, path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
