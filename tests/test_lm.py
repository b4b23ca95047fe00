import pytest
import torch

from zotune.lm import (Truncation, _newline_ids, choice_logprobs, choice_truncation, encode_pairs, generate,
                       pair_loss, pair_truncation, prompt_truncation, score_choices, sum_logprobs)
from zotune.testing import tiny_model

PAIRS = [
    ("The capital of France is", " Paris is great"),
    ("It was ", "good"),  # trailing space moves onto the continuation
    ("a b c d e f g h i j k l m n o p", " yes"),
]


def _expected_logprobs(model, ids: list[int], n_cont: int) -> torch.Tensor:
    """log p of the last n_cont tokens of one unpadded row, read off the model's full logits."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return torch.stack([logp[t - 1, ids[t]] for t in range(len(ids) - n_cont, len(ids))])


def test_pair_loss_is_the_nll_of_the_continuation(tiny_llama):
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    ctx, cont = PAIRS[0]
    ids = tok(ctx)["input_ids"] + tok(cont, add_special_tokens=False)["input_ids"]
    batch = encode_pairs(tok, [(ctx, cont)], max_length=64)
    assert batch.input_ids[0].tolist() == ids
    assert batch.cont_mask[0].sum() == 3 and batch.cont_mask[0, -3:].all()
    expected = _expected_logprobs(model, ids, 3)
    with torch.no_grad():
        torch.testing.assert_close(pair_loss(tiny_llama, batch), -expected.mean())
        ll = sum_logprobs(tiny_llama, batch)
    torch.testing.assert_close(ll.sum, expected.sum().reshape(1))
    torch.testing.assert_close(ll.mean, expected.mean().reshape(1))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_opt", "tiny_gpt2"])
def test_padding_does_not_change_scores(fixture, request):
    lm = request.getfixturevalue(fixture)
    with torch.no_grad():
        together = sum_logprobs(lm, encode_pairs(lm.tokenizer, PAIRS, 64))
        alone = [sum_logprobs(lm, encode_pairs(lm.tokenizer, [p], 64)).sum for p in PAIRS]
        loss = pair_loss(lm, encode_pairs(lm.tokenizer, PAIRS, 64))
    torch.testing.assert_close(together.sum, torch.cat(alone))
    n_tokens = (together.sum / together.mean).sum()
    torch.testing.assert_close(loss, -together.sum.sum() / n_tokens)  # token-weighted mean


def test_loss_has_gradients_only_when_the_caller_wants(tiny_gpt2):
    batch = encode_pairs(tiny_gpt2.tokenizer, PAIRS, 64)
    assert pair_loss(tiny_gpt2, batch).requires_grad
    with torch.no_grad():
        assert not pair_loss(tiny_gpt2, batch).requires_grad


def test_long_context_is_cut_from_the_left(tiny_llama):
    tok = tiny_llama.tokenizer
    ctx, cont = "one two three four five six seven eight nine ten the end", " Paris is great"
    batch = encode_pairs(tok, [(ctx, cont), ("short", " yes")], max_length=12)
    row = batch.input_ids[0].tolist()
    cont_ids = tok(cont, add_special_tokens=False)["input_ids"]
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    assert len(row) == 12 and row[0] == tok.bos_token_id  # BOS kept
    assert row[-len(cont_ids) :] == cont_ids  # the continuation whole
    assert row[1 : -len(cont_ids)] == ctx_ids[-(12 - 1 - len(cont_ids)) :]  # the context's tail
    assert batch.lengths.tolist() == [12, int(batch.attention_mask[1].sum())]
    assert encode_pairs(tok, [(ctx, cont)], max_length=4).input_ids[0].tolist() == [tok.bos_token_id, *cont_ids]
    with pytest.raises(ValueError, match="max_length=3"):
        encode_pairs(tok, [(ctx, cont)], max_length=3)


def test_empty_context_without_bos_still_scores_the_first_token(tiny_gpt2):
    batch = encode_pairs(tiny_gpt2.tokenizer, [("", " yes"), ("It", " was")], 16)
    with torch.no_grad():
        assert torch.isfinite(sum_logprobs(tiny_gpt2, batch).sum).all()


def test_bad_pairs_are_named():
    tok = tiny_model("llama").tokenizer
    with pytest.raises(ValueError, match=r"pairs\[1\]"):
        encode_pairs(tok, [("a", " b"), ("a", "")], 16)
    with pytest.raises(ValueError, match=r"pairs\[0\] must be"):
        encode_pairs(tok, ["just a string"], 16)
    with pytest.raises(ValueError, match="Did you mean 'masked'"):
        encode_pairs(tok, [("a", " b")], 16, kind="mask")


def test_masked_lm_scores_the_label_word_at_the_mask(tiny_roberta):
    tok, model = tiny_roberta.tokenizer, tiny_roberta.model
    pairs = [("It was", " great"), ("The movie was a film that", " good")]
    batch = encode_pairs(tok, pairs, 32, kind="masked")
    ctx_ids = tok("It was", add_special_tokens=False)["input_ids"]
    n = len(ctx_ids) + 3
    assert batch.input_ids[0, :n].tolist() == [tok.bos_token_id, *ctx_ids, tok.mask_token_id, tok.eos_token_id]
    great = tok.convert_tokens_to_ids("Ġgreat")
    with torch.no_grad():
        logits = model(batch.input_ids[:1, :n]).logits[0]
        ll = sum_logprobs(tiny_roberta, batch)
        expected = torch.log_softmax(logits[n - 2], -1)[great]
        torch.testing.assert_close(ll.sum[0], expected)
        torch.testing.assert_close(pair_loss(tiny_roberta, batch), -ll.sum.mean())
    with pytest.raises(ValueError, match="single-token"):
        encode_pairs(tok, [("It was", " wonderful")], 32, kind="masked")
    with pytest.raises(ValueError, match="kind='masked'"):
        pair_loss(tiny_model("llama"), batch)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_roberta"])
@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_score_choices_picks_the_most_likely_choice(fixture, normalize, request):
    lm = request.getfixturevalue(fixture)
    if lm.kind == "causal":
        words = [" great", " terrible movie", " good", " bad film and", " the"]
    else:
        words = [" great", " terrible", " good", " bad", " the"]
    contexts = ["It was", "The film is", "I think that the movie was", "so"]
    examples = [[(c, w) for w in words[i % 2 : i % 2 + 3]] for i, c in enumerate(contexts)]
    preds = score_choices(lm, lm.tokenizer, examples, batch_size=2, max_length=32, normalize=normalize)
    expected = []
    with torch.no_grad():
        for choices in examples:
            ll = sum_logprobs(lm, encode_pairs(lm.tokenizer, choices, 32, kind=lm.kind))
            expected.append(int(getattr(ll, normalize).argmax()))
    assert preds == expected
    with pytest.raises(ValueError, match="Did you mean 'mean'"):
        score_choices(lm, lm.tokenizer, examples, normalize="meen")
    with pytest.raises(ValueError, match=r"examples_choices\[1\]"):
        score_choices(lm, lm.tokenizer, [examples[0], []])


def test_generate_is_greedy_deterministic_and_batch_independent(tiny_opt):
    tok, model = tiny_opt.tokenizer, tiny_opt.model
    prompts = ["The capital of France is", "Hello", "a b c d e f"]
    out = generate(tiny_opt, tok, prompts, max_new_tokens=6, batch_size=2)
    assert out == generate(tiny_opt, tok, prompts, max_new_tokens=6, batch_size=3)
    assert out == [generate(tiny_opt, tok, [p], max_new_tokens=6)[0] for p in prompts]
    # greedy: one new token is the argmax of the next-token distribution
    ids = tok(prompts[0])["input_ids"]
    with torch.no_grad():
        best = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    [first] = generate(tiny_opt, tok, [prompts[0]], max_new_tokens=1)
    assert first == tok.decode([best], skip_special_tokens=True).split("\n")[0].strip()
    assert all("\n" not in text for text in out)


def test_generate_stops_at_newline_and_runs_max_new_tokens():
    lm = tiny_model("llama")
    tok = lm.tokenizer
    head = torch.nn.Linear(64, len(tok), bias=True)
    torch.nn.init.zeros_(head.weight)
    lm.model.lm_head = head  # a head that always says the same token
    with torch.no_grad():
        head.bias.zero_()[tok.convert_tokens_to_ids("Ġgreat")] = 1.0
        assert generate(lm, tok, ["It was", "x"], max_new_tokens=3) == ["great great great"] * 2
        newline = tok("\n", add_special_tokens=False)["input_ids"][0]
        assert newline in _newline_ids(tok)
        head.bias.zero_()[newline] = 1.0
        assert generate(lm, tok, ["It was"], max_new_tokens=3) == [""]
    with pytest.raises(ValueError, match="masked LM"):
        generate(tiny_model("roberta"), tok, ["x"])
    with pytest.raises(ValueError, match="max_length=3"):
        generate(lm, tok, ["x"], max_new_tokens=3, max_length=3)


def test_generate_truncates_long_prompts_from_the_left(tiny_llama):
    tok, model = tiny_llama.tokenizer, tiny_llama
    long = "one two three four five six seven eight nine ten " * 3 + "The capital of France is"
    kept = tok(long)["input_ids"]
    tail = tok.decode(kept[len(kept) - 9 :], skip_special_tokens=True)  # 10 - BOS
    assert generate(model, tok, [long], max_new_tokens=4, max_length=14) == generate(
        model, tok, [tail], max_new_tokens=4
    )


def test_choice_batches_score_like_separate_pairs_and_train_as_classification(tiny_llama):
    import torch.nn.functional as F

    from zotune.lm import choice_loss, choice_scores, encode_choices, encode_pairs, sum_logprobs

    model, tok = tiny_llama, tiny_llama.tokenizer
    shared = [[("the movie was", " great"), ("the movie was", " terrible")],
              [("a bad film it was", " great"), ("a bad film it was", " terrible")]]
    differing = [[("the cause was", " rain"), ("the effect was", " sun")],
                 [("it was", " good and great"), ("it was", " bad")]]
    for examples, expect_shared in ((shared, True), (differing, False)):
        cb = encode_choices(tok, examples, [0, 1], 32)
        assert cb.shared is expect_shared
        with torch.no_grad():
            scores = choice_scores(model, cb)
            flat = encode_pairs(tok, [p for e in examples for p in e], 32)
            separate = sum_logprobs(model, flat).sum.view(2, 2)
            assert torch.allclose(scores, separate, atol=1e-5)
            expected = F.cross_entropy(separate, torch.tensor([0, 1]))
            assert float(choice_loss(model, cb)) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="same number of choices"):
        encode_choices(tok, [shared[0], shared[0][:1]], None, 32)


def test_losses_per_copy_run_the_batch_twice_over_in_one_forward(tiny_llama):
    from zotune.lm import choice_loss, encode_choices

    model, tok = tiny_llama, tiny_llama.tokenizer
    rows = []
    handle = model.model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    batch = encode_pairs(tok, PAIRS, max_length=64)
    shared = encode_choices(tok, [[("the movie was", " great"), ("the movie was", " bad")]] * 3, [0, 1, 1], 32)
    differing = encode_choices(tok, [[("the cause was", " rain"), ("the effect was", " sun")]] * 2, [0, 1], 32)
    with torch.no_grad():
        for fn, b in ((pair_loss, batch), (choice_loss, shared), (choice_loss, differing)):
            rows.clear()
            one = fn(model, b)
            two = fn(model, b, copies=2)
            assert two.shape == (2,) and rows == [len(b) if fn is pair_loss else len(b.batch),
                                                  2 * (len(b) if fn is pair_loss else len(b.batch))]
            torch.testing.assert_close(two, one.expand(2), atol=1e-5, rtol=1e-5)
    handle.remove()
    with pytest.raises(ValueError, match="copies"):
        pair_loss(model, batch, copies=0)


def test_truncation_counts_the_context_tokens_each_row_loses(tiny_llama):
    """Issue 9 defect 15: rows were cut from the left without a word; now the tokens each row
    loses are counted with encode_pairs' own tokenisation."""
    tok = tiny_llama.tokenizer
    long_ctx, cont = "one two three four five six seven eight nine ten the end", " Paris is great"
    n_ctx = len(tok(long_ctx, add_special_tokens=False)["input_ids"])
    n_cont = len(tok(cont, add_special_tokens=False)["input_ids"])
    pairs = [(long_ctx, cont), ("short", " yes")]
    lost = pair_truncation(tok, pairs, max_length=12)
    assert lost == [1 + n_ctx + n_cont - 12, 0]  # BOS + context + continuation, less the room
    batch = encode_pairs(tok, pairs, max_length=12)
    assert int(batch.lengths[0]) == 1 + n_ctx + n_cont - lost[0]  # exactly what encode_pairs dropped
    assert pair_truncation(tok, pairs, max_length=64) == [0, 0]
    # an example counts once, with the most any of its candidates loses
    examples = [[(long_ctx, cont), (long_ctx, " no")], [("short", " yes"), ("short", " no")],
                [(long_ctx + " and more words", " ok"), ("x", " y")]]
    found = choice_truncation(tok, examples, max_length=12)
    worst = [max(pair_truncation(tok, e, max_length=12)) for e in examples]
    assert found == Truncation(rows=3, cut=2, tokens_max=max(worst), tokens_total=worst[0] + worst[2])
    assert found.tokens_mean == (worst[0] + worst[2]) / 2
    assert found.metrics() == {"truncated_rows": 2, "truncated_tokens_max": max(worst),
                               "truncated_tokens_mean": round((worst[0] + worst[2]) / 2, 2)}
    assert found.message("BoolQ", 12) == (f"BoolQ: 2 of 3 rows cut from the left (up to {max(worst)} tokens, "
                                          f"{found.tokens_mean:.1f} on average) at max_length=12; "
                                          "raise task.max_length")
    assert Truncation.of([0, 0]).metrics() == {"truncated_rows": 0, "truncated_tokens_max": 0,
                                               "truncated_tokens_mean": 0.0}


