"""ZOTrainer: the Hugging Face ``Trainer`` with zeroth-order steps (MeZO, LOZO, any zotune method).

An existing Trainer script switches to MeZO by one line; everything else (``TrainingArguments``,
data collator, logging, evaluation, saving, ``resume_from_checkpoint``, callbacks) stays::

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev)
    trainer = ZOTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev, method="mezo")

How it fits into the Trainer, through its public hooks only (its training loop is not copied):

- ``create_optimizer`` builds the ZO optimizer (``zotune.methods.build_optimizer``) over the
  trainable parameters (``requires_grad``, tied weights once) and gives the Trainer a
  :class:`TrainerFacingOptimizer` that shares its ``param_groups``.
- ``training_step`` takes the whole ZO step: ``ZOOptimizer.step(closure)``, where the closure
  re-evaluates ``compute_loss`` on the step's batch (every micro-batch when
  ``gradient_accumulation_steps > 1``), with the model in eval mode (dropout off: the perturbed
  losses must differ by the perturbation alone, as in MeZO) and under ``torch.no_grad``. No
  backward pass, no gradients, no AdamW state. The Trainer's own ``optimizer.step()`` that
  follows is a no-op; ``max_grad_norm`` has nothing to clip, and ``grad_norm`` is left out of
  the logs (``forward_passes`` is logged instead).
- The learning rate of step ``t`` is the Trainer's: its scheduler (``lr_scheduler_type``,
  ``warmup_steps`` ...) scales the base lr, which is ``args.learning_rate`` (or
  ``method_options["lr"]`` when given, or a ready optimizer's own lr); the ``learning_rate``
  logged for a step is the one it used. Note the Trainer's default schedule is ``linear`` (to
  0); MeZO's papers use ``constant``.
- Each checkpoint gets the ZO optimizer's state beside the Trainer's files, in
  ``checkpoint-N/zotune_optimizer/`` in zotune's checkpoint format (``optimizer.safetensors`` +
  ``optimizer.json``, nothing pickled; see :mod:`zotune.train.checkpoint`); its
  ``weights.safetensors`` is empty because the Trainer's ``model.safetensors`` holds the weights.
  The Trainer's ``optimizer.pt`` holds only the groups' learning rates.
  ``train(resume_from_checkpoint=...)`` reads the ZO state back, so a resumed run ends with the
  weights of an uninterrupted one, bit for bit on CPU.

Not supported (refused with the reason): mixed precision (``fp16`` / ``bf16``: load the model
in the dtype to train instead), DeepSpeed, FSDP and multi-process or multi-GPU data parallelism
(use ``zotune train`` under ``torchrun``), first-order methods (use the plain ``Trainer``),
``perturbation: dual`` (its closure runs the batch twice over), per-example directions (their
closure returns every example's loss) and hybrid ZO/FO.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from zotune._validate import unknown_choice
from zotune.config import Config, OptimConfig, validate
from zotune.methods import METHODS, build_optimizer, resolve_optim
from zotune.params import unique_parameters
from zotune.step import ZOOptimizer
from zotune.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint

#: the folder inside each ``checkpoint-N`` that holds the ZO optimizer's state
ZO_STATE_DIR = "zotune_optimizer"

#: OptimConfig fields that ``method_options`` may not set, and where the setting lives instead
_NOT_OPTIONS = {
    "method": "pass the method as ZOTrainer(method=...)",
    "schedule": "the Trainer's scheduler sets the lr of every step: use TrainingArguments.lr_scheduler_type",
    "warmup_steps": "the Trainer's scheduler sets the lr of every step: use TrainingArguments.warmup_steps",
    "schedule_over": "the Trainer's scheduler sets the lr of every step: use TrainingArguments.lr_scheduler_type",
    "fo_lr": "hybrid ZO/FO training is not supported by ZOTrainer (use `zotune train` with trainable.zo_layers)",
}


def zo_methods() -> list[str]:
    """The registry's zeroth-order methods: the names ``ZOTrainer(method=...)`` takes."""
    return sorted(name for name, m in METHODS.items() if m.family == "zo")


