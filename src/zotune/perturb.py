"""Two ways to evaluate the loss at ``x + s * eps * z``, and stochastic rounding for half precision.

``inplace`` (MeZO): add ``s * eps * z`` to the weights, run the closure, move on; the restore is
fused into the update. Cheapest, but in float16 / bfloat16 each add rounds, so ``+eps, -2eps,
+eps`` does not come back to ``x``: the weights take a random walk of about one unit in the last
place per step, larger than a typical ZO update, which is how half-precision ZO runs drift.

``swap`` (just in time): the weights are never written during the evaluation. A forward
pre-hook on each module that owns trained tensors gives it a perturbed copy while it runs and
puts the original back after, so only one module's perturbed weights exist at a time
(ZO-Bench's ``max_l |x_l|``), and half-precision weights stay exact.

``dual`` (one batched forward for both halves): the closure runs the batch twice over, as one
forward of twice the rows; each module that owns trained tensors gets ``x + eps z`` for the first
copy of the rows and ``x - eps z`` for the second, built from one draw of ``z`` while the module
runs. A step then draws each direction twice (here and in the update) instead of three times,
the weights are never written (exact in half precision), and the rest of the model runs one
larger batch instead of two. It needs a closure that accepts ``copies=2`` (see
:meth:`zotune.ZOOptimizer.step`) and modules that own tensors but contain no other such module.

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

import torch
import torch.nn.functional as F
from torch import nn

from zotune.estimators.base import Direction, Estimator, LowRank, add_direction_

HALF = (torch.float16, torch.bfloat16)
MODES = ("inplace", "swap", "dual", "side")


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


class DualPerturbation:
    """Runs the ``+eps`` and ``-eps`` evaluations of a direction as one forward on doubled rows.

    While :meth:`active`, each module that owns trained tensors splits its input rows in two
    halves and runs twice: on the first half with ``x + eps z``, on the second with
    ``x - eps z``, then concatenates the outputs. ``z`` is drawn once, into the perturbed copy
    itself (one module's tensors at a time), and the second copy is ``2 x - (x + eps z)``, so
    the pair is symmetric about ``x`` up to one rounding, and the weights are never written.
    """

    def __init__(self, module: nn.Module, leaves: list[torch.Tensor], names: list[str]) -> None:
        self.owners = owners_of(module, leaves, names, "dual")
        mods = {id(m) for m, _ in self.owners}
        for mod, _ in self.owners:
            inner = [n for n, sub in mod.named_modules() if sub is not mod and id(sub) in mods]
            if inner:
                raise ValueError(
                    f"perturbation='dual': {type(mod).__name__} owns trained tensors and contains "
                    f"{inner[0]!r}, which owns some too; dual evaluation splits rows at modules that "
                    "own tensors, so they must not nest. Use perturbation='inplace' or 'swap'."
                )
        self.leaves = leaves
        #: Set by streamed weights: leaf i's tensor while its module runs is a disposable copy of
        #: ``originals[i]``, so it is perturbed in place (no second copy) and rebuilt from it.
        self.originals: list[torch.Tensor] | None = None

    @contextmanager
    def active(self, est: Estimator, d: Direction, eps: float):
        """While active, owning modules evaluate ``x +- eps z(d)`` on the two halves of their rows."""
        patched = []
        first_call = [True]  # the first module to run checks that its two halves are the same rows
        for mod, own in self.owners:
            had = "forward" in mod.__dict__
            patched.append((mod, had, mod.__dict__.get("forward")))
            mod.forward = self._dual_forward(mod, mod.forward, own, est, d, eps, first_call)
        try:
            yield
        finally:
            for mod, had, old in patched:
                if had:
                    mod.forward = old
                else:
                    del mod.forward

    def _dual_forward(self, mod: nn.Module, forward, own, est: Estimator, d: Direction, eps: float,
                      first_call: list):
        leaves = self.leaves

        def run(*args, **kwargs):
            rows = _rows(args, kwargs)
            (args_a, args_b), (kw_a, kw_b) = _halves(args, rows), _halves(kwargs, rows)
            if first_call[0]:
                first_call[0] = False
                if not all(torch.equal(a, b) for a, b in zip((*args_a, *kw_a.values()), (*args_b, *kw_b.values()))
                           if isinstance(a, torch.Tensor)):
                    raise ValueError(
                        "perturbation='dual': the two halves of the rows differ; with copies=2 the closure "
                        "must run its batch twice over (rows 0..n-1, then the same rows again)"
                    )
            swapped, side, blocked = [], None, None
            originals = self.originals
            try:
                for i in own:
                    if not est.touches(d, i):
                        continue
                    p = leaves[i]
                    if originals is not None:  # a disposable copy: perturb it in place
                        swapped.append((p, originals[i]))
                        est.perturb_(leaves, d, eps, only={i})
                    elif _is_weight_of_plain_layer(mod, p) and est.factored(i):
                        side = est.leaf_direction(d, i, p)  # low rank: a side term, no copy
                    elif _is_weight_of_plain_layer(mod, p) and est.num_chunks(i) > 1 and args and not kwargs:
                        blocked = i  # a large matrix: computed in row blocks, no copy
                    else:
                        swapped.append((p, p.data))
                        p.data = _perturbed_copy(est, d, i, p, eps)
                if blocked is not None:
                    out_a, out_b = _row_blocked_halves(mod, est, d, blocked, eps, args_a[0], args_b[0], swapped)
                else:
                    out_a = forward(*args_a, **kw_a)
                    if side is not None:
                        out_a = _add_side_term(mod, args_a[0], out_a, side.u * eps, side.v)
                    for p, data in swapped:
                        p.data.lerp_(data, 2.0)  # x + eps z  ->  2 x - (x + eps z) = x - eps z
                    out_b = forward(*args_b, **kw_b)
                    if side is not None:
                        out_b = _add_side_term(mod, args_b[0], out_b, side.u * -eps, side.v)
            finally:  # (streamed: ``data`` is the stored tensor, the resident copy is dropped)
                for p, data in swapped:
                    p.data = data
            return _cat(out_a, out_b)

        return run


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


def _row_blocked_halves(mod, est, d, i, eps, x_a, x_b, swapped):
    """Both halves of a plain Linear / Embedding whose weight is perturbed block by block."""
    w = mod.weight
    if isinstance(mod, nn.Linear):
        out_a = x_a.new_empty(*x_a.shape[:-1], w.shape[0])
        out_b = x_b.new_empty(*x_b.shape[:-1], w.shape[0])
    else:
        out_a = w.new_empty(*x_a.shape, w.shape[1])
        out_b = w.new_empty(*x_b.shape, w.shape[1])

    def fill(out, x, r0, r1, block):
        if isinstance(mod, nn.Linear):
            out[..., r0:r1] = x @ block.T
        else:
            sel = (x >= r0) & (x < r1)
            out[sel] = block[x[sel] - r0]

    for r0, r1, block in _row_blocks(est, d, i, w, eps):
        fill(out_a, x_a, r0, r1, block)
        block.lerp_(w[r0:r1], 2.0)
        fill(out_b, x_b, r0, r1, block)
    if isinstance(mod, nn.Linear) and mod.bias is not None:
        out_a += mod.bias  # the bias as swapped in: x + eps z when trained
        for p, data in swapped:
            p.data.lerp_(data, 2.0)
        out_b += mod.bias
    return out_a, out_b


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


def _rows(args, kwargs) -> int:
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    if first is None or first.shape[0] % 2:
        shape = None if first is None else tuple(first.shape)
        raise ValueError(
            f"perturbation='dual': a module got inputs without an even number of rows (first input "
            f"shape {shape}); the closure must run the batch twice over when called with copies=2"
        )
    return first.shape[0]


def _halves(obj, rows: int):
    """Split every tensor of ``rows`` rows in ``obj`` (args tuple or kwargs dict) into halves."""
    def cut(x, h):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == rows:
            return x[h * rows // 2:(h + 1) * rows // 2]
        return x
    if isinstance(obj, dict):
        return tuple({k: cut(v, h) for k, v in obj.items()} for h in (0, 1))
    return tuple(tuple(cut(v, h) for v in obj) for h in (0, 1))


def _cat(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in a):
        return type(a)(torch.cat([x, y]) for x, y in zip(a, b))
    raise ValueError(f"perturbation='dual' supports modules returning tensors, got {type(a).__name__}")


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
