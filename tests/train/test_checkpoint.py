"""Checkpoint files: optimizer state as safetensors + JSON, loaded back bit for bit; no pickle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import zotune
from zotune.config import OptimConfig
from zotune.methods import METHODS, build_optimizer
from zotune.testing import copies_closure
from zotune.train import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[2] / "src" / "zotune"


def tiny_model(seed=0):
    torch.manual_seed(seed)  # only the test builds its module this way; the optimizers draw their own
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))


def loss_of(model):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)
    # per-example directions: each row's loss in each copy
    return copies_closure(lambda copies: ((model(x.repeat(copies, 1)) - y.repeat(copies, 1)) ** 2).flatten())


def registry(method, **fields):
    def build(model):
        o = OptimConfig(method=method, lr=1e-3, **fields)
        return build_optimizer(o, dict(model.named_parameters()), model)
    return build


def hybrid(fo_cls):
    def build(model):
        zo = zotune.MeZO(model[0].named_parameters(), lr=1e-3)
        return zotune.HybridOptimizer(zo, fo_cls(model[2].parameters(), lr=1e-2))
    return build


CASES = {
    **{f"method:{name}": registry(name, **({"queries": 16} if m.per_example_only else {}))  # one per row
       for name, m in METHODS.items()},
    "method:lozo-m": registry("lozo", momentum=0.9, rank=2, interval=1),
    "method:mezo-sparse-q2": registry("mezo", sparsity=0.5, queries=2),
    "method:zo-adam-rademacher": registry("zo-adam", distribution="rademacher"),
    "preset:sign-elementwise": lambda m: zotune.ZOSGDSign(m.named_parameters(), lr=1e-3, mode="elementwise"),
    "preset:hizoo": lambda m: zotune.HiZOO(m.named_parameters(), lr=1e-3, hessian_smooth=1e-3),
    "preset:sparse-mezo": lambda m: zotune.SparseMeZO(m.named_parameters(), lr=1e-3, sparsity=0.5),
    "torch:adam-amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, amsgrad=True),
    "hybrid:fo-sgd": hybrid(zotune.FOSGD),  # as the training loop builds it
    "hybrid:fo-adam": hybrid(zotune.FOAdam),
}


def assert_identical(a, b, where="state"):
    """Same structure, same Python types, same bits (tensors: dtype, shape and bytes)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        bits = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, float):
        assert repr(a) == repr(b), where  # also tells -0.0 from 0.0 and keeps nan / inf
    else:
        assert a == b, where


def only_safe_files(folder: Path) -> None:
    names = sorted(f.name for f in folder.iterdir())
    assert all(n.endswith((".safetensors", ".json")) for n in names), names
    def strict(const):
        raise ValueError(f"not strict JSON: {const}")
    for f in folder.glob("*.json"):
        json.loads(f.read_text(), parse_constant=strict)


@pytest.mark.parametrize("name", list(CASES))
def test_every_optimizer_state_round_trips_bit_for_bit_without_pickle(name, tmp_path):
    model = tiny_model()
    opt = CASES[name](model)
    loss = loss_of(model)
    for _ in range(3):  # momentum / Adam buffers, step counts, LOZO's V, HiZOO's Hessian exist now
        if isinstance(opt, torch.optim.Adam) and not isinstance(opt, zotune.FOAdam):
            opt.zero_grad()
            loss().backward()
            opt.step()
        else:
            opt.step(loss)
    state = opt.state_dict()
    weights = {k: v.detach() for k, v in model.named_parameters()}
    path = ckpt.save_checkpoint(tmp_path / "ckpt-last", weights, state, {"step": 3})
    only_safe_files(path)
    tensors, loaded, meta = ckpt.load_checkpoint(path)
    assert_identical(state, loaded)
    assert_identical(weights, {k: tensors[k] for k in weights})  # safetensors keeps keys sorted
    # and a fresh optimizer takes it: the same state back out
    other = tiny_model(seed=3)
    fresh = CASES[name](other)
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.copy_(tensors[n])
    fresh.load_state_dict(loaded)
    assert_identical(opt.state_dict(), fresh.state_dict())


