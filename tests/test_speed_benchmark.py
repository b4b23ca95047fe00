"""benchmarks/speed.py: its literal Algorithm 1 baseline does what the paper says, and a run
writes the JSON and table the docs are filled from (tiny model, one round)."""

from __future__ import annotations

import json

import torch


def test_algorithm_1_moves_along_the_seeded_randn_directions(benchmark_script):
    bench = benchmark_script("speed")
    x0 = [torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64), torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)]
    params = [torch.nn.Parameter(t.clone()) for t in x0]
    a = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)

    def loss():
        return (params[0] * a).sum() ** 2 + (params[1] ** 3).sum()

    with torch.random.fork_rng(devices=[]):
        c = bench.algorithm_1_step(params, loss, 17, lr=0.01, eps=1e-3)
        torch.manual_seed(17)  # the paper's z: one randn per parameter, in order, after the reset
        z = [torch.randn(t.shape, dtype=t.dtype) for t in x0]
    lp = ((x0[0] + 1e-3 * z[0]) * a).sum() ** 2 + ((x0[1] + 1e-3 * z[1]) ** 3).sum()
    lm = ((x0[0] - 1e-3 * z[0]) * a).sum() ** 2 + ((x0[1] - 1e-3 * z[1]) ** 3).sum()
    expected_c = float((lp - lm) / 2e-3)
    assert abs(c - expected_c) < 1e-9 * max(1.0, abs(expected_c))
    for p, x, zi in zip(params, x0, z):
        torch.testing.assert_close(p.detach(), x - 0.01 * expected_c * zi, rtol=1e-12, atol=1e-12)


def test_a_run_writes_ratios_targets_and_the_table(tmp_path, capsys, benchmark_script):
    bench = benchmark_script("speed")
    out = tmp_path / "speed.json"
    assert bench.main(["--model", "tiny-llama", "--batch", "2", "--seq-len", "8", "--repeats", "1",
                       "--methods", "mezo,mezo-rademacher,algorithm-1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"date", "machine", "torch", "cpu_threads", "loss"} <= set(result)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["mezo", "mezo-rademacher", "algorithm-1"]
    for r in rows.values():
        assert r["ratio"] == r["step_s"] / r["forward_s"] and len(r["step_s_all"]) == 1
        assert r["speedup_vs_algorithm_1"] == rows["algorithm-1"]["step_s"] / r["step_s"]
    assert (rows["mezo"]["target"], rows["mezo-rademacher"]["target"], rows["algorithm-1"]["target"]) == (1.15, 1.05, None)
    assert result["speedup_target"] == {"method": "mezo", "baseline": "algorithm-1", "target": 1.5,
                                        "value": rows["algorithm-1"]["step_s"] / rows["mezo"]["step_s"]}
    capsys.readouterr()
    assert bench.main(["--markdown", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| MeZO, Rademacher directions from random bits |" in table and "mezo over algorithm-1" in table
