"""Tiny random models for tests and examples: real transformers classes (LLaMA, OPT, GPT-2,
RoBERTa) with hidden size 64 and two layers, and a byte-level tokenizer built in memory, so a
test or an example runs in milliseconds with no downloads.

They live here, not in :mod:`zotune.models`, because they are fixtures rather than models
anyone fine-tunes; recipes name them ``model.name: tiny-<arch>`` for smoke runs.

Example::

    from zotune.testing import tiny_model
    lm = tiny_model("llama")                 # a zotune.models.LoadedModel, seeded
    batch = encode_pairs(lm.tokenizer, [("It was", " great")], max_length=32, kind=lm.kind)
"""

from __future__ import annotations

import copy

import torch

from zotune._validate import unknown_choice
from zotune.models import Kind, LoadedModel, fingerprint, forward_args, prepare_tokenizer

TINY_ARCHS = ("llama", "opt", "gpt2", "roberta")

# Words that become single tokens (with a leading space) in the tiny tokenizer: the label words
# of common prompts, so that masked-LM scoring and short continuations can be tested.
_TINY_WORDS = (
    "the a an of and or to in on is was it this that not no yes Yes No Maybe true false "
    "great terrible good bad positive negative neutral correct wrong movie film sentence "
    "question answer capital France Paris Germany Berlin city country because so cause effect "
    "what who when where why how I you he she they we"
).split()

# Special tokens and their fixed ids (RoBERTa's convention: <s>=0, <pad>=1, </s>=2).
_TINY_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def tiny_tokenizer(arch: str = "llama"):
    """A byte-level BPE tokenizer built in memory (no downloads), for tests and examples.

    Any text round-trips through it (256 byte tokens); the words in ``_TINY_WORDS`` preceded by
    a space are single tokens. Special tokens follow each architecture's habit: LLaMA prepends
    <s>, OPT prepends </s>, GPT-2 adds nothing, RoBERTa wraps in <s> ... </s>.
    """
    if arch not in TINY_ARCHS:
        raise ValueError(unknown_choice("tiny arch", arch, TINY_ARCHS))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() is unordered
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    # Each word is merged left to right from its leading space marker "Ġ"; every merge's left
    # side starts with "Ġ", so merges of different words never compete inside one word.
    for word in _TINY_WORDS:
        pieces = "Ġ" + word
        for end in range(2, len(pieces) + 1):
            merged = pieces[:end]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((pieces[: end - 1], pieces[end - 1]))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    template = {"llama": "<s> $A", "opt": "</s> $A", "gpt2": "$A", "roberta": "<s> $A </s>"}[arch]
    specials = [(t, vocab[t]) for t in ("<s>", "</s>") if t in template]
    backend.post_processor = processors.TemplateProcessing(
        single=template, pair=template + " $B", special_tokens=specials
    )
    extra = {"pad_token": "<pad>", "mask_token": "<mask>"} if arch in ("opt", "roberta") else {}
    if arch == "gpt2":
        extra["bos_token"] = "</s>"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=extra.pop("bos_token", "<s>"),
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=256,
        **extra,
    )


def tiny_model(arch: str, seed: int = 0) -> LoadedModel:
    """A tiny random model (hidden 64, 2 layers) of a real transformers class, for tests and examples.

    Built from a config with no downloads and seeded without touching the global RNG; LLaMA,
    OPT, GPT-2 and RoBERTa tie the LM head to the input embeddings, as their real checkpoints do.
    """
    tokenizer = tiny_tokenizer(arch)
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        GPT2Config,
        LlamaConfig,
        OPTConfig,
        RobertaConfig,
    )

    vocab, common = len(tokenizer), {"initializer_range": 0.1, "eos_token_id": 2}
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=0, tie_word_embeddings=True, **common,
        )  # fmt: skip
    elif arch == "opt":
        config = OPTConfig(
            vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
            **common,
        )  # fmt: skip
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=2, **common
        )
    else:
        config = RobertaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=258, type_vocab_size=1,
            pad_token_id=1, bos_token_id=0, **common,
        )  # fmt: skip
    kind: Kind = "masked" if arch == "roberta" else "causal"
    auto = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config)
    model.eval()
    prepare_tokenizer(tokenizer, kind)
    return LoadedModel(model, tokenizer, kind, f"tiny-{arch}", fingerprint(model, kind),
                       forward_args=forward_args(model))


class Crash(Exception):
    """What :func:`crash_at_step` raises: the weights and the checkpoints on disk are then what a
    ``kill -9`` at that moment of the run leaves."""


def crash_at_step(optimizer, calls: int) -> None:
    """Make ``optimizer.step`` raise :class:`Crash` instead of its call number ``calls`` (0-based),
    for resume tests run in one process."""
    real, done = optimizer.step, [0]

    def step(closure):
        if done[0] == calls:
            raise Crash
        done[0] += 1
        return real(closure)

    optimizer.step = step


def copies_closure(row_losses):
    """A closure speaking the optimizers' whole protocol, from ``row_losses(copies)``: the loss of each
    row of the batch run ``copies`` times over, a flat ``(copies * rows,)`` tensor. ``closure()`` is
    the batch's mean loss, ``closure(copies=n)`` one mean per copy (``perturbation="dual"``) and
    ``closure(copies=n, per_example=True)`` every row's loss per copy (``"per_example"``)."""
    def closure(copies: int = 1, per_example: bool = False):
        losses = row_losses(copies).view(copies, -1)
        if per_example:
            return losses
        return losses.mean(1) if copies > 1 else losses.mean()
    return closure


def assert_resumes_and_replays(new_model, make_optimizer, closure_of, before: int = 2, after: int = 3) -> dict:
    """The guarantees every ZO optimizer keeps, checked on a small model: ``before + after`` steps in
    a row end on the same weights, bit for bit, as ``before`` steps, a ``state_dict`` round trip into
    a fresh optimizer and ``after`` more; and replaying each live step's record, with no forward pass,
    rebuilds the live weights bit for bit. ``new_model()`` builds the same model at each call,
    ``make_optimizer(model)`` its optimizer, ``closure_of(model)`` a closure for one step. Returns the
    optimizer state saved after ``before`` steps (for checks of what it keeps)."""

    def same(a, b, what):
        for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
            if not torch.equal(x, y):
                raise AssertionError(f"{what}: {name} differs")

    straight = new_model()
    opt = make_optimizer(straight)
    for _ in range(before + after):
        opt.step(closure_of(straight))
    resumed = new_model()
    first = make_optimizer(resumed)
    for _ in range(before):
        first.step(closure_of(resumed))
    state = copy.deepcopy(first.state_dict())
    second = make_optimizer(resumed)
    second.load_state_dict(state)
    for _ in range(after):
        second.step(closure_of(resumed))
    same(straight, resumed, "a run resumed from its state_dict against the run straight through")
    live, rebuilt = new_model(), new_model()
    a, r = make_optimizer(live), make_optimizer(rebuilt)
    for _ in range(before + after):
        a.step(closure_of(live))
        r.replay(copy.deepcopy(a.last_record))
    if r.forward_passes:
        raise AssertionError(f"replay ran {r.forward_passes} forward passes")
    same(live, rebuilt, "weights replayed from the step records against the live run's")
    return state
