"""Data-parallel ZO over gloo: 2 ranks equal 1 rank, 8 q bytes a step, a dead rank fails fast.

The ranks are real processes started the way torchrun starts them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR=127.0.0.1, a free MASTER_PORT); each runs this file as a script with a
job name (see ``JOBS`` at the bottom) and writes what it saw to a JSON file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zotune.distributed import DistributedError, init_from_env, scalar_reduce, shutdown
from zotune.train.loop import BatchOrder

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared data not found beside the repo")

TINY = [
    "model.name=tiny-llama", "task.name=sst2", "task.train=48", "task.dev=8", "task.test=0",
    f"task.data_root={DATA}", "task.max_length=48", "train.batch_size=4", "optim.lr=3e-4",
    "train.progress=false", "train.tensorboard=false", "train.eval_batch_size=16",
    "train.eval_at_start=false",
]
# an nll task: the answers' token counts differ from shard to shard
NLL = TINY + ["task.name=squad", "task.max_length=96", "train.steps=3", "train.save_every=3"]


# ----------------------------------------------------------------------------- launching ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, job: str, args: dict, world_size: int = 2, timeout: float = 300.0,
           wait_for: tuple[int, ...] | None = None) -> list[dict]:
    """Start ``world_size`` ranks of ``job``; wait for the ranks in ``wait_for`` (all by
    default), kill the others, and return each rank's JSON report ({} if it wrote none)."""
    port = _free_port()
    procs, outs, logs = [], [], []
    for r in range(world_size):
        out, log = tmp / f"{job}-rank{r}.json", tmp / f"{job}-rank{r}.log"
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
               "OMP_NUM_THREADS": "1"}
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, __file__, job, json.dumps({**args, "out": str(out)})],
                                          env=env, stdout=f, stderr=subprocess.STDOUT))
        outs.append(out)
        logs.append(log)
    deadline = time.monotonic() + timeout
    try:
        for r in (range(world_size) if wait_for is None else wait_for):
            procs[r].wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reports = []
    for r, (out, log) in enumerate(zip(outs, logs)):
        report = json.loads(out.read_text()) if out.exists() else {}
        report["returncode"], report["log"] = procs[r].returncode, log.read_text()[-3000:]
        reports.append(report)
    return reports


# ----------------------------------------------------------------------------- a tiny regression
def mlp_train(steps: int, q: int, reduce=None, rank: int = 0, world_size: int = 1, hang: dict | None = None) -> dict:
    """ZO-SGD on a float64 MLP; step t's global batch is ``BatchOrder`` t, rank r takes
    ``[r::world_size]`` of it (as the training loop does). ``hang``: {rank, step} that stops."""
    from zotune.estimators import Gaussian
    from zotune.step import ZOOptimizer

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True))
    named = {"w1": torch.randn(6, 16, generator=g, dtype=torch.float64) * 0.4,
             "b1": torch.zeros(16, dtype=torch.float64),
             "w2": torch.randn(16, 1, generator=g, dtype=torch.float64) * 0.4}
    opt = ZOOptimizer(list(named.items()), Gaussian(queries=q), "sgd", lr=0.05, eps=1e-3, seed=7, reduce=reduce)
    order = BatchOrder(len(x), 8, seed=1)
    for t in range(steps):
        if hang and rank == hang["rank"] and t == hang["step"]:
            time.sleep(600)  # a rank that hangs (killed by the test)
        idx = order.indices(t)[rank::world_size]
        xb, yb = x[idx], y[idx]
        opt.step(lambda: ((torch.tanh(xb @ named["w1"] + named["b1"]) @ named["w2"] - yb) ** 2).mean())
    return {k: v.tolist() for k, v in named.items()}


def _write(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report))


