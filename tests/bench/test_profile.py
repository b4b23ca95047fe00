"""The profiling helper measures what it says, and the optimizers' memory and pass claims hold.

The claims under test (issue 2): ZO-SGD needs no buffer larger than the largest parameter
tensor; momentum adds one model-size buffer, Adam two, LOZO-M only m x r per matrix; MeZO makes
three passes over the parameters per step. Directions are now drawn chunk by chunk into a
reusable scratch buffer, so the bound for ZO-SGD is in fact min(largest leaf, one chunk).
"""

import os

import pytest
import torch

import zotune
from zotune.bench.profile import (
    AllocationTracker,
    Timer,
    count_parameter_passes,
    current_rss_bytes,
    estimator_buffer_bytes,
    model_bytes,
    optimizer_state_bytes,
    peak_rss_bytes,
    sequential_chunks,
    step_memory,
    tensor_bytes,
    timed,
    timings,
)
from zotune.estimators import Gaussian

F32 = 4
SLACK = 256  # bytes: the step's scalar tensors (coefficients, loss)


# ------------------------------------------------------------------------- AllocationTracker
def test_tracker_counts_a_kept_allocation_exactly():
    with AllocationTracker() as tr:
        a = torch.empty(1000, dtype=torch.float32)
    assert (tr.peak_bytes, tr.live_bytes, tr.retained_bytes) == (4000, 4000, 4000)
    assert (tr.allocations, tr.allocated_bytes) == (1, 4000)
    del a
    assert tr.live_bytes == 0 and tr.peak_bytes == 4000  # freed after exit: live drops, peak stays


def test_freed_tensors_lower_the_live_count_and_the_peak_remembers():
    with AllocationTracker() as tr:
        a = torch.ones(1000)
        b = a * 2  # 4000 more
        del b
        assert tr.live_bytes == 4000
        c = torch.zeros(250, dtype=torch.float64)  # 2000
    assert (tr.peak_bytes, tr.retained_bytes, tr.allocations, tr.allocated_bytes) == (8000, 6000, 3, 10000)
    del a, c


def test_views_share_their_storage_and_are_not_counted_twice():
    with AllocationTracker() as tr:
        a = torch.empty(1000)
        v = a[10:].view(-1, 10).t()
        w = a.reshape(10, 100)
        assert tr.live_bytes == 4000 and tr.allocations == 1
        del a, w
        assert tr.live_bytes == 4000  # the view keeps the storage alive
        del v
        assert tr.live_bytes == 0


def test_in_place_ops_allocate_nothing_and_pre_existing_tensors_are_not_counted():
    before = torch.ones(1000)
    with AllocationTracker() as tr:
        before.add_(1.0).mul_(2.0)
        torch.add(before, before, out=before)
        del before  # freeing a tensor from before entry does not go below zero
    assert (tr.peak_bytes, tr.allocations, tr.live_bytes) == (0, 0, 0)


def test_torch_tensor_literals_count_and_paused_regions_do_not():
    with AllocationTracker() as tr:
        a = torch.tensor([1.0, 2.0])  # built outside the dispatcher, handed over by lift_fresh
        with tr.paused():
            b = torch.empty(1000)
    assert tr.retained_bytes == 8 and tr.allocations == 1
    del a, b


def test_tensor_bytes_counts_shared_storage_once():
    w = torch.empty(10, 10)
    assert tensor_bytes({"a": w, "b": [w.t(), w[0]], "c": 3}) == 400
    lin = torch.nn.Linear(4, 4)
    assert model_bytes([lin.weight, lin.weight, lin.bias]) == (16 + 4) * F32


def test_process_memory_and_timer():
    assert peak_rss_bytes() > 0
    rss = current_rss_bytes()
    assert rss is None or rss > 0  # (statm and ru_maxrss are sampled differently: not compared)
    with Timer() as t:
        sum(range(1000))
    assert t.seconds >= 0
    calls = []
    assert timed(lambda: calls.append(1), repeats=3, warmup=2) >= 0 and len(calls) == 5
    with pytest.raises(ValueError, match="repeats"):
        timed(lambda: None, repeats=0)
    t = timings(lambda: sum(range(10_000)), repeats=3, warmup=0)
    assert len(t.all_seconds) == 3 and t.seconds >= 0 and t.cpu_seconds >= 0


