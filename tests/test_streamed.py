"""Streamed weights (ZO2-style): same trajectory as the plain in-place mode, each tensor in once per step."""

import pytest
import torch

import zotune
from zotune.lm import encode_pairs, pair_loss
from zotune.models import as_loaded
from zotune.testing import tiny_model
from zotune.streamed import StreamedWeights

PAIRS = [("the movie was", " great"), ("a dull film", " bad"), ("it was fun", " yes"), ("no", " no")]


def setup(arch="llama"):
    lm = tiny_model(arch)
    lm.model.requires_grad_(False)
    batch = encode_pairs(lm.tokenizer, PAIRS, max_length=32)
    return lm.model, batch


@pytest.mark.parametrize("copy_in", [False, True], ids=["from-the-file", "copied-in"])
@pytest.mark.parametrize("preset,kw", [("MeZO", {"weight_decay": 0.1}), ("LOZO", {"rank": 2, "interval": 2}),
                                       ("ZOAdam", {})])
def test_streamed_weights_follow_the_plain_trajectory(tmp_path, preset, kw, copy_in):
    """copied-in is the GPU path (a resident copy per module, perturbed in place, written back),
    run here on the CPU."""
    plain, batch = setup()
    model, _ = setup()
    make = getattr(zotune, preset)
    opt_plain = make(plain.named_parameters(), lr=1e-3, eps=1e-2, **kw)
    opt = make(model.named_parameters(), lr=1e-3, eps=1e-2, module=model, perturbation="dual",
               defer_update=True, **kw)
    streamed = StreamedWeights(model, opt, storage="mmap", directory=tmp_path, copy_in=copy_in)
    assert len(list(tmp_path.glob("*.bin"))) == len(opt.leaves)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # lrs must be those of each step
    sched_plain = torch.optim.lr_scheduler.LambdaLR(opt_plain, lambda s: 1.0 / (1 + s))
    for _ in range(6):
        lp = opt_plain.step(lambda: pair_loss(as_loaded(plain), batch))
        ls = opt.step(lambda copies=1: pair_loss(as_loaded(model), batch, copies=copies))
        assert float(ls) == pytest.approx(float(lp), rel=1e-5)
        sched.step()
        sched_plain.step()
    assert opt.pending is not None  # the last update waits for the next visit...
    opt.flush()  # ...or a flush
    assert opt.pending is None
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    mapped = {p.data_ptr() for p in opt.leaves}
    streamed.close()  # back to ordinary memory, hooks gone; a user's directory keeps its files
    assert not mapped & {p.data_ptr() for p in opt.leaves}
    assert len(list(tmp_path.glob("*.bin"))) == len(opt.leaves)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())


def test_each_trained_tensor_crosses_once_per_step_and_stays_in_storage_between_visits(tmp_path):
    model, batch = setup()
    opt = zotune.MeZO(model.named_parameters(), lr=1e-3, module=model, perturbation="dual", defer_update=True)
    streamed = StreamedWeights(model, opt, storage="mmap", directory=tmp_path)
    trained_bytes = sum(p.numel() * p.element_size() for p in opt.leaves)
    tied = model.get_input_embeddings().weight
    tied_bytes = tied.numel() * tied.element_size()  # the tied LM head brings the embedding in twice
    for step in range(3):
        before_in, before_out = streamed.bytes_in, streamed.bytes_out
        opt.step(lambda copies=1: pair_loss(as_loaded(model), batch, copies=copies))
        assert streamed.bytes_in - before_in == trained_bytes + tied_bytes
        assert streamed.bytes_out - before_out == (trained_bytes if step else 0)  # the previous update
    stored = {p.data_ptr() for p in streamed.stored}
    assert all(p.data_ptr() in stored for p in opt.leaves)  # between visits: the mapped file itself
    # evaluation outside a step sees the updated weights (brought in, pending update applied)
    with torch.no_grad():
        loss = pair_loss(as_loaded(model), batch)
    assert opt.pending is None and torch.isfinite(loss)


def test_streamed_errors_are_clear(tmp_path):
    model, _ = setup()
    plain = zotune.MeZO(model.named_parameters(), module=model)
    with pytest.raises(ValueError, match="perturbation='dual' and defer_update=True"):
        StreamedWeights(model, plain)
    with pytest.raises(ValueError, match="needs weights that the evaluation never writes"):
        zotune.MeZO(model.named_parameters(), defer_update=True)
    opt = zotune.MeZO(model.named_parameters(), module=model, perturbation="dual", defer_update=True)
    with pytest.raises(ValueError, match="Did you mean 'mmap'"):
        StreamedWeights(model, opt, storage="mmp")
    with pytest.raises(ValueError, match="on the CPU use storage='mmap'"):
        StreamedWeights(model, opt, storage="host")


def small_mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.requires_grad_(False)


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
Y = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))


def copies_loss(model):
    def closure(copies=1):
        err = ((model(X.repeat(copies, 1)) - Y.repeat(copies, 1)) ** 2).view(copies, -1).mean(1)
        return err[0] if copies == 1 else err
    return closure


@pytest.mark.parametrize("streamed", [False, True], ids=["deferred", "streamed"])
def test_state_dict_is_a_pure_read_and_a_pending_update_resumes_exactly(tmp_path, streamed):
    import copy
    import json

    def make(model, folder):
        opt = zotune.ZOAdam(model.named_parameters(), lr=1e-2, eps=1e-3, module=model, perturbation="dual",
                            defer_update=True)
        return opt, (StreamedWeights(model, opt, directory=tmp_path / folder) if streamed else None)

    straight = small_mlp()
    opt, _ = make(straight, "a")
    for _ in range(6):
        opt.step(copies_loss(straight))
    opt.flush()

    first = small_mlp()
    opt1, _ = make(first, "b")
    for _ in range(3):
        opt1.step(copies_loss(first))
    before = [p.detach().clone() for p in first.parameters()]
    saved = copy.deepcopy(opt1.state_dict())
    assert opt1.pending is not None  # saved, not applied: the weights are untouched
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), before))
    pending = saved["zo"]["pending"]
    assert pending["index"] == 2 and pending["updates"] == 3 and pending["applied"] == []
    json.dumps(pending, allow_nan=False)  # a few scalars: directions regenerate from the step

    resumed = small_mlp(seed=99)
    resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    opt2, _ = make(resumed, "c")
    opt2.load_state_dict(saved)
    assert opt2.pending.index == 2
    for _ in range(3):
        opt2.step(copies_loss(resumed))
    opt2.flush()
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    plain = zotune.ZOAdam(resumed.named_parameters(), lr=1e-2, eps=1e-3)
    with pytest.raises(ValueError, match="holds a deferred update"):
        plain.load_state_dict(saved)
