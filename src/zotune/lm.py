"""The model side of task requests: log-likelihood of (context, continuation) pairs, and generation.

Tasks emit plain requests (``(context, continuation)`` pairs to score, prompts to complete); this
module answers them for causal LMs and for masked LMs (RoBERTa/BERT, the MeZO masked setting: the
label word is scored at a ``<mask>`` appended to the context). It never imports ``zotune.tasks``.

Padding (causal): rows are padded on the **left** so every continuation ends at the last column;
the LM head then runs only on the last few positions (``logits_to_keep``), which for a small model
with a large vocabulary (SmolLM2: 49k x 576 head) is about a fifth of a forward pass, and the
(batch, length, vocab) logits tensor is never materialised. Position ids are derived from the
attention mask, so a padded row scores exactly as it would alone.

Truncation: a row longer than ``max_length`` loses tokens from the left of its context (the
continuation is always kept whole). :func:`choice_truncation` and :func:`prompt_truncation`
count, with the same tokenisation as the scoring, how many rows are cut and by how much
(a :class:`Truncation`), so callers can say so instead of scoring cut rows silently.

The model is a :class:`zotune.models.LoadedModel` (``load_model``, ``zotune.testing.tiny_model``,
or ``as_loaded(module, tokenizer)`` once for a module of your own): its kind (causal or masked,
prompt-learning adapter) and forward arguments were decided once, where it was loaded, and
scoring reads them from it; a bare module is refused.

Example::

    lm = load_model("smollm2-135m")
    batch = encode_pairs(lm.tokenizer, [("The capital of France is", " Paris")], max_length=64)
    loss = pair_loss(lm, batch)                          # mean NLL of the continuation tokens
    preds = score_choices(lm, lm.tokenizer, [[("It was", " great"), ("It was", " terrible")]])
    cut = choice_truncation(tok, [[("It was", " great"), ("It was", " terrible")]], max_length=64)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
import weakref
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from zotune._validate import check_int, unknown_choice
from zotune.models import KINDS, LoadedModel, require_loaded

Pair = tuple[str, str]
NORMALIZE = ("sum", "mean")


@dataclasses.dataclass
class Batch:
    """Encoded (context, continuation) pairs; every tensor is (batch, length) unless noted."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cont_mask: torch.Tensor  # bool: the continuation tokens (causal) or the <mask> position (masked)
    labels: torch.Tensor  # target id where cont_mask is True, -100 elsewhere
    lengths: torch.Tensor  # (batch,) number of real (non-pad) tokens per row
    kind: str = "causal"

    def to(self, device: torch.device | str) -> Batch:
        """A copy on ``device``."""
        move = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in move.items()})

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def repeat(self, copies: int) -> Batch:
        """The rows ``copies`` times over, one copy after the other (for dual evaluation)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{k: v.repeat(copies, *[1] * (v.dim() - 1)) if isinstance(v, torch.Tensor) else v
                        for k, v in fields.items()})


class Truncation(NamedTuple):
    """How many of ``rows`` lost tokens from the left at a ``max_length``, and how many tokens.

    A row is one example (all its candidates: the most any of them lost) or one prompt.
    """

    rows: int = 0  # rows looked at
    cut: int = 0  # rows that lost at least one token
    tokens_max: int = 0  # the most tokens one row lost
    tokens_total: int = 0  # tokens lost over all rows

    @classmethod
    def of(cls, lost: Sequence[int]) -> Truncation:
        """From the tokens each row lost (0: kept whole)."""
        cut = [n for n in lost if n > 0]
        return cls(len(lost), len(cut), max(cut, default=0), sum(cut))

    @property
    def tokens_mean(self) -> float:
        """Mean tokens lost per cut row (0.0 when none was cut)."""
        return self.tokens_total / self.cut if self.cut else 0.0

    def metrics(self) -> dict[str, float]:
        """``truncated_rows``, ``truncated_tokens_max``, ``truncated_tokens_mean`` (for a metrics dict)."""
        return {"truncated_rows": self.cut, "truncated_tokens_max": self.tokens_max,
                "truncated_tokens_mean": round(self.tokens_mean, 2)}

    def message(self, name: str, max_length: int) -> str:
        """E.g. 'BoolQ: 13 of 200 rows cut from the left (up to 140 tokens, 52.3 on average) at
        max_length=256; raise task.max_length'."""
        return (f"{name}: {self.cut} of {self.rows} rows cut from the left (up to {self.tokens_max} tokens, "
                f"{self.tokens_mean:.1f} on average) at max_length={max_length}; raise task.max_length")


