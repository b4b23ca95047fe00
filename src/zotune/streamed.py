"""Streamed weights: tune a model whose trained tensors live on a slower tier than the compute.

In the spirit of ZO2: the trained tensors are kept in *storage* (memory-mapped files when the
model runs on the CPU, host memory when it runs on a GPU), and each module that owns some is
brought in only while it runs. A ZO step touches every weight three times (perturb, evaluate,
update); here each crosses the link once per step:

* the step evaluates every point as a copy of the batch in one forward (``perturbation="dual"``),
  so a module computes its ``x + eps z`` and ``x - eps z`` outputs while resident;
* the step's update is deferred (``defer_update=True``): the optimizer's
  :class:`zotune.update.Deferred` is handed to this object, which applies it when the module next
  comes in (at the next step's forward, or at :meth:`ZOOptimizer.flush`), then writes it back.
  ``state_dict()`` saves a pending update without applying it.

So the compute tier holds the frozen tensors, activations, and one module's trained tensors at
a time (on a GPU: a copy, perturbed in place). On the CPU the mapped files are addressable
already: modules compute straight from them (the kernel pages them in and may drop them again),
large matrices are perturbed row block by row block (``perturbation="dual"``), and updates are
written into the files, so no weight-sized buffer is allocated at all. Results equal the plain in-place mode up to float
rounding: the same directions, coefficients and rule, applied in the same order.

Use::

    lm = zotune.models.as_loaded(model, tokenizer)   # or load_model(...): a LoadedModel
    opt = zotune.MeZO(model.named_parameters(), module=model, perturbation="dual", defer_update=True)
    streamed = StreamedWeights(model, opt, storage="mmap", directory="offload/")
    for batch in data:
        opt.step(lambda copies=1: pair_loss(lm, batch, copies=copies))
    opt.flush()        # before evaluating or saving: apply the last deferred update

Loading is not streamed: the model is loaded normally, then its trained tensors are moved out.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from zotune._validate import unknown_choice
from zotune.perturb import owners_of

STORAGES = ("auto", "mmap", "host")


class StreamedWeights:
    """Moves the trained tensors of ``model`` to ``storage`` and streams them module by module.

    Args:
        model: the module being tuned; its trained tensors are those of ``optimizer``.
        optimizer: a :class:`~zotune.ZOOptimizer` built with ``perturbation="dual"`` and
            ``defer_update=True``.
        storage: ``"mmap"`` (one memory-mapped file per tensor under ``directory``; the default
            on CPU), ``"host"`` (host memory, pinned when CUDA is available; the default when
            the model's tensors are on a GPU), or ``"auto"``.
        directory: where ``"mmap"`` files go (a temporary directory by default, removed with
            this object).
        copy_in: copy each module's tensors to the compute device while it runs (default: on
            a GPU; on the CPU modules compute from the mapped files directly).
    """

    def __init__(self, model: nn.Module, optimizer, *, storage: str = "auto", directory: str | Path | None = None,
                 copy_in: bool | None = None):
        if getattr(optimizer, "perturbation", None) != "dual" or not getattr(optimizer, "defer_update", False):
            raise ValueError(
                "streamed weights need a ZOOptimizer with perturbation='dual' and defer_update=True: "
                "both halves are computed while a module is resident and its update waits for its next visit"
            )
        if storage not in STORAGES:
            raise ValueError(unknown_choice("storage", storage, STORAGES))
        leaves, names = optimizer.leaves, optimizer.names
        self.device = leaves[0].device
        if any(p.device != self.device for p in leaves):
            raise ValueError("streamed weights need every trained tensor on one device")
        if storage == "auto":
            storage = "mmap" if self.device.type == "cpu" else "host"
        if storage == "host" and self.device.type == "cpu":
            raise ValueError("storage='host' moves tensors off a GPU; on the CPU use storage='mmap'")
        self.storage_kind = storage
        self._tmp = None
        if storage == "mmap":
            if directory is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="zotune-stream-")
                directory = self._tmp.name
            self.directory = Path(directory)
            self.directory.mkdir(parents=True, exist_ok=True)
        self.optimizer = optimizer
        self.leaves = leaves
        self.owners = owners_of(model, leaves, names, "streamed")
        self.stored: list[torch.Tensor] = []
        for i, p in enumerate(leaves):
            self.stored.append(self._store(i, p))
            p.data = self.stored[i]  # between visits the parameter *is* its stored copy
        self.bytes_in = 0  # bytes brought to the compute tier
        self.bytes_out = 0  # bytes written back
        self._handles = []
        for mod, own in self.owners:
            self._handles.append(mod.register_forward_pre_hook(lambda m, a, own=own: self._bring_in(own)))
            self._handles.append(mod.register_forward_hook(lambda m, a, out, own=own: self._send_back(own)))
        self.deferred = optimizer.deferred
        self.deferred.stream_with(self)  # the held update is now applied as each module comes in
        # On the CPU the mapped file is already addressable memory: modules compute from it and
        # updates are written into it (no copy). On a GPU each module's tensors are copied in,
        # and the copy is perturbed in place (it is disposable).
        self.copy_in = self.device.type != "cpu" if copy_in is None else bool(copy_in)
        if self.copy_in:
            optimizer.evaluation.use_originals(self.stored)

    # ----------------------------------------------------------------------------- storage
    def _store(self, i: int, p: torch.Tensor) -> torch.Tensor:
        if self.storage_kind == "mmap":
            path = self.directory / f"{i:05d}.bin"
            path.unlink(missing_ok=True)
            # shared=True: a file-backed mapping, written through to the file, paged in on use
            t = torch.from_file(str(path), shared=True, size=p.numel(), dtype=p.dtype).view(p.shape)
            t.copy_(p.detach())
            return t
        host = torch.empty(p.shape, dtype=p.dtype, pin_memory=torch.cuda.is_available())
        return host.copy_(p.detach())

    def _bring_in(self, own: list[int]) -> None:
        for i in own:
            p = self.leaves[i]
            self.bytes_in += p.numel() * p.element_size()  # copied in, or paged in from the file
            if self.copy_in:
                p.data = self.stored[i].to(self.device, copy=True)
        pending = self.deferred.pending
        if pending is not None and not set(own) <= pending.applied:
            todo = [i for i in own if i not in pending.applied]
            self.deferred.apply(todo)  # into the resident copy, or straight into the file
            for i in todo:
                if self.copy_in:
                    self.stored[i].copy_(self.leaves[i].data)
                self.bytes_out += self.stored[i].numel() * self.stored[i].element_size()

    def _send_back(self, own: list[int]) -> None:
        for i in own:
            self.leaves[i].data = self.stored[i]

    def flush(self) -> None:
        """Bring in every module whose tensors still wait for the deferred update, apply it, write back."""
        for mod, own in self.owners:
            pending = self.deferred.pending
            if pending is None:
                return
            if not set(own) <= pending.applied:
                self._bring_in(own)
                self._send_back(own)

    def remove_files(self) -> None:
        """Delete the memory-mapped files (the mappings stay valid in this process; POSIX)."""
        if self.storage_kind == "mmap":
            for i in range(len(self.stored)):
                (self.directory / f"{i:05d}.bin").unlink(missing_ok=True)

    def close(self) -> None:
        """Apply pending updates, copy the tensors back into ordinary memory on the compute
        device, remove the hooks (and the temporary files)."""
        self.deferred.flush()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for i, p in enumerate(self.leaves):
            p.data = self.stored[i].to(self.device, copy=True)
        self.stored.clear()
        self.deferred.stream_with(None)
        if self.copy_in:
            self.optimizer.evaluation.use_originals(None)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
