"""Paired comparison of zero-shot and MeZO-tuned SmolLM2 on the same SST-2 test rows (McNemar).

    python benchmarks/sst2_paired.py   # after: zotune bench benchmarks/grids/smollm-results.yaml

Scores the quickstart recipe's 400 test rows with the base model and with the tuned weights of the
grid's sst2-mezo-full run, counts the rows only one of them gets right, and gives the exact
two-sided McNemar p-value. Writes benchmarks/results/sst2_paired.json.
"""
import json, math, torch
from zotune.config import load_config
from zotune.train.loop import build
from zotune.train.checkpoint import load_checkpoint
from zotune.lm import score_choices
cfg = load_config("recipes/quickstart-sst2.yaml", [])
s = build(cfg)
ex = s.data.test
labels = [e.label for e in ex]
def preds():
    return score_choices(s.loaded, s.loaded.tokenizer, [list(e.choices) for e in ex], batch_size=32, max_length=64)
p0 = preds()
t, _, _ = load_checkpoint("runs/bench/smollm-results/sst2-mezo-full/ckpt-last")
with torch.no_grad():
    for n, p in s.named.items(): p.copy_(t[n])
p1 = preds()
a0 = sum(a == b for a, b in zip(p0, labels)); a1 = sum(a == b for a, b in zip(p1, labels))
b = sum(x == l and y != l for x, y, l in zip(p0, p1, labels))  # right before, wrong after
c = sum(x != l and y == l for x, y, l in zip(p0, p1, labels))  # wrong before, right after
# exact two-sided McNemar (binomial) p-value
n = b + c; k = min(b, c)
pval = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
out = {"n": len(ex), "zero_shot_acc": a0 / len(ex), "tuned_acc": a1 / len(ex), "only_zero_shot_right": b, "only_tuned_right": c, "mcnemar_exact_p": pval,
       "zero_shot_pred_positive": sum(p0), "tuned_pred_positive": sum(p1), "labels_positive": sum(labels)}
print(json.dumps(out))
json.dump(out, open("benchmarks/results/sst2_paired.json", "w"), indent=2)
