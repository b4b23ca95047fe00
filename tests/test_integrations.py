"""ZOTrainer (zotune.integrations): the Hugging Face Trainer taking zotune's ZO steps.

Tiny random LLaMA models on CPU; token rows of one length, so batches need no padding. Every
run takes a few steps: what is checked is exact (weights equal bit for bit), not statistical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator, get_scheduler

import zotune
from zotune.config import OptimConfig
from zotune.config import load_config
from zotune.integrations import ZO_STATE_DIR, TrainerFacingOptimizer, ZOTrainer
from zotune.lm import encode_pairs, pair_loss
from zotune.models import as_loaded
from zotune.methods import METHODS, build_optimizer, resolve_optim
from zotune.testing import tiny_model
from zotune.params import unique_parameters
from zotune.train.checkpoint import CheckpointError, load_checkpoint
from zotune.train.loop import BatchOrder, build, load_data, train

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

# per-example directions need a per-example closure, which the Trainer's compute_loss does not give (refused below)
ZO_METHODS = sorted(name for name, m in METHODS.items() if m.family == "zo" and not m.per_example_only)
# small but real settings: LOZO's V resampled every step, LOZO-M's momentum, FZOO's spread
OPTIONS = {"lozo": {"rank": 2, "interval": 1, "momentum": 0.5}, "fzoo": {"queries": 2}}
LR = {"zo-adam": 1e-3, "zo-sgd-sign": 1e-4, "fzoo": 1e-3}  # scale-free rules take an lr per coordinate


def rows(n=8, length=6, seed=0):
    """``n`` rows of random token ids (the labels are the inputs: plain language modelling)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (n, length), generator=g)
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-4, seed=3,
                lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"weights differ: {different[:5]}"


def plain_zo_loop(method, options, lr, seed, data, batch_size, steps, schedule="constant", warmup=0):
    """zotune's own ZOOptimizer in a plain loop: the registry's build over the same parameters
    (``unique_parameters``, every one trainable), the same batches in order, the model's own loss
    ``model(**batch).loss`` in eval mode, and the lr from the same transformers scheduler."""
    model = tiny_model("llama").model
    if method == "forward-grad":
        model.set_attn_implementation("eager")  # as ZOTrainer does: no forward-mode AD in fused attention
    o = OptimConfig(method=method, lr=lr, seed=seed, **options)
    resolve_optim(o)
    opt = build_optimizer(o, unique_parameters(model), module=model)
    sched = get_scheduler(schedule, opt, num_warmup_steps=warmup, num_training_steps=steps)
    losses = []
    for t in range(steps):
        batch = default_data_collator(data[t * batch_size:(t + 1) * batch_size])
        losses.append(float(opt.step(lambda: model(**batch).loss)))
        sched.step()
    return model, opt, losses


# ------------------------------------------------------------------------------ equality with zotune
@pytest.mark.parametrize("method", ZO_METHODS)
def test_zotrainer_equals_zotunes_own_loop(tmp_path, method):
    """Every ZO method of the registry: 2 ZOTrainer steps (sequential batches, linear schedule)
    end with exactly the weights of zotune's ZOOptimizer in a plain loop
    over the same batches with the same loss (:func:`plain_zo_loop`): same directions (seed =
    ``args.seed``), same lr at every step (the Trainer's scheduler), same loss values logged."""
    data, lr, opts = rows(4), LR.get(method, 1e-4), OPTIONS.get(method, {})
    model = tiny_model("llama").model
    before = weights(model)
    a = args(tmp_path, max_steps=2, learning_rate=lr, lr_scheduler_type="linear",
             train_sampling_strategy="sequential")
    trainer = ZOTrainer(model=model, args=a, train_dataset=data, method=method, method_options=opts)
    trainer.train()
    ref, ref_opt, ref_losses = plain_zo_loop(method, opts, lr, 3, data, 2, 2, "linear")
    assert_same(weights(model), weights(ref))
    assert any(not torch.equal(before[n], p) for n, p in weights(model).items())
    assert trainer.zo_optimizer.steps_taken == ref_opt.steps_taken == 2
    assert trainer.zo_optimizer.forward_passes == ref_opt.forward_passes
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["loss"] for e in logged] == pytest.approx(ref_losses, rel=1e-6)
    assert [e["learning_rate"] for e in logged] == pytest.approx([lr * m for m in (1.0, 0.5)])
    assert all("grad_norm" not in e for e in logged)
    assert [e["forward_passes"] for e in logged] == [ref_opt.forward_passes_per_step * k for k in (1, 2)]


