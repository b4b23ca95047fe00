"""Hub names, offline: ``model.name: some-org/some-model`` and ``task.hub: true`` through a cache
laid out as the hub libraries lay it out, built here, read with ``HF_HUB_OFFLINE=1``.

- model: ``$HF_HUB_CACHE/models--some-org--some-model/`` with ``refs/main`` holding a commit
  hash, ``snapshots/<hash>/`` holding symlinks into ``blobs/`` (a tiny random LLaMA saved there);
- data set: ``$HF_DATASETS_CACHE/nyu-mll___glue/sst2/0.0.0/<hash>/`` (``glue-train.arrow``,
  ``glue-validation.arrow``, ``dataset_info.json``), what ``datasets.load_dataset("nyu-mll/glue",
  "sst2")`` leaves after a download and reads back offline.

The hub environment variables are read when huggingface_hub / datasets are imported, so the
loading runs in a fresh process with them set; the results are compared here with the same
tiny model and the same rows read from a local file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zotune.tasks import SplitSpec, load_task
from zotune.testing import tiny_model
from zotune.train.evaluate import evaluate

datasets = pytest.importorskip("datasets", reason="task.hub needs the `datasets` package (pip install -e '.[data]')")

REPO, REV = "some-org/some-model", "0123456789abcdef0123456789abcdef01234567"
ROWS = [  # SST-2's columns on the hub: sentence, label (0 negative, 1 positive), idx
    ("a great movie", 1), ("a terrible film", 0), ("good and great", 1), ("bad , so bad", 0),
    ("the film is not good", 0), ("yes , a good film", 1), ("what a bad movie", 0), ("great", 1),
    ("this is terrible", 0), ("I was so good", 1),
]
TRAIN, VALIDATION = ROWS[:6], ROWS[6:]
IDS = [0, 45, 300, 7, 12]

TASK_FILE = """name: hub-sst2
data:
  hub: {path: nyu-mll/glue, name: sst2}
fields: [sentence, label]
label_field: label
metric: accuracy
templates:
  zotune:
    context: "{{ sentence | trim }} It was"
    choices: [" terrible", " great"]
"""

SCRIPT = r"""
import json, sys
TASK_FILE = sys.argv[2]
from zotune.models import ModelLoadError, load_model
from zotune.tasks import SplitSpec, load_task

out = {}
lm = load_model("some-org/some-model")
import torch
with torch.no_grad():
    out["logits"] = lm.model(input_ids=torch.tensor([json.loads(sys.argv[1])])).logits[0].tolist()
out["kind"], out["name"] = lm.kind, lm.name
try:
    load_model("some-org/not-in-the-cache")
except ModelLoadError as e:
    out["missing"] = str(e)
data = load_task("sst2", hub=True, split=SplitSpec(train=6, dev=0, test=4), eval_file="validation")
out["sources"] = list(data.sources)
out["train"] = [[list(map(list, e.choices)), e.label] for e in data.train]
out["test"] = [[list(map(list, e.choices)), e.label] for e in data.test]
# a task file (no Python) whose data.hub names the same cached data set
open("hub-task.yaml", "w").write(TASK_FILE)
ft = load_task("hub-task.yaml", hub=True, split=SplitSpec(train=6, dev=0, test=4), eval_file="validation")
out["file_sources"] = list(ft.sources)
out["file_train"] = [[list(map(list, e.choices)), e.label] for e in ft.train]
out["file_test"] = [[list(map(list, e.choices)), e.label] for e in ft.test]
print("RESULT " + json.dumps(out))
sys.stdout.flush()
# the whole command, config to JSON line: a hub model scored on a hub data set
from zotune.cli import main
sys.exit(main(["eval", "model.name=some-org/some-model", "task.name=sst2", "task.hub=true",
               "task.eval_file=validation", "task.train=0", "task.dev=0", "task.test=4",
               "train.eval_batch_size=4", "train.progress=false"]))
