"""The modules behind :mod:`zotune.evaluation`: evaluating the loss at ``x + s * eps * z`` without (or with)
writing the weights, and stochastic rounding for half precision.

``inplace`` (MeZO): add ``s * eps * z`` to the weights, run the closure, move on; the restore is
fused into the update. Cheapest, but in float16 / bfloat16 each add rounds, so ``+eps, -2eps,
+eps`` does not come back to ``x``: the weights take a random walk of about one unit in the last
place per step, larger than a typical ZO update, which is how half-precision ZO runs drift.

``swap`` (just in time): the weights are never written during the evaluation. A forward
pre-hook on each module that owns trained tensors gives it a perturbed copy while it runs and
puts the original back after, so only one module's perturbed weights exist at a time
(ZO-Bench's ``max_l |x_l|``), and half-precision weights stay exact.

``dual`` (N copies in one forward, :class:`CopiesPerturbation`): the closure runs its batch once
per point the step needs (MeZO's ``x +- eps z``: 2 copies; ``q`` queries: ``2q``; FZOO's base point
and ``N`` queries: ``N + 1``), as one forward; each module that owns trained tensors runs copy ``k``
of its rows with its tensors at point ``k``, built just in time while the module runs. A pair
``x +- eps z`` draws ``z`` once, so a MeZO step draws each direction twice (here and in the update)
instead of three times; the weights are never written (exact in half precision), and the rest
of the model runs one larger batch. Low-rank directions of plain ``nn.Linear`` / ``nn.Embedding``
weights are side terms of the copy's output (no per-copy weight). It needs a closure that
accepts ``copies`` (see :meth:`zotune.ZOOptimizer.step`) and modules that own tensors but contain
no other such module. On a CPU, N copies in one forward cost about what N forwards cost.

``per_example`` (GRZO's per-example directions, :class:`zotune.evaluation.PerExample`): the same
machinery with each example of each copy its own point: copy ``+`` and copy ``-`` of the batch in
one forward, example ``j`` of both at ``x +- eps z_j``. With dense directions each owning module
runs once per example and copy, with a perturbed copy of its tensors: cheap for a prefix, a
prompt, norms or LoRA, and ``2 B`` copies of every trained tensor a step for all weights. With
low-rank directions a plain layer runs once over all rows and adds each example's side term in
two batched thin matmuls (EGGROLL's shared base matmul): all weights at about MeZO's cost.

``side`` (low-rank directions, LOZO): a matrix perturbed by ``eps U V^T`` is never written; each
``nn.Linear`` adds ``eps (x V) U^T`` to its output and each ``nn.Embedding`` adds
``eps U[ids] V^T``, two thin matmuls, instead of three passes over every weight matrix per
step. Other tensors (biases, norms) are perturbed in place as in ``inplace``.

Updates to half-precision weights are far below their resolution (``lr * c * z`` ~ 1e-5 against
a spacing of ~4e-4 for bfloat16 weights near 0.05), so round-to-nearest drops them;
:func:`stochastic_round_` keeps them in expectation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from zotune.estimators.base import Direction, Estimator, LowRank, add_direction_

HALF = (torch.float16, torch.bfloat16)


def owners_of(module: nn.Module, leaves: list[torch.Tensor], names: list[str], mode: str):
    """``[(submodule, [leaf indices it owns directly])]`` for every submodule owning trained tensors."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"perturbation={mode!r} needs the nn.Module being trained, got {type(module).__name__}")
    index = {id(p): i for i, p in enumerate(leaves)}
    owners: list[tuple[nn.Module, list[int]]] = []
    owned = set()
    for mod in module.modules():
        own = [index[id(p)] for _, p in mod.named_parameters(recurse=False) if id(p) in index]
        if own:
            owners.append((mod, own))
            owned.update(own)
    missing = [names[i] for i in range(len(leaves)) if i not in owned]
    if missing:
        raise ValueError(
            f"perturbation={mode!r}: {len(missing)} trained tensors (e.g. {missing[0]!r}) are not "
            "parameters of the module given"
        )
    return owners


