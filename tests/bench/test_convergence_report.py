"""benchmarks/convergence.py: forward passes and seconds to the target against the reference's budget."""

from __future__ import annotations

import pytest


def run(seed, points, fwd=500):
    return {"seed": seed, "forward_passes": fwd,
            "points": [{"forward_passes": f, "seconds": s, "dev_accuracy": a} for f, s, a in points]}


def test_shares_of_the_reference_budget_per_seed(benchmark_script):
    conv = benchmark_script("convergence")
    # the reference: 500 forward passes in 600 s and 400 s (mean budget 500 s)
    ref = [run(0, [(250, 300, 0.60), (500, 600, 0.64)]), run(1, [(250, 200, 0.66), (500, 400, 0.63)])]
    fast = [run(0, [(54, 25, 0.58), (108, 50, 0.65)], fwd=504),   # 108 / 500 fwd, 50 / 500 s: met
            run(1, [(162, 74, 0.64)], fwd=504),                   # 0.324 and 0.148: met
            run(2, [(324, 148, 0.70)], fwd=504),                  # 0.648 of the forward passes: not met
            run(3, [(504, 200, 0.60)], fwd=504)]                  # never reached
    out = conv.against_reference(fast, ref, target=0.635)
    assert out["reference_forward_passes"] == 500 and out["reference_seconds"] == 500
    shares = [(x["fwd_share"], x["seconds_share"]) for x in out["per_seed"]]
    assert shares[:3] == [pytest.approx((0.216, 0.1)), pytest.approx((0.324, 0.148)), pytest.approx((0.648, 0.296))]
    assert shares[3] == (None, None)
    assert [x["met"] for x in out["per_seed"]] == [True, True, False, False]
    assert out["met_seeds"] == 2 and out["seeds"] == 4
    # the seconds matter too: a third of the forward passes in more than half the time is not met
    slow = conv.against_reference([run(0, [(150, 260, 0.64)])], ref, target=0.635)
    assert slow["per_seed"][0]["fwd_share"] == pytest.approx(0.3) and not slow["per_seed"][0]["met"]


def test_fastest_lr_is_the_one_reaching_the_target_soonest_on_the_base_seed(benchmark_script):
    conv = benchmark_script("convergence")

    def sweep(method, lr, seed, points):
        return {**run(seed, points), "method": method, "lr": lr}

    runs = [sweep("mezo (prefix)", 1e-2, 0, [(100, 50, 0.60), (220, 103, 0.64), (500, 230, 0.715)]),  # ends highest
            sweep("mezo (prefix)", 3e-2, 0, [(80, 36, 0.67), (500, 230, 0.62)]),                      # gets there first
            sweep("mezo (prefix)", 3e-2, 1, [(40, 18, 0.70)]),       # another seed: never the one chosen on
            sweep("mezo (prefix)", 3e-3, 0, [(500, 230, 0.61)]),     # never reaches it
            sweep("fzoo", 1e-3, 0, [(270, 227, 0.64)]), sweep("fzoo", 3e-3, 0, [(270, 300, 0.64)])]
    fastest = conv.fastest_to_target(runs, target=0.635, base_seed=0)
    assert fastest["mezo (prefix)"]["lr"] == 3e-2 and fastest["mezo (prefix)"]["seed"] == 0
    assert fastest["fzoo"]["lr"] == 1e-3                            # same forward passes: fewer seconds wins
    assert conv.fastest_to_target(runs, target=0.9, base_seed=0) == {}


def test_method_labels_keep_schemes_and_prefix_lengths_apart(benchmark_script):
    label = benchmark_script("convergence").method_label
    assert label({"optim.method": "mezo"}) == "mezo"
    assert label({"optim.method": "mezo", "trainable.scheme": "full"}) == "mezo"
    assert label({"optim.method": "fzoo", "trainable.scheme": "prefix"}) == "fzoo (prefix)"
    assert label({"optim.method": "mezo", "trainable.scheme": "prefix", "trainable.prefix_tokens": 1}) == "mezo (prefix, 1 token)"
    assert label({"optim.method": "mezo", "trainable.scheme": "prefix", "trainable.prefix_tokens": 10}) == "mezo (prefix, 10 tokens)"
    assert label({"optim.method": "mezo", "trainable.scheme": "prefix",
                  "trainable.prefix_values_only": True}) == "mezo (prefix, values only)"
    assert label({"optim.method": "mezo", "trainable.scheme": "prefix", "trainable.prefix_tokens": 1,
                  "trainable.prefix_values_only": True}) == "mezo (prefix, 1 token, values only)"


def test_paired_test_against_zero_shot_from_the_kept_rows(benchmark_script, tmp_path):
    import json

    conv = benchmark_script("convergence")
    assert conv.test_against_zero_shot(tmp_path) is None  # rows not kept: no test, not a pass
    # 10 rows only the tuned model gets right, none the other way: exact McNemar p = 2 / 2**10
    rows = {"zero_shot": [0.0] * 10 + [1.0] * 20, "tuned": [1.0] * 30}
    (tmp_path / "test_rows.json").write_text(json.dumps(rows))
    out = conv.test_against_zero_shot(tmp_path)
    assert out["p"] == pytest.approx(2 / 2**10) and out["n"] == 30 and out["better"]


def test_a_smaller_batch_is_its_own_row_and_its_passes_count_its_rows(benchmark_script, tmp_path):
    """1,000 steps of 4 rows run as many rows as 250 steps of 16: they count as 500 forward passes of
    the grid's batch, not 2,000, so a small batch is not flattered in the forward-pass columns."""
    import json

    conv = benchmark_script("convergence")
    assert conv.method_label({"optim.method": "mezo", "trainable.scheme": "prefix",
                              "train.batch_size": 4}) == "mezo (prefix, batch 4)"
    assert conv.method_label({"optim.method": "mezo", "train.batch_size": 4}) == "mezo (batch 4)"
    assert conv.method_label({"optim.method": "mezo", "trainable.scheme": "prefix",
                              "train.average_decay": 0.9}) == "mezo (prefix, average 0.9)"
    assert conv.method_label({"optim.method": "mezo", "trainable.scheme": "prefix", "train.batch_size": 4,
                              "optim.schedule": "cosine", "train.steps": 333}) == "mezo (prefix, batch 4, cosine over 333 steps)"
    assert conv.method_label({"optim.method": "mezo", "optim.schedule": "constant"}) == "mezo"
    rows = [{"step": 40, "loss": 0.7, "step_time": 0.5, "forward_passes": 80},
            {"step": 40, "phase": "dev", "dev/accuracy": 0.6},
            {"step": 1000, "loss": 0.6, "step_time": 0.5, "forward_passes": 2000},
            {"step": 1000, "phase": "dev", "dev/accuracy": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pts = conv.curve(tmp_path, rows_per_pass=4 / 16)
    assert [p["forward_passes"] for p in pts] == [20, 500] and [p["seconds"] for p in pts] == [20.0, 500.0]
    assert [p["forward_passes"] for p in conv.curve(tmp_path)] == [80, 2000]
    assert conv.passes(3, 0.25) == 0.75 and conv.passes(None, 0.25) is None