# ------------------------------------------------------------------------- optimizer claims
class TinyMLP(torch.nn.Module):
    """Leaves of distinct sizes; l2.weight (32 x 64, 8 KiB) is the largest."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(8, 64)
        self.l2 = torch.nn.Linear(64, 32)
        self.l3 = torch.nn.Linear(32, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


X = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
Y = torch.randn(16, 1, generator=torch.Generator().manual_seed(2))
LARGEST = 32 * 64 * F32
CHUNK = 256  # elements: smaller than every matrix here, so directions are drawn in pieces


def setup(make):
    """Model, optimizer, closure, after one warm-up step on this thread (so lazily created
    state and this thread's scratch buffer exist: a measured step allocates only transients)."""
    model = TinyMLP()
    opt = make(model)

    def closure():
        return ((model(X) - Y) ** 2).mean()

    with sequential_chunks():
        opt.step(closure)
    return model, opt, closure


def mezo(m):
    return zotune.MeZO(m.named_parameters(), lr=1e-3)


def chunked(rule, **kw):
    return lambda m: zotune.ZOOptimizer(m.named_parameters(), Gaussian(chunk_size=CHUNK, **kw), rule, lr=1e-3)


@pytest.mark.parametrize(
    "make, buffer",
    [
        (mezo, LARGEST),
        (lambda m: zotune.ZOSGDSign(m.named_parameters()), LARGEST),
        (lambda m: zotune.ZOSGDConservative(m.named_parameters()), LARGEST),
        (lambda m: zotune.ZOOptimizer(m.named_parameters(), "blockwise", lr=1e-3), LARGEST),
        (chunked("sgd"), CHUNK * F32),
    ],
    ids=["mezo", "sign", "cons", "blockwise", "mezo-chunked"],
)
def test_zo_sgd_needs_no_buffer_larger_than_the_largest_leaf_or_one_chunk(make, buffer):
    model, opt, closure = setup(make)
    mem = step_memory(opt, closure)
    assert optimizer_state_bytes(opt) == 0
    # the direction lives in one reusable scratch buffer (per thread): min(largest leaf, chunk)
    assert estimator_buffer_bytes(opt) == buffer
    assert mem.own_peak_bytes <= SLACK
    assert mem.retained_bytes == 0


def test_q_queries_add_one_accumulation_buffer():
    for make, piece in [(lambda m: zotune.MeZO(m.named_parameters(), queries=4), LARGEST),
                        (chunked("sgd", queries=4), CHUNK * F32)]:
        _, opt, closure = setup(make)
        assert step_memory(opt, closure).own_peak_bytes <= piece + SLACK  # g = sum_j c_j z_j


@pytest.mark.parametrize("make", [lambda m: zotune.ZOSGDMomentum(m.named_parameters()), chunked("momentum")])
def test_momentum_adds_one_model_size_buffer(make):
    model, opt, closure = setup(make)
    mem = step_memory(opt, closure)
    assert optimizer_state_bytes(opt) == model_bytes(model.parameters())
    assert mem.own_peak_bytes <= SLACK


@pytest.mark.parametrize("make, piece", [(lambda m: zotune.ZOAdam(m.named_parameters()), LARGEST),
                                         (chunked("adam"), CHUNK * F32)], ids=["leaf", "chunked"])
def test_adam_holds_two_model_size_buffers(make, piece):
    model, opt, closure = setup(make)
    mem = step_memory(opt, closure)
    assert optimizer_state_bytes(opt) == 2 * model_bytes(model.parameters())
    # transients per leaf or chunk: g, v_new / bc2 and v / bc2 (inside torch.maximum), denom
    assert mem.own_peak_bytes <= 4 * piece + SLACK


def lozo_bounds(model, rank):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    vectors = [p for p in model.parameters() if p.dim() != 2]
    n_buffers = sum(p.shape[0] * min(rank, *p.shape) for p in matrices)  # N: m x r per matrix
    factors = max(sum(p.shape) * min(rank, *p.shape) for p in matrices)  # U and V of one matrix
    return n_buffers, factors, vectors


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["lozo", "lozo-m"])
def test_lozo_keeps_only_m_x_r_per_matrix(momentum):
    rank = 2
    model, opt, closure = setup(lambda m: zotune.LOZO(m.named_parameters(), rank=rank, momentum=momentum))
    mem = step_memory(opt, closure)
    n_buffers, factors, vectors = lozo_bounds(model, rank)
    dense = sum(p.numel() for p in vectors)  # biases are perturbed densely: an ordinary EMA
    assert optimizer_state_bytes(opt) == ((n_buffers + dense) * F32 if momentum else 0)
    # no m x n direction is ever formed: U and a few m x r temporaries of the fused write
    # (restore U * eps - N * lr / r) at most
    assert mem.own_peak_bytes <= 5 * factors * F32 + SLACK < LARGEST


