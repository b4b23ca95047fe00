"""What every estimator shares: direction handles, per-leaf direction forms, in-place perturbation.

An estimator says how a random direction ``z`` is drawn for each trainable tensor (a *leaf*)
and how it is regenerated later. A step asks it for cheap handles (:class:`Direction`, just
integers), then for each leaf's direction one leaf at a time, so that at most one leaf-sized
direction is alive at once and no full-model direction is ever stored.

A leaf's direction is either :class:`Dense` or :class:`LowRank` (factors ``u`` (m x r) and
``v`` (n x r) with ``z = u @ v.T``; the product is never formed when the consumer can use
``addmm_``). Dense directions are defined chunk by chunk: a leaf is split into flat ranges of
``chunk_size`` elements, each with its own seed, so even the largest tensor (an embedding
matrix) never needs a direction of its own size in memory, only one chunk at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch


#: Elements per chunk of a dense direction (4 MiB in float32). Part of the direction's definition:
#: a different chunk size draws different directions (so it is checked on resume).
DEFAULT_CHUNK = 1 << 20


@dataclass(frozen=True)
class Direction:
    """A cheap handle naming one query's direction: everything else is regenerated from it."""

    step: int
    query: int
    block: int | None = None  # block-wise estimates: the only block this query perturbs


class Dense(NamedTuple):
    """A dense direction for one chunk of a leaf: ``z`` is flat, as long as the chunk."""

    z: torch.Tensor


class LowRank(NamedTuple):
    """A low-rank leaf direction ``z = u @ v.T`` with ``u``: (m, r) and ``v``: (n, r)."""

    u: torch.Tensor
    v: torch.Tensor
    period: int  # which V (LOZO resamples V every ``interval`` steps); used by low-rank momentum


LeafDirection = Dense | LowRank


def add_direction_(p: torch.Tensor, d: LeafDirection, alpha: float) -> None:
    """``p += alpha * z`` in place, without materialising a low-rank ``z``."""
    if isinstance(d, LowRank):
        p.addmm_(d.u, d.v.T, alpha=alpha)
    else:
        p.add_(d.z, alpha=alpha)


def to_dense(d: LeafDirection) -> torch.Tensor:
    """Materialise a direction (only where a consumer truly needs the dense tensor)."""
    return d.u @ d.v.T if isinstance(d, LowRank) else d.z