class SwapPerturbation:
    """Perturbs the trained tensors of ``module`` just in time, module by module."""

    def __init__(self, module: nn.Module, leaves: list[torch.Tensor], names: list[str]) -> None:
        self.owners = owners_of(module, leaves, names, "swap")
        self.leaves = leaves

    @contextmanager
    def active(self, est: Estimator, d: Direction, alpha: float):
        """While active, every owning module runs with ``x + alpha * z(d)`` for its tensors."""
        saved: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        leaves = self.leaves

        def pre(module, args, own):
            swapped = []
            for i in own:
                p = leaves[i]
                if not est.touches(d, i):
                    continue
                perturbed = p.detach().clone()
                for k in range(est.num_chunks(i)):
                    t = est.target(perturbed, i, k)
                    ld = est.leaf_direction(d, i, p, k, out=est.out_buffer(t, i, p))
                    if ld is not None:
                        add_direction_(t, ld, alpha)
                swapped.append((p, p.data))
                p.data = perturbed
            saved.append(swapped)

        def post(module, args, output):
            for p, data in saved.pop():
                p.data = data

        handles = []
        for mod, own in self.owners:
            handles.append(mod.register_forward_pre_hook(lambda m, a, own=own: pre(m, a, own)))
            handles.append(mod.register_forward_hook(post))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            while saved:  # an exception inside a forward: put every original back
                for p, data in saved.pop():
                    p.data = data


class Point(NamedTuple):
    """One point a step evaluates: ``x + alpha * z(d)``, or ``x`` itself when ``d`` is None."""

    d: Direction | None
    alpha: float


def segments(points: list[Point]) -> list[list[int]]:
    """Consecutive copies that share a direction with opposite signs (``x +- eps z``) form a pair:
    the second copy is built from the first (``2 x - (x + eps z)``), drawing ``z`` once."""
    out, k = [], 0
    while k < len(points):
        d, alpha = points[k]
        if d is not None and k + 1 < len(points) and points[k + 1].d == d and points[k + 1].alpha == -alpha:
            out.append([k, k + 1])
            k += 2
        else:
            out.append([k])
            k += 1
    return out


