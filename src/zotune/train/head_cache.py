"""The frozen trunk's output, computed once, for a run that trains only the final norm.

With ``trainable.scheme: final_norm`` nothing below the last normalisation layer trains, so what
enters it at a row's scored position never changes during the run. ``train.head_cache: true``
runs the trunk once over the training rows (and the dev rows), keeps those ``hidden_size``-wide
inputs (1,000 rows of SmolLM2-135M: 2.3 MB), and from then on every loss the optimizer asks for
is the norm and the candidates' rows of the LM head on cached rows: a fraction of a millisecond
instead of a forward pass (RTE: 2.4 ms a FZOO step of 9 losses, against 9.3 s an uncached step). The trajectory is the run's without the cache (the same batches, directions and
losses up to float rounding: tested), so any method, ZO or FO, runs as it would, only thousands of
times faster per step; a ZO estimate can then average many queries for free (``optim.queries``).

Why it matters: the final norm's 576 gains are a linear probe on the last hidden state read
through the model's own head (:func:`zotune.params.final_norm_parameters`). Without the cache a
run on RTE spends ~5 s of trunk per loss and sums too little gradient flow in 25 minutes to move
(``rte-per-example-final-norm``: 162 steps, 49.0 -> 49.1 %); with it, 20,000 steps take a minute
(``rte-fzoo-final-norm-cached``: 49.0 -> 54.5 %, p = 0.019; docs/results.md).

Covered: causal LMs whose head is ``lm_head(norm(h))`` and tasks whose candidates are single
tokens after a shared context (SST-2, RTE, CB, BoolQ, WiC, WSC, MultiRC; MNLI / SNLI with the
``infer`` template), scored with the classification loss. On the first rows the cache checks that
it reproduces the model's own loss and refuses otherwise (a head with a bias or soft-capping,
a projection after the norm).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from zotune.errors import ZotuneError
from zotune.lm import choice_scores, encode_choices
from zotune.models import LoadedModel, require_loaded
from zotune.tasks import Example
from zotune.tasks.metrics import compute_metric

log = logging.getLogger("zotune.train")

#: how far the cache's losses may be from the model's own on the check rows (float32 rounding of
#: one norm and one dot product taken in another order)
TOLERANCE = 1e-4


class HeadCacheError(ZotuneError, ValueError):
    """The run cannot use ``train.head_cache``: says why and what to change."""


def _owning_module(model: torch.nn.Module, tensors: Sequence[torch.Tensor]) -> torch.nn.Module:
    ids = {id(t) for t in tensors}
    owners = [m for m in model.modules() if any(id(p) in ids for p in m.parameters(recurse=False))]
    if len(owners) != 1:
        raise HeadCacheError(f"train.head_cache needs the trained tensors to belong to one module (the final norm); "
                             f"they belong to {len(owners)}")
    return owners[0]


class HeadCache:
    """Cached inputs of the final norm at each row's scored position, and the losses they give.

    ``rows(examples)`` runs the frozen trunk over ``examples`` (``batch_size`` at a time) and keeps,
    per example, the norm's input where the model predicts the answer and the candidates' token ids.
    :meth:`closure` then evaluates :func:`zotune.lm.choice_loss` of a training batch from the cache,
    with the norm's current tensors (perturbed in place, or split into copies by
    ``perturbation: dual`` / ``per_example``, as the module itself runs them).
    """

    def __init__(self, lm: LoadedModel, trained: Sequence[torch.Tensor], max_length: int) -> None:
        lm = require_loaded(lm, "HeadCache")
        if lm.kind != "causal" or lm.adapter is not None:
            raise HeadCacheError("train.head_cache is for a causal LM trained on its final norm "
                                 f"(trainable.scheme: final_norm); this model is a {lm.kind} LM"
                                 + (f" with a {lm.adapter} adapter" if lm.adapter else ""))
        self.lm, self.max_length = lm, max_length
        self.norm = _owning_module(lm.model, trained)
        head = lm.model.get_output_embeddings()
        if head is None or getattr(head, "bias", None) is not None:
            raise HeadCacheError("train.head_cache needs an LM head without a bias (logits = W h)")
        self.head_weight = head.weight
        self.inputs: dict[str, torch.Tensor] = {}
        self.candidates: dict[str, torch.Tensor] = {}
        self.labels: dict[str, torch.Tensor] = {}
        self.seconds = 0.0
        self.forward_passes = 0

    @property
    def rows(self) -> dict[str, int]:
        return {split: len(x) for split, x in self.inputs.items()}

    def add(self, split: str, examples: Sequence[Example], batch_size: int, progress: bool = False) -> None:
        """Run the trunk once over ``examples`` and keep their rows under ``split``."""
        if not examples:
            raise HeadCacheError(f"train.head_cache: the {split} split has no rows")
        if any(e.is_generation for e in examples):
            raise HeadCacheError("train.head_cache scores candidates; generation tasks (SQuAD, DROP) have none")
        t0 = time.time()
        captured: list[torch.Tensor] = []
        handle = self.norm.register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
        xs, cands, labels = [], [], []
        chunks = range(0, len(examples), batch_size)
        if progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"head cache ({split})", dynamic_ncols=True)
        device = self.head_weight.device
        try:
            for i in chunks:
                part = examples[i:i + batch_size]
                cb = encode_choices(self.lm.tokenizer, [e.choices for e in part], [e.label for e in part],
                                    self.max_length, kind=self.lm.kind).to(device)
                if not cb.shared:
                    raise HeadCacheError(
                        "train.head_cache needs candidates that are single tokens after a shared context; "
                        f"these rows' candidates differ in context or length (e.g. {part[0].choices[0][1]!r}); "
                        "MNLI / SNLI have such a template: task.template=infer")
                captured.clear()
                with torch.no_grad():
                    scores = choice_scores(self.lm, cb)
                if len(captured) != 1:
                    raise HeadCacheError(f"the final norm ran {len(captured)} times in one forward; "
                                         "train.head_cache needs it to run once")
                rows, cols = cb.batch.cont_mask.nonzero(as_tuple=True)
                # the norm saw the last `keep` columns or all of them: index from the right
                width = cb.batch.input_ids.shape[1]
                hidden = captured[0]
                x = hidden[rows, hidden.shape[1] - (width - (cols - 1))]
                xs.append(x)
                cands.append(cb.candidates)
                labels.append(cb.labels)
                self.forward_passes += 1
                if i == 0:
                    self._check(x, cb.candidates, scores)
        finally:
            handle.remove()
        self.inputs[split] = torch.cat(xs)
        self.candidates[split] = torch.cat(cands)
        self.labels[split] = torch.cat(labels)
        self.seconds += time.time() - t0
        log.info("head cache: %d %s rows in %.0f s (%d forward passes of the trunk)", len(examples), split,
                 time.time() - t0, len(xs))

    def _check(self, x: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor) -> None:
        with torch.no_grad():
            mine = self.logits(x, candidates).float()
            theirs = scores - scores.logsumexp(1, keepdim=True)  # the model's scores, up to the vocab's normaliser
            mine = mine - mine.logsumexp(1, keepdim=True)
        diff = float((mine - theirs).abs().max())
        if not diff <= TOLERANCE:
            raise HeadCacheError(
                f"train.head_cache: the cached rows give candidate scores {diff:.2g} away from the model's own "
                f"(tolerance {TOLERANCE}); this model's head is not lm_head(final_norm(h)) (a logit scale, "
                "soft-capping or a projection after the norm?)")

    def logits(self, x: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """The candidates' logits from norm inputs ``x`` (n, hidden): the norm as the module runs it."""
        h = self.norm(x)
        return torch.einsum("nd,ncd->nc", h.to(self.head_weight.dtype), self.head_weight[candidates])

    def closure(self, indices: Sequence[int], split: str = "train"):
        """The loss of training rows ``indices`` from the cache, called as the optimizers call a
        closure (``closure()``, ``closure(copies=n)``, ``closure(copies=n, per_example=True)``)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x, cand, y = self.inputs[split][idx], self.candidates[split][idx], self.labels[split][idx]

        def closure(copies: int = 1, per_example: bool = False):
            if copies == 1 and not per_example:
                return F.cross_entropy(self.logits(x, cand).float(), y)
            n = len(y)
            logits = self.logits(x.repeat(copies, 1), cand.repeat(copies, 1)).float()
            losses = F.cross_entropy(logits, y.repeat(copies), reduction="none").view(copies, n)
            return losses if per_example else losses.mean(1)

        return closure

    @torch.no_grad()
    def evaluate(self, split: str, examples: Sequence[Example], metric: str) -> dict:
        """The task's metric on a cached split, from the norm's current tensors (what the model
        itself would predict: the candidate with the highest logit)."""
        preds = self.logits(self.inputs[split], self.candidates[split]).argmax(1).tolist()
        out = compute_metric(metric, preds, examples)
        out["n"] = len(examples)
        return out
