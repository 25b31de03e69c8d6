"""The onecycle schedule with a separate first cycle (``scheduler.first_cycle``)."""

from __future__ import annotations

import math

import pytest
import torch

from cnnvis.checkpoint import load_checkpoint
from cnnvis.config import build_config
from cnnvis.training.optim import OneCycles, make_scheduler


def _trace(make, steps: int, optimizer_name: str = "adamw") -> list[tuple[float, float]]:
    param = torch.nn.Parameter(torch.zeros(1))
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW([param], lr=0.005)
    scheduler = make(optimizer)
    out = []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        out.append((group["lr"], group["betas"][0] if "betas" in group else group["momentum"]))
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_one_cycle_matches_torch_onecyclelr(optimizer_name):
    lr = 0.005 if optimizer_name == "adamw" else 0.1
    ours = _trace(lambda o: OneCycles(o, lr, [100], 0.1), 100, optimizer_name)
    torch_ = _trace(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=100, pct_start=0.1), 100, optimizer_name)
    for (a_lr, a_m), (b_lr, b_m) in zip(ours, torch_):
        assert math.isclose(a_lr, b_lr, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(a_m, b_m, rel_tol=1e-9)


def test_first_cycle_ends_annealed_then_the_second_warms_up_again():
    trace = [lr for lr, _ in _trace(lambda o: OneCycles(o, 0.005, [20, 80], 0.1), 100)]
    assert trace[0] == pytest.approx(0.005 / 25)
    assert max(trace[:20]) == pytest.approx(0.005, rel=0.05)
    assert trace[19] == pytest.approx(0.005 / 25 / 1e4)  # the end of the first cycle
    assert trace[20] == pytest.approx(0.005 / 25)  # the second starts like the first
    assert max(trace[20:]) == pytest.approx(0.005, rel=0.01)
    assert trace[99] == pytest.approx(0.005 / 25 / 1e4)


def test_state_dict_round_trip_continues_the_same_schedule():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=0.005)
    first = OneCycles(optimizer, 0.005, [20, 80], 0.1)
    for _ in range(37):
        optimizer.step()
        first.step()
    state = first.state_dict()
    expected = []
    for _ in range(10):
        optimizer.step()
        first.step()
        expected.append(optimizer.param_groups[0]["lr"])

    param2 = torch.nn.Parameter(torch.zeros(1))
    optimizer2 = torch.optim.AdamW([param2], lr=0.005)
    second = OneCycles(optimizer2, 0.005, [20, 80], 0.1)
    second.load_state_dict(state)
    got = []
    for _ in range(10):
        optimizer2.step()
        second.step()
        got.append(optimizer2.param_groups[0]["lr"])
    assert got == pytest.approx(expected)


def _scheduler(overrides: list[str], steps_per_epoch: int):
    config = build_config({}, overrides)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.optimizer.lr)
    return make_scheduler(config, optimizer, steps_per_epoch)


def test_first_cycle_is_off_by_default():
    scheduler, unit = _scheduler(["train.epochs=5"], 10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and unit == "step"


def test_first_cycle_splits_the_run_into_two_cycles():
    scheduler, unit = _scheduler(["train.epochs=5", "scheduler.first_cycle=1"], 10)
    assert isinstance(scheduler, OneCycles) and unit == "step"
    assert scheduler.cycle_steps == [10, 40] and scheduler.total_steps == 50


@pytest.mark.parametrize("overrides", [["train.epochs=2", "scheduler.first_cycle=2"], ["train.epochs=3", "scheduler.first_cycle=1"]])
def test_first_cycle_too_long_or_too_short_falls_back_to_one_cycle(overrides):
    steps_per_epoch = 10 if overrides[1].endswith("=2") else 2  # 2 steps: too few for a cycle
    scheduler, _ = _scheduler(overrides, steps_per_epoch)
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR)


def test_mnist_with_a_first_cycle_interrupted_and_resumed_equals_uninterrupted(mnist_root, tmp_path):
    from test_resume import (
        assert_metrics_continue,
        assert_same_state,
        mnist_config,
        run_interrupted_and_resumed,
    )

    config = mnist_config(mnist_root, epochs=3)
    config.scheduler.first_cycle = 1
    full, resumed = run_interrupted_and_resumed(config, tmp_path)
    assert_same_state(full, resumed)
    assert_metrics_continue(full, resumed, epochs=3)
    assert load_checkpoint(resumed / "checkpoints" / "last.pt")["scheduler"]["cycle_steps"] == [6, 12]
