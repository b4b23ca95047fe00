"""The update pass of a ZO step, and the deferred update as a type.

Per leaf, chunk by chunk (one chunk's direction alive at a time)::

    g   = (1 / q_l) sum_j c_j s_l z_jl          # regenerated from the seeds; s_l = 1, or 1/r (LOZO)
    u   = rule(g)
    x  <- (1 - lr wd) (x + restore_alpha z_last) - lr u

``restore_alpha`` puts back the in-place evaluation's last perturbation in the same write (MeZO:
3 passes over the weights per query instead of 4). Half-precision leaves are updated in float32
and rounded stochastically with seeded draws, so a resumed or replayed run rounds the same way;
a half-precision matrix with a low-rank update is written in float32 row blocks, never copied whole.

:class:`PendingUpdate` is a step's update kept for later (streamed weights apply it module by
module when each is next brought in): a few scalars per step, since the directions regenerate
from the step index, so it is saved in the optimizer's ``state_dict`` as is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from zotune.estimators import Direction, Estimator, LowRank, add_direction_, to_dense
from zotune.estimators.base import Dense, for_each_chunk
from zotune.perturb import HALF, stochastic_round_
from zotune.rng import STREAM_ROUNDING, derive_seed, generator
from zotune.rules import DenseGrad, LowRankGrad, Transform


@dataclass
class Update:
    """One step's update: what the update pass needs besides the weights and the rule state.

    ``index`` is the step's index (its directions are ``estimator.directions(index)``);
    ``updates`` counts applied updates including this one (the rules' bias correction); ``lrs``
    are the groups' learning rates when the step was taken.
    """

    index: int
    coeffs: list[float]
    lrs: list[float]
    updates: int
    restore_alpha: float = 0.0
    lr_mult: float = 1.0
    decay: bool = True

    @property
    def rounding_step(self) -> int:
        """The step number that seeds stochastic rounding (the count of steps taken after it)."""
        return self.index + 1


@dataclass
class PendingUpdate(Update):
    """An update waiting to be applied leaf by leaf; ``applied`` holds the leaves done already."""

    applied: set[int] = field(default_factory=set)

    def to_state(self) -> dict:
        """A JSON-able description: directions are regenerated from ``index``, never stored."""
        return {"index": self.index, "coeffs": list(self.coeffs), "lrs": list(self.lrs),
                "updates": self.updates, "applied": sorted(self.applied)}

    @classmethod
    def from_state(cls, state: dict) -> PendingUpdate:
        return cls(int(state["index"]), [float(c) for c in state["coeffs"]], [float(x) for x in state["lrs"]],
                   int(state["updates"]), applied={int(i) for i in state["applied"]})


class Deferred:
    """A step's update held back and applied leaf by leaf when each leaf is next needed.

    Streamed weights (:class:`zotune.streamed.StreamedWeights`) take this object over with
    :meth:`stream_with`: they apply the update to a module's leaves while it is resident, and
    their ``flush()`` brings in the modules still waiting. Without a streamer the optimizer
    applies it whole before its next evaluation.
    """

    def __init__(self, write: Callable[[PendingUpdate, set[int]], None], n_leaves: int) -> None:
        self.write, self.n_leaves = write, n_leaves
        self.pending: PendingUpdate | None = None
        self.streamer = None

    @property
    def streamed(self) -> bool:
        return self.streamer is not None

    def stream_with(self, streamer) -> None:
        """Let ``streamer`` (anything with ``flush()``) apply the update lazily; None takes it back."""
        self.streamer = streamer

    def hold(self, update: Update) -> None:
        self.pending = PendingUpdate(update.index, update.coeffs, update.lrs, update.updates)

    def apply(self, indices) -> None:
        """Apply the held update to leaves ``indices`` (those not yet updated), where they are now."""
        pending = self.pending
        if pending is None:
            return
        todo = set(indices) - pending.applied
        if todo:
            with torch.no_grad():
                self.write(pending, todo)
            pending.applied |= todo
        if len(pending.applied) == self.n_leaves:
            self.pending = None

    def flush(self) -> None:
        """Apply whatever is left (the streamer brings its modules in first)."""
        if self.pending is None:
            return
        if self.streamer is not None:
            self.streamer.flush()
        self.apply(range(self.n_leaves))


class UpdateWriter:
    """Writes updates into the leaves: fused restore, decoupled weight decay, stochastic
    rounding for half precision, low-rank updates of half-precision matrices in row blocks.

    The optimizer's ``param_groups`` and ``state`` are passed at each call (torch replaces both
    on ``load_state_dict``).
    """

    def __init__(self, estimator: Estimator, rule: Transform, leaves: Sequence[torch.Tensor], seed: int,
                 stochastic_rounding: bool | None, decay_1d: bool) -> None:
        self.estimator, self.rule, self.leaves, self.seed = estimator, rule, list(leaves), seed
        self.stochastic_rounding = stochastic_rounding
        self.decay_1d = decay_1d

    def rounds(self, p: torch.Tensor) -> bool:
        """Whether updates to ``p`` are rounded stochastically (default: half-precision leaves)."""
        if self.stochastic_rounding is None:
            return p.dtype in HALF
        return self.stochastic_rounding and p.dtype in HALF

    def decays(self, p: torch.Tensor) -> bool:
        return self.decay_1d or p.dim() > 1

    def decay_only(self, groups: list[dict]) -> None:
        """``x <- (1 - lr wd) x`` alone (the conservative step's kept point)."""
        for group in groups:
            shrink = 1.0 - group["lr"] * group["weight_decay"]
            for p in group["params"]:
                if shrink != 1.0 and self.decays(p):
                    p.mul_(shrink)

    def write(self, groups: list[dict], state, update: Update, only: set[int] | None = None) -> None:
        """The update pass over every leaf (the leaves ``only``, if given)."""
        est = self.estimator
        dirs = est.directions(update.index)
        items = []  # (leaf index, leaf, chunk, queries touching it, lr, shrink): independent units
        i = 0
        for gi, group in enumerate(groups):
            lr = update.lrs[gi] * update.lr_mult
            wd = group["weight_decay"] if update.decay else 0.0
            for p in group["params"]:
                if only is not None and i not in only:
                    i += 1
                    continue
                touching = [(j, d) for j, d in enumerate(dirs) if est.touches(d, i)]
                shrink = 1.0 - lr * wd if (wd and self.decays(p)) else 1.0
                if touching and not state[p]:
                    state[p].update(self.rule.init(p))
                if touching or shrink != 1.0:
                    items += [(i, p, k, touching, lr, shrink) for k in range(est.num_chunks(i))]
                i += 1
        if items:
            for_each_chunk(lambda item: self._chunk(item, state, dirs, update), items, self.leaves[0].device,
                           est.parallel_chunks)

    def _chunk(self, item, state, dirs: list[Direction], update: Update) -> None:
        i, p, k, touching, lr, shrink = item
        est, restore_eps = self.estimator, update.restore_alpha
        target = est.target(p, i, k)
        # half precision: compute in float32, then round stochastically (seeded, so exact on resume)
        rounding = self.rounds(p)
        if rounding and target.dim() == 2:  # a whole half-precision matrix (LOZO): in row blocks
            self._matrix_rounded(item, state, target, dirs, update)
            return
        work = target.float() if rounding else target
        if shrink != 1.0:
            work.mul_(shrink)
        if touching:
            u, restore = self._rule_update(item, state, target, update.coeffs, dirs[-1], restore_eps, update.updates)
            _write(work, u, restore, restore_eps * shrink, lr)
        if rounding:
            seed = derive_seed(self.seed, STREAM_ROUNDING, update.rounding_step, i, k)
            stochastic_round_(target, work, generator(seed, p.device))

    def _rule_update(self, item, state, target, coeffs, last, restore_eps, updates):
        """One chunk's estimate ``g`` from its regenerated directions, through the rule: the
        update ``u``, and the last query's direction when the restore is fused into the write."""
        i, p, k, touching, lr, shrink = item
        est = self.estimator
        scale = est.grad_scale(i) / len(touching)
        g, restore = None, None
        for j, d in touching:
            ld = est.leaf_direction(d, i, p, k, out=est.out_buffer(target, i, p))
            if d is last and restore_eps:
                restore = ld
            g = _accumulate(g, ld, coeffs[j] * scale, single=len(touching) == 1, est=est, i=i, p=p)
        leaf_state = state[p]
        chunk_state = _state_view(leaf_state, p, target)
        u = self.rule.update(g, chunk_state, target, updates)
        _merge_state(leaf_state, chunk_state, p)
        return u, restore

    def _matrix_rounded(self, item, state, target, dirs, update: Update) -> None:
        """The update of a whole half-precision matrix whose direction is low rank, written in
        float32 row blocks of about one chunk, each rounded stochastically: no float32 copy of
        the matrix (nor of ``U V^T``) is ever made."""
        i, p, k, touching, lr, shrink = item
        est, restore_eps = self.estimator, update.restore_alpha
        u, restore = None, None
        if touching:
            u, restore = self._rule_update(item, state, target, update.coeffs, dirs[-1], restore_eps, update.updates)
        m, n = target.shape
        rows = max(1, est.chunk_size // max(n, 1))
        dense = u.t.view(m, n) if isinstance(u, DenseGrad) else None
        for b, r0 in enumerate(range(0, m, rows)):
            r1 = min(m, r0 + rows)
            work = target[r0:r1].float()
            if shrink != 1.0:
                work.mul_(shrink)
            if restore is not None:
                if isinstance(restore, LowRank):
                    work.addmm_(restore.u[r0:r1].float(), restore.v.float().T, alpha=restore_eps * shrink)
                else:
                    work.add_(restore.z.view(m, n)[r0:r1].float(), alpha=restore_eps * shrink)
            if dense is not None:
                work.add_(dense[r0:r1].float(), alpha=-lr * u.scale)
            elif u is not None:
                work.addmm_(u.a[r0:r1].float(), u.v.float().T, alpha=-lr * u.scale)
            seed = derive_seed(self.seed, STREAM_ROUNDING, update.rounding_step, i, k, b)
            stochastic_round_(target[r0:r1], work, generator(seed, p.device))


def _accumulate(g, ld, coeff: float, *, single: bool, est: Estimator, i: int, p: torch.Tensor):
    """Running ``g += coeff * direction``. A lone term is borrowed as is (no copy); with
    several queries the first term is copied into a buffer that the others are added to.
    Low-rank terms sharing ``V`` (LOZO) add their ``U``s; terms with their own ``V`` (a
    population) stack their factors: ``sum_j c_j U_j V_j^T = [c_1 U_1 ...] [V_1 ...]^T``."""
    if isinstance(ld, LowRank):
        if g is None:
            v_of = lambda period: est.v(i, period, p)  # noqa: E731
            a = ld.u if single else ld.u * coeff
            return LowRankGrad(a, ld.v, coeff if single else 1.0, ld.period, v_of)
        if ld.v is g.v:
            g.a.add_(ld.u, alpha=coeff)
            return g
        return g._replace(a=torch.cat([g.a, ld.u * coeff], 1), v=torch.cat([g.v, ld.v], 1))
    if g is None:
        return DenseGrad(ld.z, coeff) if single else DenseGrad(ld.z * coeff, 1.0)
    g.t.add_(ld.z, alpha=coeff)
    return g


def _state_view(state: dict, p: torch.Tensor, target: torch.Tensor) -> dict:
    """The rule state of one chunk: leaf-shaped buffers seen through the chunk's flat view."""
    if target is p:
        return dict(state)
    start = target.storage_offset() - p.storage_offset()
    view = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == p.shape:
            view[key] = value.view(-1)[start:start + target.numel()]
        else:
            view[key] = value
    return view


def _merge_state(state: dict, chunk_state: dict, p: torch.Tensor) -> None:
    """Keep what a rule created or replaced (new buffers, counters); views write through."""
    for key, value in chunk_state.items():
        current = state.get(key)
        if current is None or not torch.is_tensor(value) or (torch.is_tensor(current) and current.shape != p.shape):
            state[key] = value


def _write(p: torch.Tensor, u, restore, restore_alpha: float, lr: float) -> None:
    """``p += restore_alpha * z_restore - lr * u``, fused into one write where the shapes allow."""
    if isinstance(u, DenseGrad):
        if isinstance(restore, Dense) and restore.z is u.t:
            p.add_(u.t, alpha=restore_alpha - lr * u.scale)
            return
        if restore is not None:
            if isinstance(restore, LowRank) and restore.u.dtype != p.dtype:
                p.add_(to_dense(restore).to(p.dtype), alpha=restore_alpha)
            else:
                add_direction_(p, restore, restore_alpha)
        p.add_(u.t, alpha=-lr * u.scale)
        return
    if u.a.dtype != p.dtype:  # a float32 work copy of a half-precision matrix
        if restore is not None:
            p.add_(to_dense(restore).to(p.dtype), alpha=restore_alpha)
        p.add_((u.a @ u.v.T).to(p.dtype), alpha=-lr * u.scale)
        return
    if isinstance(restore, LowRank) and restore.v is u.v:
        if restore.u is u.a:
            p.addmm_(u.a, u.v.T, alpha=restore_alpha - lr * u.scale)
        else:
            p.addmm_(restore.u * restore_alpha - u.a * (lr * u.scale), u.v.T)
        return
    if restore is not None:
        add_direction_(p, restore, restore_alpha)
    p.addmm_(u.a, u.v.T, alpha=-lr * u.scale)