class LogLikelihood(NamedTuple):
    """Per-row log-likelihood of the continuation: summed over its tokens, and per-token mean."""

    sum: torch.Tensor  # (batch,)
    mean: torch.Tensor  # (batch,)


# ----------------------------------------------------------------------------- encoding


def _special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """Special ids the tokenizer adds before and after a text by default (e.g. [BOS], [] for LLaMA)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _first_not_none(*values):
    return next(v for v in values if v is not None)


def _split_space(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing spaces of the context onto the continuation ("It was ", "great") -> ("It was", " great").

    Byte-level and SentencePiece vocabularies attach a space to the following word, so this
    makes the continuation the same tokens as in running text.
    """
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped) :] + continuation


def _encode_rows(tokenizer, pairs: Sequence[Pair], max_length: int,
                 kind: str) -> tuple[list[list[int]], list[tuple[int, list[int]]], list[int]]:
    """Token ids of each row (specials, context cut from the left, target), where its
    continuation starts and its ids, and how many context tokens it lost to ``max_length``."""
    if kind not in KINDS:
        raise ValueError(unknown_choice("kind", str(kind), KINDS))
    max_length = check_int("max_length", max_length, minimum=2)
    if len(pairs) == 0:
        raise ValueError("pairs is empty; nothing to encode")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ValueError(f"pairs[{i}] must be a (context, continuation) pair of strings, got {pair!r}")
    prefix, suffix = _special_affixes(tokenizer)
    split = [_split_space(c, x) for c, x in pairs]
    contexts = [c for c, _ in split]
    ctx_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    if kind == "causal":
        whole = tokenizer([c + x for c, x in split], add_special_tokens=False)["input_ids"]
        conts = [
            w[len(c) :] if w[: len(c)] == c and len(w) > len(c)
            # the boundary merged into the context: encode the continuation alone
            else tokenizer(x, add_special_tokens=False)["input_ids"]
            for w, c, (_, x) in zip(whole, ctx_ids, split)
        ]
        suffix = []
        # A causal LM needs a token before the continuation to predict its first token from.
        lead = [] if prefix else [_first_not_none(tokenizer.bos_token_id, tokenizer.eos_token_id, 0)]
    else:
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token, so it cannot score a masked LM")
        conts = tokenizer([x for _, x in split], add_special_tokens=False)["input_ids"]
        lead = []
    rows, labels, lost = [], [], []
    room = max_length - len(prefix) - len(suffix)
    for i, (c, x) in enumerate(zip(ctx_ids, conts)):
        if len(x) == 0:
            raise ValueError(f"pairs[{i}] has an empty continuation {pairs[i][1]!r}; nothing to score")
        if kind == "masked" and len(x) != 1:
            pieces = tokenizer.convert_ids_to_tokens(x)
            raise ValueError(
                f"pairs[{i}]: a masked LM scores one token at the mask, but continuation "
                f"{pairs[i][1]!r} is {len(x)} tokens {pieces}; use single-token label words"
            )
        target = x if kind == "causal" else [tokenizer.mask_token_id]
        if len(target) + len(lead) > room:
            raise ValueError(
                f"pairs[{i}]: continuation {pairs[i][1]!r} is {len(target)} tokens, more than "
                f"max_length={max_length} allows with {len(prefix) + len(suffix) + len(lead)} other tokens"
            )
        c = c or lead
        lost.append(max(0, len(c) + len(target) - room))
        c = c[lost[-1] :]  # left truncation of the context
        rows.append(prefix + c + target + suffix)
        labels.append((len(prefix) + len(c), x))
    return rows, labels, lost