"""


def _blob_link(repo: Path, file: Path) -> None:
    """Move ``file`` into ``repo/blobs/<sha256>`` and leave a relative symlink, as the hub cache does."""
    digest = hashlib.sha256(file.read_bytes()).hexdigest()
    blob = repo / "blobs" / digest
    blob.parent.mkdir(exist_ok=True)
    shutil.move(str(file), blob)
    file.symlink_to(os.path.relpath(blob, file.parent))


def _model_cache(hub: Path) -> None:
    repo = hub / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / REV
    lm = tiny_model("llama")
    lm.model.save_pretrained(str(snapshot))
    lm.tokenizer.save_pretrained(str(snapshot))
    for f in list(snapshot.iterdir()):
        _blob_link(repo, f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)


def _dataset_cache(cache: Path, work: Path) -> None:
    """Prepare the rows with datasets' own parquet builder, then name the folder and files as a
    hub download of nyu-mll/glue, config sst2, names them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in (("train", TRAIN), ("validation", VALIDATION)):
        files[split] = [str(work / f"{split}.parquet")]
        start = 0 if split == "train" else len(TRAIN)
        pq.write_table(pa.table({"sentence": [s for s, _ in rows], "label": [y for _, y in rows],
                                 "idx": list(range(start, start + len(rows)))}), files[split][0])
    builder = Parquet(cache_dir=str(work / "prepared"), dataset_name="glue", config_name="sst2",
                      data_files=files, hash=REV[:16])
    builder.download_and_prepare()
    target = cache / "nyu-mll___glue" / "sst2" / "0.0.0" / REV[:16]
    target.parent.mkdir(parents=True)
    shutil.copytree(builder.cache_dir, target)
    names = sorted(p.name for p in target.glob("*.arrow"))
    assert names == ["glue-train.arrow", "glue-validation.arrow"], names


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    _model_cache(root / "home" / "hub")
    _dataset_cache(root / "home" / "datasets", root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(root / "home"),
               HF_HUB_CACHE=str(root / "home" / "hub"), HF_DATASETS_CACHE=str(root / "home" / "datasets"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(IDS), TASK_FILE], capture_output=True, text=True,
                          timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    result = json.loads(next(x for x in lines if x.startswith("RESULT "))[len("RESULT "):])
    result["eval"] = json.loads(lines[-1])
    result["root"] = root
    return result


def test_a_hub_name_loads_the_cached_snapshot(offline):
    assert offline["kind"] == "causal" and offline["name"] == REPO
    with torch.no_grad():
        expected = tiny_model("llama").model(input_ids=torch.tensor([IDS])).logits[0]
    assert torch.equal(torch.tensor(offline["logits"]), expected)


def test_a_hub_name_not_in_the_cache_says_what_to_pass_instead(offline):
    msg = offline["missing"]
    assert "could not load 'some-org/not-in-the-cache' from the Hugging Face hub" in msg
    assert "pass a local folder" in msg and "smollm2-135m" in msg


def _file_task(tmp_path: Path):
    """The same rows from local files, split the same way."""
    for name, rows in (("train.tsv", TRAIN), ("dev.tsv", VALIDATION)):
        (tmp_path / name).write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return load_task("sst2", split=SplitSpec(train=6, dev=0, test=4), train_file=tmp_path / "train.tsv",
                     eval_file=tmp_path / "dev.tsv")


def test_task_hub_reads_the_cached_dataset_as_the_files_would(offline, tmp_path):
    files = _file_task(tmp_path)
    assert offline["sources"] == ["hub:nyu-mll/glue/sst2[train]", "hub:nyu-mll/glue/sst2[validation]"]
    as_lists = lambda examples: [[list(map(list, e.choices)), e.label] for e in examples]  # noqa: E731
    assert offline["train"] == as_lists(files.train)
    assert offline["test"] == as_lists(files.test)
    assert sorted(e[1] for e in offline["test"]) == sorted(y for _, y in VALIDATION)


def test_a_task_file_with_data_hub_reads_the_cached_dataset_as_the_built_in_does(offline):
    # the file's template is the built-in's, so the rows must be the same Examples
    assert offline["file_sources"] == offline["sources"]
    assert offline["file_train"] == offline["train"] and offline["file_test"] == offline["test"]


def test_zotune_eval_scores_a_hub_model_on_a_hub_task(offline, tmp_path):
    files = _file_task(tmp_path)
    lm = tiny_model("llama")
    expected = evaluate(lm, lm.tokenizer, files.test, "accuracy", batch_size=4, max_length=64)
    got = offline["eval"]
    assert got["model"] == REPO and got["task"] == "sst2" and got["split"] == "test"
    assert got["accuracy"] == expected["accuracy"] and got["n"] == 4