def test_prompt_truncation_counts_what_generate_cuts(tiny_llama):
    tok = tiny_llama.tokenizer
    prompts = ["one two three four five six seven eight nine ten", "short"]
    n = len(tok(prompts[0])["input_ids"])  # with BOS
    found = prompt_truncation(tok, prompts, max_length=10, max_new_tokens=4)
    assert found == Truncation(rows=2, cut=1, tokens_max=n - 6, tokens_total=n - 6)
    with pytest.raises(ValueError, match="max_length=4"):
        prompt_truncation(tok, prompts, max_length=4, max_new_tokens=4)


def test_mean_scoring_is_the_per_token_mean_in_every_batching_path(tiny_llama):
    """Issue 9 defect 16: MeZO ranks by the per-token mean; both scorings agree with
    sum_logprobs whether examples are batched whole (equal choice counts) or pair by pair."""
    tok, model = tiny_llama.tokenizer, tiny_llama
    equal = [[("It was", " great fun"), ("It was", " bad")], [("So", " yes"), ("So", " no it was not")]]
    unequal = equal[:1] + [[("So", " yes"), ("So", " no"), ("So", " maybe not")]]
    for examples in (equal, unequal):
        for normalize in ("sum", "mean"):
            got = choice_logprobs(model, tok, examples, batch_size=2, max_length=32, normalize=normalize)
            with torch.no_grad():
                want = [getattr(sum_logprobs(model, encode_pairs(tok, c, 32)), normalize).tolist() for c in examples]
            for g, w in zip(got, want):
                torch.testing.assert_close(torch.tensor(g), torch.tensor(w))


