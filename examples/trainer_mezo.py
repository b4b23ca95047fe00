"""A plain Hugging Face Trainer script, switched to MeZO by one line.

    python examples/trainer_mezo.py                        # a tiny random LLaMA, MeZO, about a minute
    python examples/trainer_mezo.py --method lozo          # any zotune ZO method (`zotune methods`)
    python examples/trainer_mezo.py --model smollm2-135m --lr 1e-5 --steps 200   # real weights (offline alias)
    python examples/trainer_mezo.py --resume               # continue from the last checkpoint in --out

Everything below is an ordinary Trainer script (data, collator, TrainingArguments, evaluation,
checkpoints); the one changed line is marked. ZOTrainer takes the lr from TrainingArguments
and the Trainer's scheduler; ZO methods need a much smaller lr than AdamW (MeZO's papers:
1e-6 to 1e-5 on real models) and use a constant schedule.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Trainer, TrainingArguments  # noqa: F401  (Trainer: the line before the switch)

from zotune.integrations import ZOTrainer
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama (random, fast) or a zotune model name")
    parser.add_argument("--method", default="mezo")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 for the tiny model, 1e-5 otherwise")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/trainer-mezo")
    parser.add_argument("--resume", action="store_true")
    cli = parser.parse_args()

    tiny = cli.model == "tiny-llama"
    loaded = tiny_model("llama") if tiny else load_model(cli.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    data = [encode(tokenizer, s, a) for s, a in REVIEWS]

    args = TrainingArguments(
        output_dir=cli.out, max_steps=cli.steps, per_device_train_batch_size=4,
        learning_rate=cli.lr or (1e-3 if tiny else 1e-5), lr_scheduler_type="constant",
        logging_steps=10, eval_strategy="steps", eval_steps=cli.steps // 2,
        save_strategy="steps", save_steps=cli.steps // 2, report_to=[], use_cpu=not torch.cuda.is_available(),
    )
    # trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
    #                   data_collator=collate(tokenizer.pad_token_id))                       # AdamW, backprop
    trainer = ZOTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                        data_collator=collate(tokenizer.pad_token_id), method=cli.method)   # <- the one changed line
    print("eval loss before:", round(trainer.evaluate()["eval_loss"], 4))
    trainer.train(resume_from_checkpoint=True if cli.resume else None)
    print("eval loss after: ", round(trainer.evaluate()["eval_loss"], 4),
          f"({trainer.zo_optimizer.forward_passes} forward passes, no backward)")


if __name__ == "__main__":
    main()