class CopiesPerturbation:
    """Runs the evaluations of ``n`` points as one forward on ``n`` copies of the rows.

    While :meth:`active`, each module that owns trained tensors splits its input rows into ``n``
    equal copies and runs once per copy ``k`` with its tensors at ``points[k]``, then concatenates
    the outputs. A copy's perturbed tensors are built just in time, one module at a time: a
    low-rank direction of a plain ``nn.Linear`` / ``nn.Embedding`` weight as a side term of its
    output (no weight written or copied), a large plain matrix row block by row block, anything
    else as a perturbed copy. A pair ``x +- eps z`` draws ``z`` once, into the first copy's
    tensor, and makes the second as ``2 x - (x + eps z)``: symmetric about ``x`` up to one rounding.
    The weights are never written.
    """

    def __init__(self, module: nn.Module, leaves: list[torch.Tensor], names: list[str], est: Estimator,
                 mode: str = "dual") -> None:
        self.owners = owners_of(module, leaves, names, mode)
        self.mode = mode
        mods = {id(m) for m, _ in self.owners}
        for mod, own in self.owners:
            inner = [n for n, sub in mod.named_modules() if sub is not mod and id(sub) in mods]
            if inner:
                raise ValueError(
                    f"perturbation={mode!r}: {type(mod).__name__} owns trained tensors and contains "
                    f"{inner[0]!r}, which owns some too; the copies' rows are split at modules that "
                    "own tensors, so they must not nest. Use perturbation='inplace' or 'swap'."
                )
            if est.side_terms_only:
                for i in own:
                    if est.factored(i) and not _is_weight_of_plain_layer(mod, leaves[i]):
                        raise ValueError(
                            f"perturbation={mode!r} with the {est.name!r} estimator adds each copy's low-rank "
                            f"direction to the output of a plain nn.Linear / nn.Embedding, but {names[i]!r} "
                            f"belongs to a {type(mod).__name__}; train only plain layers' matrices, or use "
                            "perturbation='inplace'"
                        )
        self.leaves = leaves
        #: A plain Linear / Embedding whose only trained tensor is a low-rank-perturbed weight runs
        #: once over all copies' rows, then adds each copy's side term in two batched thin matmuls
        #: (EGGROLL's shared base matmul) instead of running once per copy; False runs it per copy
        #: (``benchmarks/speed.py`` times both)
        self.batch_side_terms = True
        #: Set by streamed weights (:meth:`use_originals`): leaf i's tensor while its module runs is
        #: a disposable copy of ``originals[i]``, so it is perturbed in place and reset from it.
        self.originals: list[torch.Tensor] | None = None

    def use_originals(self, originals: list[torch.Tensor] | None) -> None:
        """Streamed weights copied in: perturb the resident copies in place, reset them from ``originals``."""
        self.originals = originals

    @contextmanager
    def active(self, est: Estimator, points: list[Point], same_rows: bool = True):
        """While active, owning modules evaluate ``points[k]`` on part ``k`` of their rows: copy ``k``
        of the batch, or (``same_rows=False``, per-example directions) the rows of one example."""
        patched = []
        first_call = [same_rows]  # the first module to run checks that its copies are the same rows
        for mod, own in self.owners:
            had = "forward" in mod.__dict__
            patched.append((mod, had, mod.__dict__.get("forward")))
            mod.forward = self._copies_forward(mod.forward, own, est, points, first_call, mod)
        try:
            yield
        finally:
            for mod, had, old in patched:
                if had:
                    mod.forward = old
                else:
                    del mod.forward

    def _copies_forward(self, forward, own, est: Estimator, points: list[Point], first_call: list, mod: nn.Module):
        n, mode = len(points), self.mode
        segs = segments(points)

        side_only = self.batch_side_terms and self.originals is None and _side_terms_only(mod, own, est, self.leaves)

        def run(*args, **kwargs):
            rows = _rows(args, kwargs, n, mode)
            if first_call[0]:
                first_call[0] = False
                _check_same_rows(_split(args, rows, n), _split(kwargs, rows, n), mode, n)
            if side_only and args:  # one forward over every copy's rows, then each copy's own side term
                return _add_side_terms_per_part(mod, args[0], forward(*args, **kwargs),
                                                _side_factors(est, own[0], self.leaves[own[0]], points))
            parts_a, parts_k = _split(args, rows, n), _split(kwargs, rows, n)
            outs = []
            for s, seg in enumerate(segs):
                outs += self._segment(mod, forward, own, est, [points[k] for k in seg],
                                      [parts_a[k] for k in seg], [parts_k[k] for k in seg], s == len(segs) - 1)
            return _cat(outs, mode)

        return run

    def _segment(self, mod, forward, own, est: Estimator, pts: list[Point], args: list, kwargs: list, last: bool):
        """The outputs of one copy, or of a pair ``x +- eps z`` sharing one draw."""
        leaves, originals = self.leaves, self.originals
        d, alpha = pts[0]
        swapped, side, blocked = [], None, None
        try:
            for i in own if d is not None else ():
                if not est.touches(d, i):
                    continue
                p = leaves[i]
                if originals is not None:  # a disposable copy: perturb it in place
                    swapped.append((p, originals[i]))
                    est.perturb_(leaves, d, alpha, only={i})
                elif _is_weight_of_plain_layer(mod, p) and est.factored(i):
                    side = est.leaf_direction(d, i, p)  # low rank: a side term, no copy
                elif _is_weight_of_plain_layer(mod, p) and est.num_chunks(i) > 1 and args[0] and not kwargs[0]:
                    blocked = i  # a large matrix: computed in row blocks, no copy
                else:
                    swapped.append((p, p.data))
                    p.data = _perturbed_copy(est, d, i, p, alpha)
            if blocked is not None:
                return _row_blocked(mod, est, d, blocked, alpha, [a[0] for a in args], swapped)
            outs = []
            for c, (a, kw) in enumerate(zip(args, kwargs)):
                if c:  # the pair's second copy: x + eps z  ->  2 x - (x + eps z) = x - eps z
                    for p, data in swapped:
                        p.data.lerp_(data, 2.0)
                out = forward(*a, **kw)
                if side is not None:
                    out = _add_side_term(mod, a[0], out, side.u * (alpha if c == 0 else -alpha), side.v)
                outs.append(out)
            return outs
        finally:  # streamed: ``data`` is the stored tensor; the resident copy is reset, or dropped after the last
            for p, data in swapped:
                if originals is not None and not last:
                    p.data.copy_(data)
                else:
                    p.data = data


