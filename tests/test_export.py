"""zotune export: tiny runs trained a few ZO steps, exported, then loaded in a fresh Python process
by transformers / peft alone (importing zotune there fails on purpose), and their logits compared
with zotune's own evaluation of the same checkpoint; every export error; GGUF quantization_config."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import load_config
from zotune.export import ExportError, export, find_source
from zotune.models import forget_gguf_quantization, load_model
from zotune.testing import tiny_model
from zotune.train.checkpoint import load_checkpoint, save_checkpoint
from zotune.train.evaluate import evaluate
from zotune.train.loop import build, train

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = [
    # SST-2's dev file (872 rows) as the training file: read in a blink, unlike train.tsv's 67,349
    "task.name=sst2", "task.train_file=SST-2/dev.tsv", "task.train=16", "task.dev=0", "task.test=0",
    f"task.data_root={DATA}",
    "task.max_length=32", "train.batch_size=4", "train.steps=4", "train.save_every=4", "train.progress=false",
    "train.tensorboard=false", "train.eval_batch_size=16", "train.eval_at_start=false",
]
RUNS = {  # name -> (model, scheme, extra overrides)
    "full": ("tiny-llama", "full", ["optim.lr=3e-3"]),
    "norms": ("tiny-llama", "norms", ["optim.lr=3e-2", "optim.eps=1e-2"]),
    "final_norm": ("tiny-llama", "final_norm", ["optim.lr=3e-2", "optim.eps=1e-2"]),
    "lora": ("tiny-llama", "lora", ["optim.lr=3e-2", "optim.eps=1e-1"]),
    "prefix": ("tiny-llama", "prefix", ["optim.lr=1e-2", "optim.eps=1e-1"]),
    "prompt-masked": ("tiny-roberta", "prompt", ["optim.lr=1e-2", "optim.eps=1e-1"]),
    "full-masked": ("tiny-roberta", "full", ["optim.lr=3e-3"]),
}
EXPORTS = {  # name -> (run, merge, from_log)
    "full": ("full", False, False),
    "full-log": ("full", False, True),
    "norms": ("norms", False, False),
    "final_norm": ("final_norm", False, False),
    "lora": ("lora", False, False),
    "lora-merged": ("lora", True, False),
    "prefix": ("prefix", False, False),
    "prompt-masked": ("prompt-masked", False, False),
    "full-masked": ("full-masked", False, False),
}
TEXTS = ["the movie was great", "a terrible , bad film ."]

# Run in a fresh interpreter: load each export with transformers / peft only and write its logits.
LOADER = r"""
import json, sys

class NoZotune:  # an export must load where zotune is not installed
    def find_spec(self, name, path=None, target=None):
        if name == "zotune" or name.startswith("zotune."):
            raise ImportError("an exported folder must load without zotune")
sys.meta_path.insert(0, NoZotune())

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

spec = json.loads(open(sys.argv[1]).read())
logits, facts = {}, {}
for name, e in spec["exports"].items():
    auto = AutoModelForMaskedLM if e["kind"] == "masked" else AutoModelForCausalLM
    if e["base"] is None:
        model = auto.from_pretrained(e["folder"])
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        facts[name] = {"tied": emb.data_ptr() == head.data_ptr(), "quantizer": getattr(model, "hf_quantizer", None) is not None}
    else:
        model = PeftModel.from_pretrained(auto.from_pretrained(e["base"]), e["folder"])
        facts[name] = {"peft_type": str(model.peft_config["default"].peft_type.value)}
    model.eval()
    tok = AutoTokenizer.from_pretrained(e["folder"])
    for i, text in enumerate(spec["texts"]):
        enc = tok(text, return_tensors="pt")
        facts[name][f"ids{i}"] = enc["input_ids"][0].tolist()
        with torch.no_grad():
            logits[f"{name}/{i}"] = model(**enc).logits.contiguous()