def encode_pairs(
    tokenizer,
    pairs: Sequence[Pair],
    max_length: int,
    *,
    kind: Literal["causal", "masked"] = "causal",
) -> Batch:
    """Tokenize (context, continuation) pairs into one padded batch.

    Causal: ``[specials] context continuation``, left padded; the continuation is split off
    the tokenization of the joined text, so tokens merged across the boundary stay as in
    running text. Masked: ``[specials] context <mask> [specials]``, right padded, and the
    continuation must be a single token (the label word scored at the mask). Too long a row
    loses tokens from the left of its context; the continuation is always kept whole
    (:func:`pair_truncation` says how many tokens each row loses).
    """
    rows, labels, _ = _encode_rows(tokenizer, pairs, max_length, kind)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    label_ids = torch.full((n, width), -100, dtype=torch.long)
    for i, (row, (start, x)) in enumerate(zip(rows, labels)):
        offset = width - len(row) if kind == "causal" else 0
        input_ids[i, offset : offset + len(row)] = torch.tensor(row)
        attention_mask[i, offset : offset + len(row)] = 1
        label_ids[i, offset + start : offset + start + len(x)] = torch.tensor(x)
    lengths = attention_mask.sum(1)
    return Batch(input_ids, attention_mask, label_ids != -100, label_ids, lengths, kind)


def pair_truncation(tokenizer, pairs: Sequence[Pair], max_length: int, *,
                    kind: Literal["causal", "masked"] = "causal") -> list[int]:
    """Context tokens each pair loses from the left when encoded at ``max_length`` (0: none),
    with exactly :func:`encode_pairs`'s tokenisation."""
    return _encode_rows(tokenizer, pairs, max_length, kind)[2]


def choice_truncation(tokenizer, examples_choices: Sequence[Sequence[Pair]], max_length: int, *,
                      kind: Literal["causal", "masked"] = "causal") -> Truncation:
    """How many examples lose context tokens at ``max_length`` (an example: the most any of its
    candidates loses), as scoring or training on their (context, continuation) pairs would."""
    flat = [(e, tuple(pair)) for e, choices in enumerate(examples_choices) for pair in choices]
    if not flat:
        return Truncation()
    lost = [0] * len(examples_choices)
    for (e, _), n in zip(flat, pair_truncation(tokenizer, [p for _, p in flat], max_length, kind=kind)):
        lost[e] = max(lost[e], n)
    return Truncation.of(lost)


def _cut_prompt(ids: list[int], room: int, prefix: list[int]) -> tuple[list[int], int]:
    """A prompt's ids cut from the left (its leading special tokens kept) to ``room``, and the tokens lost."""
    if len(ids) <= room:
        return ids, 0
    return prefix + ids[len(ids) - room + len(prefix) :], len(ids) - room


def prompt_truncation(tokenizer, prompts: Sequence[str], max_length: int, max_new_tokens: int = 32) -> Truncation:
    """How many generation prompts lose tokens from the left, as :func:`generate` cuts them to
    leave ``max_new_tokens`` of ``max_length``."""
    if not prompts:
        return Truncation()
    room = check_int("max_length", max_length) - check_int("max_new_tokens", max_new_tokens)
    if room < 1:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt with max_new_tokens={max_new_tokens}")
    prefix, _ = _special_affixes(tokenizer)
    return Truncation.of([_cut_prompt(ids, room, prefix)[1] for ids in tokenizer(list(prompts))["input_ids"]])


# ----------------------------------------------------------------------------- scoring


def _right_align(batch: Batch) -> Batch:
    """Roll left-padded rows so their padding is on the right (for methods that drop position ids)."""
    width = batch.input_ids.shape[1]
    shift = (width - batch.lengths).unsqueeze(1)
    index = (torch.arange(width, device=shift.device).unsqueeze(0) + shift) % width
    names = ("input_ids", "attention_mask", "cont_mask", "labels")
    return dataclasses.replace(batch, **{n: getattr(batch, n).gather(1, index) for n in names})


@contextlib.contextmanager
def contiguous_head(model: torch.nn.Module):
    """Within it, the LM head of ``model`` gets its input rows contiguous.

    Why: transformers keeps the last positions (``logits_to_keep``; one position a generated
    token) as a strided view of the hidden states, and when the head is frozen (LoRA, prefix and
    prompt tuning) ``F.linear`` on that strided 3-D input runs as a batched matmul against the
    head's weight expanded once per row: for SmolLM2's 49k x 576 head and 16 rows, 4x slower than
    the same product on contiguous rows, and 15-20 % of a whole forward (``benchmarks/head_speed.py``)."""
    module = getattr(model, "module", model)  # a DDP wrapper's model
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _prompt_tuned_inputs(model, batch: Batch) -> dict:
    """The inputs peft's prompt tuning gives the base model (the virtual tokens' embeddings before
    each row's), with the rows kept left padded and their positions explicit: peft's own forward
    drops position ids, which forces right padding, and then the continuations end at different
    columns and the LM head must run over every column instead of the last few."""
    n = model.active_peft_config.num_virtual_tokens
    rows, mask = batch.input_ids.shape[0], batch.attention_mask
    embeds = model.word_embeddings(batch.input_ids)
    prompts = _virtual_embeddings(model, rows).to(embeds.dtype)
    virtual = torch.arange(n, device=mask.device).expand(rows, n)
    return {"inputs_embeds": torch.cat([prompts, embeds], dim=1),
            "attention_mask": torch.cat([mask.new_ones(rows, n), mask], dim=1),
            "position_ids": torch.cat([virtual, n + (mask.cumsum(1) - 1).clamp(min=0)], dim=1)}