class Estimator:
    """Base class: draws, regenerates and applies random directions for a list of leaves.

    Subclasses implement :meth:`leaf_direction`. ``bind`` is called once by the optimizer with
    the ordered leaf names and tensors; leaf ``i`` is then addressed by its index.

    ``kind`` is ``"two_point"`` (perturb the weights, difference two losses) or ``"jvp"``
    (forward-mode directional derivative, no perturbation).
    """

    kind = "two_point"
    name = "base"
    #: Draw chunks on parallel CPU threads (worth it when drawing is a single-threaded kernel,
    #: as Gaussian sampling is; Rademacher signs are cheap multithreaded ops already).
    parallel_chunks = True
    #: whether the update pass may put back the last perturbation while it writes the update
    #: (false when the direction itself changes between evaluation and update, as HiZOO's)
    fuses_restore = True
    #: evaluated as copies in one forward, a matrix's direction must be a side term of a plain
    #: nn.Linear / nn.Embedding (a population of low-rank directions: never a per-copy weight)
    side_terms_only = False
    #: what rules may rely on (a rule's ``needs``): ``"shared_subspace"``, one low-rank ``V`` per
    #: matrix kept for several steps (LOZO), which low-rank momentum projects its state onto
    provides: frozenset = frozenset()

    def __init__(self, queries: int = 1, chunk_size: int = DEFAULT_CHUNK) -> None:
        from zotune._validate import check_int

        self.queries = check_int("queries", queries)
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.run_seed = 0
        self.names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.ranges: list[list[tuple[int, int]]] = []
        self._scratch: dict[tuple, torch.Tensor] = {}

    # -- binding -----------------------------------------------------------------------------
    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        """Remember the leaves' names, shapes and chunks and the run seed (called by the optimizer)."""
        for n, p in zip(names, params):
            if not p.is_contiguous():
                raise ValueError(f"parameter {n!r} is not contiguous; ZO updates write it in place by chunks")
        self.names = list(names)
        self.shapes = [p.shape for p in params]
        self.ranges = [chunk_ranges(p.numel(), self.chunk_size) for p in params]
        self.run_seed = int(run_seed)
        self._scratch.clear()

    # -- chunks ------------------------------------------------------------------------------
    def num_chunks(self, i: int) -> int:
        """How many chunks leaf ``i``'s direction is drawn in."""
        return len(self.ranges[i])

    def factored(self, i: int) -> bool:
        """Whether leaf ``i``'s direction comes as low-rank factors (no dense buffer needed)."""
        return False

    def out_buffer(self, t: torch.Tensor, i: int, p: torch.Tensor) -> torch.Tensor | None:
        """The scratch buffer chunk ``t`` of leaf ``i`` is drawn into (None for factored leaves)."""
        return None if self.factored(i) else self.scratch(t.numel(), p)

    def target(self, p: torch.Tensor, i: int, k: int) -> torch.Tensor:
        """The view of leaf ``p`` that chunk ``k``'s direction applies to (flat)."""
        a, b = self.ranges[i][k]
        return p.view(-1)[a:b]

    def scratch(self, n: int, p: torch.Tensor) -> torch.Tensor:
        """A reusable buffer of ``n`` elements for one chunk's direction (the step's only temp)."""
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        key = (dtype, p.device)
        key = key + (threading.get_ident(),)  # one buffer per worker thread
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = self._scratch[key] = torch.empty(n, dtype=dtype, device=p.device)  # grows to the largest chunk
        return buf[:n]

    # -- directions ----------------------------------------------------------------------------
    def directions(self, step: int) -> list[Direction]:
        """The query handles of ``step`` (``queries`` of them by default)."""
        return [Direction(step, j) for j in range(self.queries)]

    def leaf_direction(
        self, d: Direction, i: int, p: torch.Tensor, k: int = 0, out: torch.Tensor | None = None
    ) -> LeafDirection | None:
        """Regenerate chunk ``k`` of leaf ``i``'s direction for handle ``d`` (into ``out`` when
        given, a buffer of the chunk's length); ``None`` if ``d`` leaves the leaf alone."""
        raise NotImplementedError

    def touches(self, d: Direction, i: int) -> bool:
        """Whether query ``d`` perturbs leaf ``i`` (all do, except in block-wise estimates)."""
        return True

    def grad_scale(self, i: int) -> float:
        """Factor between the perturbation ``z`` and the gradient estimate ``c * scale * z``.

        1 for Gaussian directions; ``1 / r`` for LOZO's ``U V^T / r``.
        """
        return 1.0

    def observe(self, dirs: Sequence[Direction], aux: Sequence[float], params: Sequence[torch.Tensor]) -> None:
        """Take in a step's extra per-direction scalars (HiZOO's curvatures) before its update
        pass; stateless estimators ignore them."""

    def perturb_(self, params: Sequence[torch.Tensor], d: Direction, alpha: float,
                 only: set[int] | None = None) -> int:
        """``x += alpha * z(d)`` leaf by leaf (the leaves ``only``, if given), in place.
        Returns the number of leaves written."""
        items = [(i, p, k) for i, p in enumerate(params) if self.touches(d, i) and (only is None or i in only)
                 for k in range(self.num_chunks(i))]

        def one(item) -> int:
            i, p, k = item
            t = self.target(p, i, k)
            ld = self.leaf_direction(d, i, p, k, out=self.out_buffer(t, i, p))
            if ld is None:
                return 0
            add_direction_(t, ld, alpha)
            return 1

        return sum(for_each_chunk(one, items, params[0].device if params else None, self.parallel_chunks))

    def full_direction(self, d: Direction, i: int, p: torch.Tensor) -> torch.Tensor | None:
        """Leaf ``i``'s whole direction shaped like ``p`` (for tests and Forward-Grad)."""
        parts = [self.leaf_direction(d, i, p, k) for k in range(self.num_chunks(i))]
        if parts[0] is None:
            return None
        if isinstance(parts[0], LowRank):
            return to_dense(parts[0])
        return torch.cat([x.z for x in parts]).view(p.shape)

    def config(self) -> dict:
        """Hyperparameters that determine the directions (checked on resume)."""
        return {"name": self.name, "queries": self.queries, "chunk_size": self.chunk_size}

    def state_dict(self) -> dict:
        """Estimator state worth checkpointing (none for stateless ones)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class DenseWrapper(Estimator):
    """Base of estimators that reshape another dense estimator's directions entry by entry
    (sparse masks, Sparse-MeZO's magnitude masks, HiZOO's ``H^{-1/2}``): the handles, chunks and
    blocks are the inner estimator's; only :meth:`leaf_direction` changes the values."""

    #: what the wrapper does, for the error when the inner directions are low rank
    needs_dense_because = "it changes directions entry by entry"

    def __init__(self, inner: Estimator) -> None:
        if not isinstance(inner, Estimator) or inner.kind != "two_point":
            raise ValueError(f"inner must be a two-point Estimator, got {inner!r}")
        super().__init__(inner.queries, inner.chunk_size)
        self.inner = inner
        self.parallel_chunks = inner.parallel_chunks

    def bind(self, names: Sequence[str], params: Sequence[torch.Tensor], run_seed: int) -> None:
        super().bind(names, params, run_seed)
        self.inner.bind(names, params, run_seed)
        for i, n in enumerate(names):
            if self.inner.factored(i):
                raise ValueError(f"{self.name} needs dense directions ({self.needs_dense_because}), but "
                                 f"{self.inner.name!r} draws a low-rank one for {n!r}")
        self.queries = self.inner.queries

    def directions(self, step: int) -> list[Direction]:
        return self.inner.directions(step)

    def touches(self, d: Direction, i: int) -> bool:
        return self.inner.touches(d, i)

    def grad_scale(self, i: int) -> float:
        return self.inner.grad_scale(i)


