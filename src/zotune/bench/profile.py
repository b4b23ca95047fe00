"""One profiling helper for the whole project: memory allocated by a step, process memory,
step time, and passes over the parameters.

Why a dispatch-mode tracker: on CPU there is no allocator peak counter (``torch.cuda`` has
``max_memory_allocated``, the CPU allocator has nothing alike) and process RSS is too coarse
(the allocator keeps freed pages, other tensors come and go). :class:`AllocationTracker` sees
every tensor that a torch op creates inside it and follows each one's storage until it is
freed, so "how much extra memory did this optimizer step need" has an exact answer that is the
same on every device and machine.

Example::

    from zotune.bench.profile import AllocationTracker, count_parameter_passes, timed

    with AllocationTracker() as tr:
        opt.step(closure)
    print(tr.peak_bytes, tr.allocations)
    print(count_parameter_passes(opt, closure))        # 3.0 for MeZO
    print(timed(lambda: opt.step(closure), repeats=3))  # median seconds
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "AllocationTracker",
    "Timer",
    "count_parameter_passes",
    "cuda_peak_bytes",
    "current_rss_bytes",
    "estimator_buffer_bytes",
    "model_bytes",
    "peak_rss_bytes",
    "reset_cuda_peak",
    "sequential_chunks",
    "StepMemory",
    "step_memory",
    "tensor_bytes",
    "optimizer_state_bytes",
    "timed",
    "timings",
    "Timing",
]


# ---------------------------------------------------------------------------------- allocations
def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """``(device, data_ptr, nbytes)`` of ``t``'s storage, or ``None`` when it has no real memory
    (meta or fake tensors, empty storages, tensor subclasses without a storage)."""
    try:
        s = t.untyped_storage()
        ptr, nbytes = s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    if ptr == 0 or nbytes == 0 or t.device.type == "meta":
        return None
    return str(t.device), ptr, nbytes


class AllocationTracker(TorchDispatchMode):
    """Counts the bytes of tensor storages created by torch ops inside the context, live.

    Each op's outputs are inspected; an output whose storage is neither one of the op's inputs'
    storages (a view, an in-place or ``out=`` op) nor already tracked is a new allocation. Its
    storage is followed with a weak reference, keyed by ``(device, data_ptr)`` so that views of
    it are never counted twice, and its bytes leave the live count when the storage is freed.

    Attributes:
        live_bytes: bytes of tracked storages alive now.
        peak_bytes: the largest ``live_bytes`` seen, i.e. the memory the code inside needed on top
            of what existed at entry.
        allocated_bytes: total bytes allocated inside (freed or not).
        allocations: number of storages allocated inside.
        retained_bytes: ``live_bytes`` when the context exited (what the code kept, e.g. lazily
            created optimizer state).

    Limits:
        * Only tensors created through torch ops dispatched inside the context count; memory a
          kernel uses internally (BLAS workspaces, the CUDA caching allocator's slack), Python
          objects and non-torch buffers are invisible.
        * In-place ops (``add_``, ``copy_``, ``out=``) allocate nothing and count nothing.
        * Freeing a tensor that existed at entry does not lower the count: the peak is "above
          what existed at entry", never below it.
        * It intercepts every op in Python: time measured inside it is not representative.
        * A dispatch mode is per thread: ops run on other threads (zotune's chunk workers on CPU)
          are not seen. :func:`step_memory` runs the step on one thread for this reason.

    :meth:`paused` excludes a region (e.g. the loss closure) from being recorded, so the
    optimizer's own buffers can be told apart from the forward pass's activations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocated_bytes = 0
        self.allocations = 0
        self.retained_bytes = 0
        self._live: dict[tuple[str, int], tuple[weakref.ref, int]] = {}
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Do not record allocations made in this block (storages already tracked still are)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def reset_peak(self) -> None:
        """Restart the peak from the bytes alive now."""
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self._paused:
            # lift_fresh hands over a tensor that torch.tensor() built outside the dispatcher
            inputs = () if func is torch.ops.aten.lift_fresh.default else (args, kwargs)
            seen = {k[:2] for k in map(_storage_key, _tensors(inputs)) if k is not None}
            for t in _tensors(out):
                key = _storage_key(t)
                if key is None or key[:2] in seen or key[:2] in self._live:
                    continue
                seen.add(key[:2])
                self._track(t.untyped_storage(), key[:2], key[2])
        return out

    def _track(self, storage, key: tuple[str, int], nbytes: int) -> None:
        def freed(ref, key=key, tracker_ref=weakref.ref(self)):
            tracker = tracker_ref()
            if tracker is not None and tracker._live.get(key, (None,))[0] is ref:
                del tracker._live[key]
                tracker.live_bytes -= nbytes

        self._live[key] = (weakref.ref(storage, freed), nbytes)
        self.live_bytes += nbytes
        self.allocated_bytes += nbytes
        self.allocations += 1
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.retained_bytes = self.live_bytes
        return super().__exit__(exc_type, exc_val, exc_tb)


class StepMemory(NamedTuple):
    """What one ``optimizer.step(closure)`` allocated (see :func:`step_memory`)."""

    step_peak_bytes: int  # everything: forward activations, directions, temporaries
    own_peak_bytes: int  # the optimizer's own tensors only (allocations inside the closure excluded)
    retained_bytes: int  # still alive after the step (new state, grads)


def step_memory(optimizer, closure: Callable[[], Any], *, sequential: bool = True) -> StepMemory:
    """Takes one real step, instrumented twice: once for the whole step's peak, and, within the
    same step, a second tracker that skips what the closure allocates, so the optimizer's own
    buffers (directions, rule temporaries, gradients) are told apart from the forward's.

    ``own_peak_bytes`` is the number behind claims like "ZO-SGD needs no buffer larger than one
    chunk of a direction"; ``step_peak_bytes - forward peak`` is what the step costs on top of
    inference, which is ``max(forward, own)`` rather than their sum when they do not overlap.

    A dispatch mode only sees its own thread, and zotune draws direction chunks on worker
    threads on CPU: with ``sequential`` (default) the step runs on one thread (see
    :func:`sequential_chunks`, which the warm-up step should use too) so that every op is seen.
    With ``W`` workers the real transient peak is up to ``W`` times the per-chunk part, and each
    worker keeps its own scratch buffer (:func:`estimator_buffer_bytes`).
    """
    own = AllocationTracker()

    def excluded():
        with own.paused():
            return closure()

    with sequential_chunks() if sequential else contextlib.nullcontext():
        with AllocationTracker() as whole, own:
            optimizer.step(excluded)
    return StepMemory(whole.peak_bytes, own.peak_bytes, whole.retained_bytes)


@contextlib.contextmanager
def sequential_chunks() -> Iterator[None]:
    """Run zotune's per-chunk loops on the calling thread (``ZOTUNE_THREADS=1``) in this block.

    Needed wherever an :class:`AllocationTracker` must see every op; warm an optimizer up
    inside it too before measuring, so that the calling thread's scratch buffer already exists.
    """
    old = os.environ.get("ZOTUNE_THREADS")
    os.environ["ZOTUNE_THREADS"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["ZOTUNE_THREADS"]
        else:
            os.environ["ZOTUNE_THREADS"] = old


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in tree_leaves(tree) if isinstance(x, torch.Tensor)]


def tensor_bytes(tree: Any) -> int:
    """Bytes of the distinct storages of the tensors in a nested structure (dicts, lists...)."""
    keys = {k[:2]: k[2] for k in map(_storage_key, _tensors(tree)) if k is not None}
    return sum(keys.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` (momentum, Adam moments, LOZO-M's m x r buffers).

    The estimator's own buffers live outside ``state``: see :func:`estimator_buffer_bytes`.
    """
    return tensor_bytes([dict(s) for s in optimizer.state.values()])


def estimator_buffer_bytes(optimizer) -> int:
    """Bytes of tensors the estimator keeps between steps, outside ``optimizer.state``: the
    per-thread scratch buffers that chunks are drawn into, LOZO's cached ``V`` (n x r per matrix)."""
    est = getattr(optimizer, "estimator", None)
    return 0 if est is None else tensor_bytes(list(vars(est).values()))


# ---------------------------------------------------------------------------- process memory
def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (``ru_maxrss``: KiB on Linux, bytes on macOS).

    It never goes down, so compare it across separate processes, not across steps.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def current_rss_bytes() -> int | None:
    """The process's resident memory now (``/proc/self/statm``); ``None`` where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * resource.getpagesize()


def cuda_peak_bytes(device: torch.device | str | int | None = None) -> int | None:
    """Peak bytes allocated by tensors on a CUDA device since the last reset; ``None`` without CUDA."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.max_memory_allocated(device))


def reset_cuda_peak(device: torch.device | str | int | None = None) -> None:
    """Start :func:`cuda_peak_bytes` afresh (waits for pending kernels first); no-op without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------- time
def _sync() -> None:
    # CUDA kernels run asynchronously: without a sync a timer measures the launch, not the work
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timer:
    """Wall and process-CPU time of a block, synchronising CUDA at both ends::

        with Timer() as t:
            ...
        t.seconds, t.cpu_seconds

    CPU time (all threads of this process) is the steadier number on a shared machine, where
    other processes stretch wall time but not the work done.
    """

    def __init__(self) -> None:
        self.seconds = float("nan")
        self.cpu_seconds = float("nan")
        self._start = self._cpu_start = 0.0

    def __enter__(self) -> Timer:
        _sync()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        _sync()
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu_start


class Timing(NamedTuple):
    """Medians over repeated calls (see :func:`timings`)."""

    seconds: float  # wall
    cpu_seconds: float  # process CPU time, all threads
    all_seconds: list[float]


def timings(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> Timing:
    """Median wall and CPU seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls.

    The median, not the mean: on a shared machine one slow call should not move the result.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        with Timer() as t:
            fn()
        wall.append(t.seconds)
        cpu.append(t.cpu_seconds)
    return Timing(statistics.median(wall), statistics.median(cpu), wall)


def timed(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` (:func:`timings` for CPU time as well)."""
    return timings(fn, repeats, warmup).seconds


# ---------------------------------------------------------------------------- parameter passes
def count_parameter_passes(optimizer, closure: Callable[[], Any]) -> float:
    """Takes one real ``optimizer.step(closure)`` and returns the passes over the parameters it made.

    A pass is one regeneration of every leaf's direction (``estimator.leaf_direction``): each
    call is weighted by the elements its direction covers (a chunk of a leaf, or a whole matrix
    for a low-rank ``U V^T``) over all trained elements, so chunked directions and a block-wise
    step that touches one block at a time still count in whole-model units. MeZO makes 3 per
    step (perturb +eps, perturb -2 eps, restore fused into the update). Regeneration is what
    costs time in a ZO step (a random draw per element), so this is the number to compare.

    The estimator's method is wrapped on the instance for the duration of the step only; the
    wrapper is safe to call from zotune's chunk worker threads.
    """
    est = getattr(optimizer, "estimator", None)
    if est is None or not hasattr(est, "leaf_direction"):
        raise ValueError(
            f"{type(optimizer).__name__} has no ZO estimator to count; "
            "count_parameter_passes works on zotune.ZOOptimizer and its presets"
        )
    total = sum(p.numel() for p in optimizer.leaves)
    counts: list[int] = []  # list.append is atomic: workers may call the wrapper concurrently
    inner = est.leaf_direction

    def counting(*args, **kwargs):
        ld = inner(*args, **kwargs)
        if ld is not None:
            counts.append(ld.u.shape[0] * ld.v.shape[0] if hasattr(ld, "u") else ld.z.numel())
        return ld

    had_own = "leaf_direction" in vars(est)
    est.leaf_direction = counting
    try:
        optimizer.step(closure)
    finally:
        if had_own:
            est.leaf_direction = inner
        else:
            del est.leaf_direction  # back to the class's method
    return sum(counts) / total


def model_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``params`` (tied weights counted once)."""
    return tensor_bytes(list(params))
