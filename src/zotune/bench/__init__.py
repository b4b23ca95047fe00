"""Benchmarking and profiling: exact allocation tracking, process memory, step time, and
passes over the parameters (see :mod:`zotune.bench.profile`)."""

from zotune.bench.profile import (
    AllocationTracker,
    StepMemory,
    Timer,
    Timing,
    count_parameter_passes,
    cuda_peak_bytes,
    current_rss_bytes,
    estimator_buffer_bytes,
    model_bytes,
    optimizer_state_bytes,
    peak_rss_bytes,
    reset_cuda_peak,
    sequential_chunks,
    step_memory,
    tensor_bytes,
    timed,
    timings,
)

__all__ = [
    "AllocationTracker", "StepMemory", "Timer", "Timing", "count_parameter_passes", "cuda_peak_bytes",
    "current_rss_bytes", "estimator_buffer_bytes", "model_bytes", "optimizer_state_bytes",
    "peak_rss_bytes", "reset_cuda_peak", "sequential_chunks", "step_memory", "tensor_bytes", "timed", "timings",
]
