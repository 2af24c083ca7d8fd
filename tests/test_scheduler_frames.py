"""The scheduler service's pure parts, without gRPC: frame collector, edge registry, core."""

from __future__ import annotations

import asyncio
import math
import threading

import pytest

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.live.core import (
    AlreadyReported,
    LinkInput,
    Measured,
    PlanInput,
    PlanInputError,
    PlanReport,
    SchedulerCore,
    UnknownPlan,
)
from services.scheduler.live.edges import EdgeLoad, EdgeRegistry
from services.scheduler.live.frames import FrameCollector, FrameConfig
from tandem.codec.spec import DEFAULT_STRATEGY


# --- frame collector ---------------------------------------------------------------------------
class Recorder:
    def __init__(self):
        self.frames: list[list] = []
        self.threads: set[str] = set()

    def __call__(self, items):
        self.frames.append(list(items))
        self.threads.add(threading.current_thread().name)
        return [f"{item}:{len(items)}" for item in items]


def test_concurrent_submissions_form_one_frame_decided_off_the_loop():
    decide = Recorder()

    async def main():
        collector = FrameCollector(decide, FrameConfig(window_s=0.05, max_size=64))
        return await asyncio.gather(*(collector.submit(i) for i in range(10)))

    results = asyncio.run(main())
    assert decide.frames == [list(range(10))]
    assert results == [f"{i}:10" for i in range(10)]  # each caller gets its own result
    assert threading.main_thread().name not in decide.threads


def test_max_size_closes_a_frame_early_and_frames_keep_order():
    decide = Recorder()

    async def main():
        collector = FrameCollector(decide, FrameConfig(window_s=10.0, max_size=2))
        first = await asyncio.gather(*(collector.submit(i) for i in range(4)))
        last = asyncio.ensure_future(collector.submit(4))
        await asyncio.sleep(0)
        await collector.drain()  # closes the open frame without waiting for its window
        return first, await last

    first, last = asyncio.run(main())
    assert decide.frames == [[0, 1], [2, 3], [4]]
    assert first == ["0:2", "1:2", "2:2", "3:2"] and last == "4:1"


def test_later_submissions_open_a_new_frame():
    decide = Recorder()

    async def main():
        collector = FrameCollector(decide, FrameConfig(window_s=0.0, max_size=8))
        await collector.submit("a")
        await collector.submit("b")

    asyncio.run(main())
    assert decide.frames == [["a"], ["b"]]


def test_a_failing_decision_reaches_every_caller_of_its_frame_only():
    calls = []

    def decide(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("solver failed")
        return list(items)

    async def main():
        collector = FrameCollector(decide, FrameConfig(window_s=0.01))
        frame = await asyncio.gather(*(collector.submit(x) for x in ("ok", "bad")), return_exceptions=True)
        return frame, await collector.submit("next")

    frame, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in frame)
    assert after == "next"


def test_frame_config_is_checked():
    with pytest.raises(ValueError, match="max frame size"):
        FrameConfig(max_size=0)
    with pytest.raises(ValueError, match="window"):
        FrameConfig(window_s=-1)


# --- edge registry -----------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_routes_to_the_least_loaded_live_edge_and_spreads_a_burst():
    clock = Clock()
    edges = EdgeRegistry(ttl_s=3.0, clock=clock)
    edges.heartbeat(EdgeLoad("a:1", queue_depth=2, running_requests=1))
    edges.heartbeat(EdgeLoad("b:1", queue_depth=0, running_requests=0))
    # b takes plans until its routed count catches up with a's reported load, then they alternate.
    assert edges.route(5) == ["b:1", "b:1", "b:1", "a:1", "b:1"]
    edges.heartbeat(EdgeLoad("b:1", queue_depth=9))  # a fresh heartbeat replaces the estimate
    assert edges.route(1) == ["a:1"]


def test_ties_go_to_the_faster_edge():
    edges = EdgeRegistry(clock=Clock())
    edges.heartbeat(EdgeLoad("slow:1", steps_per_second=10.0))
    edges.heartbeat(EdgeLoad("fast:1", steps_per_second=90.0))
    assert edges.route(1) == ["fast:1"]


def test_silent_edges_expire_and_static_edges_are_the_fallback():
    clock = Clock()
    edges = EdgeRegistry(ttl_s=3.0, static=("s1:1", "s2:1"), clock=clock)
    edges.heartbeat(EdgeLoad("a:1"))
    clock.now = 2.0
    edges.heartbeat(EdgeLoad("b:1", queue_depth=5))
    assert edges.route(1) == ["a:1"]
    clock.now = 4.0  # a: 4 s silent > ttl; b: 2 s
    assert [e.address for e in edges.live()] == ["b:1"] and edges.route(1) == ["b:1"]
    clock.now = 10.0
    assert edges.live() == [] and edges.route(3) == ["s1:1", "s2:1", "s1:1"]
    assert EdgeRegistry().route(2) == ["", ""]


# --- core --------------------------------------------------------------------------------------
@pytest.fixture
def core():
    registry = EdgeRegistry(clock=Clock())
    registry.heartbeat(EdgeLoad("edge:1"))
    return SchedulerCore(synthetic_profile(), CostProfile(), "greedy_ls", registry)


