import pytest
import torch

from zotune.lm import encode_pairs, pair_loss, sum_logprobs
from zotune.testing import tiny_model
from zotune.params import hybrid_split, layer_of, norm_parameters, num_layers, select_trainable, unique_parameters

PAIRS = [("The capital of France is", " Paris is great"), ("It was", " good"), ("a b c d e f g h", " yes")]
MASKED_PAIRS = [("The capital of France is a", " city"), ("It was", " good")]


def test_full_counts_a_tied_head_once():
    lm = tiny_model("llama")
    out, named = select_trainable(lm, "full")
    model = out.model
    assert out is lm and model is lm.model  # nothing wraps it: the same LoadedModel
    assert "model.embed_tokens.weight" in named and "lm_head.weight" not in named
    assert sum(p.numel() for p in named.values()) == lm.fingerprint["num_params"]
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch, expected", [
    # LLaMA: two RMSNorm gains per layer and the final one; OPT / GPT-2 / RoBERTa: LayerNorm gains and biases
    ("llama", {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
               "model.norm.weight"}),
    ("opt", {"model.decoder.layers.0.self_attn_layer_norm.weight", "model.decoder.layers.0.self_attn_layer_norm.bias",
             "model.decoder.final_layer_norm.weight"}),
    ("gpt2", {"transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.bias", "transformer.ln_f.weight"}),
    ("roberta", {"roberta.embeddings.LayerNorm.weight", "roberta.encoder.layer.0.output.LayerNorm.bias"}),
])
def test_norms_trains_the_normalisation_layers_only(arch, expected):
    lm = tiny_model(arch)
    out, named = select_trainable(lm, "norms")
    assert out is lm and out.adapter is None  # no wrapper: the base model's own tensors
    assert expected <= set(named) and set(named) == set(norm_parameters(lm.model))
    assert all(p.dim() == 1 for p in named.values())  # gains and biases, never a weight matrix
    assert {n for n, p in lm.model.named_parameters() if p.requires_grad} == set(named)
    assert sum(p.numel() for p in named.values()) < 0.05 * lm.fingerprint["num_params"]
    pairs = PAIRS if lm.kind == "causal" else MASKED_PAIRS
    batch = encode_pairs(lm.tokenizer, pairs, 48, kind=lm.kind)
    with torch.no_grad():
        before = pair_loss(out, batch)
        name = list(named)[-1]  # the last norm: every prediction passes through it
        named[name].add_(0.5)
        after = pair_loss(out, batch)
    assert torch.isfinite(before) and abs(float(after - before)) > 1e-4
    pair_loss(out, batch).backward()  # first order: gradients reach the gains only
    assert all(p.grad is not None for p in named.values())
    assert all(p.grad is None for n, p in lm.model.named_parameters() if n not in named)


