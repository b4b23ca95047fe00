"""The training recipe on tiny random models: resume after kill -9, replay, schemes, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import load_config
from zotune.train import checkpoint as ckpt
from zotune.train.loop import BatchOrder, build, load_data, replay, train
from zotune.train.objective import make_closure, resolve_objective

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = [
    "model.name=tiny-llama", "task.name=sst2", "task.train=48", "task.dev=8", "task.test=16",
    f"task.data_root={DATA}", "task.max_length=48", "train.batch_size=4", "optim.lr=3e-4",
    "train.progress=false", "train.tensorboard=false", "train.eval_batch_size=16",
]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "zotune.cli", *args], capture_output=True, text=True, timeout=timeout)


def weights(run: Path) -> dict:
    return load_file(str(run / "ckpt-last" / "weights.safetensors"))


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path):
    # a schedule with warmup: the lr of each step must come back exactly (see test_resume.py for
    # every schedule and optimizer family, in-process)
    common = TINY + ["train.steps=40", "train.save_every=3", "train.eval_at_start=false", "task.test=0",
                     "optim.schedule=cosine", "optim.warmup_steps=12"]
    straight = tmp_path / "straight"
    assert cli("train", *common, f"train.output_dir={straight}").returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "zotune.cli", "train", *common, f"train.output_dir={killed}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = killed / "steps.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline:
        if steps.exists() and len(steps.read_text().splitlines()) >= 10:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = int(json.loads((ckpt.find_checkpoint(killed / "ckpt-last") / "meta.json").read_text())["step"])
    assert 0 < done_before < 40
    resumed = cli("train", *common, f"train.output_dir={killed}")
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the step log was cut back to the checkpoint and continued: replay rebuilds the same weights
    lines = [json.loads(x) for x in (killed / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(40))
    report = replay(killed)
    assert report == {"steps": 40, "max_abs_diff_vs_checkpoint": 0.0, "bitwise_equal": True}


@pytest.mark.parametrize("scheme, extra", [
    ("lora", []), ("prefix", ["optim.lr=1e-2", "optim.eps=1e-1"]), ("prompt", ["optim.lr=1e-2", "optim.eps=1e-1"]),
    ("full", ["trainable.zo_layers=1", "optim.fo_lr=1e-2"]),
])
def test_each_scheme_trains_and_checkpoints_only_its_tensors(tmp_path, scheme, extra):
    cfg = load_config(None, TINY + [f"trainable.scheme={scheme}", "train.steps=6", "train.save_every=6",
                                    f"train.output_dir={tmp_path / 'run'}", "train.eval_at_start=false"] + extra)
    setup = build(cfg)
    before = {n: p.detach().clone() for n, p in setup.named.items()}
    results = train(cfg, setup=setup)
    assert "accuracy" in results["test"]
    saved = weights(tmp_path / "run")
    assert set(saved) == set(setup.named)
    moved = [n for n, p in setup.named.items() if not torch.equal(p.detach(), before[n])]
    assert moved, "no trainable tensor changed"
    if scheme != "full":
        total = sum(p.numel() for p in setup.model.parameters())
        assert sum(t.numel() for t in saved.values()) < 0.5 * total
        # the adapters' init comes from optim.seed, so the step log and the base model rebuild them
        # (it came from the global RNG, which a replay in this process had moved on: not the same)
        torch.manual_seed(123)
        assert replay(tmp_path / "run")["bitwise_equal"]


@pytest.mark.parametrize("task, objective", [("sst2", "classification"), ("sst2", "nll"), ("squad", "nll")])
def test_grad_accumulation_sums_micro_batch_losses_to_the_full_batch_loss(task, objective):
    cfg = load_config(None, TINY + ["train.batch_size=8", f"task.name={task}", "task.max_length=96"])
    setup = build(cfg)
    batch = setup.data.train[:8]
    kind = setup.loaded.kind
    if task == "squad":  # answers of different lengths: a mean of micro-batch means is not the mean
        from zotune.lm import encode_pairs

        tokens = encode_pairs(setup.loaded.tokenizer, [e.target for e in batch], 96, kind=kind).cont_mask.sum(1)
        assert len(set(tokens.tolist())) > 1
    with torch.no_grad():
        whole = make_closure(setup.loaded, batch, cfg, "cpu", objective)()
        for k in (2, 3, 4):
            cfg.train.grad_accum = k
            parts = make_closure(setup.loaded, batch, cfg, "cpu", objective)()
            dual = make_closure(setup.loaded, batch, cfg, "cpu", objective)(copies=2)
            assert float(parts) == pytest.approx(float(whole), rel=1e-6, abs=0), k  # float rounding
            torch.testing.assert_close(dual, whole.expand(2), rtol=1e-6, atol=0)


def test_objective_auto_is_classification_for_choice_tasks_and_nll_for_generation():
    cfg = load_config(None, TINY)
    setup = build(cfg)
    assert resolve_objective(cfg, setup.data.train) == "classification"
    squad = load_config(None, TINY + ["task.name=squad"])
    assert resolve_objective(squad, build(squad).data.train) == "nll"
    cfg.train.objective = "nll"
    assert resolve_objective(cfg, setup.data.train) == "nll"


def test_batch_order_is_a_pure_function_of_seed_and_step():
    a, b = BatchOrder(10, 4, seed=3), BatchOrder(10, 4, seed=3)
    seq = [a.indices(t) for t in range(5)]
    assert [b.indices(t) for t in reversed(range(5))][::-1] == seq
    flat = sum(seq, [])
    assert sorted(flat[:10]) == list(range(10))  # the first epoch covers every example once
    other = BatchOrder(10, 4, seed=4)
    assert [other.indices(t) for t in range(3)] != seq[:3]  # another seed, another order
    with pytest.raises(ValueError, match="training split is empty"):
        BatchOrder(0, 4, 0)


def test_atomic_save_survives_a_crash_during_the_swap(tmp_path, monkeypatch):
    path = tmp_path / "ckpt-last"
    ckpt.save_checkpoint(path, {"w": torch.ones(3)}, {"x": 1}, {"step": 1})
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_second(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # after moving the old copy aside, before moving the new one in
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(path, {"w": torch.zeros(3)}, {"x": 2}, {"step": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    tensors, opt, meta = ckpt.load_checkpoint(path)
    assert meta["step"] == 1 and torch.equal(tensors["w"], torch.ones(3)) and opt == {"x": 1}
    # the next save cleans up and replaces it
    ckpt.save_checkpoint(path, {"w": torch.zeros(3)}, None, {"step": 3})
    assert ckpt.load_checkpoint(path)[2]["step"] == 3
    assert not (tmp_path / "ckpt-last.prev").exists()


def test_a_damaged_checkpoint_is_reported_by_name(tmp_path):
    path = tmp_path / "ckpt-last"
    ckpt.save_checkpoint(path, {"w": torch.ones(3)}, None, {"step": 1})
    (path / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match="ckpt-last is damaged"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("override, message", [
    ("task.name=sst3", "Did you mean 'sst2'"),
    ("optim.method=mezzo", "Did you mean 'mezo'"),
    ("model.device=cuda", "cuda"),
    ("task.train_file=/nonexistent/train.tsv", "/nonexistent/train.tsv"),
    ("task.template=mezzo", "Did you mean 'mezo'"),
    ("train.batch_size=0", "train.batch_size must be an integer >= 1"),
    ("optim.lr", "section.field=value"),
])
def test_bad_input_exits_non_zero_with_a_specific_message(tmp_path, override, message):
    if override == "model.device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = cli("train", *TINY, "train.steps=2", f"train.output_dir={tmp_path / 'run'}", override)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr
    assert r.stderr.startswith("zotune: error:")


def test_malformed_data_file_names_file_line_and_field(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tlabel\ngood movie\t1\nbad movie\n")
    r = cli("train", *TINY, "train.steps=2", f"task.train_file={bad}", f"train.output_dir={tmp_path / 'run'}")
    assert r.returncode != 0
    assert "train.tsv" in r.stderr and "line 3" in r.stderr, r.stderr


def test_resume_with_another_config_is_refused_and_keeps_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    common = TINY + ["train.steps=2", "train.eval_at_start=false", f"train.output_dir={run}"]
    assert cli("train", *common).returncode == 0
    before = (run / "ckpt-last" / "weights.safetensors").read_bytes()
    r = cli("train", *common, "optim.lr=1e-2")
    assert r.returncode != 0 and "different config" in r.stderr
    r = cli("train", *common, "train.resume=false")
    assert r.returncode != 0 and "already holds a run" in r.stderr
    assert (run / "ckpt-last" / "weights.safetensors").read_bytes() == before


def test_eval_command_prints_zero_shot_metrics_as_json(tmp_path):
    # the test split comes from the eval file: the training file is not read (it is not there)
    r = cli("eval", *TINY, "task.train_file=/nonexistent/train.tsv", "task.eval_file=SST-2/dev.tsv")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["task"] == "sst2" and out["n"] == 16 and 0.0 <= out["accuracy"] <= 1.0
    assert "too few rows" not in r.stderr
    # zero-shot of a prefix recipe: the base model, as for full fine-tuning
    p = cli("eval", *TINY, "task.train_file=/nonexistent/train.tsv", "task.eval_file=SST-2/dev.tsv",
            "trainable.scheme=prefix")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["accuracy"] == out["accuracy"]


def test_an_evaluation_loads_only_its_split_with_the_rows_a_training_run_uses():
    import warnings

    small = ["task.train_file=SST-2/dev.tsv"]  # 6,735 rows: quick to read
    # with an eval file: test alone reads the eval file alone, and warns about nothing it does not use
    cfg = load_config(None, TINY + small + ["task.eval_file=SST-2/dev.tsv", "task.train=100000"])
    with pytest.warns(UserWarning, match="too few rows"):
        full = load_data(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        only = load_data(cfg, splits=("test",))
        missing = load_config(None, TINY + ["task.train_file=/nonexistent/train.tsv", "task.eval_file=SST-2/dev.tsv"])
        assert load_data(missing, splits=("test",)).test == only.test
    assert only.sizes == {"train": 0, "dev": 0, "test": 16} and only.test == full.test
    # without one: test, dev, then train are carved from the training file, in that order
    cfg = load_config(None, TINY + small)
    full = load_data(cfg)
    for split in ("test", "dev", "train"):
        part = load_data(cfg, splits=(split,))
        assert getattr(part, split) == getattr(full, split), split
    assert load_data(cfg, splits=("test",)).sizes == {"train": 0, "dev": 0, "test": 16}
    cfg.task.train = 100000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_data(cfg, splits=("dev",)).dev == full.dev
    with pytest.raises(ValueError, match="Did you mean 'test'"):
        load_data(cfg, splits=("tset",))


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_file_a_run_writes_is_strict_json(tmp_path):
    from zotune.train.logger import RunLogger

    run = tmp_path / "run"  # no dev split: the best dev score is null, not -Infinity
    train(load_config(None, TINY + ["task.dev=0", "task.test=8", "train.steps=2", "train.eval_at_start=false",
                                    f"train.output_dir={run}"]))
    results = _strict_json((run / "results.json").read_text())
    assert results["best_dev"] == {"value": None, "step": None} and results["tested_step"] == 2
    assert {"cpu", "threads", "torch", "transformers"} <= set(results["machine"])  # what its step times ran on
    for name in ("config.json", "ckpt-last/meta.json"):
        _strict_json((run / name).read_text())
    for name in ("metrics.jsonl", "steps.jsonl"):
        assert [_strict_json(line) for line in (run / name).read_text().splitlines()]
    logger = RunLogger(tmp_path / "log", tensorboard=False)
    logger.metrics(1, loss=float("nan"), lr=float("inf"), step_time=0.5)
    assert _strict_json((tmp_path / "log" / "metrics.jsonl").read_text()) == {
        "step": 1, "loss": None, "lr": None, "step_time": 0.5}
    # with a dev split the best step is picked as before
    dev = tmp_path / "dev"
    out = train(load_config(None, TINY + ["task.test=8", "train.steps=2", "train.eval_every=1", "train.eval_at_start=false",
                                          f"train.output_dir={dev}"]))
    assert out["best_dev"]["step"] in (1, 2) and 0.0 <= out["best_dev"]["value"] <= 1.0
    _strict_json((dev / "results.json").read_text())


def test_a_run_killed_before_its_first_checkpoint_starts_again(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "steps.jsonl").write_text('{"step": 0, "coeffs": [1.0]}\n')  # left by a kill before any save
    r = cli("train", *TINY, "train.steps=2", "train.eval_at_start=false", f"train.output_dir={run}")
    assert r.returncode == 0, r.stderr
    lines = (run / "steps.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]


@pytest.mark.parametrize("method", ["mezo", "lozo"])
def test_streamed_and_dual_runs_end_with_the_plain_run_weights(tmp_path, method):
    common = TINY + ["train.steps=5", "train.save_every=5", "task.test=8", f"optim.method={method}"]
    runs = {
        "plain": [],
        "dual": ["optim.perturbation=dual"],
        "streamed": ["model.offload=mmap", f"model.offload_dir={tmp_path / 'offload'}"],
    }
    results = {}
    for name, extra in runs.items():
        cfg = load_config(None, common + extra + [f"train.output_dir={tmp_path / name}"])
        results[name] = train(cfg)
    assert (tmp_path / "offload").is_dir()  # the streamed run kept its tensors there...
    assert not list((tmp_path / "offload").glob("*.bin"))  # ...and removed the files at the end
    r = results["plain"]  # the peak is counted from the end of the load (the kernel's counter reset)
    # (the kernel's peak counters are updated lazily, page-granular: compare within 1 %)
    assert r["peak_rss_with_load_bytes"] >= 0.99 * r["peak_rss_bytes"] >= 0.98 * r["rss_after_load_bytes"] > 0
    plain = weights(tmp_path / "plain")
    for name in ("dual", "streamed"):
        other = weights(tmp_path / name)
        assert other.keys() == plain.keys()
        for k in plain:
            torch.testing.assert_close(other[k], plain[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
        assert results[name]["test"] == results["plain"]["test"]


@pytest.mark.parametrize("override, message", [
    ("model.offload=mmp", "Did you mean 'mmap'"),
    ("optim.method=fo-sgd", "needs a two-point ZO method"),
    ("optim.perturbation=swap", "needs optim.perturbation: dual"),
])
def test_offload_errors_are_specific(tmp_path, override, message):
    extra = [] if override.startswith("model.offload") else ["model.offload=mmap"]
    r = cli("train", *TINY, "train.steps=2", f"train.output_dir={tmp_path / 'run'}", *extra, override)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_device_map_run_equals_the_plain_run_and_offloading_maps_are_refused(tmp_path):
    """On this CPU-only machine every module maps to "cpu", but accelerate's hooks are attached
    (force_hooks) and wrap each module's forward: ZO must perturb and update through them."""
    common = TINY + ["train.steps=4", "train.save_every=4", "task.test=0", "train.eval_at_start=false"]
    layout = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    for name, extra in (("plain", {}), ("mapped", {"device_map": layout}),
                        ("mapped-dual", {"device_map": layout, "perturbation": "dual"})):
        cfg = load_config(None, common + [f"train.output_dir={tmp_path / name}"])
        cfg.model.device_map = extra.get("device_map")
        cfg.optim.perturbation = extra.get("perturbation", "auto")
        setup = build(cfg)
        if name != "plain":
            assert hasattr(setup.model.model.layers[0], "_hf_hook")  # accelerate's hook is in the way
        train(cfg, setup=setup)
    plain = weights(tmp_path / "plain")
    for name in ("mapped", "mapped-dual"):
        other = weights(tmp_path / name)
        for k in plain:
            torch.testing.assert_close(other[k], plain[k], rtol=1e-4, atol=1e-5, msg=f"{name}: {k}")
    from zotune.models import spread_over_devices
    from zotune.testing import tiny_model

    with pytest.raises(ValueError, match="use model.offload"):
        spread_over_devices(tiny_model("llama").model, {"model": "cpu", "lm_head": "disk"})
    with pytest.raises(ValueError, match="Did you mean 'balanced'"):
        spread_over_devices(tiny_model("llama").model, "balancd")