def _side_terms_only(mod: nn.Module, own: list[int], est: Estimator, leaves: list[torch.Tensor]) -> bool:
    """``mod`` is a plain Linear / Embedding whose only trained tensor is its weight, perturbed by
    low-rank factors: every copy's perturbation is a side term of one shared forward."""
    return len(own) == 1 and est.factored(own[0]) and _is_weight_of_plain_layer(mod, leaves[own[0]])


def _side_factors(est: Estimator, i: int, p: torch.Tensor, points: list[Point]):
    """``(U, V)`` stacked over the points, ``U[k] = alpha_k u_k`` (m x r) and ``V[k] = v_k`` (n x r),
    zero for a point that leaves leaf ``i`` at ``x``; each direction drawn once (a pair shares it)."""
    drawn: dict = {}
    us, vs = [], []
    for d, alpha in points:
        if d is None or not est.touches(d, i):
            us.append(None)
            vs.append(None)
            continue
        if d not in drawn:
            drawn[d] = est.leaf_direction(d, i, p)
        ld = drawn[d]
        us.append(ld.u * alpha)
        vs.append(ld.v)
    like = next((k for k, u in enumerate(us) if u is not None), None)
    if like is None:
        return None
    us = [u if u is not None else torch.zeros_like(us[like]) for u in us]
    vs = [v if v is not None else torch.zeros_like(vs[like]) for v in vs]
    return torch.stack(us), torch.stack(vs)


def _add_side_terms_per_part(module: nn.Module, x: torch.Tensor, out: torch.Tensor, factors):
    """Add part ``k``'s ``U[k] V[k]^T`` to the output rows of part ``k`` (the rows split into
    ``len(U)`` equal parts), as :func:`_add_side_term` does for one part, for all parts in two
    batched matmuls: ``(x_k V_k) U_k^T`` for a Linear, ``U_k[ids_k] V_k^T`` for an Embedding."""
    if factors is None:
        return out
    u, v = factors
    n = u.shape[0]
    if isinstance(module, nn.Embedding):  # U_k[ids_k]: index the stacked U with ids offset by part
        offset = torch.arange(n, device=x.device).view(n, 1) * u.shape[1]
        thin = F.embedding(x.reshape(n, -1) + offset, u.reshape(-1, u.shape[-1]))  # (n, P, r)
        right = v.transpose(1, 2)  # (n, r, embedding dim)
    else:
        thin = torch.bmm(x.reshape(n, -1, x.shape[-1]), v)  # (n, P, r)
        right = u.transpose(1, 2)  # (n, r, out features)
    if out.is_contiguous() and not torch.is_grad_enabled():
        out.view(n, -1, out.shape[-1]).baddbmm_(thin, right)
        return out
    return out + torch.bmm(thin, right).view_as(out)


def _is_weight_of_plain_layer(mod: nn.Module, p: torch.Tensor) -> bool:
    """``p`` is the weight of a plain ``nn.Linear`` / ``nn.Embedding`` (not a subclass with its own forward)."""
    if type(mod) is nn.Linear:
        return mod.weight is p
    return type(mod) is nn.Embedding and mod.weight is p and mod.max_norm is None


