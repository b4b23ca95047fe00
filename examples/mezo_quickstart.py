"""Fine-tune a small language model with zotune.MeZO and watch the loss fall.

    python examples/mezo_quickstart.py            # SmolLM2-135M (real weights, offline), ~2 min on 2 CPU cores
    python examples/mezo_quickstart.py --tiny     # a tiny random LLaMA, a few seconds

The whole training loop is the last ten lines: zotune optimizers take the usual
``step(closure)``, where the closure just returns the loss. No backward pass, no gradients, no
optimizer state: the model trains in about the memory of inference.
"""

from __future__ import annotations

import argparse
import time

import torch

import zotune
from zotune.lm import encode_pairs, pair_loss
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="use a tiny random model (fast, no real weights)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()

    loaded = tiny_model("llama") if args.tiny else load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    steps = args.steps or (200 if args.tiny else 60)
    lr = 3e-4 if args.tiny else 2e-5

    # The MeZO prompt for SST-2: "<sentence> It was" -> " great" / " terrible".
    batch = encode_pairs(tokenizer, [(f"{s} It was", w) for s, w in REVIEWS], max_length=64)
    opt = zotune.MeZO(model.named_parameters(), lr=lr, eps=1e-3, seed=0)

    with torch.no_grad():
        print(f"step    0  loss {float(pair_loss(loaded, batch)):.4f}")
    t0 = time.time()
    for step in range(1, steps + 1):
        loss = opt.step(lambda: pair_loss(loaded, batch))
        if step % (steps // 10) == 0:
            print(f"step {step:4d}  loss {float(loss):.4f}  ({time.time() - t0:.0f} s, {opt.forward_passes} forward passes)")
    with torch.no_grad():
        print(f"final       loss {float(pair_loss(loaded, batch)):.4f}")


if __name__ == "__main__":
    main()