def request(**kw) -> PlanInput:
    base = dict(device_class="phone", link=LinkInput(bandwidth_bps=50e6))
    return PlanInput(**{**base, **kw})


def test_a_frame_gets_one_plan_each_with_an_edge_when_it_splits(core):
    plans = core.decide([request(), request(device_class="cpu", personalized_user="alice"), request()])
    assert len({a.plan_id for a in plans}) == 3 and all(a.frame_size == 3 for a in plans)
    for a in plans:
        p = a.plan
        assert 0 <= p.split <= p.steps and a.merge_strategy == DEFAULT_STRATEGY
        assert a.edge_address == ("edge:1" if p.split > 0 else "")
        assert math.isclose(p.latency_seconds, p.edge_seconds + p.transfer_seconds + p.device_seconds)
    assert core.pending_reports == 3


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(device_class="toaster"), "device_class"),
        (dict(link=LinkInput(bandwidth_bps=-1.0)), "link.bandwidth_bps"),
        (dict(link=LinkInput(bandwidth_bps=1e6, rtt_s=math.nan)), "link.rtt_seconds"),
        (dict(link=LinkInput(spectral_efficiency=math.inf)), "link.spectral_efficiency"),
        (dict(personalized_user="not a name"), "personalized_user"),
        (dict(latency_budget_s=-2.0), "latency_budget_seconds"),
        (dict(energy_budget_j=math.nan), "energy_budget_joules"),
        (dict(prompt_chars=5000), "prompt_chars"),
    ],
)
def test_bad_requests_name_the_field(core, change, field):
    with pytest.raises(PlanInputError) as exc:
        core.user_spec(request(**change))
    assert exc.value.field == field


def test_spectral_efficiency_or_bandwidth_and_named_users(core):
    by_rate = core.user_spec(request(link=LinkInput(bandwidth_bps=20e6)))
    by_se = core.user_spec(request(link=LinkInput(spectral_efficiency=2.0)))
    assert by_rate.spectral_efficiency == by_se.spectral_efficiency == 2.0  # 20 Mb/s over 10 MHz
    alice = core.user_spec(request(personalized_user="alice", latency_budget_s=8.0))
    assert alice.personalized and alice.profile_user == "personalized"  # synthetic profile: generic entry
    assert alice.latency_budget_s == 8.0 and alice.energy_budget_j == math.inf


def test_a_report_calibrates_and_measures_the_prediction_error(core):
    step_before = core.costs.device("phone").step_s
    decode_before = core.costs.device("phone").decode_s
    decodes = []
    for _ in range(3):  # robust calibration: one report never moves the model, consistent ones do
        (assigned,) = core.decide([request(latency_budget_s=100.0)])
        plan = assigned.plan
        slow = Measured(queue=0.0, edge_steps=plan.edge_seconds, transfer=plan.transfer_seconds,
                        device_steps=10.0 * max(plan.steps - plan.split, 1) * step_before, decode=2 * decode_before)
        outcome = core.report(PlanReport(assigned.plan_id, slow, handoff_bytes=plan.handoff_bytes))
        assert set(outcome.relative_errors) >= {"device", "total"} and outcome.relative_errors["device"] > 0
        assert not outcome.budget_violated
        decodes.append(core.costs.device("phone").decode_s)
    assert decodes[0] == decode_before and decode_before < decodes[1] < decodes[2] < 2 * decode_before
    with pytest.raises(AlreadyReported):  # a plan is reported once
        core.report(PlanReport(assigned.plan_id, slow))
    with pytest.raises(UnknownPlan):
        core.report(PlanReport("never-issued", slow))
    with pytest.raises(PlanInputError, match="measured.decode"):
        core.report(PlanReport("x", Measured(decode=-1.0)))


def test_overridden_or_fallback_reports_calibrate_but_skip_the_error(core):
    (assigned,) = core.decide([request(latency_budget_s=0.5)])
    outcome = core.report(PlanReport(assigned.plan_id, Measured(device_steps=3.0, decode=0.5), edge_steps=0,
                                     device_steps=7, fallback=True))
    assert outcome.relative_errors == {} and outcome.budget_violated


def test_a_users_rtt_shapes_only_its_own_plan(core):
    before = core.costs.rtt_s
    far, near = core.decide([request(link=LinkInput(bandwidth_bps=50e6, rtt_s=0.2), user_id="far"),
                             request(user_id="near")])
    assert core.costs.rtt_s == before  # the shared model is not moved by a claim
    assert far.plan.split == 0 or far.plan.transfer_seconds >= 0.2
    assert near.plan.split == 0 or near.plan.transfer_seconds < 0.2


def test_heartbeats_are_checked(core):
    assert core.heartbeat(EdgeLoad("10.0.0.2:50051", 1, 2, 30.0)) == 2
    for bad, field in ((EdgeLoad("nohost"), "address"), (EdgeLoad("h:99999"), "address"),
                       (EdgeLoad("h:1", steps_per_second=math.nan), "steps_per_second")):
        with pytest.raises(PlanInputError) as exc:
            core.heartbeat(bad)
        assert exc.value.field == field