def job_mlp(args: dict) -> None:
    """Train ``steps`` steps data-parallel and report; then train again with a hanging rank."""
    ctx = init_from_env(timeout_s=args["timeout_s"])
    try:
        weights = mlp_train(args["steps"], args["q"], scalar_reduce(ctx), ctx.rank, ctx.world_size)
        report = {"weights": weights, "bytes": ctx.bytes_all_reduced, "all_reduces": ctx.all_reduces,
                  "backend": ctx.backend, "rank": ctx.rank}
        _write(args["out"], report)
        t0 = time.monotonic()
        try:
            mlp_train(args["steps"], args["q"], scalar_reduce(ctx), ctx.rank, ctx.world_size, args["hang"])
        except DistributedError as e:
            report.update(error=str(e), error_rank=e.rank, error_step=e.step, waited_s=e.waited_s,
                          seconds_to_error=time.monotonic() - t0)
        _write(args["out"], report)
    finally:
        shutdown(ctx)


@pytest.fixture(scope="module")
def mlp_ranks(tmp_path_factory):
    """One 2-rank launch: 6 ZO steps with q = 3, then a run where rank 1 hangs at step 4."""
    args = {"steps": 6, "q": 3, "timeout_s": 5, "hang": {"rank": 1, "step": 4}}
    return args, launch(tmp_path_factory.mktemp("mlp"), "mlp", args, wait_for=(0,), timeout=240)


def test_single_process_fallback_without_torchrun_env():
    ctx = init_from_env(env={})
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type) == (0, 1, None, "cpu")
    c = torch.tensor([1.5, -2.0], dtype=torch.float64)
    assert scalar_reduce(ctx)(c) is c and ctx.bytes_all_reduced == 0
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_from_env(env={"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ValueError, match="Did you mean"):
        init_from_env(backend="glo", env={})


def test_zo_two_ranks_equal_one_rank_and_send_8q_bytes_a_step(mlp_ranks):
    args, reports = mlp_ranks
    steps, q = args["steps"], args["q"]
    for r in reports:
        assert "weights" in r, r["log"]
        assert r["backend"] == "gloo"
        assert r["bytes"] == 8 * q * steps and r["all_reduces"] == steps  # q float64 scalars a step, nothing else
    one = mlp_train(steps, q)  # one process, the whole global batch
    start = mlp_train(0, q)
    for name in one:
        a, b, ref = (torch.tensor(w[name], dtype=torch.float64) for w in (reports[0]["weights"],
                                                                           reports[1]["weights"], one))
        assert torch.equal(a, b), name  # every rank applies the very same update
        torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-12)
        assert not torch.equal(ref, torch.tensor(start[name], dtype=torch.float64))


def test_a_hung_rank_makes_the_others_fail_within_the_timeout(mlp_ranks):
    args, reports = mlp_ranks
    survivor = reports[0]
    assert "error" in survivor, survivor["log"]
    assert survivor["error_rank"] == 0 and survivor["error_step"] == args["hang"]["step"]
    assert args["timeout_s"] - 0.5 < survivor["waited_s"] < args["timeout_s"] + 3
    assert survivor["seconds_to_error"] < args["timeout_s"] + 5
    msg = survivor["error"]
    assert msg.startswith("rank 0 of 2:") and "step 4" in msg and "timed out" in msg.lower()
    assert "resume with the same command" in msg


# ----------------------------------------------------------------------------- through the training loop
def job_loop(args: dict) -> None:
    """Run each of ``args["runs"]`` through ``run_training`` in one process group; rank
    ``exit_rank`` dies at the ``exit_step`` ZO all-reduce of the last run. A run is a dict:
    ``overrides`` (``{rank}`` replaced by this rank: one run folder per node) and ``copy``
    ([src, dst]: rank 1 copies a checkpoint folder first, as a user copies it to another node)."""
    import shutil

    import torch.distributed as dist

    from zotune.config import load_config
    from zotune.train.run import run_training

    ctx = init_from_env(timeout_s=args["timeout_s"])
    report: dict = {"runs": []}
    try:
        for k, run in enumerate(args["runs"]):
            last = k == len(args["runs"]) - 1
            if last and ctx.rank == args["exit_rank"]:
                real, calls = dist.all_reduce, [0]

                def dying_all_reduce(*a, **kw):
                    calls[0] += 1
                    if calls[0] > args["exit_step"]:  # one scalar all-reduce per ZO step
                        os._exit(3)
                    return real(*a, **kw)

                dist.all_reduce = dying_all_reduce
            if run.get("copy") and ctx.rank == 1:
                shutil.copytree(*run["copy"])
            overrides = [o.replace("{rank}", str(ctx.rank)) for o in run["overrides"]]
            try:
                res = run_training(load_config(None, overrides), timeout_s=args["timeout_s"])
                report["runs"].append({"steps": res["steps"], "start_step": res["start_step"]})
            except DistributedError as e:
                failed = {"error": str(e), "error_rank": e.rank, "error_step": e.step, "waited_s": e.waited_s}
                report["runs"].append(failed)
                if last:
                    report.update(failed)
            _write(args["out"], report)
    finally:
        shutdown(ctx)
    _write(args["out"], report)


def _trained(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "ckpt-last" / "weights.safetensors"))


