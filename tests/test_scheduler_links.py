"""Each user's own link in the scheduler (services/scheduler/live/core.py, decide/calibration.py
UserLinks): the device's rate wins, else the user's own reports, else the prior; the round trip
comes from the user's own reports, else the device, else the profile. A bad measurement moves
only its sender's plans; the per-user map is bounded. Over gRPC: the plan says which link it was
predicted for, and new and old fields are range-checked."""

from __future__ import annotations

import itertools
import math

import grpc
import pytest
from service_procs import scheduler_service

from services.scheduler.decide.calibration import UserLinks
from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.quality import synthetic_profile
from services.scheduler.live.core import PRIOR_BANDWIDTH_BPS, LinkInput, Measured, PlanInput, PlanReport, SchedulerCore
from services.scheduler.live.edges import EdgeLoad, EdgeRegistry
from tandem.link import MIN_RATE_BYTES, MIN_SAMPLES
from tandem.v1 import scheduler_pb2 as pb
from tandem.v1 import scheduler_pb2_grpc

UNKNOWN = LinkInput()  # a device that has measured nothing yet


@pytest.fixture
def core():
    registry = EdgeRegistry()
    registry.heartbeat(EdgeLoad("edge:1"))
    # An hour passes at every call: no plan is still on the edge when the next is made, so what
    # moves a plan here is links (the edge's load: tests/test_edge_occupancy.py).
    return SchedulerCore(synthetic_profile(), CostProfile(), "greedy_ls", registry,
                         clock=itertools.count(0.0, 3600.0).__next__)


def request(link: LinkInput = UNKNOWN, user_id: str = "u", **kw) -> PlanInput:
    return PlanInput(device_class="phone", link=link, user_id=user_id, **kw)


def plan_one(core, link: LinkInput = UNKNOWN, user_id: str = "u", owner: str | None = None):
    (assigned,) = core.decide([request(link, user_id)], None if owner is None else [owner])
    return assigned


def report_link(core, assigned, rate_bps: float, rtt_s: float) -> None:
    """Reports the plan as run over a link of ``rate_bps`` and round trip ``rtt_s``: its handoff's
    exact bytes took bytes*8/rate, and the time before the first progress event held step 1 (as
    planned) and the round trip. Only link figures: compute times (which calibrate the cost model
    every user shares, robustly, see test_scheduler_calibration) are left out (0: not measured)."""
    plan = assigned.plan
    assert plan.split >= 1 and plan.handoff_bytes >= MIN_RATE_BYTES
    measured = Measured(queue=plan.edge_seconds / plan.split + rtt_s, transfer=plan.handoff_bytes * 8 / rate_bps)
    core.report(PlanReport(assigned.plan_id, measured, handoff_bytes=plan.handoff_bytes))


def decision(assigned) -> tuple:
    """Everything of a plan but its id."""
    p = assigned.plan
    return (p.steps, p.split, p.codec, p.merge_ratio, p.edge_seconds, p.transfer_seconds, p.device_seconds,
            p.quality, assigned.link)


def test_an_unknown_link_is_planned_at_the_prior_and_the_profile_round_trip(core):
    assigned = plan_one(core)
    link = assigned.link
    assert (link.rate_bps, link.rate_source) == (PRIOR_BANDWIDTH_BPS, "profile")
    assert (link.rtt_s, link.rtt_source) == (core.costs.rtt_s, "profile")


def test_a_users_reports_teach_its_own_rate_and_round_trip(core):
    for _ in range(MIN_SAMPLES):
        report_link(core, plan_one(core), rate_bps=2e6, rtt_s=0.08)
    assigned = plan_one(core)
    link, plan = assigned.link, assigned.plan
    assert (link.rate_source, link.rtt_source) == ("reports", "reports")
    assert math.isclose(link.rate_bps, 2e6, rel_tol=1e-9) and math.isclose(link.rtt_s, 0.08, rel_tol=1e-9)
    if plan.split > 0:  # the prediction prices this user's own link in
        assert math.isclose(plan.transfer_seconds, plan.handoff_bytes * 8 / 2e6 + 0.08, rel_tol=1e-6)
    other = plan_one(core, user_id="v")  # another user still gets the prior
    assert (other.link.rate_source, other.link.rtt_source) == ("profile", "profile")