def test_the_encoding_keeps_every_type_the_state_can_hold(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "state": {0: {"step": torch.tensor(3.0), "buf": base.view(3, 4)}, 7: {"view": base[2:5]}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 7], "foreach": None,
                          "amsgrad": False, "name": "w"}],
        "floats": [math.inf, -math.inf, math.nan, -0.0, 5e-324, 0.1 + 0.2],
        "big": 2**80, "tuple_keys": {(1, "a"): "x", 2.5: "y", None: "z", True: "t"},
        "looks_like_a_tag": {"__tensor__": "0"}, "empty": {}, "nested": ((), [[]]),
        "dtypes": [torch.ones(2, dtype=d) for d in (torch.float16, torch.bfloat16, torch.float64,
                                                      torch.int64, torch.int8, torch.uint8, torch.bool)],
        "odd": [torch.zeros(0, 3), torch.randn(4, 3).t()],
    }
    path = ckpt.save_checkpoint(tmp_path / "c", {}, state, {"step": 0})
    only_safe_files(path)
    assert_identical(state, ckpt.load_checkpoint(path)[1])


def test_state_that_json_cannot_hold_is_refused_at_save_by_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer_state\['zo'\]\['fn'\]"):
        ckpt.save_checkpoint(tmp_path / "c", {}, {"zo": {"fn": object()}}, {"step": 0})
    assert not (tmp_path / "c").exists()


class RunsCode:
    """A pickle that writes a file when it is loaded (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("filename", ["optimizer.pt", "extra.pkl"])
def test_a_checkpoint_with_a_pickle_file_is_refused_and_never_unpickled(tmp_path, filename):
    path = ckpt.save_checkpoint(tmp_path / "ckpt-last", {"w": torch.ones(3)}, None, {"step": 1})
    marker = tmp_path / "code-ran"
    torch.save({"state": RunsCode(marker)}, path / filename)
    with pytest.raises(ckpt.CheckpointError, match=f"{filename}.*pickle") as e:
        ckpt.load_checkpoint(path)
    assert not marker.exists()
    if filename == "optimizer.pt":  # an old zotune checkpoint: say why, and what to do
        assert "older zotune" in str(e.value) and "can run code" in str(e.value)


def test_nothing_in_src_calls_torch_load():
    callers = [str(f.relative_to(SRC)) for f in SRC.rglob("*.py")
               if "torch.load(" in f.read_text() or "import pickle" in f.read_text()]
    assert not callers


def test_a_damaged_optimizer_state_is_reported_by_name(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "ckpt-last", {"w": torch.ones(3)}, {"m": torch.ones(2)}, {"step": 1})
    (path / ckpt.OPT_TENSORS).write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="ckpt-last is damaged"):
        ckpt.load_checkpoint(path)


def test_copy_weights_fills_the_tensors_one_by_one_and_names_what_is_missing(tmp_path):
    saved = {"a.w": torch.arange(6.0).view(2, 3), "b": torch.tensor([1.5, -2.0])}
    path = ckpt.save_checkpoint(tmp_path / "ckpt-best", saved, None, {"step": 7})
    named = {"a.w": torch.zeros(2, 3), "b": torch.zeros(2)}
    assert ckpt.copy_weights(path, named)["step"] == 7
    assert all(torch.equal(named[k], saved[k]) for k in saved)
    more = {"a.w": torch.zeros(2, 3), "c": torch.zeros(1)}
    with pytest.raises(ckpt.CheckpointError, match="has no tensor 'c'"):
        ckpt.copy_weights(path, more)
    assert torch.equal(more["a.w"], torch.zeros(2, 3))  # refused before any copy
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at"):
        ckpt.copy_weights(tmp_path / "nowhere", named)
    (path / "meta.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="ckpt-best is damaged: meta.json"):
        ckpt.copy_weights(path, named)


def test_a_meta_with_a_non_finite_number_is_written_as_strict_json(tmp_path):
    where = tmp_path / "ckpt-last"
    ckpt.save_checkpoint(where, {"w": torch.ones(2)}, None, {"step": 1, "loss": 0.5})
    ckpt.save_checkpoint(where, {"w": torch.zeros(2)}, None, {"step": 2, "loss": math.nan, "dev": [-math.inf]})

    def refuse(constant):
        raise AssertionError(f"meta.json holds {constant}: not strict JSON")

    meta = json.loads((where / "meta.json").read_text(), parse_constant=refuse)
    assert meta == {"step": 2, "loss": None, "dev": [None]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-last"]  # no half-written folder left