def _row_blocks(est: Estimator, d: Direction, i: int, w: torch.Tensor, eps: float):
    """Yield ``(r0, r1, w[r0:r1] + eps z[r0:r1])`` over whole rows of matrix ``w``, drawing the
    direction chunk by chunk (a chunk's partial last row is carried over to the next), so no
    perturbed copy larger than about one chunk ever exists."""
    n = w.shape[1]
    flat = w.view(-1)
    carry = None
    r0 = 0
    for k in range(est.num_chunks(i)):
        t = est.target(w, i, k)
        z = est.leaf_direction(d, i, w, k, out=est.out_buffer(t, i, w)).z
        if carry is not None and carry.numel():
            z = torch.cat([carry, z])
        rows = z.numel() // n
        if rows:
            block = torch.add(flat[r0 * n:(r0 + rows) * n], z[:rows * n], alpha=eps).view(rows, n)
            yield r0, r0 + rows, block
            r0 += rows
        carry = z[rows * n:].clone()


def _row_blocked(mod, est, d, i, alpha, xs, swapped):
    """One copy's output (``x + alpha z``), or a pair's (``x +- alpha z``), of a plain Linear /
    Embedding whose weight is perturbed block by block."""
    w = mod.weight
    if isinstance(mod, nn.Linear):
        outs = [x.new_empty(*x.shape[:-1], w.shape[0]) for x in xs]
    else:
        outs = [w.new_empty(*x.shape, w.shape[1]) for x in xs]

    def fill(out, x, r0, r1, block):
        if isinstance(mod, nn.Linear):
            out[..., r0:r1] = x @ block.T
        else:
            sel = (x >= r0) & (x < r1)
            out[sel] = block[x[sel] - r0]

    for r0, r1, block in _row_blocks(est, d, i, w, alpha):
        for c, (out, x) in enumerate(zip(outs, xs)):
            if c:
                block.lerp_(w[r0:r1], 2.0)
            fill(out, x, r0, r1, block)
    if isinstance(mod, nn.Linear) and mod.bias is not None:
        for c, out in enumerate(outs):
            if c:
                for p, data in swapped:
                    p.data.lerp_(data, 2.0)
            out += mod.bias  # the bias as swapped in: x + alpha z when trained
    return outs


class SidePerturbation:
    """Low-rank perturbations as side terms of the layers' outputs (``perturbation="side"``).

    A leaf whose direction comes as factors and whose every owner is an ``nn.Linear`` or
    ``nn.Embedding`` (as its ``weight``) is perturbed through forward hooks; every other leaf in
    place. The factors are drawn once per evaluation and shared by tied owners.
    """

    SUPPORTED = (nn.Linear, nn.Embedding)

    def __init__(self, module: nn.Module, leaves: list[torch.Tensor], names: list[str], est: Estimator) -> None:
        owners = owners_of(module, leaves, names, "side")
        by_leaf: dict[int, list[nn.Module]] = {}
        for mod, own in owners:
            for i in own:
                by_leaf.setdefault(i, []).append(mod)
        self.side: dict[int, list[nn.Module]] = {}
        for i, mods in by_leaf.items():
            if est.factored(i) and all(isinstance(m, self.SUPPORTED) and m.weight is leaves[i] for m in mods):
                self.side[i] = mods
        self.in_place = set(range(len(leaves))) - set(self.side)
        self.leaves = leaves

    @contextmanager
    def active(self, est: Estimator, d: Direction, alpha: float):
        """While active, the model computes with ``x + alpha * z(d)``; no matrix is written."""
        leaves = self.leaves
        handles = []
        for i, mods in self.side.items():
            if not est.touches(d, i):
                continue
            ld = est.leaf_direction(d, i, leaves[i])
            u, v = ld.u * alpha, ld.v
            for mod in mods:
                handles.append(mod.register_forward_hook(
                    lambda m, args, out, u=u, v=v: _add_side_term(m, args[0], out, u, v)))
        est.perturb_(leaves, d, alpha, only=self.in_place)
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            est.perturb_(leaves, d, -alpha, only=self.in_place)