def test_the_devices_rate_wins_and_the_reports_round_trip_wins(core):
    device = LinkInput(bandwidth_bps=40e6, rtt_s=0.01)
    first = plan_one(core, device).link  # nothing reported yet: the device's figures
    assert (first.rate_bps, first.rtt_s, first.rate_source, first.rtt_source) == (40e6, 0.01, "device", "device")
    for _ in range(MIN_SAMPLES):
        report_link(core, plan_one(core), rate_bps=2e6, rtt_s=0.08)
    both = plan_one(core, device).link  # the round's whole fixed cost, as reported, beats the device's RTT
    assert (both.rate_bps, both.rate_source, both.rtt_source) == (40e6, "device", "reports")
    assert math.isclose(both.rtt_s, 0.08)
    rtt_only = plan_one(core, LinkInput(rtt_s=0.01)).link  # small handoffs: the device knows only its RTT
    assert (rtt_only.rate_source, rtt_only.rtt_source) == ("reports", "reports")
    assert math.isclose(rtt_only.rate_bps, 2e6)


def test_reports_count_for_the_owner_the_plan_was_issued_to(core):
    """With tokens on the owner is the authenticated user, whatever user_id the request claims."""
    for _ in range(MIN_SAMPLES):
        report_link(core, plan_one(core, user_id="claims-to-be-bob", owner="user:alice"), rate_bps=5e6, rtt_s=0.03)
    assert plan_one(core, owner="user:alice").link.rate_source == "reports"
    assert plan_one(core, user_id="claims-to-be-bob", owner="user:bob").link.rate_source == "profile"


def test_one_users_absurd_reports_leave_other_users_plans_identical(core):
    for _ in range(MIN_SAMPLES):  # a user with measurements of its own
        report_link(core, plan_one(core, user_id="good"), rate_bps=20e6, rtt_s=0.03)
    good_before, new_before = plan_one(core, user_id="good"), plan_one(core, user_id="new")
    report_link(core, plan_one(core, user_id="bad"), rate_bps=1.5e3, rtt_s=9.5)  # one absurd report
    assert decision(plan_one(core, user_id="new")) == decision(new_before)  # even a user without its own
    claims = LinkInput(bandwidth_bps=50e6, rtt_s=0.02)  # its own plans now avoid the edge unless it claims a link
    for _ in range(4):  # more of them, and physically impossible ones
        report_link(core, plan_one(core, claims, user_id="bad"), rate_bps=1.5e3, rtt_s=9.5)
        report_link(core, plan_one(core, claims, user_id="bad"), rate_bps=1e15, rtt_s=0.001)
    assert decision(plan_one(core, user_id="good")) == decision(good_before)
    bad = plan_one(core, user_id="bad").link
    assert bad.rate_source == "reports" and bad.rate_bps < 1e6  # only its sender's plans move


def test_a_fallback_or_local_report_teaches_no_link(core):
    assigned = plan_one(core)
    plan = assigned.plan
    measured = Measured(queue=5.0, edge_steps=1.0, transfer=5.0, device_steps=1.0, decode=0.1)
    core.report(PlanReport(assigned.plan_id, measured, handoff_bytes=plan.handoff_bytes, fallback=True))
    assigned = plan_one(core)
    core.report(PlanReport(assigned.plan_id, measured, edge_steps=0, device_steps=assigned.plan.steps))
    link = plan_one(core).link
    assert (link.rate_source, link.rtt_source) == ("profile", "profile")


def test_the_per_user_map_is_bounded_least_recent_first():
    links = UserLinks(max_users=3)
    for user in ("a", "b", "c"):
        for _ in range(MIN_SAMPLES):
            links.observe(user, 64_000, 0.05, 0.02)
    links.observe("a", 64_000, 0.05, 0.02)  # a reported most recently
    for flood in range(100):
        links.observe(f"flood{flood}", 64_000, 0.05, 0.02)
    assert len(links) == 3 and links.get("a").bandwidth_bps == 0 and links.get("flood99").rate_samples == 1