@pytest.fixture(scope="module")
def loop_ranks(tmp_path_factory):
    """One 2-rank launch through ``run_training``: MeZO for 3 steps, FO-SGD (DDP) for 2 steps,
    streamed MeZO, MeZO on an nll task (SQuAD: answers of uneven token counts), two "nodes" with
    a run folder each (2 steps; 4 steps with rank 0's checkpoint alone; 4 steps after copying it
    to rank 1's folder), then MeZO again with rank 1 dying at step 3 (a checkpoint was saved at
    step 2)."""
    tmp = tmp_path_factory.mktemp("loop")
    zo = TINY + ["train.steps=3", "train.save_every=2", f"train.output_dir={tmp / 'zo'}"]
    fo = TINY + ["optim.method=fo-sgd", "optim.lr=1e-2", "train.steps=2", f"train.output_dir={tmp / 'fo'}"]
    dies = TINY + ["train.steps=6", "train.save_every=2", f"train.output_dir={tmp / 'dies'}"]
    streamed = TINY + ["train.steps=3", "model.offload=mmap", f"train.output_dir={tmp / 'streamed'}"]
    nll = NLL + [f"train.output_dir={tmp / 'nll'}"]
    nodes = TINY + ["train.save_every=2", f"train.output_dir={tmp / 'node{rank}'}"]
    runs = [{"overrides": zo}, {"overrides": fo}, {"overrides": streamed}, {"overrides": nll},
            {"overrides": nodes + ["train.steps=2"]}, {"overrides": nodes + ["train.steps=4"]},
            {"overrides": nodes + ["train.steps=4"], "copy": [str(tmp / "node0" / "ckpt-last"),
                                                              str(tmp / "node1" / "ckpt-last")]},
            {"overrides": dies}]
    args = {"runs": runs, "timeout_s": 30, "exit_rank": 1, "exit_step": 3}
    reports = launch(tmp, "loop", args, wait_for=(0,), timeout=300)
    return tmp, zo, fo, reports


