"""``zotune study``: each study's grid, its renderer on hand-made records, option errors, and one
end-to-end study on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zotune.bench.studies import (
    STUDIES,
    Layout,
    Options,
    check_recorded,
    figures,
    model_layout,
    plan_study,
    render,
)
from zotune.cli import main
from zotune.tasks import get_task

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
TINY = Layout(layers=2, blocks=4)  # tiny-llama: embeddings, 2 layers, final norm (head tied)
OPT13 = Layout(layers=24, blocks=26)  # OPT-1.3B as in ZO-Bench: 24 layers, p = 26 blocks


def plan(name, layout=TINY, **kw):
    kw.setdefault("model", "tiny-llama")
    return plan_study(name, Options(**kw), layout=layout)


def runs(p):
    return {r.name: r for r in p.grid.runs}


# ----------------------------------------------------------------------------- grids
def test_the_six_studies_are_registered():
    assert list(STUDIES) == ["alignment", "queries", "block", "hybrid", "sparsity", "lozo-memory"]


def test_alignment_grid_is_methods_by_template_on_and_off_per_task():
    p = plan("alignment")
    assert p.tasks == ("sst2", "rte")  # ZO-Bench Table 1's tasks
    r = runs(p)
    assert len(r) == 2 * 3 * 2
    on, off = r["rte-zo-adam-aligned-s0"].overrides, r["rte-zo-adam-unaligned-s0"].overrides
    assert on["task.template"] is None and off["task.template"] == "none"
    assert on["optim.method"] == off["optim.method"] == "zo-adam" and on["task.name"] == "rte"
    # each task's own default length (TaskSpec.max_length, measured on its data): RTE 224, SST-2 64
    assert on["task.max_length"] == get_task("rte").max_length == 224
    assert r["sst2-mezo-aligned-s0"].overrides["task.max_length"] == get_task("sst2").max_length == 64
    assert plan("alignment", max_length=48).grid.runs[0].overrides["task.max_length"] == 48  # --max-length wins
    assert r["sst2-fo-sgd-unaligned-s0"].labels == {"task": "sst2", "method": "fo-sgd", "aligned": False, "seed": 0}
    assert {k: v for k, v in on.items() if k != "task.template"} == {
        k: v for k, v in off.items() if k != "task.template"}  # the template is the only difference
    assert len(plan("alignment", tasks=("sst2",), values=("mezo",)).grid.runs) == 2
    # zero-shot is measured once per task and template (the first run of each), not by every run
    measured = [x.name for x in r.values() if x.overrides.get("train.eval_at_start", True)]
    assert measured == ["sst2-fo-sgd-aligned-s0", "sst2-fo-sgd-unaligned-s0", "rte-fo-sgd-aligned-s0",
                        "rte-fo-sgd-unaligned-s0"]


def test_queries_grid_sweeps_q_for_zo_sgd_and_forward_grad_with_lora():
    p = plan("queries")
    assert p.values == (1, 2, 4, 8)
    r = runs(p)
    assert sorted(r) == sorted(f"sst2-{m}-q{q}-s0" for m in ("mezo", "forward-grad") for q in (1, 2, 4, 8))
    assert all(x.overrides["trainable.scheme"] == "lora" for x in r.values())
    assert r["sst2-forward-grad-q4-s0"].overrides["optim.queries"] == 4
    assert r["sst2-mezo-q8-s0"].labels["q"] == 8


def test_block_grid_gives_zo_sgd_the_forward_passes_of_zo_sgd_block():
    r = runs(plan("block", layout=OPT13, tasks=("sst2",)))
    assert sorted(r) == ["sst2-block-s0", "sst2-mezo-q1-s0", "sst2-mezo-q26-s0"]  # Table 6's three rows
    assert r["sst2-mezo-q26-s0"].overrides["optim.queries"] == 26
    assert r["sst2-block-s0"].overrides["optim.method"] == "zo-sgd-block"


def test_block_count_matches_the_blockwise_estimator_and_forward_passes_are_equal():
    import torch

    from zotune.config import OptimConfig
    from zotune.methods import build_optimizer
    from zotune.testing import tiny_model
    from zotune.params import select_trainable

    layout = model_layout("tiny-llama")
    assert layout == TINY
    r = runs(plan("block", layout=layout, tasks=("sst2",)))
    fwd = {}
    for name in ("sst2-block-s0", f"sst2-mezo-q{layout.blocks}-s0", "sst2-mezo-q1-s0"):
        o = r[name].overrides
        lm, named = select_trainable(tiny_model("llama"), "full")
        model = lm.model
        cfg = OptimConfig(method=o["optim.method"], queries=o.get("optim.queries", 1))
        fwd[name] = build_optimizer(cfg, named, model).forward_passes_per_step
    assert fwd["sst2-block-s0"] == fwd[f"sst2-mezo-q{layout.blocks}-s0"] == 2 * layout.blocks
    assert fwd["sst2-mezo-q1-s0"] == 2
    assert torch.get_default_dtype() == torch.float32


def test_hybrid_grid_splits_layers_from_pure_fo_to_pure_zo():
    p = plan("hybrid", layout=OPT13)
    assert p.values == (0, 4, 8, 12, 16, 20, 24)  # ZO-Bench Table 7's rows for a 24-layer model
    r = runs(p)
    assert r["sst2-zo0-fo-sgd-s0"].overrides["optim.method"] == "fo-sgd"
    assert "trainable.zo_layers" not in r["sst2-zo0-fo-sgd-s0"].overrides
    assert r["sst2-zo24-mezo-s0"].overrides["optim.method"] == "mezo"
    assert "trainable.zo_layers" not in r["sst2-zo24-mezo-s0"].overrides
    mid = r["sst2-zo12-s0"].overrides
    assert mid["trainable.zo_layers"] == 12 and mid["optim.method"] == "mezo" and mid["optim.fo_lr"] > mid["optim.lr"]
    assert plan("hybrid").values == (0, 1, 2)  # tiny-llama's two layers
    assert plan("hybrid", values=("1",)).grid.runs[0].overrides["trainable.zo_layers"] == 1


def test_sparsity_grid_is_the_paper_ratios_on_copa_and_sst2():
    p = plan("sparsity")
    assert p.tasks == ("copa", "sst2") and p.values == tuple(range(0, 100, 10))
    r = runs(p)
    assert len(r) == 20
    assert r["copa-sparsity20-s0"].overrides["optim.sparsity"] == pytest.approx(0.2)
    assert r["sst2-sparsity0-s0"].overrides["optim.sparsity"] == 0.0


def test_lozo_memory_grid_has_the_slides_six_methods_and_no_evaluation():
    r = runs(plan("lozo-memory"))
    assert sorted(x.labels["variant"] for x in r.values()) == sorted(["lozo", "lozo-m", "mezo", "mezo-m", "ft-lora", "ft"])
    assert r["sst2-lozo-m-s0"].overrides["optim.momentum"] == 0.9 and r["sst2-lozo-m-s0"].overrides["optim.method"] == "lozo"
    assert r["sst2-lozo-s0"].overrides["optim.momentum"] == 0.0
    assert r["sst2-mezo-m-s0"].overrides["optim.method"] == "zo-sgd-momentum"
    assert r["sst2-ft-lora-s0"].overrides["trainable.scheme"] == "lora"
    assert all(x.overrides["task.test"] == 0 and x.overrides["train.steps"] == 5 for x in r.values())


def test_options_seeds_and_overrides_reach_every_run():
    p = plan("sparsity", tasks=("sst2",), values=("0", "20"), seeds=(0, 1), steps=7, batch_size=4, train=32,
             test=16, max_length=48, overrides=("optim.lr=2e-5", "task.split_seed=3"))
    r = runs(p)
    assert sorted(r) == ["sst2-sparsity0-s0", "sst2-sparsity0-s1", "sst2-sparsity20-s0", "sst2-sparsity20-s1"]
    o = r["sst2-sparsity20-s1"].overrides
    assert (o["optim.seed"], o["train.data_seed"], o["train.steps"], o["train.batch_size"]) == (1, 1, 7, 4)
    assert (o["task.train"], o["task.test"], o["task.max_length"], o["task.split_seed"]) == (32, 16, 48, 3)
    assert o["optim.lr"] == 2e-5  # --set comes last, over the study's own lr
    assert p.grid.results == Path("benchmarks/results/studies/sparsity-tiny-llama.jsonl")
    assert plan_study("sparsity", Options(), layout=TINY).grid.results == Path("benchmarks/results/studies/sparsity.jsonl")


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, kw, message", [
    ("hybird", {}, "Unknown study 'hybird'. Did you mean 'hybrid'? Available: alignment, block, hybrid"),
    ("sparsity", {"tasks": ("sst3",)}, "Did you mean 'sst2'?"),
    ("queries", {"values": ("0",)}, "a query budget q must be an integer >= 1, got '0'"),
    ("sparsity", {"values": ("100",)}, "a sparsity is a whole percentage in [0, 100)"),
    ("hybrid", {"values": ("3",)}, "must be an integer in [0, 2] (the model has 2 layers), got '3'"),
    ("alignment", {"values": ("mezzo",)}, "Unknown method 'mezzo'. Did you mean 'mezo'?"),
    ("lozo-memory", {"values": ("lozom",)}, "Did you mean 'lozo-m'?"),
    ("block", {"values": ("1",)}, "study 'block' takes no --values"),
    ("block", {"steps": 0}, "--steps must be an integer >= 1, got 0"),
    ("block", {"test": -1}, "--test must be an integer >= 0"),
    ("block", {"seeds": (0, 0)}, "--seeds repeats a seed"),
    ("queries", {"values": ("2", "2")}, "--values repeats a value"),
    ("queries", {"overrides": ("optim.lr",)}, "must look like section.field=value"),
])
def test_bad_options_give_clear_errors(name, kw, message):
    with pytest.raises((ValueError, KeyError)) as e:
        plan(name, **kw)
    assert message in (e.value.args[0] if isinstance(e.value, KeyError) else str(e.value))


def test_a_bad_override_is_reported_per_run_before_anything_runs():
    from zotune.config import ConfigError

    with pytest.raises(ConfigError, match="optim.schedule: Unknown schedule 'cosin'. Did you mean 'cosine'"):
        plan("block", overrides=("optim.schedule=cosin",))


def test_cli_errors_are_one_line_with_exit_status_2(capsys):
    assert main(["study", "lozo_memory", "--dry-run"]) == 2
    assert "Did you mean 'lozo-memory'?" in capsys.readouterr().err
    assert main(["study", "block", "--dry-run", "--report-only"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["study", "block", "--seeds", "a"]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err


def test_cli_dry_run_lists_runs_and_runs_nothing(tmp_path, capsys):
    args = ["study", "hybrid", "--model", "tiny-llama", "--results", str(tmp_path / "r.jsonl"),
            "--output-dir", str(tmp_path / "runs"), "--dry-run"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "study hybrid (ZO-Bench Table 7): 3 runs on tiny-llama" in out
    assert 'sst2-zo1-s0: optim.method="mezo"' in out and "trainable.zo_layers=1" in out
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "runs").exists()


def test_report_only_without_results_says_what_to_run(tmp_path, capsys):
    assert main(["study", "sparsity", "--model", "tiny-llama", "--results", str(tmp_path / "none.jsonl"),
                 "--report-only"]) == 2
    assert "no results at" in capsys.readouterr().err


def test_results_of_other_settings_are_refused(tmp_path):
    p = plan("sparsity", tasks=("sst2",), values=("0",), results=str(tmp_path / "r.jsonl"))
    run = p.grid.runs[0]
    rec = {"run": run.name, "status": "ok", "overrides": {**run.overrides, "train.steps": 999}}
    p.grid.results.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match=r"already holds run 'sst2-sparsity0-s0' with other settings \(train.steps: 999 -> 100\)"):
        check_recorded(p)
    rec["overrides"] = run.overrides
    p.grid.results.write_text(json.dumps(rec) + "\n")
    check_recorded(p)  # same settings: resumes


# ----------------------------------------------------------------------------- renderers
def record(p, name, acc, zs=0.5, n=100, **results):
    run = runs(p)[name]
    res = {"task": run.labels["task"], "method": run.overrides.get("optim.method"), "scheme": "full", "steps": 10,
           "zero_shot": {"accuracy": zs, "n": n}, "test": {"accuracy": acc, "n": n}, **results}
    return {"run": name, "status": "ok", "overrides": run.overrides, "labels": run.labels, "results": res}


def test_alignment_table():
    p = plan("alignment", tasks=("sst2", "rte"), values=("mezo", "fo-sgd"))
    recs = [record(p, "sst2-mezo-aligned-s0", 0.894, zs=0.58), record(p, "sst2-mezo-unaligned-s0", 0.792, zs=0.5),
            record(p, "sst2-fo-sgd-aligned-s0", 0.916, zs=0.58), record(p, "sst2-fo-sgd-unaligned-s0", 0.915),
            record(p, "rte-mezo-aligned-s0", 0.687)]
    text = render(p, recs)
    assert "| Method | sst2 ✓ | sst2 ✗ | Difference | rte ✓ | rte ✗ | Difference |" in text
    assert "| ZO-SGD | 89.4 | 79.2 | 10.2 | 68.7 | - | - |" in text  # Table 1's numbers, shape and arithmetic
    assert "| FO-SGD | 91.6 | 91.5 | 0.1 | - | - | - |" in text
    assert "| zero-shot (no step) | 58.0 | 50.0 | 8.0 | 50.0 | - | - |" in text
    assert "5 of 8 runs finished" in text


def test_queries_table_and_figure(tmp_path):
    p = plan("queries", values=("1", "4"))
    recs = [record(p, "sst2-mezo-q1-s0", 0.60, forward_passes=20, mean_step_seconds=1.0),
            record(p, "sst2-mezo-q4-s0", 0.62, forward_passes=80, mean_step_seconds=3.5),
            record(p, "sst2-forward-grad-q1-s0", 0.61, forward_passes=10, mean_step_seconds=2.0),
            record(p, "sst2-forward-grad-q4-s0", 0.66, forward_passes=40, mean_step_seconds=7.25)]
    text = render(p, recs)
    assert "| q | ZO-SGD acc | ZO-SGD fwd/step | ZO-SGD s/step | Forward-Grad acc | Forward-Grad fwd/step |" in text
    assert "| 1 | 60.0 | 2 | 1.00 | 61.0 | 1 | 2.00 |" in text
    assert "| 4 | 62.0 | 8 | 3.50 | 66.0 | 4 | 7.25 |" in text
    assert "*sst2* (zero-shot 50.0 %)" in text
    paths = figures(p, tmp_path, recs)
    assert sorted(x.name for x in paths) == ["queries_accuracy_vs_q.png", "queries_accuracy_vs_q.svg"]
    assert all(x.stat().st_size > 1000 for x in paths)


def test_block_table_averages_seeds():
    p = plan("block", layout=OPT13, tasks=("sst2", "winogrande"), seeds=(0, 1))
    recs = [record(p, "sst2-mezo-q1-s0", 0.9083, forward_passes=20), record(p, "sst2-mezo-q26-s0", 0.9128, forward_passes=520),
            record(p, "sst2-block-s0", 0.92, forward_passes=520), record(p, "sst2-block-s1", 0.94, forward_passes=520),
            record(p, "winogrande-block-s0", 0.572, forward_passes=520)]
    text = render(p, recs)
    assert "| Optimizer | Queries / step | Forward passes / step (measured) | s/step | sst2 | winogrande |" in text
    assert "| MeZO (ZO-SGD, q = 1) | 1 | 2 | - | 90.8 | - |" in text
    assert "| ZO-SGD (q = 26) | 26 | 52 | - | 91.3 | - |" in text
    assert "| ZO-SGD-Block (26 blocks) | 26 | 52 | - | 93.0 (n=2) | 57.2 |" in text
    assert "| zero-shot (no step) | - | - | - | 50.0 | 50.0 |" in text


def test_hybrid_table_deltas_against_pure_zo_and_figure(tmp_path):
    p = plan("hybrid")
    mib = 2**20
    recs = [record(p, "sst2-zo0-fo-sgd-s0", 0.9122, peak_rss_bytes=2400 * mib, rss_after_load_bytes=500 * mib),
            record(p, "sst2-zo1-s0", 0.9048, peak_rss_bytes=1800 * mib, rss_after_load_bytes=500 * mib),
            record(p, "sst2-zo2-mezo-s0", 0.8924, peak_rss_bytes=1300 * mib, rss_after_load_bytes=500 * mib)]
    text = render(p, recs)
    assert "| ZO layer # | Memory (peak RSS MiB) | Δ Memory | RSS over load MiB | Accuracy (%) | Δ Accuracy |" in text
    assert "| 0 (FO-SGD) | 2,400 | 1,100 | 1,900 | 91.2 | 2.0 |" in text
    assert "| 1 | 1,800 | 500 | 1,300 | 90.5 | 1.2 |" in text
    assert "| 2 (ZO-SGD) | 1,300 | 0 | 800 | 89.2 | 0.0 |" in text
    paths = figures(p, tmp_path, recs)
    assert sorted(x.name for x in paths) == ["hybrid_memory_vs_accuracy.png", "hybrid_memory_vs_accuracy.svg"]


def test_sparsity_table_is_shaped_like_table_8():
    p = plan("sparsity", tasks=("copa",), values=("0", "20", "50"))
    recs = [record(p, "copa-sparsity0-s0", 0.73, zs=0.62), record(p, "copa-sparsity20-s0", 0.75, zs=0.62),
            {"run": "copa-sparsity50-s0", "status": "failed", "stderr_tail": "boom", "labels": {"task": "copa"}}]
    text = render(p, recs)
    assert "| Sparsity (%) | 0 | 20 | 50 |" in text and "| Accuracy (%) | 73.0 | 75.0 | - |" in text
    assert "*copa* (zero-shot 62.0 %)" in text
    assert "| copa-sparsity50-s0 |" in text and "failed" in text  # the failed run is listed below
    assert figures(p, Path("unused"), recs) == []  # Table 8 has no figure


def test_lozo_memory_table():
    p = plan("lozo-memory", values=("lozo", "mezo-m"))
    mib = 2**20
    recs = [record(p, "sst2-lozo-s0", None, peak_rss_bytes=1000 * mib, rss_after_load_bytes=600 * mib,
                   mean_step_seconds=1.5),
            record(p, "sst2-mezo-m-s0", None, peak_rss_bytes=1600 * mib, rss_after_load_bytes=600 * mib)]
    for r in recs:
        r["results"]["test"] = {}
        del r["results"]["zero_shot"]
    text = render(p, recs)
    assert "| Method | peak RSS MiB | RSS over load MiB | CUDA peak MiB | predicted peak MiB |" in text
    assert "| LOZO | 1,000 | 400 | - | - | - | 1.50 |" in text  # no memory model for a tiny random model
    assert "| MeZO-M | 1,600 | 1,000 | - | - | - | - |" in text


def test_lozo_memory_prediction_comes_from_the_memory_model(monkeypatch):
    from zotune.bench import memory_model

    p = plan("lozo-memory", values=("lozo-m",), model="smollm2-135m")
    seen = {}

    def fake(model, method, scheme, **kw):
        seen.update(model=model, method=method, scheme=scheme, **kw)
        return memory_model.Prediction(model, method, scheme, "float32", "zotune", 64, 16, 1, 1, 3 * 2**20, 0, 0,
                                       7 * 2**20, "")

    monkeypatch.setattr(memory_model, "predict", fake)
    rec = record(p, "sst2-lozo-m-s0", None, peak_rss_bytes=2**30)
    assert "| LOZO-M | 1,024 | - | - | 7 | 3 | - |" in render(p, [rec])
    assert seen == {"model": "smollm2-135m", "method": "lozo", "scheme": "full", "seq_len": 64, "batch": 16,
                    "lozo_rank": 2, "momentum": 0.9}


# ----------------------------------------------------------------------------- end to end
@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")
def test_study_end_to_end_on_a_tiny_model(tmp_path, capsys):
    args = ["study", "queries", "--model", "tiny-llama", "--values", "1", "--steps", "2", "--batch-size", "4",
            "--train", "16", "--test", "8", "--set", f"task.data_root={DATA}", "--set", "task.max_length=32",
            "--output-dir", str(tmp_path / "runs"), "--results", str(tmp_path / "r.jsonl"),
            "--figures", str(tmp_path / "figs"), "--out", str(tmp_path / "queries.md")]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert "[queries 1/2] sst2-mezo-q1-s0: running" in cap.err
    assert "[queries 2/2] sst2-forward-grad-q1-s0: ok in" in cap.err and "(n=8)" in cap.err
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(x["run"], x["status"], x["labels"]["method"]) for x in lines] == [
        ("sst2-mezo-q1-s0", "ok", "mezo"), ("sst2-forward-grad-q1-s0", "ok", "forward-grad")]
    assert [x["results"]["forward_passes"] for x in lines] == [4, 2]  # 2 steps x (2 evaluations | 1 JVP)
    table = (tmp_path / "queries.md").read_text()
    assert "| 1 | " in table and "2 of 2 runs finished" in table
    assert (tmp_path / "figs" / "queries_accuracy_vs_q.png").stat().st_size > 1000
    # the same command again runs nothing: both runs are recorded as ok
    assert main(args) == 0
    assert "[queries 1/2] sst2-mezo-q1-s0: done already, skipped" in capsys.readouterr().err
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
