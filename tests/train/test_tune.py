"""zotune tune: the lr probe picks on dev loss, restores the weights, and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zotune.config import load_config
from zotune.train.loop import build
from zotune.train.tune import choose, drift_caution, probe_lr

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = [
    "model.name=tiny-llama", "task.name=sst2", "task.train=48", "task.dev=16", "task.test=0",
    f"task.data_root={DATA}", "task.max_length=48", "train.batch_size=8", "optim.eps=1e-2",
    "train.progress=false", "train.tensorboard=false",
]


def row(factor, loss, status="ok"):
    return {"lr": 1e-5 * factor, "factor": factor, "dev_loss": loss, "status": status}


def test_choose_takes_the_lowest_dev_loss_that_fell_and_flags_the_grid_edge():
    rows = [row(0.1, 0.68), row(1.0, 0.61), row(10.0, None, "non-finite loss")]
    best, why = choose(0.69, rows)
    assert best["factor"] == 1.0 and "lowered the dev loss most (0.6900 -> 0.6100)" in why and "edge" not in why
    best, why = choose(0.69, [row(0.1, 0.68), row(1.0, 0.60)])
    assert best["factor"] == 1.0 and "edge of the grid" in why
    best, why = choose(0.5, [row(1.0, 0.7, "dev loss did not fall")])
    assert best is None and "no candidate lowered the dev loss (0.5000)" in why


def chunked(factor, chunks):
    return {**row(factor, sum(chunks) / len(chunks)), "dev_chunks": chunks}


def test_one_se_rule_keeps_the_smallest_lr_within_one_standard_error_of_the_lowest_loss():
    # lr x1 beats lr x0.3 by 0.01 on average, but the chunk differences (0.03, -0.01, 0.01, 0.01)
    # have a standard error of sqrt(0.0008 / 3 / 4) = 0.00816 ... so 0.01 is not within it
    low, high = chunked(0.3, [0.63, 0.61, 0.62, 0.62]), chunked(1.0, [0.60, 0.62, 0.61, 0.61])
    assert high["dev_loss"] < low["dev_loss"]
    best, why = choose(0.69, [low, high])
    assert best is high and "lowered the dev loss most" in why
    # a noisier difference (0.07, -0.05, 0.03, -0.01: se 0.0258) ties them: the smaller lr is kept
    low = chunked(0.3, [0.67, 0.57, 0.64, 0.60])
    best, why = choose(0.69, [low, high, chunked(0.1, [0.68, 0.68, 0.68, 0.68])])
    assert best is low and "within one standard error (0.0258)" in why and "lr 1e-05 was lower" in why
    assert choose(0.69, [low, high], rule="min")[0] is high
    # a candidate that did not lower the loss is never kept, however small its lr
    flat = {**chunked(0.1, [0.70, 0.60, 0.70, 0.60]), "status": "dev loss did not fall"}
    assert choose(0.69, [flat, low, high])[0] is low
    with pytest.raises(ValueError, match="unknown rule 'median'"):
        choose(0.69, [low], rule="median")


def test_drift_caution_only_for_runs_much_longer_than_the_probe_and_says_what_to_do():
    assert drift_caution(run_steps=299, probe_steps=30, eval_every=0) is None
    no_dev = drift_caution(run_steps=300, probe_steps=30, eval_every=0)
    assert "300 steps, 10x the probe's 30" in no_dev and "set train.eval_every" in no_dev
    assert "set train.eval_every" in drift_caution(run_steps=300, probe_steps=30, eval_every=300)
    with_dev = drift_caution(run_steps=2000, probe_steps=30, eval_every=50)
    assert "66x" in with_dev and "train.eval_every=50 keeps the best-dev checkpoint" in with_dev


def test_paired_standard_error_is_the_standard_error_of_the_chunk_differences():
    from zotune.train.tune import _paired_se

    d = [0.07, -0.05, 0.03, -0.01]
    mean = sum(d) / 4
    expected = (sum((x - mean) ** 2 for x in d) / 3 / 4) ** 0.5
    assert _paired_se([1 + x for x in d], [1.0] * 4) == pytest.approx(expected)
    assert _paired_se([0.5], [0.4]) == 0.0


def test_probe_scores_dev_rows_in_chunks_and_rejects_bad_chunks_and_rules():
    cfg = load_config(None, TINY + ["optim.method=mezo", "optim.lr=1e-3"])
    setup = build(cfg)
    out = probe_lr(cfg, factors=(1.0,), steps=1, setup=setup, progress=False, rows=16, chunks=4)
    (cand,) = out["candidates"]
    assert out["chunks"] == 4 and out["rule"] == "one-se" and len(cand["dev_chunks"]) == 4
    assert cand["dev_loss"] == pytest.approx(sum(cand["dev_chunks"]) / 4)  # equal chunks weigh equally
    assert "16 dev rows in 4 chunks; rule one-se" in out["reason"]
    with pytest.raises(ValueError, match="chunks must be an integer >= 1"):
        probe_lr(cfg, steps=1, setup=setup, progress=False, chunks=0)
    with pytest.raises(ValueError, match="unknown rule 'best'"):
        probe_lr(cfg, steps=1, setup=setup, progress=False, rule="best")


def test_probe_runs_every_candidate_from_the_same_weights_and_restores_them():
    cfg = load_config(None, TINY + ["optim.method=mezo", "optim.lr=1e-3"])
    setup = build(cfg)
    before = {n: p.detach().clone() for n, p in setup.named.items()}
    out = probe_lr(cfg, factors=(1e-9, 1.0, 1e4), steps=4, setup=setup, progress=False)
    by = {r["factor"]: r for r in out["candidates"]}
    assert list(by) == [1e-9, 1.0, 1e4]
    # an lr of 1e-12 changes nothing measurable: its dev loss is the starting one, so it did not fall
    assert by[1e-9]["dev_loss"] == pytest.approx(out["dev_loss_before"], abs=1e-6)
    assert by[1e-9]["status"] == "dev loss did not fall"
    assert by[1e4]["status"] in ("non-finite loss", "dev loss did not fall")  # lr 10: blows up
    for n, p in setup.named.items():
        assert torch.equal(p, before[n])
    assert out["chosen_lr"] in (None, by[1.0]["lr"])


def test_probe_tries_every_lr_and_eps_pair_and_picks_both():
    cfg = load_config(None, TINY + ["optim.method=mezo", "optim.lr=1e-3"])
    out = probe_lr(cfg, factors=(1e-9, 1.0), eps_factors=(1.0, 10.0), steps=2, progress=False, rule="min")
    pairs = [(r["factor"], r["eps_factor"]) for r in out["candidates"]]
    assert pairs == [(1e-9, 1.0), (1.0, 1.0), (1e-9, 10.0), (1.0, 10.0)]
    assert [r["eps"] for r in out["candidates"]] == pytest.approx([1e-2, 1e-2, 1e-1, 1e-1])
    best = min((r for r in out["candidates"] if r["status"] == "ok"), key=lambda r: r["dev_loss"], default=None)
    assert out["chosen_lr"] == (best and best["lr"]) and out["chosen_eps"] == (best and best["eps"])
    if best:
        assert f"(eps {best['eps']:.3g})" in out["reason"]


def test_probe_refuses_without_dev_rows_and_bad_factors():
    with pytest.raises(ValueError, match="needs dev rows"):
        probe_lr(load_config(None, TINY + ["task.dev=0"]), steps=1, progress=False)
    cfg = load_config(None, TINY)
    with pytest.raises(ValueError, match="factors must be positive"):
        probe_lr(cfg, factors=(0.0,), steps=1, progress=False)
    with pytest.raises(ValueError, match="eps_factors must be positive"):
        probe_lr(cfg, eps_factors=(), steps=1, progress=False)


def test_tune_command_prints_the_table_and_json_and_exits_by_outcome():
    import json
    import subprocess
    import sys

    args = [sys.executable, "-m", "zotune.cli", "tune", *TINY, "optim.method=mezo", "optim.lr=1e-3",
            "--steps", "2", "--factors", "1e-9,1", "--rule", "min"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 3), done.stderr
    out = json.loads(done.stdout)
    assert [r["factor"] for r in out["candidates"]] == [1e-9, 1.0]
    assert "dev loss" in done.stderr and out["reason"] in done.stderr
    assert "tune:" not in done.stderr  # train.progress=false: no progress bar (logs, CI)
    assert (done.returncode == 0) == (out["chosen_lr"] is not None) and out["rule"] == "min"
    run_steps = load_config(None, TINY).train.steps  # the default, far longer than the 2-step probe
    assert out["caution"] == drift_caution(run_steps, 2, 0) and out["caution"] is not None
    bad = subprocess.run([sys.executable, "-m", "zotune.cli", "tune", *TINY, "task.dev=0", "--steps", "1"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "needs dev rows" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "zotune.cli", "tune", *TINY, "--eps-factors", "1,ten"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--eps-factors takes comma-separated numbers" in bad.stderr


def test_runs_score_with_the_configured_scoring(monkeypatch, tmp_path):
    """task.scoring reaches the evaluation of a run (it was read only by zotune's evaluate default)."""
    import zotune.train.evaluate as evaluate
    import zotune.train.loop as loop

    seen = []
    real = evaluate.evaluate_rows

    def spy(*args, **kwargs):
        seen.append(kwargs.get("scoring"))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_rows", spy)  # every evaluation of a run goes through evaluate_configured
    cfg = load_config(None, TINY + ["task.scoring=mean", "task.test=8", "train.steps=1", "train.save_every=1",
                                    "train.eval_at_start=false", f"train.output_dir={tmp_path / 'run'}"])
    loop.train(cfg)
    assert seen and set(seen) == {"mean"}


def test_probe_warns_when_test_0_makes_its_dev_rows_another_runs_test_rows(caplog):
    """Test rows are carved before dev rows: with task.test=0 the probe's dev rows are the rows a
    run with a test split tests on (how the SST-2 probes read test rows before 2026-12-03)."""
    with caplog.at_level("WARNING", logger="zotune.tune"):
        out = probe_lr(load_config(None, TINY + ["optim.lr=1e-3"]), factors=(1.0,), steps=1, progress=False)
    assert "task.test=0" in caplog.text and out["split"]["test"] == 0
    caplog.clear()
    with caplog.at_level("WARNING", logger="zotune.tune"):
        out = probe_lr(load_config(None, TINY + ["optim.lr=1e-3", "task.test=8"]), factors=(1.0,), steps=1,
                       progress=False)
    assert "task.test=0" not in caplog.text and out["split"] == {"train": 48, "dev": 16, "test": 8, "seed": 0,
                                                                  "eval_file": None}


def test_probe_says_it_does_not_use_the_head_cache(caplog):
    cfg = load_config(None, TINY + ["optim.lr=1e-3", "task.test=8", "trainable.scheme=final_norm", "train.head_cache=true"])
    with caplog.at_level("WARNING", logger="zotune.tune"):
        probe_lr(cfg, factors=(1.0,), steps=1, progress=False)
    assert "train.head_cache" in caplog.text and "head_cache_sweep.py" in caplog.text
