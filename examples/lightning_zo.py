"""MeZO (or any zotune optimizer) in PyTorch Lightning, with manual optimisation.

    pip install lightning                                  # not a zotune dependency
    python examples/lightning_zo.py                        # a tiny random LLaMA, MeZO, under a minute
    python examples/lightning_zo.py --method lozo          # any zotune preset (zotune.PRESETS)
    python examples/lightning_zo.py --resume               # continue from --out/last.ckpt

A ZO optimizer calls its closure several times per step (at x + eps z, then x - eps z), so the
LightningModule turns automatic optimisation off and hands the closure to ``opt.step``:
``self.automatic_optimization = False``; ``loss = opt.step(lambda: self.model(**batch).loss)``.
No ``manual_backward``, no gradients. Lightning calls ``on_before_optimizer_step`` after each
closure evaluation (twice per MeZO step) and keeps the optimizer state in its ``.ckpt`` (a
pickle, as for every optimizer there); zotune's own checkpoints and ``ZOTrainer`` store it as
safetensors + JSON instead.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader

import zotune
from zotune.models import load_model
from zotune.testing import tiny_model

REVIEWS = [
    ("a gorgeous, witty, seductive movie", " great"),
    ("the acting is terrible and the plot makes no sense", " terrible"),
    ("an utterly charming and hilarious film", " great"),
    ("a dull, lifeless, boring mess", " terrible"),
    ("one of the best films of the year", " great"),
    ("i walked out after twenty minutes", " terrible"),
    ("warm, funny and beautifully acted", " great"),
    ("a waste of a talented cast", " terrible"),
]


def encode(tokenizer, sentence: str, answer: str) -> dict:
    """Prompt then answer; only the answer's tokens are labels (-100: not scored)."""
    prompt = tokenizer(f"{sentence} It was")["input_ids"]
    target = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}


def collate(pad_id: int):
    def pad(rows: list[dict]) -> dict:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [pad_id] * (n - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return pad


class ZOLanguageModel(L.LightningModule):
    def __init__(self, model: torch.nn.Module, method: str = "mezo", lr: float = 1e-3, eps: float = 1e-3,
                 steps: int = 60) -> None:
        super().__init__()
        self.model, self.method, self.lr, self.eps, self.steps = model, method, lr, eps, steps
        self.automatic_optimization = False  # the ZO step evaluates the loss itself, several times

    def configure_optimizers(self):
        preset = zotune.PRESETS[self.method]
        kwargs = {"module": self.model} if self.method == "forward-grad" else {"eps": self.eps}
        opt = preset(self.model.named_parameters(), lr=self.lr, seed=0, **kwargs)
        # lr of step t = lr * multiplier(t): a plain torch scheduler over the ZO optimizer's groups
        sched = torch.optim.lr_scheduler.LambdaLR(opt, zotune.lr_multiplier("constant", self.steps))
        return [opt], [sched]

    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        self.model.eval()  # no dropout: both perturbed losses must see the same function
        loss = opt.step(lambda: self.model(**batch).loss)  # a ZO step: forward passes only
        sched.step()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(**batch).loss, prog_bar=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama (random, fast) or a zotune model name")
    parser.add_argument("--method", default="mezo", choices=sorted(zotune.PRESETS))
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 for the tiny model, 1e-5 otherwise")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/lightning-zo")
    parser.add_argument("--resume", action="store_true")
    cli = parser.parse_args()

    tiny = cli.model == "tiny-llama"
    loaded = tiny_model("llama") if tiny else load_model(cli.model)
    data = [encode(loaded.tokenizer, s, a) for s, a in REVIEWS]
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate(loaded.tokenizer.pad_token_id),
                        generator=torch.Generator().manual_seed(0))
    val = DataLoader(data, batch_size=8, collate_fn=collate(loaded.tokenizer.pad_token_id))
    module = ZOLanguageModel(loaded.model, cli.method, cli.lr or (1e-3 if tiny else 1e-5), steps=cli.steps)
    trainer = L.Trainer(max_steps=cli.steps, accelerator="auto", devices=1, logger=False, default_root_dir=cli.out,
                        val_check_interval=cli.steps // 2, check_val_every_n_epoch=None, log_every_n_steps=10,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=cli.out, save_last=True)])
    trainer.validate(module, val)
    trainer.fit(module, loader, val, ckpt_path="last" if cli.resume else None)
    print(f"{trainer.optimizers[0].forward_passes} forward passes, no backward; "
          f"val loss {float(trainer.callback_metrics['val_loss']):.4f}")


if __name__ == "__main__":
    main()