@pytest.mark.parametrize("arch, expected", [
    ("llama", {"model.norm.weight"}),
    ("opt", {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"}),
    ("gpt2", {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
    ("roberta", {"lm_head.layer_norm.weight", "lm_head.layer_norm.bias"}),
])
def test_final_norm_trains_the_last_normalisation_before_the_head_only(arch, expected):
    lm = tiny_model(arch)
    out, named = select_trainable(lm, "final_norm")
    assert out is lm and out.adapter is None and set(named) == expected
    assert {n for n, p in lm.model.named_parameters() if p.requires_grad} == expected
    hidden = lm.model.config.hidden_size
    assert all(p.shape == (hidden,) for p in named.values())
    pairs = PAIRS if lm.kind == "causal" else MASKED_PAIRS
    batch = encode_pairs(lm.tokenizer, pairs, 48, kind=lm.kind)
    pair_loss(out, batch).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in named.values())


def test_a_change_of_the_final_gains_is_a_linear_probe_through_the_head():
    """Two candidates' logit difference moves by sum_j (W_aj - W_bj) h_j d_gamma_j, h the normalised
    last hidden state before the gain: exactly linear in the change of the gains."""
    lm = tiny_model("llama")
    model = lm.model
    _, named = select_trainable(lm, "final_norm")
    gamma = named["model.norm.weight"]
    ids = lm.tokenizer("It was a good film", return_tensors="pt")["input_ids"]
    a, b = 5, 9
    w = model.lm_head.weight.detach()
    captured = {}
    model.model.norm.register_forward_hook(lambda m, inp, out: captured.update(h=out[0, -1] / m.weight))
    with torch.no_grad():
        logits0 = model(ids).logits[0, -1].double()
        h = captured["h"].double()
        delta = torch.randn(gamma.shape, generator=torch.Generator().manual_seed(0)) * 0.1
        gamma.add_(delta)
        logits1 = model(ids).logits[0, -1].double()
    moved = (logits1[a] - logits1[b]) - (logits0[a] - logits0[b])
    assert float(moved) == pytest.approx(float(((w[a] - w[b]).double() * h * delta.double()).sum()), rel=1e-4, abs=1e-6)


def test_final_norm_on_a_model_without_one_outside_the_layers_is_refused():
    lm = tiny_model("llama")
    lm.model.model.norm = torch.nn.Identity()
    with pytest.raises(ValueError, match="scheme 'final_norm' selects no tensors of LlamaForCausalLM .*outside the numbered layers"):
        select_trainable(lm, "final_norm")


def test_norms_on_a_model_without_normalisation_layers_is_refused():
    lm = tiny_model("llama")
    for module in list(lm.model.modules()):
        for child_name, child in list(module.named_children()):
            if "norm" in type(child).__name__.lower():
                setattr(module, child_name, torch.nn.Identity())
    with pytest.raises(ValueError, match="scheme 'norms' selects no tensors of LlamaForCausalLM"):
        select_trainable(lm, "norms")


def test_unique_parameters_catches_parameters_sharing_memory():
    module = torch.nn.Module()
    module.a = torch.nn.Parameter(torch.zeros(3, 4))
    module.b = torch.nn.Parameter(module.a.data)  # another Parameter object, same storage
    module.c = torch.nn.Parameter(module.a.data[1:])  # an overlapping view is a different tensor
    assert list(unique_parameters(module)) == ["a", "c"]


ADAPTER_CASES = [(a, s) for a in ("llama", "opt") for s in ("lora", "prefix", "prompt")]
ADAPTER_CASES += [("gpt2", "lora"), ("roberta", "lora"), ("roberta", "prompt")]


@pytest.mark.parametrize("arch, scheme", ADAPTER_CASES)
def test_adapters_train_a_small_set_that_moves_the_loss(arch, scheme):
    lm = tiny_model(arch)
    total = lm.fingerprint["num_params"]
    out, named = select_trainable(lm, scheme)
    model = out.model
    # the adapter is decided where it is made, from its config, and carried with the model
    assert (out.kind, out.adapter, out.prompt_learning) == (
        lm.kind, {"lora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[scheme], scheme != "lora")
    assert out.fingerprint == lm.fingerprint and out.forward_args == lm.forward_args
    marker = "lora_" if scheme == "lora" else "prompt_encoder"
    assert named and all(marker in name for name in named)
    if scheme == "lora":  # peft's default targets: the attention query and value projections
        assert all(any(t in n for t in ("q_proj", "v_proj", "c_attn", "query", "value")) for n in named)
    assert sum(p.numel() for p in named.values()) < 0.05 * total
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(named)

    pairs = PAIRS if lm.kind == "causal" else MASKED_PAIRS
    batch = encode_pairs(lm.tokenizer, pairs, 48, kind=lm.kind)
    with torch.no_grad():
        before = pair_loss(out, batch)
        # a padded batch scores each row as it scores alone (prefix and prompt change positions)
        together = sum_logprobs(out, batch).sum
        alone = torch.cat([sum_logprobs(out, encode_pairs(lm.tokenizer, [p], 48, kind=lm.kind)).sum for p in pairs])
        torch.testing.assert_close(together, alone)
        gen = torch.Generator().manual_seed(0)
        name = list(named)[-1]
        named[name].add_(torch.randn(named[name].shape, generator=gen))
        after = pair_loss(out, batch)
    assert torch.isfinite(before) and abs(float(after - before)) > 1e-4

    loss = pair_loss(out, batch)  # first-order: gradients reach the adapters only
    loss.backward()
    assert all(p.grad is not None for p in named.values())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in named)


@pytest.mark.parametrize("scheme", ["lora", "prefix", "prompt"])
def test_adapter_init_follows_init_seed_not_the_global_rng(scheme):
    """peft draws adapter inits from torch's global RNG, so two runs of one recipe started from
    different adapters (a probe's candidates had different zero-step dev losses) and a replay could
    not rebuild them; with ``init_seed`` the init is a function of the seed, and the global RNG is
    left as it was."""
    def init(seed, global_seed):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        _, named = select_trainable(tiny_model("llama", seed=0), scheme, init_seed=seed)
        assert torch.equal(torch.get_rng_state(), state)  # the global RNG did not move
        return {n: p.detach().clone() for n, p in named.items()}

    a, b, c = init(7, 1), init(7, 2), init(8, 1)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_options_override_the_peft_defaults():
    _, named = select_trainable(tiny_model("opt"), "lora", r=4, target_modules=["k_proj"])
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    assert all("k_proj" in n for n in named)
    assert shapes["base_model.model.model.decoder.layers.0.self_attn.k_proj.lora_A.default.weight"] == (4, 64)
    _, named = select_trainable(tiny_model("llama"), "prompt", num_virtual_tokens=3)
    assert [tuple(p.shape) for p in named.values()] == [(3, 64)]


def test_scheme_and_option_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="select_trainable needs a zotune.models.LoadedModel"):
        select_trainable(model.model, "full")  # a bare module: its kind was never decided
    with pytest.raises(ValueError, match="Did you mean 'lora'"):
        select_trainable(model, "lroa")
    with pytest.raises(ValueError, match="Did you mean 'lora_alpha'"):
        select_trainable(model, "lora", lora_alpah=32)
    with pytest.raises(ValueError, match="takes no options"):
        select_trainable(model, "full", r=8)
    with pytest.raises(ValueError, match="scheme 'norms' takes no options"):
        select_trainable(model, "norms", r=8)
    wrapped, _ = select_trainable(model, "lora")
    with pytest.raises(ValueError, match="already has peft adapters"):
        select_trainable(wrapped, "prompt")


@pytest.mark.parametrize(
    "name, layer",
    [
        ("model.layers.3.self_attn.q_proj.weight", 3),
        ("model.decoder.layers.11.fc1.bias", 11),
        ("transformer.h.0.attn.c_attn.weight", 0),
        ("roberta.encoder.layer.7.output.dense.weight", 7),
        ("base_model.model.model.layers.2.mlp.up_proj.lora_A.default.weight", 2),
        ("model.embed_tokens.weight", None),
        ("transformer.ln_f.weight", None),
        ("prompt_encoder.default.embedding.weight", None),
    ],
)
def test_layer_of(name, layer):
    assert layer_of(name) == layer


@pytest.mark.parametrize(
    "arch, zo_only, fo_only",
    [
        ("llama", ["model.embed_tokens.weight"], ["model.norm.weight"]),
        ("opt", ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"],
         ["model.decoder.final_layer_norm.weight"]),
        ("gpt2", ["transformer.wte.weight", "transformer.wpe.weight"], ["transformer.ln_f.bias"]),
        ("roberta", ["roberta.embeddings.word_embeddings.weight"], ["lm_head.dense.weight"]),
    ],
)  # fmt: skip
def test_hybrid_split_partitions_by_depth(arch, zo_only, fo_only, request):
    lm = request.getfixturevalue(f"tiny_{arch}")
    named = unique_parameters(lm.model)  # the "full" set, without changing the shared fixture
    assert num_layers(lm.model) == 2
    for k in range(3):
        zo, fo = hybrid_split(lm.model, named, k)
        assert set(zo).isdisjoint(fo) and list(named) == [n for n in named if n in zo or n in fo]
        assert all(name in zo for name in zo_only) and all(name in fo for name in fo_only)
        assert {layer_of(n) for n in zo} - {None} == set(range(k))
        assert {layer_of(n) for n in fo} - {None} == set(range(k, 2))
    with pytest.raises(ValueError, match=r"zo_layers=3 is outside \[0, 2\].*2 transformer layers"):
        hybrid_split(lm.model, named, 3)
    with pytest.raises(ValueError, match="zo_layers=-1"):
        hybrid_split(lm.model, named, -1)


def test_hybrid_split_of_adapters():
    lm, named = select_trainable(tiny_model("llama"), "prefix")
    zo, fo = hybrid_split(lm.model, named, 0)
    assert list(zo) == ["prompt_encoder.default.embedding.weight"] and fo == {}
    lm, named = select_trainable(tiny_model("llama"), "lora")
    zo, fo = hybrid_split(lm.model, named, 1)
    assert len(zo) == len(fo) == 4


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_a_prefix_of_real_activations_is_the_same_as_real_tokens_before_the_input(arch):
    """prefix_init="activations": the prefix holds the base model's keys / values of real tokens,
    so the tuned model starts out computing exactly what the base model computes on those tokens
    followed by the input (peft's random prefix starts somewhere else), in each model family."""
    lm = tiny_model(arch, seed=0)
    x = torch.tensor([[7, 3, 12, 30]])
    prefixed, named = select_trainable(tiny_model(arch, seed=0), "prefix", num_virtual_tokens=3, init_seed=5,
                                       prefix_init="activations")
    g = torch.Generator().manual_seed(5)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    real = torch.randint(0, vocab, (1, 3), generator=g)
    with torch.no_grad():
        want = lm.model(input_ids=torch.cat([real, x], dim=1)).logits[:, 3:]
        got = prefixed.model(input_ids=x).logits
        random_prefix, _ = select_trainable(tiny_model(arch, seed=0), "prefix", num_virtual_tokens=3, init_seed=5)
        other = random_prefix.model(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(other, want, atol=1e-3)
    with pytest.raises(ValueError, match="prefix_init"):
        select_trainable(tiny_model("llama"), "prefix", prefix_init="real")


@pytest.mark.parametrize("arch", ["llama", "opt", "roberta"])
def test_a_prompt_from_text_is_the_same_as_the_texts_tokens_before_the_input(arch):
    """prompt_init_text: the virtual tokens hold the embeddings of the text's tokens, repeated to fill
    them (peft's TEXT init, with the run's own tokenizer), so the model starts out computing what
    it computes on those real tokens followed by the input."""
    lm = tiny_model(arch, seed=0)
    ids = lm.tokenizer("b c", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    x = torch.tensor([[7, 3, 12, 30]])
    prompted, named = select_trainable(tiny_model(arch, seed=0), "prompt", num_virtual_tokens=5,
                                       prompt_init_text="b c")
    table = lm.model.get_input_embeddings().weight
    torch.testing.assert_close(next(iter(named.values())).detach(), table[ids * 2 + ids[:1]].detach())
    if lm.kind == "causal":  # an encoder's position ids and token types make a plain prefix a different input
        with torch.no_grad():
            want = lm.model(input_ids=torch.cat([torch.tensor([ids * 2 + ids[:1]]), x], dim=1)).logits[:, 5:]
            got = prompted.model(input_ids=x).logits[:, 5:]  # peft returns the virtual positions' logits too
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prompt_init_text_is_refused_where_it_cannot_apply():
    with pytest.raises(ValueError, match="no tokens"):
        select_trainable(tiny_model("llama"), "prompt", prompt_init_text="")
    with pytest.raises(ValueError, match="prompt_init_text.*prompt"):
        select_trainable(tiny_model("llama"), "prefix", prompt_init_text="b c")


@pytest.mark.parametrize("scheme, options", [
    ("prefix", {"prefix_init": "activations"}), ("prefix", {}), ("prompt", {}), ("lora", {}), ("full", {}),
])
def test_without_adapters_is_the_base_model_and_gives_the_adapters_back(scheme, options):
    """The zero-shot baseline of an adapter run is the base model's, not the model with its
    adapters (a real-token prefix computes something else from step 0; a trained LoRA too)."""
    from zotune.params import without_adapters

    base = tiny_model("llama", seed=0)
    x = torch.tensor([[7, 3, 12, 30]])
    with torch.no_grad():
        want = base.model(input_ids=x).logits
    lm, named = select_trainable(tiny_model("llama", seed=0), scheme, init_seed=5, **options)
    with torch.no_grad():
        for p in named.values():  # a trained adapter: every tensor moved
            p.add_(0.5)
        with_adapters = lm.model(input_ids=x).logits
        with without_adapters(lm) as plain:
            got = plain.model(input_ids=x).logits
            assert plain.adapter is None and not plain.prompt_learning
        again = lm.model(input_ids=x).logits
    if scheme == "full":  # no adapters: the model itself, trained weights included
        torch.testing.assert_close(got, with_adapters)
        return
    torch.testing.assert_close(got[:, -x.shape[1]:], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(with_adapters[:, -x.shape[1]:], want, atol=1e-3)
    torch.testing.assert_close(again, with_adapters)  # the adapters are back


def test_a_prefix_generates_as_if_its_real_tokens_came_first_and_a_tuned_prefix_answers_otherwise():
    """Generation through a prefix from real activations equals the base model's generation after
    those real tokens (left-padded batch of two), and moving the prefix changes the answers.
    peft's own generate ignored the prefix's values (same answers for any prefix)."""
    from zotune.lm import generate

    base = tiny_model("llama", seed=0)
    lm, named = select_trainable(tiny_model("llama", seed=0), "prefix", num_virtual_tokens=3, init_seed=5,
                                 prefix_init="activations")
    g = torch.Generator().manual_seed(5)
    real = torch.randint(0, base.model.get_input_embeddings().weight.shape[0], (1, 3), generator=g)[0].tolist()
    tok = lm.tokenizer
    prompts = ["a b c d e f", "hello world"]
    got = generate(lm, tok, prompts, max_new_tokens=6)
    want = []
    for p in prompts:  # one row at a time: the real tokens, then the prompt's own tokens
        ids = torch.tensor([real + tok(p)["input_ids"]])
        with torch.no_grad():
            out = base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                      do_sample=False, pad_token_id=0, eos_token_id=None)
        want.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n", 1)[0].strip())
    assert got == want
    with torch.no_grad():
        for p in named.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 3)
    assert generate(lm, tok, prompts, max_new_tokens=6) != got


def test_a_prefix_scores_as_if_its_real_tokens_came_first_in_a_left_padded_batch():
    """Scoring (training losses, choice scores) through a prefix from real activations equals the
    base model's scores of the same rows after those real tokens: the rows' positions continue
    the prefix's (they started at 0 before, overlapping the prefix's own positions)."""
    from zotune.lm import Batch, encode_pairs, sum_logprobs

    base = tiny_model("llama", seed=0)
    lm, _ = select_trainable(tiny_model("llama", seed=0), "prefix", num_virtual_tokens=3, init_seed=5,
                             prefix_init="activations")
    g = torch.Generator().manual_seed(5)
    real = torch.randint(0, base.model.get_input_embeddings().weight.shape[0], (3,), generator=g)
    batch = encode_pairs(lm.tokenizer, [("a b c d e f", " g h"), ("hi", " there")], max_length=64)
    got = sum_logprobs(lm, batch).sum
    want = []
    for i in range(len(batch)):
        keep = batch.attention_mask[i] == 1
        ids = torch.cat([real, batch.input_ids[i][keep]])[None]
        cont = torch.cat([torch.zeros(3, dtype=torch.bool), batch.cont_mask[i][keep]])[None]
        labels = torch.cat([torch.zeros(3, dtype=torch.long), batch.labels[i][keep]])[None]
        one = Batch(ids, torch.ones_like(ids), cont, labels, torch.tensor([ids.shape[1]]), "causal")
        want.append(sum_logprobs(base, one).sum[0])
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
