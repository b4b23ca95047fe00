"""LRSchedule: a checkpointed scheduler whose lr survives the optimizer's load_state_dict."""

from __future__ import annotations

import json
import math

import pytest
import torch

import zotune
from zotune.fo import FOSGD, HybridOptimizer
from zotune.schedules import LRSchedule, TimedLRSchedule, lr_multiplier, make_schedule


def _opt(lr=1.0):
    return zotune.MeZO([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize("name, warmup", [("constant", 3), ("linear", 1), ("cosine", 0)])
def test_a_schedule_saved_and_loaded_mid_run_continues_with_the_same_lrs(name, warmup):
    straight_opt = _opt()
    straight = make_schedule(straight_opt, name, total_steps=8, warmup_steps=warmup)
    lrs = []
    for _ in range(8):
        lrs.append(straight_opt.param_groups[0]["lr"])
        straight.step()
    opt = _opt()
    sched = make_schedule(opt, name, total_steps=8, warmup_steps=warmup)
    for _ in range(2):
        sched.step()
    opt_state, sched_state = opt.state_dict(), json.loads(json.dumps(sched.state_dict()))  # plain numbers
    assert sched_state == {"base_lrs": [1.0], "step": 2}
    # a fresh process: its optimizer's load_state_dict restores the already-scheduled lr
    opt2 = _opt()
    sched2 = make_schedule(opt2, name, total_steps=8, warmup_steps=warmup)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    resumed = lrs[:2]
    for _ in range(6):
        resumed.append(opt2.param_groups[0]["lr"])
        sched2.step()
    assert resumed == lrs  # exactly
    assert lrs == [lr_multiplier(name, 8, warmup)(t) for t in range(8)]


def test_the_hybrid_optimizer_groups_follow_its_parts_load_state_dict():
    zo_p, fo_p = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    hybrid = HybridOptimizer(zotune.MeZO([zo_p], lr=1.0), FOSGD([fo_p], lr=0.5))
    state = hybrid.state_dict()
    hybrid.load_state_dict(state)  # torch replaces the group dicts of each part
    sched = make_schedule(hybrid, "linear", total_steps=4)
    sched.step()
    assert [g["lr"] for g in hybrid.zo.param_groups + hybrid.fo.param_groups] == [0.75, 0.375]
    assert sched.get_last_lr() == [0.75, 0.375]


def test_schedule_errors_name_the_value():
    opt = _opt()
    with pytest.raises(ValueError, match="param_groups"):
        LRSchedule(object(), lambda t: 1.0)
    with pytest.raises(ValueError, match="multiplier must be a callable"):
        LRSchedule(opt, 1.0)
    sched = make_schedule(opt, "linear", 4)
    with pytest.raises(ValueError, match="2 base lrs but the optimizer has 1"):
        sched.load_state_dict({"base_lrs": [1.0, 2.0], "step": 1})
    with pytest.raises(ValueError, match="needs base_lrs and step"):
        sched.load_state_dict({"step": 1})
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        make_schedule(opt, "cosin", 4)


def test_the_scheduler_is_part_of_the_public_api():
    opt = _opt(lr=2.0)
    schedule = zotune.make_schedule(opt, "linear", total_steps=4)
    assert isinstance(schedule, zotune.LRSchedule) and zotune.LRSchedule is LRSchedule
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        schedule.step()
    assert lrs == pytest.approx([2.0, 1.5, 1.0, 0.5])


# ----------------------------------------------------------------- a schedule over training seconds
def test_a_schedule_over_seconds_follows_the_share_of_the_budget_spent():
    """lr(t) = base * shape(seconds / total_seconds): the cosine's exact value wherever the steps fall."""
    opt = _opt(lr=2.0)
    sched = make_schedule(opt, "cosine", total_steps=1000, total_seconds=10.0)
    assert isinstance(sched, TimedLRSchedule)
    assert opt.param_groups[0]["lr"] == 2.0  # nothing spent yet
    for seconds in (2.5, 5.0, 9.0, 12.0):  # uneven steps; past the budget the floor holds
        sched.step(seconds=seconds)
        expected = 2.0 * 0.5 * (1 + math.cos(math.pi * min(1.0, seconds / 10.0)))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    linear = make_schedule(_opt(lr=1.0), "linear", total_steps=3, total_seconds=4.0, min_ratio=0.5)
    linear.step(seconds=2.0)
    assert linear.get_last_lr() == [pytest.approx(0.75)]  # total_steps does not enter


def test_a_schedule_over_seconds_ramps_its_warmup_by_steps():
    opt = _opt(lr=1.0)
    sched = make_schedule(opt, "linear", total_steps=100, warmup_steps=4, total_seconds=8.0)
    lrs = [opt.param_groups[0]["lr"]]
    for k in range(1, 6):
        sched.step(seconds=float(k))
        lrs.append(opt.param_groups[0]["lr"])
    # step t's lr: min(1, (t + 1) / 4) * (1 - seconds / 8)
    assert lrs == pytest.approx([0.25, 0.5 * 7 / 8, 0.75 * 6 / 8, 5 / 8, 4 / 8, 3 / 8])


def test_a_schedule_over_seconds_saved_and_loaded_continues_with_the_same_lrs():
    seconds = [0.7, 1.9, 2.2, 3.5, 4.1, 6.0]
    opt = _opt()
    straight = make_schedule(opt, "cosine", total_steps=10, total_seconds=6.0)
    lrs = []
    for s in seconds:
        straight.step(seconds=s)
        lrs.append(opt.param_groups[0]["lr"])
    opt1 = _opt()
    first = make_schedule(opt1, "cosine", total_steps=10, total_seconds=6.0)
    for s in seconds[:2]:
        first.step(seconds=s)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"base_lrs": [1.0], "step": 2, "seconds": 1.9}
    opt2 = _opt()
    opt2.load_state_dict(opt1.state_dict())
    resumed = make_schedule(opt2, "cosine", total_steps=10, total_seconds=6.0)
    resumed.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == lrs[1]
    rest = []
    for s in seconds[2:]:
        resumed.step(seconds=s)
        rest.append(opt2.param_groups[0]["lr"])
    assert rest == lrs[2:]  # exactly


def test_a_schedule_over_seconds_errors_name_the_value():
    with pytest.raises(ValueError, match="total_seconds must be > 0"):
        make_schedule(_opt(), "cosine", 4, total_seconds=-1.0)
    sched = make_schedule(_opt(), "cosine", 4, total_seconds=5.0)
    with pytest.raises(ValueError, match=r"step\(seconds=\.\.\.\)"):
        sched.step()
    sched.step(seconds=2.0)
    with pytest.raises(ValueError, match="went back from 2 to 1"):
        sched.step(seconds=1.0)
    with pytest.raises(ValueError, match="needs base_lrs, step and seconds"):
        sched.load_state_dict({"base_lrs": [1.0], "step": 1})  # a schedule over steps' state
    assert isinstance(make_schedule(_opt(), "cosine", 4), LRSchedule)
    assert not isinstance(make_schedule(_opt(), "cosine", 4), TimedLRSchedule)  # total_seconds 0: over steps
