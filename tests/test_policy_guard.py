"""The policy guard (services/scheduler/live/guard.py): a policy that falls behind greedy + local search
on the sampled frames is replaced by it (one log line, plans then equal greedy + LS's); a good one
is left alone; the service exposes the verdict as metrics."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_procs import metric_value, scheduler_service

from services.scheduler.decide.baselines import all_device, polished
from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.options import DEFAULT_OPTIONS
from services.scheduler.decide.planner import plan_frame
from services.scheduler.decide.policy import SchedulerPolicy
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.decide.scenario import DEFAULT_SCENARIO, sample_frame
from services.scheduler.live.guard import GuardConfig, PolicyGuard
from tandem.v1 import scheduler_pb2 as pb
from tandem.v1 import scheduler_pb2_grpc

POLICIES = Path(__file__).resolve().parents[1] / "services" / "scheduler" / "policies"
QUALITY, COSTS = synthetic_profile(), CostProfile()


def frames(count: int, n: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sample_frame(rng, DEFAULT_SCENARIO, n_users=n, costs=COSTS) for _ in range(count)]


def test_a_bad_policy_falls_back_to_greedy_ls_and_says_so_once(caplog):
    guard = PolicyGuard(all_device, GuardConfig(sample_every=1, window=3, background=False))
    with caplog.at_level("WARNING", logger="tandem.scheduler"):
        for users, ctx in frames(3):
            plan_frame(users, QUALITY, COSTS, guard, ctx=ctx)
        status = guard.status()
        assert status.fallback and status.checked == 3 and status.ratio < 0.98
        for users, ctx in frames(4, seed=1):  # after the fallback: greedy + local search's plans exactly
            assert plan_frame(users, QUALITY, COSTS, guard, ctx=ctx) == plan_frame(users, QUALITY, COSTS, "greedy_ls", ctx=ctx)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "serving greedy + local search until restart" in lines[0]
    assert guard.status().checked == 3  # nothing more is checked once fallen back


def test_one_bad_frame_is_not_enough_the_window_decides():
    guard = PolicyGuard(all_device, GuardConfig(sample_every=1, window=3, background=False))
    for users, ctx in frames(2):
        plan_frame(users, QUALITY, COSTS, guard, ctx=ctx)
    assert guard.status().checked == 2 and not guard.status().fallback


def test_a_good_policy_is_kept_and_its_plans_are_its_own():
    policy = polished(SchedulerPolicy.load(POLICIES / "synthetic", DEFAULT_OPTIONS), 1, 32)  # the service's decider
    guard = PolicyGuard(policy, GuardConfig(sample_every=1, window=5, background=False))
    for users, ctx in frames(15, n=20, seed=3):
        assert plan_frame(users, QUALITY, COSTS, guard, ctx=ctx) == plan_frame(users, QUALITY, COSTS, policy, ctx=ctx)
    status = guard.status()
    assert status.checked == 15 and not status.fallback and status.ratio >= 0.98


def test_only_one_frame_in_sample_every_is_checked():
    guard = PolicyGuard(all_device, GuardConfig(sample_every=4, window=50, background=False))
    for users, ctx in frames(10):
        plan_frame(users, QUALITY, COSTS, guard, ctx=ctx)
    assert guard.status().checked == 2


def test_in_the_background_the_check_leaves_the_request_thread():
    threads = []

    def reference(problem):
        threads.append(threading.current_thread().name)
        return all_device(problem)

    guard = PolicyGuard(all_device, GuardConfig(sample_every=1, window=2), reference=reference)
    for users, ctx in frames(2):
        plan_frame(users, QUALITY, COSTS, guard, ctx=ctx)
    deadline = time.monotonic() + 60  # a liveness bound for the background thread, not a speed target
    while guard.status().checked + guard.status().skipped < 2:
        assert time.monotonic() < deadline, "the guard's background check never ran"
        time.sleep(0.01)
    assert threads and set(threads) == {"policy-guard"}


@pytest.mark.parametrize("config", [dict(sample_every=-1), dict(window=0), dict(tolerance=1.5)])
def test_bad_guard_settings_are_refused(config):
    with pytest.raises(ValueError, match="guard"):
        GuardConfig(**config)


def test_the_service_falls_back_from_a_mismatched_policy_and_exposes_it(tmp_path):
    bad = SchedulerPolicy.random_init(DEFAULT_OPTIONS, seed=7).save(tmp_path / "untrained")
    with scheduler_service(tmp_path, "--policy", str(bad), "--guard-every", "1", "--guard-window", "2",
                           "--polish-sweeps", "0", "--quality-profile", "synthetic", "--cost-profile", "builtin",
                           "--frame-ms", "5") as sched:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(sched.address))
        deadline = time.monotonic() + 120  # liveness bound: background checks of 1-user frames
        while metric_value(sched.metrics(), "tandem_scheduler_guard_fallback") != 1:
            assert time.monotonic() < deadline, sched.log()
            for device in ("cpu", "phone", "laptop-gpu"):
                stub.Plan(pb.PlanRequest(device_class=device, user_id=f"u-{device}", personalized_user="alice",
                                         link=pb.LinkEstimate(bandwidth_bps=20e6, rtt_seconds=0.02)), timeout=30)
        text = sched.metrics()
        assert metric_value(text, "tandem_scheduler_guard_checked_frames") >= 2
        assert metric_value(text, "tandem_scheduler_guard_ratio") < 0.98
        assert "policy guard" in sched.log() and "serving greedy + local search until restart" in sched.log()
