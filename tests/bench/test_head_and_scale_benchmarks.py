"""benchmarks/head_speed.py and benchmarks/trainable_scale.py on the tiny model: the old and new
code paths give the same loss, and each run writes its table's JSON with machine and date."""

from __future__ import annotations

import json

import pytest


def test_head_speed_runs_the_old_and_new_paths_to_the_same_loss(tmp_path, benchmark_script):
    out = tmp_path / "head.json"
    result = benchmark_script("head_speed").main(["--model", "tiny-llama", "--schemes", "lora,prompt", "--batch", "4",
                                                  "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert {"date", "machine", "threads", "torch"} <= set(result["meta"]) and result["meta"]["model"] == "tiny-llama"
    assert [r["scheme"] for r in result["rows"]] == ["lora", "prompt"]
    for r in result["rows"]:
        assert r["loss_after"] == pytest.approx(r["loss_before"], rel=1e-5)
        assert r["before_s"] > 0 and r["after_s"] > 0 and len(r["times"]["before"]) == 1


def test_trainable_scale_reads_each_schemes_step_0_entries(tmp_path, benchmark_script):
    out = tmp_path / "scale.json"
    result = benchmark_script("trainable_scale").main(["--model", "tiny-llama", "--schemes", "full,prompt",
                                                       "--out", str(out)])
    rows = {r["scheme"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["prompt"]["entries"] == 10 * 64  # 10 virtual tokens of the tiny model's width
    assert 0 < rows["prompt"]["rms"] < 1  # token embeddings, not peft's N(0, 1) vectors
    assert rows["full"]["entries"] > rows["prompt"]["entries"] and result["meta"]["model"] == "tiny-llama"


def test_a_record_carries_machine_and_date_and_makes_its_folder(tmp_path):
    from zotune.bench.record import write_record

    record = write_record(tmp_path / "a" / "b.json", {"rows": [1, 2]}, model="m")
    assert json.loads((tmp_path / "a" / "b.json").read_text()) == record
    assert record["rows"] == [1, 2] and record["meta"]["model"] == "m" and {"date", "cpu"} <= set(record["meta"])