def test_lozo_keeps_no_dense_buffer_of_a_matrix_size():
    rank = 2
    model, opt, _ = setup(lambda m: zotune.LOZO(m.named_parameters(), rank=rank))
    _, _, vectors = lozo_bounds(model, rank)
    v_cache = sum(p.shape[1] * min(rank, *p.shape) for p in model.parameters() if p.dim() == 2) * F32
    assert estimator_buffer_bytes(opt) <= v_cache + max(p.numel() for p in vectors) * F32


def test_forward_grad_holds_every_tangent_at_once():
    model, opt, closure = setup(lambda m: zotune.ForwardGrad(m.named_parameters(), module=m))
    mbytes = model_bytes(model.parameters())
    mem = step_memory(opt, closure)
    # ZO-Bench Table 5: |x| for the tangents (plus the tangent activations inside the closure)
    assert mbytes <= mem.own_peak_bytes <= mbytes + LARGEST + SLACK


def test_step_memory_runs_on_one_thread_and_restores_the_setting(monkeypatch):
    monkeypatch.setenv("ZOTUNE_THREADS", "2")
    _, opt, closure = setup(mezo)
    seen = []
    step_memory(opt, lambda: seen.append(os.environ["ZOTUNE_THREADS"]) or closure())
    assert seen == ["1", "1"] and os.environ["ZOTUNE_THREADS"] == "2"


# ------------------------------------------------------------------------- parameter passes
@pytest.mark.parametrize("make", [mezo, chunked("sgd")], ids=["mezo", "chunked"])
def test_mezo_makes_three_passes_perturb_perturb_and_fused_restore_update(make):
    _, opt, closure = setup(make)
    assert count_parameter_passes(opt, closure) == 3.0  # chunks add up to whole passes
    assert "leaf_direction" not in vars(opt.estimator)  # the wrapper is gone after the step


@pytest.mark.parametrize("q", [2, 4])
def test_q_query_passes(q):
    # queries 1..q-1: perturb +, perturb -, restore (3 each); the last query's restore is fused
    # into the update (2); the update regenerates all q directions of every leaf (q): 4q - 1
    _, opt, closure = setup(lambda m: zotune.MeZO(m.named_parameters(), lr=1e-3, queries=q))
    assert count_parameter_passes(opt, closure) == 4 * q - 1


def test_conservative_and_forward_grad_and_lozo_passes():
    _, opt, closure = setup(lambda m: zotune.ZOSGDConservative(m.named_parameters(), lr=1e-3))
    passes = count_parameter_passes(opt, closure)
    # perturb, perturb, restore (not fused); update to x - lr u, then to x + lr u; one more update
    # pass to x or x - lr u unless x + lr u had the lowest loss
    assert passes == 5 + (opt.last_record["choice"] != 2)
    _, opt, closure = setup(lambda m: zotune.ForwardGrad(m.named_parameters(), module=m))
    assert count_parameter_passes(opt, closure) == 2.0  # all tangents at once, then the update
    _, opt, closure = setup(lambda m: zotune.LOZO(m.named_parameters(), momentum=0.9))
    assert count_parameter_passes(opt, closure) == 3.0


def test_blockwise_passes_count_in_whole_model_units():
    model, opt, closure = setup(lambda m: zotune.ZOOptimizer(m.named_parameters(), "blockwise", lr=1e-3))
    total = sum(p.numel() for p in model.parameters())
    last_block = sum(p.numel() for p in model.l3.parameters())
    # every block: perturb, perturb, restore, and one update pass; the last block's restore is fused
    assert count_parameter_passes(opt, closure) == pytest.approx(4 - last_block / total)


def test_counting_passes_of_a_first_order_optimizer_says_what_works():
    model = TinyMLP()
    with pytest.raises(ValueError, match="ZOOptimizer"):
        count_parameter_passes(zotune.FOSGD(model.parameters(), lr=0.1), lambda: model(X).sum())