class PairLossTrainer(ZOTrainer):
    """A Trainer script with its own loss, as users override ``compute_loss``: here zotune's
    ``pair_loss`` (mean NLL of the gold continuations) on batches the collator encodes."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return pair_loss(as_loaded(model), inputs["pairs"])  # the Trainer hands over its module


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")
@pytest.mark.parametrize("method,options", [("mezo", {}), ("lozo", {"momentum": 0.5, "interval": 2})])
def test_zotrainer_equals_zotune_train(tmp_path, method, options):
    """``zotune train`` (the library's entry point: SST-2 rows, nll objective, tiny LLaMA) and a
    ZOTrainer fed the same data path end with the same weights, bit for bit: the Trainer reads,
    in order (``train_sampling_strategy="sequential"``), the examples of zotune's own
    ``BatchOrder`` for each step, its collator encodes them as zotune's closure does
    (``encode_pairs``), its ``compute_loss`` is ``pair_loss``, and lr, seed and method match."""
    steps, batch = 3, 4
    cfg = load_config(None, [
        "model.name=tiny-llama", "task.name=sst2", "task.train=16", "task.dev=0", "task.test=0",
        f"task.data_root={DATA}", "task.max_length=48", f"train.batch_size={batch}", "train.objective=nll",
        f"optim.method={method}", "optim.lr=3e-4", "optim.seed=5", "train.progress=false",
        "train.tensorboard=false", "train.eval_at_start=false", f"train.steps={steps}",
        f"train.output_dir={tmp_path / 'zotune'}", *(f"optim.{k}={v}" for k, v in options.items()),
    ])
    data = load_data(cfg)
    setup = build(cfg, data=data)
    train(cfg, setup=setup)

    lm = tiny_model("llama")
    order = BatchOrder(len(data.train), batch, cfg.train.data_seed)
    ordered = [data.train[i] for t in range(steps) for i in order.indices(t)]

    def collate(examples):
        return {"pairs": encode_pairs(lm.tokenizer, [e.target for e in examples], cfg.task.max_length, kind=lm.kind)}

    a = args(tmp_path / "trainer", max_steps=steps, per_device_train_batch_size=batch, learning_rate=3e-4, seed=5,
             train_sampling_strategy="sequential")
    PairLossTrainer(model=lm.model, args=a, train_dataset=ordered, data_collator=collate, method=method,
                    method_options=options).train()
    tuned = {n: p.detach() for n, p in unique_parameters(lm.model).items()}
    assert_same({n: p.detach() for n, p in setup.named.items()}, tuned)
    start = unique_parameters(tiny_model("llama").model)
    assert any(not torch.equal(start[n], tuned[n]) for n in tuned)


def test_a_ready_optimizer_trains_as_its_method_name(tmp_path):
    """``method=zotune.LOZO(...)`` (a ready optimizer, its own lr and seed) equals
    ``method="lozo"`` with the same hyperparameters taken from TrainingArguments."""
    data = rows(6)
    m1 = tiny_model("llama").model
    ready = zotune.LOZO(m1.named_parameters(), lr=2e-4, eps=1e-3, seed=7, rank=2, interval=2, module=m1)
    ZOTrainer(model=m1, args=args(tmp_path / "a", max_steps=3, train_sampling_strategy="sequential"),
              train_dataset=data, method=ready).train()
    m2 = tiny_model("llama").model
    ZOTrainer(model=m2, args=args(tmp_path / "b", max_steps=3, learning_rate=2e-4, seed=7,
                                  train_sampling_strategy="sequential"),
              train_dataset=data, method="lozo", method_options={"rank": 2, "interval": 2}).train()
    assert_same(weights(m1), weights(m2))
    assert ready.steps_taken == 3


def test_zotrainer_lowers_the_loss(tmp_path):
    """MeZO through the Trainer on one repeated batch of four rows: the evaluation loss (the
    Trainer's own ``evaluate``) falls over 12 steps, and only forward passes were spent."""
    data = rows(4, seed=1)
    model = tiny_model("llama").model
    a = args(tmp_path, max_steps=12, per_device_train_batch_size=4, learning_rate=2e-3, logging_steps=4,
             train_sampling_strategy="sequential")
    trainer = ZOTrainer(model=model, args=a, train_dataset=data, eval_dataset=data, method="mezo")
    start = trainer.evaluate()["eval_loss"]
    trainer.train()
    end = trainer.evaluate()["eval_loss"]
    assert end < start - 0.05, (start, end)
    assert all(p.grad is None for p in model.parameters())
    assert trainer.zo_optimizer.forward_passes == 24


# ------------------------------------------------------------------------------ checkpoints and resume
class StopAt(TrainerCallback):
    """Stops training after step ``k`` (a kill right after a checkpoint)."""

    def __init__(self, k):
        self.k = k

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.k:
            control.should_training_stop = True


@pytest.mark.parametrize("method,opts", [("lozo", {"rank": 2, "interval": 2, "momentum": 0.5}), ("zo-adam", {})])
def test_resume_is_bit_for_bit(tmp_path, method, opts):
    """6 steps straight == 3 steps, checkpoint, a fresh model and trainer resumed from it, 3 more:
    all weights equal exactly. Shuffled batches and a linear schedule, so the data order, the lr
    and the optimizer state (LOZO-M's momentum and V, ZO-Adam's moments) must all come back."""
    data = rows(8)
    kw = dict(max_steps=6, learning_rate=1e-3, lr_scheduler_type="linear", save_strategy="steps", save_steps=3)
    straight = tiny_model("llama").model
    ZOTrainer(model=straight, args=args(tmp_path / "straight", **kw), train_dataset=data, method=method,
              method_options=opts).train()

    first = tiny_model("llama").model
    ZOTrainer(model=first, args=args(tmp_path / "cut", **kw), train_dataset=data, method=method,
              method_options=opts, callbacks=[StopAt(3)]).train()
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert not (tmp_path / "cut" / "checkpoint-6").exists()
    resumed = tiny_model("llama").model  # the initial weights: the checkpoint's must be loaded
    trainer = ZOTrainer(model=resumed, args=args(tmp_path / "cut", **kw), train_dataset=data, method=method,
                        method_options=opts)
    trainer.train(resume_from_checkpoint=True)
    assert_same(weights(resumed), weights(straight))
    assert trainer.zo_optimizer.steps_taken == 6

    # the ZO state is zotune's checkpoint format, readable without the Trainer, nothing pickled
    _, state, meta = load_checkpoint(ckpt / ZO_STATE_DIR)
    assert meta["step"] == 3 and meta["method"] == method
    assert state["zo"]["steps_taken"] == 3
    assert not [f for f in (ckpt / ZO_STATE_DIR).iterdir() if f.suffix in (".pt", ".bin", ".pkl", ".pth")]
    # the Trainer's optimizer.pt keeps only the groups' hyperparameters
    pt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert pt["state"] == {} and pt["param_groups"][0]["lr"] == pytest.approx(1e-3 * 3 / 6)


def test_resume_without_zo_state_is_refused(tmp_path):
    """A checkpoint of a plain Trainer (or one saved with save_only_model) has no ZO state:
    resuming from it is refused by name rather than silently restarting the optimizer."""
    data = rows(4)
    a = args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, optim="sgd", learning_rate=0.0)
    Trainer(model=tiny_model("llama").model, args=a, train_dataset=data).train()
    trainer = ZOTrainer(model=tiny_model("llama").model, args=args(tmp_path, max_steps=2), train_dataset=data)
    with pytest.raises(CheckpointError, match=f"holds no ZO optimizer state \\({ZO_STATE_DIR}/\\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


# ------------------------------------------------------------------------------ gradient accumulation
def test_gradient_accumulation_is_one_step_over_every_micro_batch(tmp_path):
    """Batches of 2 accumulated twice take the same steps as batches of 4 (to float rounding:
    the loss is summed by micro-batch), one ZO step per optimizer step, its loss logged once."""
    data = rows(8)
    m1, m2 = tiny_model("llama").model, tiny_model("llama").model
    t1 = ZOTrainer(model=m1, args=args(tmp_path / "a", max_steps=2, per_device_train_batch_size=2,
                                       gradient_accumulation_steps=2, learning_rate=1e-3,
                                       train_sampling_strategy="sequential"), train_dataset=data)
    t1.train()
    t2 = ZOTrainer(model=m2, args=args(tmp_path / "b", max_steps=2, per_device_train_batch_size=4,
                                       learning_rate=1e-3, train_sampling_strategy="sequential"), train_dataset=data)
    t2.train()
    assert t1.zo_optimizer.steps_taken == t2.zo_optimizer.steps_taken == 2
    # float32 losses differ in their last bits, and c = (L+ - L-) / (2 eps) multiplies that by
    # 1 / (2 eps): the two runs agree to within 1 % of the distance they moved
    w1, w2, w0 = weights(m1), weights(m2), weights(tiny_model("llama").model)
    moved = max(float((w1[n] - w0[n]).abs().max()) for n in w1)
    apart = max(float((w1[n] - w2[n]).abs().max()) for n in w1)
    assert moved > 1e-4 and apart < 0.01 * moved, (moved, apart)
    l1 = [e["loss"] for e in t1.state.log_history if "loss" in e]
    l2 = [e["loss"] for e in t2.state.log_history if "loss" in e]
    assert l1 == pytest.approx(l2, rel=1e-5)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs,error", [
    (dict(method="mezzo"), "Unknown method 'mezzo'. Did you mean 'mezo'?"),
    (dict(method="fo-adam"), "method='fo-adam' is first-order"),
    (dict(method="mezo", method_options={"epss": 1e-3}), "Unknown option 'epss'. Did you mean 'eps'?"),
    (dict(method="mezo", method_options={"schedule": "cosine"}), "TrainingArguments.lr_scheduler_type"),
    (dict(method="mezo", method_options={"schedule_over": "seconds"}), "TrainingArguments.lr_scheduler_type"),
    (dict(method="mezo", method_options={"eps": -1.0}), "optim.eps must be > 0"),
    (dict(method="lozo", method_options={"perturbation": "dual"}), "'dual' runs the batch twice"),
    (dict(method=3), "method must be a zotune method name or a ZOOptimizer"),
])
def test_bad_methods_and_options_are_refused_at_construction(tmp_path, kwargs, error):
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        ZOTrainer(model=tiny_model("llama").model, args=args(tmp_path, max_steps=1), train_dataset=rows(2),
                  **kwargs)