def test_scoring_refuses_a_bare_module_and_reads_the_kind_from_the_loaded_model(tiny_llama, monkeypatch):
    """The kind is decided once at load: scoring never looks at the module to find it, and a
    module handed over without it is refused with the fix."""
    from zotune import models
    from zotune.lm import choice_loss, choice_scores, encode_choices

    batch = encode_pairs(tiny_llama.tokenizer, PAIRS, 64)
    cb = encode_choices(tiny_llama.tokenizer, [[("It was", " great"), ("It was", " bad")]], [0], 32)
    for fn, args in ((pair_loss, (batch,)), (sum_logprobs, (batch,)), (choice_loss, (cb,)), (choice_scores, (cb,)),
                     (score_choices, (tiny_llama.tokenizer, [PAIRS[:2]])), (generate, (tiny_llama.tokenizer, ["x"]))):
        with pytest.raises(ValueError, match=f"{fn.__name__} needs a zotune.models.LoadedModel .*"
                                             "got a bare LlamaForCausalLM"):
            fn(tiny_llama.model, *args)

    def looked(*args, **kwargs):
        raise AssertionError("scoring inspected the module for its kind")

    for name in ("infer_kind", "detect_kind", "forward_args", "as_loaded"):
        monkeypatch.setattr(models, name, looked)
    with torch.no_grad():
        pair_loss(tiny_llama, batch)
        score_choices(tiny_llama, tiny_llama.tokenizer, [PAIRS[:2]])
        generate(tiny_llama, tiny_llama.tokenizer, ["x"], max_new_tokens=1)