@pytest.mark.parametrize("scheme", ["full", "prompt"])
def test_one_run_decides_the_model_kind_once_at_load(tmp_path, monkeypatch, scheme):
    """Issue 9: the kind (causal / masked, prompt-learning adapter) and the forward's arguments
    were re-derived from the module at every call (about ten call sites); now a whole run (zero-shot
    test, steps, dev evaluations, checkpoints, final test) reads the model's config once, at load,
    and never looks at the module again for it."""
    from zotune import models
    from zotune.testing import tiny_model

    folder = tmp_path / "model"
    lm = tiny_model("llama")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    calls = {name: 0 for name in ("detect_kind", "forward_args", "infer_kind", "as_loaded")}
    for name in calls:
        real = getattr(models, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(models, name, counted)
    cfg = load_config(None, TINY + [f"model.name={folder}", f"trainable.scheme={scheme}", "train.steps=4",
                                    "train.eval_every=2", "train.save_every=2", f"train.output_dir={tmp_path / 'run'}"])
    results = train(cfg)
    assert results["test"]["n"] == 16 and results["zero_shot"]["n"] == 16
    assert calls == {"detect_kind": 1, "forward_args": 1, "infer_kind": 0, "as_loaded": 0}


def test_the_loaded_model_carries_its_adapter_to_the_closure(monkeypatch):
    """The closure and evaluation receive the LoadedModel that select_trainable returned (the
    peft wrapper and its prompt-learning type), also when the closure runs a wrapper of it."""
    import zotune.lm as lm_mod

    cfg = load_config(None, TINY + ["trainable.scheme=prefix"])
    setup = build(cfg)
    assert setup.loaded.model is setup.model and setup.loaded.adapter == "PREFIX_TUNING"
    assert setup.loaded.prompt_learning and setup.loaded.kind == "causal"
    seen = []
    real = lm_mod._continuation_logits
    monkeypatch.setattr(lm_mod, "_continuation_logits", lambda lm, b: seen.append(lm) or real(lm, b))
    batch = setup.data.train[:4]
    objective = resolve_objective(cfg, batch)
    wrapper = torch.nn.Module()  # stands for a DDP wrapper: forwards to the model, holds it as .module
    wrapper.forward, wrapper.module = setup.model.forward, setup.model
    with torch.no_grad():
        whole = make_closure(setup.loaded, batch, cfg, "cpu", objective)()
        wrapped = make_closure(setup.loaded.with_module(wrapper), batch, cfg, "cpu", objective)()
    assert float(whole) == float(wrapped)
    assert [(x.adapter, x.prompt_learning) for x in seen] == [("PREFIX_TUNING", True)] * 2 and seen[1].model is wrapper
    with pytest.raises(ValueError, match="make_closure needs a zotune.models.LoadedModel"):
        make_closure(setup.model, batch, cfg, "cpu", objective)


def test_a_run_says_once_how_many_training_rows_are_cut(tmp_path, caplog):
    # issue 9 defect 15: evaluation reported its cut rows, the training set was cut without a word
    import logging

    with caplog.at_level(logging.WARNING, logger="zotune"):
        out = train(load_config(None, TINY + ["task.dev=0", "task.test=0", "task.max_length=12", "train.steps=1",
                                              "train.eval_at_start=false", f"train.output_dir={tmp_path / 'r'}"]))
    said = [r.getMessage() for r in caplog.records if "SST-2 train:" in r.getMessage()]
    assert len(said) == 1 and "of 48 rows cut from the left" in said[0] and "max_length=12" in said[0]
    assert out["train_truncation"]["truncated_rows"] > 0
    assert out["train_truncation"]["truncated_rows"] == int(said[0].split("SST-2 train: ")[1].split(" of")[0])
    roomy = train(load_config(None, TINY + ["task.dev=0", "task.test=0", "train.steps=1", "task.max_length=256",
                                            "train.eval_at_start=false", f"train.output_dir={tmp_path / 'ok'}"]))
    assert roomy["train_truncation"]["truncated_rows"] == 0


def test_the_test_score_is_the_best_dev_checkpoints_and_training_memory_is_kept_apart(tmp_path):
    # the best-dev weights are copied back tensor by tensor before the test (no second copy of the
    # weights), and results say training's own peak apart from the test phase's
    from zotune.train.evaluate import evaluate

    out = tmp_path / "run"
    cfg = load_config(None, TINY + ["task.dev=8", "task.test=16", "train.steps=3", "train.eval_every=1",
                                    "train.eval_at_start=false", "optim.lr=1e-9", f"train.output_dir={out}"])
    results = train(cfg)
    best = results["best_dev"]["step"]
    assert results["tested_step"] == best and best < 3  # lr 1e-9: dev never improves after step 1, ties keep it
    setup = build(cfg, splits=("test",))
    ckpt.copy_weights(out / "ckpt-best", setup.named)
    again = evaluate(setup.loaded, setup.loaded.tokenizer, setup.data.test, "accuracy", batch_size=16,
                     max_length=48)
    assert again["accuracy"] == results["test"]["accuracy"]
    if results["peak_rss_train_bytes"] is not None:  # Linux: the peak counter can be reset after the load
        assert 0 < results["peak_rss_train_bytes"] <= results["peak_rss_bytes"]


def test_a_run_keeps_each_test_rows_score_for_a_paired_test(tmp_path):
    """test_rows.json holds the zero-shot and tuned score of every test row (their means are the
    reported accuracies), and a resumed run keeps the zero-shot scores it measured before."""
    import json

    run = tmp_path / "run"
    common = TINY + ["task.test=12", "train.save_every=1", f"train.output_dir={run}"]
    res = train(load_config(None, common + ["train.steps=1"]))
    rows = json.loads((run / "test_rows.json").read_text())
    assert set(rows) == {"zero_shot", "tuned"} and len(rows["zero_shot"]) == len(rows["tuned"]) == 12
    assert set(rows["zero_shot"]) <= {0.0, 1.0}
    assert sum(rows["zero_shot"]) / 12 == pytest.approx(res["zero_shot"]["accuracy"])
    assert sum(rows["tuned"]) / 12 == pytest.approx(res["test"]["accuracy"])
    zero_shot = rows["zero_shot"]
    res = train(load_config(None, common + ["train.steps=2"]))  # resumes from step 1: no zero-shot again
    rows = json.loads((run / "test_rows.json").read_text())
    assert rows["zero_shot"] == zero_shot and sum(rows["tuned"]) / 12 == pytest.approx(res["test"]["accuracy"])


def test_console_log_follows_a_replaced_stderr():
    """The console handler wrote into the stderr it was made with; once that was replaced and
    closed, every later message became "--- Logging error ---" (seen in the CLI tests)."""
    import io
    import logging
    import sys

    from zotune.train.logger import setup_console_logging

    setup_console_logging()
    old = sys.stderr
    first, second = io.StringIO(), io.StringIO()
    try:
        sys.stderr = first
        logging.getLogger("zotune.test").info("one")
        first.close()
        sys.stderr = second
        logging.getLogger("zotune.test").info("two")
    finally:
        sys.stderr = old
    assert "two" in second.getvalue() and "Logging error" not in second.getvalue()


def test_a_time_budget_stops_the_run_evaluates_and_tests_where_it_stopped(tmp_path, monkeypatch):
    """train.max_seconds counts the steps' own seconds: with each step taking 1 s (a patched
    clock) and a budget of 2.5 s, the run stops after step 3, evaluates dev there (eval_every
    does not divide 3), checkpoints, tests, and says why it stopped; resumed with a larger budget
    it goes on from step 3 (the seconds spent before count) and ends with the uninterrupted run's weights."""
    from zotune.train import loop

    clock = [0.0]

    def perf_counter():  # every call moves 1 s: a step (timed between two calls) takes 1 s
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(loop, "step_clock", perf_counter)
    run = tmp_path / "run"
    common = TINY + ["train.steps=8", "train.eval_every=5", "train.save_every=100", "train.eval_at_start=false",
                     f"train.output_dir={run}"]
    res = train(load_config(None, common + ["train.max_seconds=2.5"]))
    assert res["steps"] == 3 and res["steps_configured"] == 8 and res["stopped_by_time_budget"] is True
    assert res["train_seconds"] == 3.0 and res["tested_step"] == 3 and res["test"]
    assert res["best_dev"]["step"] == 3  # the stopping step was evaluated
    dev_steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if r.get("phase") == "dev"]
    assert dev_steps == [3]
    meta = json.loads((ckpt.find_checkpoint(run / "ckpt-last") / "meta.json").read_text())
    assert meta["step"] == 3 and meta["train_seconds"] == 3.0
    # the same budget again: spent, so nothing more is trained
    again = train(load_config(None, common + ["train.max_seconds=2.5"]))
    assert again["steps"] == 3 and again["stopped_by_time_budget"] is True
    # a larger one: 3 s spent before, 2 more steps to reach 5 s
    more = train(load_config(None, common + ["train.max_seconds=5"]))
    assert more["steps"] == 5 and more["train_seconds"] == 5.0
    # no budget: to the configured end, with the weights of a run never stopped
    full = train(load_config(None, common))
    assert full["steps"] == 8 and full["stopped_by_time_budget"] is False
    straight = tmp_path / "straight"
    train(load_config(None, TINY + ["train.steps=8", "train.eval_every=5", "train.save_every=100",
                                    "train.eval_at_start=false", f"train.output_dir={straight}"]))
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_schedule_over_seconds_decays_across_the_time_budget_and_resumes_with_it(tmp_path, monkeypatch):
    """optim.schedule_over=seconds: the cosine spans train.max_seconds, not train.steps. With every
    step taking 1 s (a patched clock) and a 4 s budget, steps 0..3 take base * cos-shape(0, 1/4, 2/4, 3/4)
    whatever train.steps says; a run killed after step 2 and resumed takes the same lrs and ends with
    the same weights."""
    import math

    from zotune.train import loop

    clock = [0.0]

    def perf_counter():
        clock[0] += 1.0
        return clock[0]

    monkeypatch.setattr(loop, "step_clock", perf_counter)
    common = TINY + ["train.steps=50", "train.save_every=2", "train.eval_at_start=false", "train.max_seconds=4",
                     "optim.schedule=cosine", "optim.schedule_over=seconds", "optim.lr=1e-3"]
    straight = tmp_path / "straight"
    res = train(load_config(None, common + [f"train.output_dir={straight}"]))
    assert res["steps"] == 4 and res["stopped_by_time_budget"] is True
    lrs = [r["lrs"][0] for r in map(json.loads, (straight / "steps.jsonl").read_text().splitlines())]
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], rel=1e-12)
    meta = json.loads((ckpt.find_checkpoint(straight / "ckpt-last") / "meta.json").read_text())
    assert meta["schedule"]["seconds"] == 4.0
    # the same run cut after 2 s (the budget's first half), then resumed with the whole budget
    from zotune.testing import Crash, crash_at_step

    run = tmp_path / "run"
    cfg = load_config(None, common + [f"train.output_dir={run}"])
    setup = build(cfg)
    crash_at_step(setup.optimizer, 3)  # steps 0-2 taken, the checkpoint of step 2 on disk
    with pytest.raises(Crash):
        train(cfg, setup=setup)
    again = train(load_config(None, common + [f"train.output_dir={run}", "train.resume=true"]))
    assert again["start_step"] == 2
    resumed = [r["lrs"][0] for r in map(json.loads, (run / "steps.jsonl").read_text().splitlines())]
    assert resumed == lrs
    a, b = weights(straight), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_schedule_over_seconds_needs_a_time_budget_and_keeps_old_fingerprints():
    from zotune.config import ConfigError

    with pytest.raises(ConfigError, match=r"optim\.schedule_over=seconds spans the time budget: set train\.max_seconds"):
        load_config(None, TINY + ["optim.schedule_over=seconds"])
    with pytest.raises(ConfigError, match=r"optim\.schedule_over.*Did you mean 'seconds'"):
        load_config(None, TINY + ["optim.schedule_over=second", "train.max_seconds=10"])
    base = load_config(None, ["train.max_seconds=10"]).fingerprint()
    assert load_config(None, ["train.max_seconds=10", "optim.schedule_over=steps"]).fingerprint() == base
    assert load_config(None, ["train.max_seconds=10", "optim.schedule_over=seconds"]).fingerprint() != base