def _virtual_embeddings(model, rows: int) -> torch.Tensor:
    """The prompt's virtual-token embeddings, one row per batch row. peft's ``get_prompt`` embeds
    one row and repeats it, so the prompt encoder never sees the batch's rows; evaluating copies
    (``perturbation="dual"``) or examples (``"per_example"``) at different points needs them there."""
    adapter = model.active_adapter
    tokens = model.prompt_tokens[adapter].to(model.word_embeddings.weight.device)
    return model.prompt_encoder[adapter](tokens.unsqueeze(0).expand(rows, -1))


def _continuation_logits(lm: LoadedModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits predicting each continuation token (n_tokens, vocab), its target ids, its row."""
    kind, model, params = lm.kind, lm.model, lm.forward_args
    if batch.kind != kind:
        raise ValueError(f"batch was encoded with kind={batch.kind!r} but the model is a {kind} LM")
    kwargs = {}
    if kind == "causal":
        # prompt tuning runs as peft builds it, but with positions (needs the base forward to take them)
        prompt_tuned = lm.adapter == "PROMPT_TUNING" and hasattr(model, "get_prompt") and "position_ids" in params
        if prompt_tuned:
            pass  # _prompt_tuned_inputs gives the positions, virtual tokens included
        elif lm.prompt_learning and lm.adapter != "PREFIX_TUNING":
            # peft drops position ids for prompt tuning; right padding keeps positions exact instead.
            batch = _right_align(batch)
        elif "position_ids" in params:
            kwargs["position_ids"] = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        # Logits are needed from the column before the first continuation token to the end.
        first = int(batch.cont_mask.any(0).nonzero()[0])
        keep = batch.input_ids.shape[1] - first + 1
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = keep
        if "use_cache" in params:
            kwargs["use_cache"] = False
        with contiguous_head(model):
            if prompt_tuned:
                out = model.get_base_model()(**kwargs, **_prompt_tuned_inputs(model, batch))
            else:
                out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
        logits = out.logits[:, -keep:][:, :-1]  # column j predicts token first + j
        mask, targets = batch.cont_mask[:, first:], batch.labels[:, first:]
    else:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        width = batch.input_ids.shape[1]
        logits = out.logits[:, -width:]  # prompt tuning prepends virtual positions
        mask, targets = batch.cont_mask, batch.labels
    selected = logits[mask].float()  # (n_tokens, vocab): log_softmax only where it is needed
    return selected, targets[mask], mask.nonzero()[:, 0]


def _target_logprobs(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each continuation token, flat (n_tokens,)), and the row of each token."""
    selected, targets, rows = _continuation_logits(model, batch)
    return -F.cross_entropy(selected, targets, reduction="none"), rows


def pair_loss(model, batch: Batch, copies: int = 1, per_example: bool = False) -> torch.Tensor:
    """Mean negative log-likelihood over all continuation tokens of the batch (a scalar).

    The training loss of MeZO (the gold candidate's continuation). Tokens are weighted equally,
    as Hugging Face's ``labels`` loss does. Runs under the caller's grad mode: ZO optimizers call
    it inside ``torch.no_grad()``, first-order ones with gradients. ``copies > 1`` runs the
    batch that many times over in one forward and returns one loss per copy (a ``(copies,)``
    tensor), as ``perturbation="dual"`` asks. ``per_example``: a ``(copies, n)`` tensor of each
    row's share, ``n`` times its summed token losses over the copy's token count, so that a copy's
    mean over its rows is its loss (what ``perturbation="per_example"`` asks).
    """
    model = require_loaded(model, "pair_loss")
    copies = _check_copies(copies)
    if copies == 1 and not per_example:
        logp, _ = _target_logprobs(model, batch)
        return -logp.mean()
    n = len(batch)
    logp, rows = _target_logprobs(model, batch.repeat(copies) if copies > 1 else batch)
    if not per_example:
        return -_per_copy(logp, rows // n, copies, mean=True)
    sums = _per_copy(logp, rows, copies * n, mean=False).view(copies, n)
    tokens = _per_copy(torch.ones_like(logp), rows // n, copies, mean=False)
    return -sums * (n / tokens).unsqueeze(1)


def _check_copies(copies) -> int:
    return check_int("copies", copies)


def _per_copy(values: torch.Tensor, copy: torch.Tensor, copies: int, mean: bool) -> torch.Tensor:
    total = torch.zeros(copies, dtype=values.dtype, device=values.device).index_add(0, copy, values)
    if not mean:
        return total
    counts = torch.zeros(copies, dtype=values.dtype, device=values.device).index_add(0, copy, torch.ones_like(values))
    return total / counts


def sum_logprobs(model, batch: Batch) -> LogLikelihood:
    """Per-row continuation log-likelihood: ``.sum`` over its tokens and ``.mean`` per token."""
    logp, rows = _target_logprobs(require_loaded(model, "sum_logprobs"), batch)
    n = len(batch)
    total = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    counts = torch.zeros(n, dtype=logp.dtype, device=logp.device).index_add(0, rows, torch.ones_like(logp))
    return LogLikelihood(total, total / counts)


def choice_logprobs(
    model,
    tokenizer,
    examples_choices: Sequence[Sequence[Pair]],
    batch_size: int = 16,
    max_length: int = 512,
    *,
    normalize: Literal["sum", "mean"] = "sum",
) -> list[list[float]]:
    """Log-likelihood of every candidate of every example, batched across examples: summed over
    the continuation's tokens (``normalize="sum"``) or their per-token mean (``"mean"``).

    Pairs are sorted by length before batching so that little padding is computed.
    """
    model = require_loaded(model, "choice_logprobs")
    if normalize not in NORMALIZE:
        raise ValueError(unknown_choice("normalize", str(normalize), NORMALIZE))
    batch_size = check_int("batch_size", batch_size)
    flat: list[tuple[int, int, Pair]] = []
    for e, choices in enumerate(examples_choices):
        if len(choices) == 0:
            raise ValueError(f"examples_choices[{e}] has no choices to score")
        flat.extend((e, k, tuple(pair)) for k, pair in enumerate(choices))
    order = sorted(range(len(flat)), key=lambda i: -len(flat[i][2][0] + flat[i][2][1]))
    kind = model.kind
    device = next(model.model.parameters()).device
    scores = [[0.0] * len(choices) for choices in examples_choices]
    sizes = {len(c) for c in examples_choices}
    if len(sizes) == 1:
        # equal numbers of choices: score whole examples; when the candidates are single tokens
        # after a shared context, one forward row per example scores all of them
        n_choices = sizes.pop()
        by_length = sorted(range(len(examples_choices)), key=lambda e: -len(examples_choices[e][0][0]))
        start = 0
        with torch.no_grad():
            while start < len(by_length):
                idx = by_length[start : start + batch_size]
                cb = encode_choices(tokenizer, [examples_choices[e] for e in idx], None, max_length, kind=kind)
                if not cb.shared and len(idx) * n_choices > batch_size:
                    idx = idx[: max(1, batch_size // n_choices)]
                    cb = encode_choices(tokenizer, [examples_choices[e] for e in idx], None, max_length, kind=kind)
                for e, row in zip(idx, choice_scores(model, cb.to(device), normalize=normalize).tolist()):
                    scores[e] = row
                start += len(idx)
        return scores
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = [flat[i] for i in order[start : start + batch_size]]
            batch = encode_pairs(tokenizer, [p for _, _, p in chunk], max_length, kind=kind).to(device)
            ll = sum_logprobs(model, batch)
            values = (ll.sum if normalize == "sum" else ll.mean).tolist()
            for (e, k, _), v in zip(chunk, values):
                scores[e][k] = v
    return scores


def score_choices(
    model,
    tokenizer,
    examples_choices: Sequence[Sequence[Pair]],
    batch_size: int = 16,
    max_length: int = 512,
    *,
    normalize: Literal["sum", "mean"] = "sum",
) -> list[int]:
    """The predicted choice of each example: argmax of continuation log-likelihood (first on ties).

    ``normalize="sum"`` (zotune's default) compares the candidates' total log-likelihoods: the
    probability of each continuation, and the same scores :func:`choice_loss` trains with.
    ``"mean"`` divides by the number of tokens, as MeZO's ``large_models/run.py`` does by
    default (its scores are ``log_probs.mean()``); it stops long candidates (COPA's sentences,
    ReCoRD's queries) being penalised for their length. For one-token label words (SST-2, RTE,
    BoolQ, ...) the two agree.
    """
    model = require_loaded(model, "score_choices")
    scores = choice_logprobs(model, tokenizer, examples_choices, batch_size, max_length, normalize=normalize)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


# ----------------------------------------------------------------------------- generation

_STOP_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _newline_ids(tokenizer) -> list[int]:
    """Ids of every token whose text contains a newline (computed once per tokenizer)."""
    try:
        return _STOP_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    ids = [i for i, text in enumerate(texts) if "\n" in text]
    try:
        _STOP_IDS[tokenizer] = ids
    except TypeError:
        pass
    return ids


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    *,
    max_length: int | None = None,
) -> list[str]:
    """Greedy completions of ``prompts``, each cut at the first newline or EOS and stripped.

    For SQuAD/DROP-style answers. Prompts are left padded (so new tokens follow each prompt
    directly) and, when ``max_length`` is given, truncated from the left to leave room for
    ``max_new_tokens``. Generation stops for a row at EOS or any token containing a newline.
    """
    from transformers import GenerationConfig

    lm = require_loaded(model, "generate")
    model = lm.model
    if lm.kind != "causal":
        raise ValueError("generate needs a causal LM; a masked LM can only score choices")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens)
    batch_size = check_int("batch_size", batch_size)
    if max_length is not None and check_int("max_length", max_length) <= max_new_tokens:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt with max_new_tokens={max_new_tokens}")
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string")
    stop = sorted(set(_newline_ids(tokenizer)) | ({tokenizer.eos_token_id} - {None}))
    pad_id = _first_not_none(tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop, pad_token_id=pad_id
    )
    encoded = tokenizer(list(prompts))["input_ids"]
    if max_length is not None:
        room = max_length - max_new_tokens
        prefix, _ = _special_affixes(tokenizer)
        encoded = [_cut_prompt(ids, room, prefix)[0] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(encoded)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids = encoded[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, width - len(ids) :] = 1
            with warnings.catch_warnings(), contiguous_head(model):
                # peft prompt tuning drops the position ids generate passes, and says so each step.
                warnings.filterwarnings("ignore", message="Position ids are not supported")
                out = _generate(lm, input_ids.to(device), attention_mask.to(device), config)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, text in zip(chunk, texts):
                outputs[i] = text.split("\n", 1)[0].strip()
    return outputs


def _generate(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, config):
    """``generate`` of ``lm``'s model; for prefix tuning, of its base model continuing the
    prefix's keys and values.

    peft's own ``generate`` for prefix tuning (0.21 with transformers 5) hands the prefix to
    transformers under a name it no longer reads: the answers then follow an empty prefix, the
    same whatever the prefix holds (a tuned SQuAD prefix answered exactly as before training).
    Here the prefix goes in as the cache the prompt continues, with its positions in the mask.
    """
    model = lm.model
    if lm.adapter != "PREFIX_TUNING":
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    n = model.peft_config[model.active_adapter].num_virtual_tokens
    prefix = model.get_prompt(batch_size=input_ids.shape[0])
    mask = torch.cat([attention_mask.new_ones(input_ids.shape[0], n), attention_mask], dim=1)
    return model.get_base_model().generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                           **{_cache_argument(): prefix})


@functools.cache  # the installed transformers does not change within a process
def _cache_argument() -> str:
    """What ``generate`` calls the cache it continues: ``cache`` from transformers 5.24 (tested; the
    old name warns there and goes in 6.0), ``past_key_values`` before."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


# ----------------------------------------------------------------------------- choices as one batch


@dataclasses.dataclass
class ChoiceBatch:
    """Every candidate of every example, ready to be scored together.

    ``shared`` (the common case: SST-2, RTE, BoolQ, ... whose candidates are one label word after
    a shared context): ``batch`` holds one row per example and ``candidates`` the (n, C) label
    token ids, so one forward scores all C candidates. Otherwise ``batch`` holds every
    (context, continuation) pair, n * C rows in example order.
    """

    batch: Batch
    n_choices: int
    candidates: torch.Tensor | None  # (n, C) token ids when shared
    labels: torch.Tensor | None  # (n,) gold index

    @property
    def shared(self) -> bool:
        return self.candidates is not None

    def repeat(self, copies: int) -> "ChoiceBatch":
        """Every example ``copies`` times over, one copy after the other (for dual evaluation)."""
        rep = lambda t: None if t is None else t.repeat(copies, *[1] * (t.dim() - 1))  # noqa: E731
        return ChoiceBatch(self.batch.repeat(copies), self.n_choices, rep(self.candidates), rep(self.labels))

    def to(self, device) -> "ChoiceBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ChoiceBatch(self.batch.to(device), self.n_choices, move(self.candidates), move(self.labels))


def encode_choices(tokenizer, examples_choices: Sequence[Sequence[Pair]], labels: Sequence[int] | None,
                   max_length: int, *, kind: str = "causal") -> ChoiceBatch:
    """Encode the candidates of ``examples_choices`` (each example the same number of them)."""
    sizes = {len(c) for c in examples_choices}
    if len(sizes) != 1:
        raise ValueError(f"every example needs the same number of choices to be scored as a batch, got {sorted(sizes)}")
    n_choices = sizes.pop()
    flat = [tuple(pair) for choices in examples_choices for pair in choices]
    enc = encode_pairs(tokenizer, flat, max_length, kind=kind)
    gold = None if labels is None else torch.tensor(list(labels), dtype=torch.long)
    n = len(examples_choices)
    if bool((enc.cont_mask.sum(1) == 1).all()):
        ids = enc.input_ids.view(n, n_choices, -1)
        where = enc.cont_mask.view(n, n_choices, -1)
        same_slot = bool((where == where[:, :1]).all())
        context = ids.masked_fill(where, -1)
        if same_slot and bool((context == context[:, :1]).all()):
            cand = enc.labels[enc.cont_mask].view(n, n_choices)
            rows = torch.arange(0, n * n_choices, n_choices)
            first = dataclasses.replace(enc, **{f.name: getattr(enc, f.name)[rows] for f in dataclasses.fields(Batch)
                                                if isinstance(getattr(enc, f.name), torch.Tensor)})
            return ChoiceBatch(first, n_choices, cand, gold)
    return ChoiceBatch(enc, n_choices, None, gold)


def choice_scores(model, cb: ChoiceBatch, *, normalize: Literal["sum", "mean"] = "sum") -> torch.Tensor:
    """(n, C) log-likelihood of each candidate, summed over its tokens or (``normalize="mean"``)
    per token (one forward when candidates share a context; they are then one token each, so
    sum and mean agree)."""
    model = require_loaded(model, "choice_scores")
    if normalize not in NORMALIZE:
        raise ValueError(unknown_choice("normalize", str(normalize), NORMALIZE))
    if cb.shared:
        selected, _, _ = _continuation_logits(model, cb.batch)
        return torch.log_softmax(selected, dim=-1).gather(1, cb.candidates)
    logp, rows = _target_logprobs(model, cb.batch)
    total = torch.zeros(len(cb.batch), dtype=logp.dtype, device=logp.device).index_add(0, rows, logp)
    if normalize == "mean":
        total = total / cb.batch.cont_mask.sum(1).to(total.dtype)
    return total.view(-1, cb.n_choices)


def choice_loss(model, cb: ChoiceBatch, copies: int = 1, per_example: bool = False) -> torch.Tensor:
    """Cross-entropy of the gold candidate among the candidates (MeZO's classification loss for
    classification and multiple-choice tasks: it trains the model to tell the candidates apart,
    not to make the label words likelier in general). ``copies > 1``: one loss per copy of the
    examples, from one forward (see :func:`pair_loss`); ``per_example``: every example's loss, a
    ``(copies, n)`` tensor."""
    model = require_loaded(model, "choice_loss")
    if cb.labels is None:
        raise ValueError("choice_loss needs labels")
    copies = _check_copies(copies)
    if copies == 1 and not per_example:
        return F.cross_entropy(choice_scores(model, cb), cb.labels)
    n = len(cb.labels)
    rep = cb.repeat(copies) if copies > 1 else cb
    losses = F.cross_entropy(choice_scores(model, rep), rep.labels, reduction="none").view(copies, n)
    return losses if per_example else losses.mean(1)