def test_as_loaded_reads_a_module_once_and_scores_as_the_loader_does(tiny_llama, tiny_roberta):
    from zotune.models import as_loaded

    for lm in (tiny_llama, tiny_roberta):
        mine = as_loaded(lm.model, lm.tokenizer)
        assert (mine.kind, mine.adapter, mine.prompt_learning, mine.forward_args) == (
            lm.kind, None, False, lm.forward_args)
        assert mine.fingerprint == lm.fingerprint and as_loaded(mine) is mine
    batch = encode_pairs(tiny_llama.tokenizer, PAIRS, 64)
    with torch.no_grad():
        assert torch.equal(pair_loss(as_loaded(tiny_llama.model), batch), pair_loss(tiny_llama, batch))
    with pytest.raises(ValueError, match="Did you mean 'masked'"):
        as_loaded(tiny_llama.model, kind="mask")


@pytest.mark.parametrize("scheme", ["full", "lora", "prefix", "prompt"])
def test_the_lm_head_reads_contiguous_rows_in_scoring_and_generation(scheme):
    """transformers hands the head a strided view of the last positions; on a strided input the
    head's matmul runs batched against its weight copied per row (4x slower on SmolLM2)."""
    from zotune.lm import contiguous_head
    from zotune.params import select_trainable

    lm = tiny_model("llama", seed=0)
    if scheme != "full":
        lm, _ = select_trainable(lm, scheme, init_seed=0)
    seen = []
    head = lm.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        sum_logprobs(lm, encode_pairs(lm.tokenizer, PAIRS, 64))
        generate(lm, lm.tokenizer, ["a b c", "The capital of France is"], max_new_tokens=3)
    handle.remove()
    assert seen and all(seen)
    with contiguous_head(lm.model):  # the hook is gone after the block
        pass
    assert not head._forward_pre_hooks


def test_prompt_tuned_rows_score_as_peft_scores_each_row_alone():
    """Prompt-tuned rows keep left padding with explicit positions (peft's forward drops positions
    and needs right padding, which runs the head over every column): each row scores as peft's own
    forward scores it alone, after the virtual tokens."""
    from zotune.params import select_trainable

    lm, named = select_trainable(tiny_model("llama", seed=0), "prompt", num_virtual_tokens=3, init_seed=0)
    with torch.no_grad():
        for p in named.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        together = sum_logprobs(lm, encode_pairs(lm.tokenizer, PAIRS, 64)).sum
        for i, (ctx, cont) in enumerate(PAIRS):
            alone = encode_pairs(lm.tokenizer, [(ctx, cont)], 64)
            ids, n_cont = alone.input_ids[0].tolist(), int(alone.cont_mask.sum())
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, 3:]  # after the virtual tokens
            logp = torch.log_softmax(logits.float(), -1)
            expected = sum(logp[t - 1, ids[t]] for t in range(len(ids) - n_cont, len(ids)))
            torch.testing.assert_close(together[i], expected, rtol=1e-5, atol=1e-5)