def test_unsupported_training_arguments_are_refused(tmp_path):
    model = tiny_model("llama").model
    with pytest.raises(ValueError, match="does not support fp16=True / bf16=True"):
        ZOTrainer(model=model, args=args(tmp_path, max_steps=1, bf16=True), train_dataset=rows(2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="leave optimizers unset"):
        ZOTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows(2), optimizers=(sgd, None))
    with pytest.raises(ValueError, match="method_options apply to a method name"):
        ZOTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=rows(2),
                  method=zotune.MeZO(model.named_parameters()), method_options={"eps": 1e-2})


def test_a_ready_optimizer_over_other_tensors_is_refused(tmp_path):
    other = tiny_model("llama").model
    trainer = ZOTrainer(model=tiny_model("llama").model, args=args(tmp_path, max_steps=1), train_dataset=rows(2),
                        method=zotune.MeZO(other.named_parameters()))
    with pytest.raises(ValueError, match="not parameters of the Trainer's model"):
        trainer.train()


def test_trainer_facing_optimizer_shares_groups_and_refuses_a_bare_step():
    """The Trainer's view: the lr written into its groups is the ZO optimizer's; its state_dict
    is the groups alone and loads back in place; a bare step() with no ZO step taken is refused."""
    model = tiny_model("llama").model
    zo = zotune.MeZO(model.named_parameters(), lr=1e-3)
    facing = TrainerFacingOptimizer(zo)
    facing.param_groups[0]["lr"] = 5e-4
    assert zo.param_groups[0]["lr"] == 5e-4
    sd = facing.state_dict()
    assert sd["state"] == {} and sd["param_groups"][0]["params"] == list(range(len(zo.leaves)))
    json.dumps(sd)  # plain numbers: nothing of the ZO state goes through the Trainer's torch.save
    zo.param_groups[0]["lr"] = 1.0
    facing.load_state_dict(sd)
    assert zo.param_groups[0]["lr"] == 5e-4 and facing.param_groups is zo.param_groups
    with pytest.raises(RuntimeError, match="ZOTrainer takes the ZO step in training_step"):
        facing.step()
    with pytest.raises(ValueError, match="does not match this ZO optimizer"):
        facing.load_state_dict({"state": {}, "param_groups": [{"params": [0], "lr": 1.0}]})


@pytest.mark.parametrize("method,options", [("per-example", {}), ("mezo", {"perturbation": "per_example"})])
def test_zotrainer_refuses_per_example_directions(tmp_path, method, options):
    with pytest.raises(ValueError, match="per-example directions need every example's loss"):
        ZOTrainer(model=tiny_model("llama").model, args=args(tmp_path, max_steps=1), train_dataset=rows(4),
                  method=method, method_options=options)
