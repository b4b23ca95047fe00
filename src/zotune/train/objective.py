"""The training objective: which loss a run trains with, and the closure an optimizer calls.

The loss of a step is the mean over the *whole* global batch, whatever splits it: over ranks
(data parallel) and over micro-batches (``train.grad_accum``). A mean of per-part means equals
it only when the parts hold equally many terms, which nll losses (one term per target token)
rarely do; so each part contributes its sum, and the sum is divided once, by the batch's count::

    loss_r = (W / N) sum_m n_m mean_m       (rank r, micro-batches m: n_m terms, mean loss mean_m;
                                              N terms in the global batch, W ranks)

and the mean over ranks of ``loss_r`` (what the ZO ``reduce`` and DDP's gradient average take)
is ``(1 / N) sum of every term``: the single-process loss of the whole batch, to float rounding.
A term is a target token for ``nll`` and an example for ``classification``; the token count of
an nll batch is summed over ranks once per step (one all-reduce of one number), the example
count is known (every rank holds ``batch_size / W`` examples).
"""

from __future__ import annotations

import torch

from zotune.config import Config
from zotune.lm import choice_loss, encode_choices, encode_pairs, pair_loss
from zotune.models import require_loaded


def resolve_objective(cfg: Config, examples) -> str:
    """``classification`` when every example has the same number (> 1) of labeled candidates."""
    if cfg.train.objective != "auto":
        return cfg.train.objective
    counts = {len(e.choices) for e in examples}
    labeled = all(e.label is not None and not e.is_generation for e in examples)
    return "classification" if labeled and len(counts) == 1 and counts.pop() > 1 else "nll"


def make_closure(lm, examples, cfg: Config, device, objective: str = "nll", world=None):
    """Encode this rank's ``examples`` once for ``lm`` (a :class:`zotune.models.LoadedModel`; its
    ``model`` is what the closure runs: the model, or its DDP wrapper), in ``cfg.train.grad_accum``
    micro-batches; the closure returns this rank's share ``loss_r`` of the global batch's mean loss (see the module
    docstring); ``closure(copies=2)`` returns one such loss per copy of the batch run twice over
    (``perturbation: dual``), and ``closure(copies=2, per_example=True)`` a ``(2, examples)`` tensor whose rows'
    means are those losses (``perturbation: per_example``). ``world`` (a :class:`zotune.distributed.DistContext`; None: one
    process) gives the number of ranks and sums the token count over them."""
    lm = require_loaded(lm, "make_closure")
    tokenizer, kind = lm.tokenizer, lm.kind
    k = cfg.train.grad_accum
    size = -(-len(examples) // k)
    chunks = [examples[i:i + size] for i in range(0, len(examples), size)]
    if objective == "classification":
        batches = [encode_choices(tokenizer, [e.choices for e in c], [e.label for e in c], cfg.task.max_length,
                                  kind=kind).to(device) for c in chunks]
        counts = [len(c) for c in chunks]
        loss_fn = choice_loss
    else:
        batches = [encode_pairs(tokenizer, [e.target for e in c], cfg.task.max_length, kind=kind).to(device)
                   for c in chunks]
        counts = [int(b.cont_mask.sum()) for b in batches]
        loss_fn = pair_loss
    for c, n in zip(chunks, counts):
        if n == 0:
            raise ValueError(f"a micro-batch of {len(c)} examples has no target tokens "
                             f"(task.max_length={cfg.task.max_length} leaves none?)")
    ranks = 1 if world is None else world.world_size
    total = global_count(sum(counts), objective, world)
    weights = [n * ranks / total for n in counts]  # 1.0 for one micro-batch on one process

    def closure(copies: int = 1, per_example: bool = False):
        if per_example and (len(batches) > 1 or ranks > 1):
            raise ValueError("per-example directions need the whole batch in one forward on one process: "
                             "set train.grad_accum: 1 and run a single process")
        loss = None
        for b, w in zip(batches, weights):
            part = loss_fn(lm, b, copies=copies, per_example=per_example) * w
            loss = part if loss is None else loss + part
        return loss

    return closure


def global_count(local: int, objective: str, world=None) -> int:
    """The number of loss terms in the global batch, from this rank's ``local`` count."""
    if world is None or world.world_size == 1:
        return local
    if objective == "classification":  # every rank holds batch_size / W examples
        return local * world.world_size
    summed = world.all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64),
                                  "the all-reduce of the batch's token count")
    return int(summed.item())