@needs_data
def test_two_ranks_then_one_rank_from_the_checkpoint_equals_one_rank_throughout(loop_ranks, tmp_path):
    from zotune.config import load_config
    from zotune.train.loop import train

    tmp, zo, _, reports = loop_ranks
    assert [r.get("steps") for r in reports[0]["runs"][:3]] == [3, 2, 3], reports[0]["log"]
    # continue the 2-rank run with one process (another number of ranks) up to step 6
    train(load_config(None, [*zo, "train.steps=6"]))
    train(load_config(None, [*TINY, "train.steps=6", "train.save_every=2", f"train.output_dir={tmp_path / 'one'}"]))
    mixed, one = _trained(tmp / "zo"), _trained(tmp_path / "one")
    steps = [json.loads(line) for line in (tmp / "zo" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(6))
    assert all(abs(s["coeffs"][0]) > 0 for s in steps)  # the weights did move
    for name in one:
        # each rank's loss is the mean over its shard: equal to the 1-rank loss to float rounding
        torch.testing.assert_close(mixed[name], one[name], rtol=0, atol=2e-6)  # ~16 float32 ulps at 1


@needs_data
def test_streamed_weights_under_two_ranks_follow_the_plain_run(loop_ranks, tmp_path):
    from zotune.config import load_config
    from zotune.train.loop import train

    tmp, _, _, reports = loop_ranks
    assert reports[0]["runs"][2].get("steps") == 3, reports[0]["log"]
    # each rank streamed its own copy of the tensors (no two ranks updating one file)
    assert sorted(d.name for d in (tmp / "streamed" / "offload").iterdir()) == ["rank0", "rank1"]
    train(load_config(None, [*TINY, "train.steps=3", f"train.output_dir={tmp_path / 'plain'}"]))
    plain, streamed = _trained(tmp_path / "plain"), _trained(tmp / "streamed")
    assert plain.keys() == streamed.keys()
    for name in plain:
        torch.testing.assert_close(streamed[name], plain[name], rtol=1e-4, atol=1e-5)


@needs_data
def test_fo_ddp_baseline_two_ranks_equals_one_rank(loop_ranks, tmp_path):
    from zotune.config import load_config
    from zotune.train.loop import train

    tmp, _, fo, reports = loop_ranks
    assert reports[0]["runs"][1].get("steps") == 2, reports[0]["log"]
    train(load_config(None, [*fo, f"train.output_dir={tmp_path / 'fo1'}"]))
    ddp, one = _trained(tmp / "fo"), _trained(tmp_path / "fo1")
    for name in one:  # DDP averages the two shards' gradients: the full batch's gradient
        torch.testing.assert_close(ddp[name], one[name], rtol=0, atol=1e-6)


@needs_data
def test_nll_losses_of_uneven_token_counts_on_two_ranks_equal_one_rank(loop_ranks, tmp_path):
    from zotune.config import load_config
    from zotune.train.loop import build, train

    tmp, _, _, reports = loop_ranks
    assert reports[0]["runs"][3].get("steps") == 3, reports[0]["log"]
    cfg = load_config(None, NLL + [f"train.output_dir={tmp_path / 'nll1'}"])
    setup = build(cfg)
    start = {n: p.detach().clone() for n, p in setup.named.items()}
    train(cfg, setup=setup)
    two, one = _trained(tmp / "nll"), _trained(tmp_path / "nll1")
    assert any(not torch.equal(one[n], start[n]) for n in one)  # the weights did move
    for name in one:  # both train on the token mean of the whole batch: equal to float rounding
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=2e-6)


@needs_data
def test_ranks_with_different_checkpoints_refuse_and_with_the_same_one_resume_at_its_step(loop_ranks):
    tmp, _, _, reports = loop_ranks
    for r, report in enumerate(reports):
        first, refused, resumed = report["runs"][4:7]
        assert first == {"steps": 2, "start_step": 0}, report["log"]
        # rank 0 found its checkpoint of step 2, rank 1 (another node) none: both refuse
        assert refused["error_rank"] == r and refused["error_step"] is None, refused
        msg = refused["error"]
        assert msg.startswith(f"rank {r} of 2: the ranks found different checkpoints")
        assert "rank 0: step 2, rank 1: no checkpoint (step 0)" in msg and "copy rank 0's" in msg
        assert resumed == {"steps": 4, "start_step": 2}, report["log"]
    steps = [json.loads(line)["step"] for line in (tmp / "node0" / "steps.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the refused run left rank 0's log alone
    assert not (tmp / "node1" / "steps.jsonl").exists()  # only rank 0 writes


@needs_data
def test_a_dead_rank_fails_the_others_at_once_and_the_checkpoint_stays_loadable(loop_ranks):
    from zotune.train.checkpoint import find_checkpoint, load_checkpoint

    tmp, _, _, reports = loop_ranks
    survivor = reports[0]
    assert "error" in survivor, survivor["log"]
    assert survivor["error_rank"] == 0 and survivor["error_step"] == 3
    assert survivor["waited_s"] < 5  # a closed connection is noticed at once, well within the timeout
    assert "resume with the same command" in survivor["error"]
    assert reports[1]["returncode"] == 3
    tensors, opt_state, meta = load_checkpoint(find_checkpoint(tmp / "dies" / "ckpt-last"))
    assert meta["step"] == 2 and tensors and opt_state["zo"]["steps_taken"] == 2


JOBS = {"mlp": job_mlp, "loop": job_loop}

if __name__ == "__main__":  # a rank started by launch()
    job_name, job_args = sys.argv[1], json.loads(sys.argv[2])
    JOBS[job_name](job_args)