def _add_side_term(module: nn.Module, x: torch.Tensor, out: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """Add what ``W + u v^T`` adds to the module's output, in place when the output allows it:
    ``(x v) u^T`` for a Linear, ``u[ids] v^T`` for an Embedding (one pass over the output)."""
    thin = F.embedding(x, u) if isinstance(module, nn.Embedding) else x @ v  # (..., r)
    right = v.T if isinstance(module, nn.Embedding) else u.T  # (r, out features)
    if out.is_contiguous() and not torch.is_grad_enabled():
        out.view(-1, out.shape[-1]).addmm_(thin.reshape(-1, thin.shape[-1]), right)
        return out
    return out + thin @ right


def _perturbed_copy(est: Estimator, d: Direction, i: int, p: torch.Tensor, eps: float) -> torch.Tensor:
    """``p + eps z`` in a new tensor, written chunk by chunk straight from the draws."""
    out = torch.empty_like(p)
    for k in range(est.num_chunks(i)):
        src, dst = est.target(p, i, k), est.target(out, i, k)
        ld = est.leaf_direction(d, i, p, k, out=est.out_buffer(dst, i, p))
        if ld is None:
            dst.copy_(src)
        elif isinstance(ld, LowRank):
            dst.copy_(src)
            add_direction_(dst, ld, eps)
        else:
            torch.add(src, ld.z, alpha=eps, out=dst)
    return out


def _rows(args, kwargs, n: int, mode: str) -> int:
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    if first is None or first.shape[0] % n:
        shape = None if first is None else tuple(first.shape)
        if mode == "per_example":
            raise ValueError(
                f"perturbation='per_example': a module got {shape} inputs, whose rows do not split into {n} parts "
                f"(one per example of each copy of the batch): the estimator draws one direction per example, so "
                f"the batch must hold `queries` examples ({n} parts = 2 copies x queries)"
            )
        raise ValueError(
            f"perturbation={mode!r}: a module got inputs whose rows do not split into {n} copies (first input "
            f"shape {shape}); the closure must run the batch {n} times over when called with copies={n}"
        )
    return first.shape[0]


def _split(obj, rows: int, n: int) -> list:
    """Every tensor of ``rows`` rows in ``obj`` (args tuple or kwargs dict) cut into ``n`` copies."""
    def cut(x, h):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows:
            return x[h * rows // n:(h + 1) * rows // n]
        return x
    if isinstance(obj, dict):
        return [{k: cut(v, h) for k, v in obj.items()} for h in range(n)]
    return [tuple(cut(v, h) for v in obj) for h in range(n)]


def _check_same_rows(parts_a: list, parts_k: list, mode: str, n: int) -> None:
    def tensors(a, kw):
        return [x for x in (*a, *kw.values()) if isinstance(x, torch.Tensor)]
    first = tensors(parts_a[0], parts_k[0])
    for a, kw in zip(parts_a[1:], parts_k[1:]):
        if not all(torch.equal(x, y) for x, y in zip(first, tensors(a, kw))):
            raise ValueError(
                f"perturbation={mode!r}: the {n} copies of the rows differ; with copies={n} the closure "
                f"must run its batch {n} times over (rows 0..n-1, then the same rows again, ...)"
            )


def _cat(outs: list, mode: str):
    a = outs[0]
    if isinstance(a, torch.Tensor):
        return torch.cat(outs)
    if isinstance(a, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in a):
        return type(a)(torch.cat(parts) for parts in zip(*outs))
    raise ValueError(f"perturbation={mode!r} supports modules returning tensors, got {type(a).__name__}")


def stochastic_round_(dst: torch.Tensor, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Write float32 ``value`` into half-precision ``dst``, rounding up or down at random with
    the probabilities that make the result exact in expectation."""
    nearest = value.to(dst.dtype)
    near32 = nearest.float()
    away = torch.where(near32 > value, float("-inf"), float("inf")).to(dst.dtype)
    other = torch.nextafter(nearest, away)
    gap = other.float() - near32
    prob = ((value - near32) / gap).nan_to_num_(0.0, posinf=0.0, neginf=0.0)
    draw = torch.rand(value.shape, generator=generator, device=value.device)
    return dst.copy_(torch.where(draw < prob, other, nearest))