def randn_like_leaf(p: torch.Tensor, g: torch.Generator, shape=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal draws in the leaf's dtype and device (MeZO draws in the weight dtype)."""
    if out is not None:
        return out.normal_(generator=g)
    dtype = p.dtype if p.dtype.is_floating_point else torch.float32
    return torch.randn(p.shape if shape is None else shape, generator=g, dtype=dtype, device=p.device)


def chunk_ranges(numel: int, chunk_size: int) -> list[tuple[int, int]]:
    """Flat ``[start, end)`` ranges of at most ``chunk_size`` elements covering ``numel``."""
    return [(a, min(a + chunk_size, numel)) for a in range(0, numel, chunk_size)] or [(0, 0)]


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def for_each_chunk(fn: Callable, items: Iterable, device: torch.device | None, parallel: bool = True) -> list:
    """Run ``fn`` over independent chunks, in parallel threads on the CPU.

    Drawing random numbers is single-threaded in PyTorch's CPU kernels, and every chunk has its
    own generator, so chunks can be drawn side by side: on CPU this halves the cost of
    regenerating directions on two cores. Each chunk's arithmetic is the same whatever thread
    runs it, so results are bit-identical to a sequential run. Set ``ZOTUNE_THREADS=1`` to run
    sequentially. On CUDA the kernels are asynchronous already: chunks run in order.
    """
    global _POOL
    items = list(items)
    workers = int(os.environ.get("ZOTUNE_THREADS", torch.get_num_threads()))
    if not parallel or workers <= 1 or len(items) < 2 or (device is not None and device.type != "cpu"):
        return [fn(x) for x in items]
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != workers:
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zotune")

    def run(x):
        with torch.no_grad():  # grad mode is per thread: the workers must not record in-place writes
            return fn(x)

    return list(_POOL.map(run, items))