def test_user_links_drop_impossible_samples_and_small_handoffs():
    links = UserLinks()
    for nbytes, seconds, rtt in ((64_000, 0.05, math.nan), (64_000, 1e-12, 60.0), (2_700, 0.001, 0.02),
                                 (64_000, math.inf, -1.0)):
        links.observe("u", nbytes, seconds, rtt)
    link = links.get("u")
    assert link.rate_samples == 1 and link.rtt_samples == 1 and links.rejected == 5  # 1e-12 s: 5e17 b/s


# --- over gRPC ---------------------------------------------------------------------------------

def test_the_plan_names_the_link_it_was_predicted_for_and_bad_links_are_refused(tmp_path):
    with scheduler_service(tmp_path) as sched, grpc.insecure_channel(sched.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        unknown = stub.Plan(pb.PlanRequest(device_class="cpu", user_id="x"), timeout=30)
        assert (unknown.rate_source, unknown.rtt_source) == ("profile", "profile")
        assert unknown.planned_link.bandwidth_bps == PRIOR_BANDWIDTH_BPS and unknown.planned_link.rtt_seconds > 0
        given = stub.Plan(pb.PlanRequest(device_class="cpu", link=pb.LinkEstimate(bandwidth_bps=3e6, rtt_seconds=0.04)),
                          timeout=30)
        assert (given.planned_link.bandwidth_bps, given.planned_link.rtt_seconds) == (3e6, 0.04)
        assert (given.rate_source, given.rtt_source) == ("device", "device")
        for link, field in ((pb.LinkEstimate(bandwidth_bps=-1.0), "link.bandwidth_bps"),
                            (pb.LinkEstimate(rtt_seconds=11.0), "link.rtt_seconds"),
                            (pb.LinkEstimate(bandwidth_bps=float("inf")), "link.bandwidth_bps")):
            with pytest.raises(grpc.RpcError) as exc:
                stub.Plan(pb.PlanRequest(device_class="cpu", link=link), timeout=30)
            assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in exc.value.details()



def test_users_on_their_own_links_are_not_split_a_shared_band(core):
    """Four devices that each measured 2 Mbit/s each have that rate to themselves (their own
    shaped links): planned in one frame, every predicted transfer is the one it would have alone,
    bytes*8/rate + RTT. Devices that give a spectral efficiency share the scheduler's band."""
    measured = LinkInput(bandwidth_bps=2e6, rtt_s=0.05)
    alone = plan_one(core, measured, "solo").plan
    together = core.decide([request(measured, f"u{i}") for i in range(4)], None)
    for assigned in together:
        plan = assigned.plan
        assert assigned.link.own_link
        if plan.split:
            assert math.isclose(plan.transfer_seconds, plan.handoff_bytes * 8 / 2e6 + 0.05, rel_tol=1e-9)
    assert {(a.plan.split, a.plan.codec, a.plan.merge_ratio) for a in together} == {(alone.split, alone.codec, alone.merge_ratio)}
    band = LinkInput(spectral_efficiency=2e6 / core.ctx.bandwidth_hz, rtt_s=0.05)
    shared = [a for a in core.decide([request(band, f"s{i}") for i in range(4)], None) if a.plan.split]
    assert shared and not shared[0].link.own_link
    assert all(a.plan.transfer_seconds > a.plan.handoff_bytes * 8 / 2e6 + 0.05 for a in shared)


def test_an_own_link_users_transfer_does_not_depend_on_the_frame():
    """In the frame problem itself: a user on its own link pays its transfer alone (so another
    user's handoff does not slow it), and its plan reports it as transfer, not device time."""
    from services.scheduler.decide.options import DEFAULT_OPTIONS
    from services.scheduler.decide.problem import FrameProblem
    from services.scheduler.decide.scenario import UserSpec

    costs, quality = CostProfile(), synthetic_profile()
    own = UserSpec("own", "phone", spectral_efficiency=0.2, own_link=True)
    band = UserSpec("band", "phone", spectral_efficiency=0.2)
    edge_option = next(i for i, o in enumerate(DEFAULT_OPTIONS) if o.uses_edge)
    solo = FrameProblem.build([own], quality, costs, DEFAULT_OPTIONS).evaluate([edge_option])
    pair = FrameProblem.build([own, band], quality, costs, DEFAULT_OPTIONS).evaluate([edge_option, edge_option])
    expected = DEFAULT_OPTIONS[edge_option]
    nbytes = costs.handoff_bytes(expected.steps, expected.split, expected.codec, expected.merge_ratio)
    assert math.isclose(solo.transfer_seconds[0], nbytes * 8 / (0.2 * 10e6), rel_tol=1e-12)
    assert math.isclose(pair.transfer_seconds[0], solo.transfer_seconds[0], rel_tol=1e-12)
    assert math.isclose(pair.transfer_seconds[1], solo.transfer_seconds[0], rel_tol=1e-12)  # the band is all its own
    assert pair.band_shares[0] == 0.0 and pair.band_shares[1] == 1.0
    assert math.isclose(solo.local_seconds[0] + solo.transfer_seconds[0] + solo.edge_seconds[0], solo.latency[0])


def test_the_codec_follows_the_link_when_the_quality_profile_prices_it():
    """With a quality profile that measured int8's loss, a baseline decider chooses the codec per
    user: int8 (about half the bytes of fp16) where the link is slow, fp16 where bytes are
    nearly free. Without a measured loss int8 is never offered."""
    from dataclasses import replace

    from services.scheduler.decide.options import build_option_table
    from services.scheduler.server import planner_options

    quality = replace(synthetic_profile(), codec_loss={"int8": 0.002})
    assert planner_options("greedy_ls", quality) == build_option_table(codecs=("fp16", "int8"))
    assert planner_options("greedy_ls", synthetic_profile()) == build_option_table()
    registry = EdgeRegistry()
    registry.heartbeat(EdgeLoad("edge:1"))
    core = SchedulerCore(quality, CostProfile(), "greedy_ls", registry, options=planner_options("greedy_ls", quality))
    slow, fast = core.decide([request(LinkInput(bandwidth_bps=2e6, rtt_s=0.02), "slow"),
                              request(LinkInput(bandwidth_bps=1e9, rtt_s=0.02), "fast")], None)
    assert slow.plan.split > 0 and slow.plan.codec == "int8"
    assert fast.plan.split > 0 and fast.plan.codec == "fp16"
    assert slow.plan.quality == pytest.approx(quality.accuracy(slow.plan.steps, slow.plan.split / slow.plan.steps,
                                                               slow.plan.merge_ratio, codec="int8"))


def test_a_quality_profiles_codec_loss_is_checked_and_round_trips():
    from dataclasses import replace

    from services.scheduler.decide.quality import QualityProfile, QualityProfileError

    base = synthetic_profile()
    priced = replace(base, codec_loss={"int8": 0.01})
    again = QualityProfile.from_dict(priced.to_dict())
    assert again.codec_loss == {"int8": 0.01} and again.codecs == ("fp16", "int8")
    assert "codec_loss" not in base.to_dict()  # profiles without it are unchanged (their digests too)
    assert again.accuracy(20, 0.5, 0.0, codec="int8") == pytest.approx(again.accuracy(20, 0.5, 0.0) - 0.01)
    assert again.accuracy(20, 0.0, 0.0, codec="int8") == again.accuracy(20, 0.0, 0.0)  # nothing is sent at k = 0
    with pytest.raises(QualityProfileError, match="no measured loss for codec 'int8'"):
        base.accuracy(20, 0.5, 0.0, codec="int8")
    for bad, needle in (({"int4": 0.1}, "unknown codec 'int4'"), ({"int8": -0.1}, "must be finite and >= 0"),
                        ({"int8": float("nan")}, "must be finite and >= 0")):
        with pytest.raises(QualityProfileError, match=needle):
            replace(base, codec_loss=bad)