@pytest.mark.parametrize("value", ["-1", "true", "soon"])
def test_a_bad_time_budget_is_refused(value):
    from zotune.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.max_seconds"):
        load_config(None, TINY + [f"train.max_seconds={value}"])


def test_the_zero_shot_of_a_prefix_run_is_the_base_models(tmp_path):
    """A prefix from real activations changes what the model computes before any step (as if
    real tokens came first): the zero-shot baseline must still be the base model's rows, the
    same rows a full fine-tuning run of the task measures."""
    common = TINY + ["task.test=16", "train.steps=1", "train.save_every=1", "optim.lr=1e-9"]
    rows = {}
    for scheme in ("full", "prefix"):
        run = tmp_path / scheme
        train(load_config(None, common + [f"trainable.scheme={scheme}", f"train.output_dir={run}"]))
        rows[scheme] = json.loads((run / "test_rows.json").read_text())["zero_shot"]
    assert rows["prefix"] == rows["full"]


def test_a_prompt_starts_from_rows_of_the_vocabulary_drawn_with_the_run_seed():
    """peft's default prompt is N(0, 1) vectors, far larger than any token embedding; a run's
    prompt starts from real token embeddings (Lester et al.), the same ones for the same seed."""
    def prompt(seed):
        setup = build(load_config(None, TINY + ["trainable.scheme=prompt", f"optim.seed={seed}"]))
        (p,) = setup.named.values()
        return p.detach().clone(), setup.model.get_base_model().get_input_embeddings().weight

    a, vocab = prompt(0)
    b, _ = prompt(0)
    c, _ = prompt(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(bool((vocab == row).all(1).any()) for row in a)  # every row is a token's embedding


def test_a_prompt_starts_from_the_recipes_text_whatever_the_seed():
    """trainable.prompt_init_text: the virtual tokens are that text's token embeddings, repeated to
    fill the prompt, for every seed (a replay rebuilds the same start from the config)."""
    def prompt(seed):
        setup = build(load_config(None, TINY + ["trainable.scheme=prompt", "trainable.prompt_tokens=4",
                                                "trainable.prompt_init_text=It was", f"optim.seed={seed}"]))
        (p,) = setup.named.values()
        ids = setup.loaded.tokenizer("It was", add_special_tokens=False)["input_ids"]
        table = setup.model.get_base_model().get_input_embeddings().weight
        return p.detach().clone(), table[(ids * 4)[:4]].detach()

    a, want = prompt(0)
    b, _ = prompt(1)
    assert torch.equal(a, want) and torch.equal(a, b)


def test_prefix_values_only_trains_the_values_and_leaves_the_keys(tmp_path):
    """trainable.prefix_values_only: the ZO direction is masked to the prefix's values, so after
    training the keys are still the real tokens' keys; a resumed run rebuilds the same mask."""
    from zotune.params import prefix_value_masks

    over = TINY + ["trainable.scheme=prefix", "trainable.prefix_values_only=true", "optim.lr=1e-2",
                   "optim.eps=1e-1", "train.steps=3", "train.eval_every=0", f"train.output_dir={tmp_path}"]
    start = build(load_config(None, over))
    (table,) = start.named.values()
    before = table.detach().clone()
    train(load_config(None, over))
    after = build(load_config(None, over))  # the layout rebuilt from the config, then the trained prefix
    ckpt.copy_weights(tmp_path / "ckpt-last", after.named)
    (trained,) = after.named.values()
    (mask,) = prefix_value_masks(after.loaded, after.named).values()
    assert torch.equal(trained.detach()[~mask], before[~mask])
    assert not torch.equal(trained.detach()[mask], before[mask])