facts["zotune_imported"] = any(m == "zotune" or m.startswith("zotune.") for m in sys.modules)
save_file(logits, spec["logits"])
open(spec["facts"], "w").write(json.dumps(facts))
"""


def _cfg(name: str, root: Path):
    model, scheme, extra = RUNS[name]
    return load_config(None, TINY + [f"model.name={model}", f"trainable.scheme={scheme}",
                                     f"train.output_dir={root / name}"] + extra)


def _zotune_eval(cfg, checkpoint: Path):
    """The model as ``zotune eval --checkpoint`` builds it: the run's setup, the tensors copied in."""
    setup = build(cfg, splits=("test",))
    tensors, _, _ = load_checkpoint(checkpoint)
    with torch.no_grad():
        for name, p in setup.named.items():
            p.copy_(tensors[name])
    return setup


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Train each tiny run, export it every way, and load every export once in a fresh process."""
    root = tmp_path_factory.mktemp("export")
    cfgs, before = {}, {}
    for name in RUNS:
        cfgs[name] = _cfg(name, root / "runs")
        setup = build(cfgs[name])
        before[name] = {n: p.detach().clone() for n, p in setup.named.items()}
        train(cfgs[name], setup=setup)
    infos = {name: export(root / "runs" / run, root / "out" / name, merge=merge, from_log=log)
             for name, (run, merge, log) in EXPORTS.items()}
    bases = {}
    for arch in ("llama", "roberta"):
        bases[arch] = root / f"base-{arch}"
        tiny_model(arch).model.save_pretrained(str(bases[arch]))  # seeded: the runs' base model
    spec = {"texts": TEXTS, "logits": str(root / "logits.safetensors"), "facts": str(root / "facts.json"),
            "exports": {}}
    for name, info in infos.items():
        adapter = info["format"] == "peft"
        arch = "roberta" if info["kind"] == "masked" else "llama"
        spec["exports"][name] = {"folder": info["out"], "kind": info["kind"],
                                 "base": str(bases[arch]) if adapter else None}
    (root / "spec.json").write_text(json.dumps(spec))
    (root / "loader.py").write_text(LOADER)
    proc = subprocess.run([sys.executable, str(root / "loader.py"), str(root / "spec.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "cfgs": cfgs, "before": before, "infos": infos,
            "logits": load_file(spec["logits"]), "facts": json.loads((root / "facts.json").read_text())}


def test_exports_load_without_zotune_and_write_safetensors_only(exported):
    assert exported["facts"]["zotune_imported"] is False
    for name, info in exported["infos"].items():
        files = set(info["files"])
        weights = "adapter_model.safetensors" if info["format"] == "peft" else "model.safetensors"
        assert weights in files and "tokenizer.json" in files, name
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], name
        if info["format"] != "peft":
            config = json.loads((Path(info["out"]) / "config.json").read_text())
            assert "quantization_config" not in config, name
            assert exported["facts"][name]["quantizer"] is False, name
    assert [exported["infos"][n]["format"] for n in ("full", "norms", "final_norm", "lora", "lora-merged", "prefix",
                                                     "prompt-masked")] \
        == ["transformers", "transformers", "transformers", "peft", "transformers (LoRA merged)", "peft", "peft"]
    assert exported["facts"]["prefix"]["peft_type"] == "PREFIX_TUNING"
    assert exported["facts"]["prompt-masked"]["peft_type"] == "PROMPT_TUNING"


@pytest.mark.parametrize("name", ["full", "full-log", "norms", "final_norm", "lora", "prefix", "prompt-masked",
                                  "full-masked"])
def test_exported_logits_equal_zotune_evaluation_of_the_checkpoint(exported, name):
    run = EXPORTS[name][0]
    cfg = exported["cfgs"][run]
    setup = _zotune_eval(cfg, exported["root"] / "runs" / run / "ckpt-last")
    moved = [n for n, p in setup.named.items() if not torch.equal(p.detach(), exported["before"][run][n])]
    assert moved, "training changed no tensor: the comparison would not test the export"
    for i, text in enumerate(TEXTS):
        enc = setup.loaded.tokenizer(text, return_tensors="pt")
        assert enc["input_ids"][0].tolist() == exported["facts"][name][f"ids{i}"]  # the saved tokenizer
        with torch.no_grad():
            ours = setup.model(**enc).logits
        theirs = exported["logits"][f"{name}/{i}"]
        assert theirs.shape == ours.shape
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_merged_lora_equals_the_adapter_to_float_rounding(exported):
    setup = _zotune_eval(exported["cfgs"]["lora"], exported["root"] / "runs" / "lora" / "ckpt-last")
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            ours = setup.model(**setup.loaded.tokenizer(text, return_tensors="pt")).logits
        torch.testing.assert_close(exported["logits"][f"lora-merged/{i}"], ours, rtol=1e-4, atol=1e-4)
        # and the merge changed something: LoRA moved away from its zero start
        base = tiny_model("llama").model(**setup.loaded.tokenizer(text, return_tensors="pt")).logits.detach()
        assert not torch.allclose(exported["logits"][f"lora-merged/{i}"], base, rtol=0, atol=1e-6)


def test_tied_weights_stay_tied(exported):
    saved = load_file(str(Path(exported["infos"]["full"]["out"]) / "model.safetensors"))
    assert "model.embed_tokens.weight" in saved and "lm_head.weight" not in saved
    config = json.loads((Path(exported["infos"]["full"]["out"]) / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    for name in ("full", "full-masked", "lora-merged"):
        assert exported["facts"][name]["tied"] is True, name


def test_export_from_the_step_log_equals_the_checkpoint_export(exported):
    a = load_file(str(Path(exported["infos"]["full"]["out"]) / "model.safetensors"))
    b = load_file(str(Path(exported["infos"]["full-log"]["out"]) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    info = exported["infos"]["full-log"]
    assert info["checkpoint"] is None and info["step"] == 4
    assert info["replay"] == {"steps": 4, "max_abs_diff_vs_checkpoint": 0.0, "bitwise_equal": True}
    on_disk = json.loads((Path(info["out"]) / "export_info.json").read_text())
    assert on_disk["source"] == "rebuilt from steps.jsonl (from_log)" and on_disk["method"] == "mezo"


def test_exported_folder_scores_as_zotune_eval_does(exported):
    cfg = copy.deepcopy(exported["cfgs"]["full"])
    cfg.task.test = 16  # the runs skipped their final test to save time
    setup = _zotune_eval(cfg, exported["root"] / "runs" / "full" / "ckpt-last")
    loaded = load_model(exported["infos"]["full"]["out"])
    kw = dict(batch_size=16, max_length=cfg.task.max_length, scoring=cfg.task.scoring)
    ours = evaluate(setup.loaded, setup.loaded.tokenizer, setup.data.test, "accuracy", **kw)
    theirs = evaluate(loaded, loaded.tokenizer, setup.data.test, "accuracy", **kw)
    assert ours == theirs and ours["n"] == 16


# ----------------------------------------------------------------------------- which checkpoint
def _fake_run(root: Path, steps: dict[str, int], tested: int | None) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(load_config(None, ["model.name=tiny-llama"]).to_dict()))
    for folder, step in steps.items():
        save_checkpoint(root / folder, {"w": torch.zeros(1)}, None, {"step": step})
    if tested is not None:
        (root / "results.json").write_text(json.dumps({"tested_step": tested}))
    return root


def test_a_run_folder_exports_the_checkpoint_its_test_score_comes_from(tmp_path):
    run = _fake_run(tmp_path / "a", {"ckpt-last": 8, "ckpt-best": 4}, tested=4)
    assert find_source(run).checkpoint == run / "ckpt-best"
    run = _fake_run(tmp_path / "b", {"ckpt-last": 8, "ckpt-best": 8}, tested=8)
    assert find_source(run).checkpoint == run / "ckpt-best"  # the same step: either is the tested one
    run = _fake_run(tmp_path / "c", {"ckpt-last": 6, "ckpt-best": 4}, tested=None)  # still running
    assert find_source(run).checkpoint == run / "ckpt-last"
    assert find_source(run / "ckpt-best").checkpoint == run / "ckpt-best"
    run = _fake_run(tmp_path / "d", {}, tested=None)
    (run / "steps.jsonl").write_text("")
    assert find_source(run).checkpoint is None  # no checkpoint: rebuilt from the step log


# ----------------------------------------------------------------------------- errors
def test_export_errors_name_the_problem(tmp_path, exported):
    runs = exported["root"] / "runs"
    with pytest.raises(ExportError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "o1")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ExportError, match="is a file: pass a run folder"):
        export(tmp_path / "file.txt", tmp_path / "o1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="is not a zotune run or checkpoint folder"):
        export(tmp_path / "empty", tmp_path / "o1")
    with pytest.raises(ExportError, match="exists and is not empty"):
        export(runs / "full", exported["infos"]["lora"]["out"])
    with pytest.raises(ExportError, match="--out .* is a file"):
        export(runs / "full", tmp_path / "file.txt")
    with pytest.raises(ExportError, match="merge folds LoRA into the base weights; this run's scheme is 'prefix'"):
        export(runs / "prefix", tmp_path / "o1", merge=True)
    with pytest.raises(ExportError, match="pass the run folder"):
        export(runs / "full" / "ckpt-last", tmp_path / "o1", from_log=True)
    shutil.copytree(runs / "full" / "ckpt-last", tmp_path / "loose")
    with pytest.raises(ExportError, match="has no config.json beside it"):
        export(tmp_path / "loose", tmp_path / "o1")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(runs / "full" / "config.json", bare / "config.json")
    with pytest.raises(ExportError, match="has no checkpoint and no steps.jsonl"):
        export(bare, tmp_path / "o1")
    other = tmp_path / "other"
    shutil.copytree(runs / "full", other)
    config = json.loads((other / "config.json").read_text())
    config["trainable"]["scheme"] = "lora"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="holds scheme 'full' tensors, but the run's config.json says"):
        export(other, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()  # nothing written by a refused export
    (tmp_path / "o2").mkdir()  # an empty folder is fine
    assert export(runs / "full", tmp_path / "o2")["format"] == "transformers"


def test_cli_export_prints_json_and_names_errors_in_one_line(tmp_path, exported, capsys):
    from zotune.cli import main

    runs = exported["root"] / "runs"
    assert main(["export", str(runs / "lora"), "--merge", "--out", str(tmp_path / "m")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["format"] == "transformers (LoRA merged)"
    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(Path(exported["infos"]["lora-merged"]["out"]) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert main(["export", str(runs / "full"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("zotune: error: --out") and "Traceback" not in err
    with pytest.raises(SystemExit):  # --out is required
        main(["export", str(runs / "full")])


# ----------------------------------------------------------------------------- GGUF leftovers
def _gguf_marked_folder(path: Path) -> Path:
    """A tiny save_pretrained folder whose config.json says GGUF although its weights are floats,
    as a folder converted from a .gguf by older zotune (or by transformers) is."""
    lm = tiny_model("llama")
    lm.model.save_pretrained(str(path))
    lm.tokenizer.save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_folder_marked_gguf_loads_as_plain_floats_and_saves(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = _gguf_marked_folder(tmp_path / "marked")
    raw = AutoModelForCausalLM.from_pretrained(str(folder))
    assert raw.hf_quantizer is not None  # the problem: transformers attaches a GGUF quantizer
    with pytest.raises(ValueError, match="not serializable"):
        raw.save_pretrained(str(tmp_path / "refused"))
    forget_gguf_quantization(raw)
    raw.save_pretrained(str(tmp_path / "resaved"))
    assert "quantization_config" not in json.loads((tmp_path / "resaved" / "config.json").read_text())

    loaded = load_model(str(folder))
    assert getattr(loaded.model, "hf_quantizer", None) is None
    assert getattr(loaded.model.config, "quantization_config", None) is None
    reference = tiny_model("llama").model
    for (n, p), (m, q) in zip(loaded.model.state_dict().items(), reference.state_dict().items()):
        assert n == m and torch.equal(p, q), n
    loaded.model.save_pretrained(str(tmp_path / "saved"))
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_export_of_a_run_on_a_gguf_marked_folder_has_no_quantization_config(tmp_path):
    folder = _gguf_marked_folder(tmp_path / "marked")
    cfg = load_config(None, TINY + [f"model.name={folder}", "train.steps=2", "train.save_every=2",
                                    "optim.lr=3e-3", f"train.output_dir={tmp_path / 'run'}"])
    train(cfg)
    info = export(tmp_path / "run", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config and info["base_model"] == str(folder)
    tensors, _, _ = load_checkpoint(tmp_path / "run" / "ckpt-last")
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, t in tensors.items():
        assert torch.equal(saved[name], t), name
