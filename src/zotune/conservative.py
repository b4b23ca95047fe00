"""ZO-SGD-Cons (ZO-Bench appendix A): after estimating ``g``, keep the best of ``x``,
``x - lr u`` and ``x + lr u``, by three more forward passes.

Data parallel: the three losses are averaged over ranks before the choice, so every rank keeps
the same point. Weight decay belongs to the update: it is applied only when a moved point is
kept. A replay's probe skips the forward passes and takes the recorded choice.
"""

from __future__ import annotations

from dataclasses import replace

from zotune.evaluation import Probe, Reduce
from zotune.perturb import HALF
from zotune.rules import Transform
from zotune.schemes import Central, Scheme
from zotune.update import Update, UpdateWriter


def check_conservative(rule: Transform, scheme: Scheme, leaves) -> None:
    """What ZO-SGD-Cons needs, checked when the optimizer is built."""
    if not rule.stateless:
        raise ValueError(
            f"conservative=True needs a stateless rule (sgd or sign), got rule '{rule.name}': "
            "trying x - lr u and x + lr u must not advance the rule's state"
        )
    if not isinstance(scheme, Central):
        raise ValueError(f"scheme={scheme.name!r} needs a non-conservative step: ZO-SGD-Cons "
                         "compares losses along MeZO's central estimate")
    if any(p.dtype in HALF for p in leaves):
        raise ValueError(
            "conservative=True (ZO-SGD-Cons) needs float32 weights: it writes x - lr u, then x + lr u, then "
            "goes back, and in float16 / bfloat16 each write rounds, so 'keep x' would not give x back"
        )


def conservative_step(writer: UpdateWriter, groups: list[dict], state, update: Update, probe: Probe,
                      reduce: Reduce | None) -> tuple[int, float]:
    """Move to the best of the three points; returns ``(choice, its loss)`` (0: ``x``, 1: ``x - lr u``,
    2: ``x + lr u``)."""
    def move(lr_mult: float) -> None:
        writer.write(groups, state, replace(update, lr_mult=lr_mult, restore_alpha=0.0, decay=False))

    f = [probe.loss()]
    move(1.0)
    f.append(probe.loss())
    move(-2.0)
    f.append(probe.loss())
    choice, loss = probe.choose(f, reduce)
    if choice == 0:
        move(1.0)
    elif choice == 1:
        move(2.0)
    if choice != 0 and any(g["weight_decay"] > 0 for g in groups):
        writer.decay_only(groups)
    return choice, loss