class TrainerFacingOptimizer(torch.optim.Optimizer):
    """The optimizer the Trainer holds: a view of a ZO optimizer whose step was already taken.

    Like accelerate's ``AcceleratedOptimizer`` it wraps another optimizer without running
    ``Optimizer.__init__``: ``param_groups`` *are* the ZO optimizer's groups, so the lr the
    Trainer's scheduler writes is the lr the next ZO step uses. ``step()`` without a closure is
    the Trainer's call after ``ZOTrainer.training_step`` took the ZO step, and does nothing;
    with a closure it takes a ZO step. ``state_dict()`` holds the groups' hyperparameters only
    (the Trainer pickles it into ``optimizer.pt``); the ZO state is saved by
    :meth:`ZOTrainer.save_zo_state` as safetensors + JSON.
    """

    def __init__(self, zo: ZOOptimizer) -> None:  # no super().__init__: a view, as AcceleratedOptimizer
        if not isinstance(zo, ZOOptimizer):
            raise ValueError(f"TrainerFacingOptimizer wraps a zotune ZOOptimizer, got {type(zo).__name__}")
        self.zo = zo
        self.step_taken = False  # set by ZOTrainer.training_step, cleared by step()

    @property
    def param_groups(self) -> list[dict]:
        return self.zo.param_groups

    @property
    def defaults(self) -> dict:
        return self.zo.defaults

    @property
    def state(self):
        return self.zo.state

    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            return self.zo.step(closure)
        if not self.step_taken:
            raise RuntimeError(
                "optimizer.step() without a closure: ZOTrainer takes the ZO step in training_step, which has not "
                "run since the last step; to step by hand, pass the closure: optimizer.step(lambda: loss)"
            )
        self.step_taken = False
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zo.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        groups, start = [], 0
        for g in self.zo.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        return {"state": {}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the groups' hyperparameters (lr ...) in place: the groups stay the ZO optimizer's."""
        saved = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        mine = self.zo.param_groups
        if saved is None or len(saved) != len(mine) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved, mine)):
            shape = None if saved is None else [len(s.get("params", ())) for s in saved]
            raise ValueError(f"optimizer state with param groups of sizes {shape} does not match this ZO "
                             f"optimizer's {[len(g['params']) for g in mine]}")
        for group, s in zip(mine, saved):
            group.update({k: v for k, v in s.items() if k != "params"})


class _SaveZOState(TrainerCallback):
    """Writes the ZO state into each checkpoint folder the Trainer has just saved."""

    def __init__(self, trainer: ZOTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        if args.should_save and not args.save_only_model:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            self.trainer.save_zo_state(folder)


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a zotune zeroth-order method (see the module
    docstring for how it hooks in, which lr it uses, and what it refuses).

    Args (besides every ``Trainer`` argument):
        method: a method name of :data:`zotune.methods.METHODS` (``mezo``, ``lozo``,
            ``zo-adam``, ``fzoo`` ...; ``zotune methods`` lists them), or a ready
            :class:`~zotune.step.ZOOptimizer` over the model's parameters (``zotune.LOZO(...)``),
            which keeps its own lr, eps, seed and parameter groups.
        method_options: the method's hyperparameters, as fields of ``optim`` in a zotune recipe
            (``eps``, ``queries``, ``rank``, ``interval``, ``momentum`` ...). ``lr``,
            ``weight_decay`` and ``seed`` default to ``args.learning_rate``,
            ``args.weight_decay`` (decoupled, applied to matrices only) and ``args.seed``.

    Example::

        args = TrainingArguments("out", max_steps=1000, learning_rate=1e-5, lr_scheduler_type="constant",
                                 per_device_train_batch_size=16, logging_steps=10, save_steps=100)
        trainer = ZOTrainer(model=model, args=args, train_dataset=train, method="lozo",
                            method_options={"eps": 1e-3, "rank": 2, "interval": 50})
        trainer.train()                              # later: trainer.train(resume_from_checkpoint=True)
    """

    def __init__(self, *args, method: str | ZOOptimizer = "mezo", method_options: Mapping | None = None, **kwargs):
        self.zo_optimizer: ZOOptimizer | None = None
        self._ready = None
        self._zo_options: dict = {}
        if isinstance(method, ZOOptimizer):
            if method_options:
                raise ValueError("method_options apply to a method name; a ready optimizer carries its own "
                                 f"hyperparameters (got method_options={dict(method_options)!r})")
            self._ready, self.zo_method = method, type(method).__name__
        elif isinstance(method, str):
            self.zo_method, self._zo_options = method, _check_options(method, method_options)
        else:
            raise ValueError(f"method must be a zotune method name or a ZOOptimizer, got {type(method).__name__}: "
                             f"{method!r}")
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ValueError("ZOTrainer builds its optimizer and the Trainer its scheduler: leave optimizers unset "
                             "and pass a ready zotune optimizer as method=...")
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError("optimizer_cls_and_kwargs does not apply to ZOTrainer: choose the method with "
                             "method=... and its hyperparameters with method_options=...")
        super().__init__(*args, **kwargs)
        _check_args(self.args)
        self.zo_config = None if self._ready is not None else self._optim_config()
        self._zo_micro_batches: list = []
        self._zo_resume: str | None = None
        self.add_callback(_SaveZOState(self))

    # ------------------------------------------------------------------ configuration
    def _optim_config(self) -> OptimConfig:
        """The method's ``optim`` config: options over the TrainingArguments' lr, weight decay and
        seed; validated with zotune's own config checks before any training."""
        a = self.args
        o = OptimConfig(method=self.zo_method, lr=a.learning_rate, weight_decay=a.weight_decay, seed=a.seed)
        for key, value in self._zo_options.items():
            setattr(o, key, value)
        resolve_optim(o)
        method = METHODS.get(o.method)
        if o.perturbation == "per_example" or (method is not None and method.per_example_only):
            # refused outright: the config's other checks (queries against a batch size the Trainer sets) are moot
            raise ValueError(f"ZOTrainer method={self.zo_method!r}: per-example directions need every example's loss "
                             "from one forward of the batch twice over, which the Trainer's compute_loss (one mean "
                             "loss) does not give; train with `zotune train`, or zotune.PerExampleMeZO with a "
                             "per-example closure")
        errors = [e for e in validate(Config(optim=o)) if e.startswith("optim.")]
        if o.perturbation == "dual":
            errors.append("optim.perturbation: 'dual' runs the batch twice over in one forward, which the "
                          "Trainer's compute_loss does not; use inplace, swap or side (or auto)")
        if errors:
            raise ValueError(f"ZOTrainer method={self.zo_method!r}: " + "; ".join(errors))
        return o

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        """Build the ZO optimizer once (or take the ready one), and read its state back when
        ``train`` resumes from a checkpoint."""
        if self.optimizer is None:
            target = self.model
            if self._ready is not None:
                zo = self._ready
                owned = {id(p) for p in target.parameters()}
                if any(id(p) not in owned for p in zo.leaves):
                    raise ValueError("the ready ZO optimizer (method=...) trains tensors that are not parameters "
                                     "of the Trainer's model; build it over model.named_parameters()")
            else:
                named = {n: p for n, p in unique_parameters(target).items() if p.requires_grad}
                if not named:
                    raise ValueError("the model has no parameter with requires_grad=True: nothing to train")
                if self.zo_method == "forward-grad" and hasattr(target, "set_attn_implementation"):
                    target.set_attn_implementation("eager")  # torch's fused CPU attention has no forward-mode AD
                zo = build_optimizer(copy.deepcopy(self.zo_config), named, module=target)
            self.zo_optimizer, self._facing = zo, TrainerFacingOptimizer(zo)
            self.optimizer = self._facing  # accelerate wraps it in train()
        if self._zo_resume is not None:
            where, self._zo_resume = self._zo_resume, None
            self.load_zo_state(where)
        return self.optimizer

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """``Trainer.train``; a resumed run also reads the ZO optimizer's state from the checkpoint."""
        if resume_from_checkpoint is True:
            out = self.args.output_dir
            resume_from_checkpoint = get_last_checkpoint(out) if out and os.path.isdir(out) else None
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({out})")
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        self._zo_resume = None if resume_from_checkpoint is None else str(resume_from_checkpoint)
        self._zo_micro_batches = []
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # ------------------------------------------------------------------ the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """One ZO step per optimizer step: micro-batches are collected until the step's last one
        (``gradient_accumulation_steps``), which takes the step on all of them and returns its
        loss (the others return 0, so the Trainer's logged loss is the step's)."""
        self._zo_micro_batches.append(_to_device(inputs, self.args.device))
        expected = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if len(self._zo_micro_batches) < expected:
            return torch.zeros((), device=self.args.device)
        batches, self._zo_micro_batches = self._zo_micro_batches, []
        if self.zo_optimizer is None:
            self.create_optimizer()
        model.eval()  # no dropout: both perturbed losses must see the same function
        loss = self.zo_optimizer.step(self.zo_closure(model, batches, num_items_in_batch))
        self._facing.step_taken = True  # the Trainer's optimizer.step() that follows is then a no-op
        return loss.detach().to(self.args.device)

    def zo_closure(self, model, batches: list, num_items_in_batch=None):
        """The closure of a ZO step: the loss of the whole (accumulated) batch as the Trainer
        would backpropagate it, ``sum_m compute_loss(micro-batch m)``, each divided by the number
        of micro-batches unless the loss is already normalised over the whole batch
        (``num_items_in_batch`` passed to the model, ``compute_loss_func``, or
        ``loss_is_scaled_for_ga``), exactly as ``Trainer.training_step`` scales it."""
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        parts = len(batches)

        def closure():
            total = None
            for inputs in batches:
                with self.compute_loss_context_manager():
                    # a copy: compute_loss may pop "labels" from what it is given
                    loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
                if not scaled:
                    loss = loss / parts
                total = loss if total is None else total + loss
            return total

        return closure

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """No ``grad_norm`` (there are no gradients); ``forward_passes`` so far instead."""
        logs = {k: v for k, v in logs.items() if k != "grad_norm"}
        zo = self.zo_optimizer
        if zo is not None and "loss" in logs:
            logs["forward_passes"] = zo.forward_passes
            if zo.skipped_steps:
                logs["skipped_steps"] = zo.skipped_steps
        super().log(logs, start_time)

    # ------------------------------------------------------------------ ZO state in checkpoints
    def save_zo_state(self, checkpoint_dir: str | os.PathLike) -> Path | None:
        """Write the ZO optimizer's state into ``checkpoint_dir/zotune_optimizer`` (atomically)."""
        if self.zo_optimizer is None:
            return None
        folder = Path(checkpoint_dir)
        if not folder.is_dir():
            raise CheckpointError(f"cannot save the ZO state: the Trainer's checkpoint folder {folder} does not "
                                  "exist (ZOTrainer does not support hyperparameter_search)")
        meta = {"step": self.state.global_step, "method": self.zo_method, "written_by": "zotune.integrations.ZOTrainer"}
        return save_checkpoint(folder / ZO_STATE_DIR, {}, self.zo_optimizer.state_dict(), meta)

    def load_zo_state(self, checkpoint_dir: str | os.PathLike) -> None:
        """Read the ZO optimizer's state back from a checkpoint this trainer's kind wrote."""
        where = Path(checkpoint_dir) / ZO_STATE_DIR
        if find_checkpoint(where) is None:
            raise CheckpointError(
                f"{checkpoint_dir} holds no ZO optimizer state ({ZO_STATE_DIR}/): ZOTrainer resumes from checkpoints "
                "it wrote itself with save_only_model=False. To start afresh from these weights, load them as the "
                "model and train without resume_from_checkpoint"
            )
        device = self.zo_optimizer.leaves[0].device
        _, state, meta = load_checkpoint(where, map_location=device)
        if state is None:
            raise CheckpointError(f"{where} holds no optimizer state")
        if meta.get("step") != self.state.global_step:
            raise CheckpointError(f"{where} is the ZO state of step {meta.get('step')}, but the Trainer's state in "
                                  f"{checkpoint_dir} is at step {self.state.global_step}")
        try:
            self.zo_optimizer.load_state_dict(state)
        except ValueError as e:
            raise CheckpointError(f"{where}: {e}") from e


# ---------------------------------------------------------------------------- checks
def _check_options(method: str, options: Mapping | None) -> dict:
    """The method name and its options, refused with the reason before anything is built."""
    if method not in METHODS:
        raise ValueError(unknown_choice("method", method, zo_methods()))
    if METHODS[method].family != "zo":
        raise ValueError(f"method={method!r} is first-order (backpropagation): use transformers.Trainer for it. "
                         f"ZOTrainer takes the zeroth-order methods: {', '.join(zo_methods())}")
    options = dict(options or {})
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    for key in options:
        if key in _NOT_OPTIONS:
            raise ValueError(f"method_options[{key!r}]: {_NOT_OPTIONS[key]}")
        if key not in fields:
            raise ValueError("method_options: " + unknown_choice("option", key, fields - set(_NOT_OPTIONS)))
    return options


def _check_args(args) -> None:
    """TrainingArguments a ZO step cannot honour, each refused with what to do instead."""
    if args.fp16 or args.bf16:
        raise ValueError(
            "ZOTrainer does not support fp16=True / bf16=True: mixed precision autocasts the forward, which rounds "
            "the +-eps perturbations of float32 weights away; load the model in the dtype to train in "
            "(zotune trains float16 / bfloat16 weights directly) and leave fp16 / bf16 off"
        )
    if args.deepspeed or args.fsdp:
        raise ValueError("ZOTrainer does not support DeepSpeed or FSDP: a ZO step needs no sharded optimizer "
                         "state; for data-parallel ZO use `zotune train` under torchrun")
    if args.world_size > 1 or args.n_gpu > 1:
        raise ValueError(
            f"ZOTrainer runs on one process and one device (world_size={args.world_size}, n_gpu={args.n_gpu}): "
            "data-parallel ZO all-reduces scalars, which the Trainer's DDP does not; use `zotune train` under "
            "torchrun, or CUDA_VISIBLE_DEVICES to pick one GPU"
        )


def _to_device(inputs, device):
    """The batch's tensors on ``device`` (accelerate's data loader has usually put them there)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return {k: _to_device(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to_device(v, device) for v in inputs)
    return inputs
