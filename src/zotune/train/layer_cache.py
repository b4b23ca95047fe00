"""The frozen layers' output, computed once, for a run that trains only the top layers.

With ``trainable.scheme: top_layers`` (the last ``trainable.top_layers`` layers and the final
norm) nothing below the first trained layer changes during the run, so what enters that layer for
a given token sequence never changes either. ``train.head_cache: true`` runs the whole model once
over the training rows and the dev rows as the run itself encodes them (the training closure;
the dev evaluation) and keeps, per distinct token sequence, the hidden states that entered the
first trained layer (hidden_size floats a token; the size is logged). From then on, every loss and
every dev evaluation runs the model with its layer list cut to the trained layers and those
cached states fed into the first of them: SmolLM2-135M's last layer takes a loss of 16 SST-2
rows from 590 ms to 45 ms (``benchmarks/cache_speed.py``). Everything else is the model's own forward (masks, positions, the norm, the head,
the loss), so any method, objective and evaluation mode (in place, copies, per example) runs as
it would without the cache (tested: the same losses and the same trajectory).

Why: the final norm alone (:mod:`zotune.train.head_cache`) is a linear probe read through the
model's head; a whole layer can learn features, at a fraction of a forward per loss, so a ZO run
takes about ten times the steps in the same wall time. On SST-2 that did not beat the prefix
(docs/results.md, eighteenth session): a layer's 3.5 M entries make a noisy two-point estimate.

Covered: models whose numbered layers run in order from one ``nn.ModuleList`` and take the
previous layer's hidden states as their first input (LLaMA, Qwen2, Mistral, GPT-2, OPT, ...). On
the first training rows the cache checks that it reproduces the model's own loss and refuses
otherwise. Generation tasks (their dev metric generates new tokens) and prefix / prompt tuning
(virtual tokens enter every layer) are refused.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from zotune.config import Config
from zotune.train.evaluate import evaluate_configured
from zotune.models import LoadedModel, require_loaded
from zotune.params import final_norm_parameters, layer_of
from zotune.tasks import Example
from zotune.train.head_cache import HeadCacheError
from zotune.train.objective import make_closure

log = logging.getLogger("zotune.train")

#: how far the cached loss may be from the model's own on the check rows (float32 rounding of the
#: trained layers run on another batch's padding)
TOLERANCE = 1e-4

def _first_trained_layer(lm: LoadedModel, named: Mapping[str, torch.nn.Parameter]) -> tuple[nn.Module, str, int]:
    """(the module holding the layer list, the list's attribute name, the first trained layer)."""
    if lm.prompt_learning:
        raise HeadCacheError(f"train.head_cache: {lm.adapter} puts virtual tokens into every layer, so no layer's "
                             "input is frozen; use trainable.scheme: top_layers")
    indices = [layer_of(n) for n in named]
    inside = [i for i in indices if i is not None]
    if not inside:
        raise HeadCacheError("train.head_cache with layers: no trained tensor is inside a numbered layer "
                             "(for the final norm alone use trainable.scheme: final_norm)")
    first = min(inside)
    if first == 0:
        raise HeadCacheError("train.head_cache: layer 0 trains, so there is nothing frozen below it to cache")
    outside = [n for n, i in zip(named, indices) if i is None]
    above = set(final_norm_parameters(lm.model))
    below = [n for n in outside if n not in above]
    if below:
        raise HeadCacheError(f"train.head_cache: {below[0]!r} trains but is not in a layer or the final norm (an "
                             "embedding feeds the frozen layers, so their output would change)")
    name = next(n for n in named if layer_of(n) == first)
    modules = dict(lm.model.named_modules())
    for path, module in modules.items():  # the list whose entry `first` holds the tensor
        if isinstance(module, nn.ModuleList) and name.startswith(f"{path}.{first}."):
            parent_path, _, attr = path.rpartition(".")
            return modules[parent_path], attr, first
    raise HeadCacheError(f"train.head_cache: layer {first} of {type(lm.model).__name__} is not in an nn.ModuleList")


class LayerCache:
    """Cached inputs of the first trained layer for every token sequence of the train and dev
    rows, and the losses and dev metrics they give (the interface of
    :class:`~zotune.train.head_cache.HeadCache`: :meth:`closure`, :meth:`evaluate`)."""

    def __init__(self, lm: LoadedModel, named: Mapping[str, torch.nn.Parameter], cfg: Config, device,
                 objective: str, metric: str) -> None:
        self.lm = require_loaded(lm, "LayerCache")
        self.cfg, self.device, self.objective, self.metric = cfg, device, objective, metric
        self.parent, self.attr, self.first = _first_trained_layer(self.lm, named)
        self.layers: nn.ModuleList = getattr(self.parent, self.attr)
        self.hidden: dict[tuple[int, ...], torch.Tensor] = {}
        self.examples: dict[str, list[Example]] = {}
        self.seconds = 0.0
        self.forward_passes = 0
        self.bytes = 0

    @property
    def rows(self) -> dict[str, int]:
        return {split: len(rows) for split, rows in self.examples.items()}

    # -------------------------------------------------------------- recording
    @contextlib.contextmanager
    def _inputs(self) -> Iterator[list]:
        """Within it, each forward of the model leaves its (input_ids, attention_mask) in the list."""
        seen: list = []

        def hook(_, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                raise HeadCacheError("train.head_cache needs the model called with input_ids")
            mask = kwargs.get("attention_mask")
            seen.append((ids, torch.ones_like(ids) if mask is None else mask))

        handle = self.lm.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        """Within it, the model runs whole and the first trained layer's inputs are kept."""
        first = self.layers[self.first]
        with self._inputs() as seen:
            def keep(_, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                ids, mask = seen[-1]
                if hidden.shape[:2] != ids.shape:
                    raise HeadCacheError(f"train.head_cache: layer {self.first} got hidden states of shape "
                                         f"{tuple(hidden.shape)} for inputs of shape {tuple(ids.shape)}")
                for r, (row, m) in enumerate(zip(ids, mask.bool())):
                    key = tuple(row[m].tolist())
                    if key not in self.hidden:
                        self.hidden[key] = hidden[r][m].detach().clone()
                        self.bytes += self.hidden[key].numel() * self.hidden[key].element_size()

            handle = first.register_forward_pre_hook(keep, with_kwargs=True)
            try:
                yield
            finally:
                handle.remove()

    # -------------------------------------------------------------- replaying
    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Within it, the model runs only the trained layers (and what sits above them), on the
        cached inputs of the sequences it is given; a sequence not in the cache is an error."""
        with self._inputs() as seen:
            def replace(_, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                ids, mask = seen[-1]
                fed = self.lookup(ids, mask).to(hidden.device, hidden.dtype)
                if args:
                    return (fed, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": fed}

            top = self.layers[self.first]
            handle = top.register_forward_pre_hook(replace, with_kwargs=True)
            setattr(self.parent, self.attr, nn.ModuleList(list(self.layers)[self.first:]))
            try:
                yield
            finally:
                setattr(self.parent, self.attr, self.layers)
                handle.remove()

    def lookup(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The cached first-layer inputs laid out as ``ids`` (rows, width): zeros at padding."""
        keep = mask.bool()
        parts = []
        for row, m in zip(ids, keep):
            key = tuple(row[m].tolist())
            if key not in self.hidden:
                raise HeadCacheError(f"train.head_cache: a sequence of {len(key)} tokens is not in the cache "
                                     "(only the train and dev rows are)")
            parts.append(self.hidden[key])
        some = parts[0]
        out = torch.zeros(*ids.shape, some.shape[-1], dtype=some.dtype, device=some.device)
        out[keep] = torch.cat(parts)
        return out

    # -------------------------------------------------------------- the run's interface
    def add(self, split: str, examples: Sequence[Example], batch_size: int, progress: bool = False) -> None:
        """Run the whole model once over ``examples`` (training batches of ``batch_size`` for
        ``train``, the dev evaluation for any other split) and keep their sequences' states."""
        if not examples:
            raise HeadCacheError(f"train.head_cache: the {split} split has no rows")
        if any(e.is_generation for e in examples):
            raise HeadCacheError("train.head_cache evaluates dev from the cache; a generation task's dev metric "
                                 "generates new tokens (SQuAD, DROP)")
        t0 = time.time()
        if split == "train":
            chunks = range(0, len(examples), batch_size)
            if progress:
                from tqdm.auto import tqdm

                chunks = tqdm(chunks, desc="layer cache (train)", dynamic_ncols=True)
            for i in chunks:
                closure = make_closure(self.lm, list(examples[i:i + batch_size]), self.cfg, self.device,
                                       self.objective)
                with torch.no_grad(), self._recording():
                    loss = float(closure())
                self.forward_passes += self.cfg.train.grad_accum
                if i == 0:
                    self._check(closure, loss)
        else:
            with self._recording():
                self.evaluate(split, examples, self.metric, replay=False)
            self.forward_passes += -(-len(examples) // self.cfg.train.eval_batch_size)
        self.examples[split] = list(examples)
        self.seconds += time.time() - t0
        log.info("layer cache: %d %s rows in %.0f s (%d sequences, %.0f MB, layers %d.. train)", len(examples),
                 split, time.time() - t0, len(self.hidden), self.bytes / 2**20, self.first)

    def _check(self, closure, loss: float) -> None:
        with torch.no_grad(), self.replaying():
            mine = float(closure())
        if not abs(mine - loss) <= TOLERANCE * max(1.0, abs(loss)):
            raise HeadCacheError(
                f"train.head_cache: the cached layer inputs give a loss of {mine:.6g} where the model gives "
                f"{loss:.6g} (tolerance {TOLERANCE}); this model's layers do not take the previous layer's "
                "hidden states as they are (an embedding scale or a projection between layers?)")

    def closure(self, indices: Sequence[int], split: str = "train"):
        """The loss of training rows ``indices`` from the cache, called as the optimizers call a
        closure (``closure()``, ``closure(copies=n)``, ``closure(copies=n, per_example=True)``)."""
        rows = self.examples[split]
        inner = make_closure(self.lm, [rows[i] for i in indices], self.cfg, self.device, self.objective)

        def closure(copies: int = 1, per_example: bool = False):
            with self.replaying():
                return inner(copies=copies, per_example=per_example)

        return closure

    def evaluate(self, split: str, examples: Sequence[Example], metric: str, *, replay: bool = True) -> dict:
        """The task's metric on a cached split, as the run evaluates it (batch size, length, scoring)."""
        with self.replaying() if replay else contextlib.nullcontext():
            return evaluate_configured(self.lm, self.cfg, examples, metric, f"{self.cfg.task.name} {split}")[0]

