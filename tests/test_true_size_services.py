"""Every path at true size (issue 26, part 2): tandem-onboard on a pair with random weights (the
cost profile measured, a quality profile that says there is none, and a scheduler that is told so and
plans by cost alone), then the three services (scheduler -> edge -> device service) serving one
512 px image on a real plan, its handoff bytes predicted exactly.

At true size (SD 1.5 on the edge, BK-SDM-Small on the device, tandem-pack's sd15 pair) this needs
minutes on a CPU: marked truesize (pytest -m truesize; not in CI; the pair comes from
$TANDEM_PACK_CACHE/sd15 as `tandem-pack build sd15` leaves it, built there if absent). The same paths run always on tiny
random pairs: the session's tiny packs, and the SD-geometry pair (512 px, 4x64x64 latents, tiny
UNets), in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from PIL import Image
from service_procs import ROOT, device_service, edge_server, metric_value, scheduler_service

from services.cli import generate as cli
from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.options import DEFAULT_OPTIONS
from services.scheduler.decide.quality import (
    BASE_USER,
    QualityPoint,
    QualityProfile,
    QualityProfileError,
    random_weights_profile,
)
from services.scheduler.defaults import DEFAULT_POLICY
from services.ue_client import client as _ue_client  # noqa: F401  (the CLI imports it late: load it with the rest)
from tandem.codec.spec import CodecSpec, handoff_size
from tandem.v1 import scheduler_pb2 as pb
from tandem.v1 import scheduler_pb2_grpc

GENERAL_POLICY = DEFAULT_POLICY.parent / "general"  # the policy tandem-onboard's printed command names
NO_QUALITY_LINE = "none (random weights): plans by cost alone"
PROMPT = "a red circle at the left on a blue background"
# The request the services serve: T and k given (a cost-only plan on a CPU where the device's
# step is the cheaper one keeps every step on the device); the plan gives the codec, merge ratio
# and edge.
STEPS, SPLIT = 4, 2
# The edge and the profiler run the UNet eagerly: at true size a trace saves nothing measurable on
# a step of tens of seconds, and its equality checks cost 3-4 extra UNet calls per input shape.
EAGER = "--no-trace-unet"


def onboard(large: Path, small: Path, out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.onboard", str(large), str(small), "--out", str(out),
                           "--quiet", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


# --- the quality profile that says there is none ------------------------------------------------

def test_a_random_weights_profile_is_flat_and_round_trips():
    profile = random_weights_profile("l+s", (BASE_USER, "alice"), ("int8",))
    again = QualityProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again.random_weights and not again.has_quality and again.metric.startswith("none: ")
    assert again.users() == ("base", "alice") and again.codecs == ("fp16", "int8")
    values = {again.accuracy(o.steps, o.split_fraction, o.merge_ratio, user, codec=codec)
              for o in DEFAULT_OPTIONS for user in ("base", "alice", "carol") for codec in again.codecs}
    assert values == {0.0}  # every option, user and codec the same: nothing to rank by
    assert "random_weights" not in QualityProfile({"p": {"base": (QualityPoint(10, 0.5, 0.0, 0.8),)}}).to_dict()


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d["pairs"]["l+s"]["users"]["base"]["points"].append(
        {"steps": 20, "split_fraction": 0.5, "merge_ratio": 0.0, "accuracy": 0.5}), "points must all be equal"),
    (lambda d: d.update(codec_loss={"int8": 0.01}), "codec losses 0"),
    (lambda d: d.update(random_weights="yes"), "random_weights = 'yes': must be true or false"),
])
def test_a_profile_that_claims_random_weights_but_ranks_options_is_refused(edit, needle):
    data = random_weights_profile("l+s").to_dict()
    edit(data)
    with pytest.raises(QualityProfileError, match=needle):
        QualityProfile.from_dict(data)


# --- tandem-onboard on a random pair: costs measured, no quality, the scheduler told so -----------

@pytest.fixture(scope="module")
def onboarded_random(tiny_packs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onboard-random")
    began = time.perf_counter()
    done = onboard(tiny_packs["large"], tiny_packs["small"], out, "--quick", "--device-class", "tiny-cpu")
    assert done.returncode == 0, done.stderr
    return out, done, time.perf_counter() - began


def test_onboard_measures_the_costs_of_a_random_pair_and_says_it_has_no_quality(onboarded_random):
    out, done, seconds = onboarded_random
    costs = CostProfile.load(out / "cost_profile.json")
    assert not costs.synthetic and "tiny-cpu" in costs.devices and "large" in costs.edge
    measured = json.loads((out / "cost_profile.json").read_text())["measured"]
    assert sorted(map(int, measured["edge"]["step_seconds"])) == [1, 2]  # --quick, random: what a + b·n needs
    assert measured["repeats"] == 2 and measured["handoff"] == {"payloads": 18, "max_error_bytes": 0}
    quality = QualityProfile.load(out / "quality_profile.json")
    assert quality.random_weights and not quality.has_quality and quality.metric.startswith("none: ")
    assert quality.pairs == ("large+small",) and quality.codecs == ("fp16", "int8")
    assert not list(out.glob("quality_points*.jsonl"))  # nothing pretended to be measured
    assert "quality: none: the packs' weights are random" in done.stderr
    assert "handoff bytes predicted exactly (18 real payloads)" in done.stderr
    assert "# the quality profile says none (random weights): the scheduler plans by cost alone" in done.stdout
    assert seconds < 120, f"onboarding the tiny random pair took {seconds:.0f} s"


def test_measure_random_still_measures_fidelity(tiny_packs, tmp_path):
    done = onboard(tiny_packs["large"], tiny_packs["small"], tmp_path, "--quick", "--device-class", "tiny-cpu",
                   "--measure-random", "--steps", "2", "--n", "1", "--codecs", "none")
    assert done.returncode == 0, done.stderr
    quality = QualityProfile.load(tmp_path / "quality_profile.json")
    assert quality.has_quality and quality.metric.startswith("fidelity (SSIM")


def test_a_scheduler_on_a_random_pairs_profiles_says_so_and_plans_by_cost_alone(onboarded_random, tmp_path):
    out, _, _ = onboarded_random
    with scheduler_service(tmp_path, "--policy", str(GENERAL_POLICY), "--quality-profile",
                           str(out / "quality_profile.json"), "--cost-profile", str(out / "cost_profile.json")) as sched:
        with grpc.insecure_channel(sched.address) as channel:
            reply = scheduler_pb2_grpc.SchedulerServiceStub(channel).Plan(pb.PlanRequest(
                device_class="tiny-cpu", latency_budget_seconds=30.0,
                link=pb.LinkEstimate(bandwidth_bps=50e6, rtt_seconds=0.01)), timeout=30)
        log = sched.log()
    assert log.count(NO_QUALITY_LINE) == 1, log
    assert reply.plan_id and reply.predicted_quality == 0.0 and reply.meets_budget
    # Every option scores the same, so the fewest steps are the cheapest plan whatever the split.
    assert reply.steps == min(o.steps for o in DEFAULT_OPTIONS)


# --- the three services on a real plan -----------------------------------------------------------

def serve_one_image(large: Path, small: Path, work: Path, device_class: str, budget_s: float,
                    onboard_timeout: float, generate_timeout: float) -> dict:
    """tandem-onboard --quick on the pair, then scheduler + edge + device service on loopback and
    one 512 px image asked of the device service (T and k given, the rest planned); checks what
    every hop did and returns what it saw."""
    out = work / "profiles"
    began = time.perf_counter()
    done = onboard(large, small, out, "--quick", "--device-class", device_class, EAGER, timeout=onboard_timeout)
    assert done.returncode == 0, done.stderr
    onboard_s = time.perf_counter() - began
    costs = CostProfile.load(out / "cost_profile.json")
    latent = costs.latent
    assert (latent.channels, latent.height, latent.width) == (4, 64, 64)  # SD's 512 px latent
    assert json.loads((out / "cost_profile.json").read_text())["measured"]["handoff"]["max_error_bytes"] == 0
    assert QualityProfile.load(out / "quality_profile.json").random_weights
    with edge_server(large, work, EAGER) as edge, \
            scheduler_service(work, "--policy", str(GENERAL_POLICY), "--edge", edge.address,
                              "--quality-profile", str(out / "quality_profile.json"),
                              "--cost-profile", str(out / "cost_profile.json")) as sched, \
            device_service(small, work, "--edge", edge.address) as ue:
        assert sched.log().count(NO_QUALITY_LINE) == 1, sched.log()
        # The scheduler's own plan for this device (what it chooses by cost alone).
        with grpc.insecure_channel(sched.address) as channel:
            own = scheduler_pb2_grpc.SchedulerServiceStub(channel).Plan(
                pb.PlanRequest(device_class=device_class, latency_budget_seconds=budget_s), timeout=30)
        own_spec = CodecSpec(own.codec.encoding or "fp16", own.codec.merge_ratio)
        assert own.predicted_handoff_bytes == costs.handoff_bytes(own.steps, own.split, own_spec.encoding,
                                                                  own_spec.merge_ratio)
        if own.split:
            assert own.predicted_handoff_bytes == handoff_size(4, 64, 64, own_spec, own.steps, own.split)
        image = work / "image.png"
        argv = ["generate", PROMPT, "--out", str(image), "--ue", ue.address, "--scheduler", sched.address,
                "--device-class", device_class, "--latency-budget", str(budget_s), "--steps", str(STEPS),
                "--split", str(SPLIT), "--timeout", str(generate_timeout), "--json", "--quiet"]
        began = time.perf_counter()
        assert cli.main(argv) == 0
        generate_s = time.perf_counter() - began
        edge_metrics, ue_metrics = edge.metrics(), ue.metrics()
    return {"argv": argv, "onboard_s": onboard_s, "generate_s": generate_s, "costs": costs, "image": image,
            "own_plan": own, "edge_metrics": edge_metrics, "ue_metrics": ue_metrics, "onboard_stderr": done.stderr}


def check_served(seen: dict, report: dict) -> dict:
    """The plan came from the scheduler, the edge ran k steps, the handoff had the predicted bytes,
    a 512x512 PNG came back. Returns a summary to print."""
    assert report["mode"] == "device-service" and report["fallback"] is None
    plan = report["plan"]
    assert plan is not None and plan["id"] and plan["reported"], plan  # planned, and the phases reported back
    assert report["edge_steps"] == SPLIT and report["device_steps"] == STEPS - SPLIT
    assert metric_value(seen["edge_metrics"], "tandem_edge_steps_total") == SPLIT
    spec = CodecSpec(**report["codec"])  # what the device service asked the edge for (the plan's codec)
    predicted = handoff_size(4, 64, 64, spec, STEPS, SPLIT)
    assert report["handoff_bytes"] == predicted == seen["costs"].handoff_bytes(STEPS, SPLIT, spec.encoding,
                                                                               spec.merge_ratio)
    assert metric_value(seen["ue_metrics"], "tandem_ue_handoff_bytes_sum") == predicted
    with Image.open(seen["image"]) as png:
        assert png.format == "PNG" and png.size == (512, 512)
    own = seen["own_plan"]
    return {"onboard_s": round(seen["onboard_s"], 1), "generate_s": round(seen["generate_s"], 1),
            "scheduler_plan": {"steps": own.steps, "split": own.split, "codec": own.codec.encoding,
                               "merge_ratio": own.codec.merge_ratio, "edge": own.edge_address,
                               "predicted_s": {"edge": own.predicted.edge, "transfer": own.predicted.transfer,
                                               "device": own.predicted.device, "total": own.predicted.total},
                               "predicted_handoff_bytes": own.predicted_handoff_bytes,
                               "predicted_quality": own.predicted_quality, "meets_budget": own.meets_budget},
            "served": {"steps": STEPS, "split": SPLIT, "codec": report["codec"], "handoff_bytes": report["handoff_bytes"],
                       "predicted_handoff_bytes": predicted, "measured_s": report["seconds"],
                       "predicted_s_of_plan": plan["predicted_seconds"]}}


def _served(seen: dict, capsys, show: bool = False) -> tuple[dict, dict]:
    """The CLI's JSON report, checked; ``show``: printed past pytest's capture (what a slow run saw)."""
    report = json.loads(capsys.readouterr().out)
    summary = check_served(seen, report)
    if show:
        with capsys.disabled():
            print("\n" + json.dumps(summary, indent=1))
    return report, summary


@pytest.mark.slow
def test_the_three_services_serve_a_512px_image_on_a_plan_sd_geometry(tmp_path, capsys):
    """The slow test's twin: SD's 512 px geometry with tiny random UNets (under a minute)."""
    from tandem.tiny_pack import build_sd_geometry_pair

    large, small = build_sd_geometry_pair(tmp_path / "pair")
    seen = serve_one_image(large, small, tmp_path, "geometry-cpu", budget_s=60.0, onboard_timeout=300,
                           generate_timeout=120)
    _, summary = _served(seen, capsys)
    assert summary["scheduler_plan"]["steps"] == min(o.steps for o in DEFAULT_OPTIONS)  # cost alone: fewest steps
    assert "random weights: the cheapest faithful settings" in seen["onboard_stderr"]


@pytest.mark.truesize
def test_the_three_services_serve_a_512px_image_at_true_size(tmp_path, capsys):
    """SD 1.5 (860 M UNet) on the edge and BK-SDM-Small (482 M) on the device, random weights:
    onboarding's cost profile at true size, then one 512 px image through the three services on
    a plan (12 minutes on two loaded cores, 10 of them onboarding)."""
    from services.cli.pack import default_cache
    from tandem.true_size import build_pair, cached_pair

    pair = default_cache() / "sd15"
    if cached_pair(pair) is not None:
        build_pair("sd15", pair, progress=lambda _: None)
    seen = serve_one_image(pair / "large", pair / "small", tmp_path, "sd15-cpu", budget_s=3600.0,
                           onboard_timeout=3000, generate_timeout=1800)
    report, summary = _served(seen, capsys, show=True)
    measured = json.loads((tmp_path / "profiles" / "cost_profile.json").read_text())["measured"]
    with capsys.disabled():
        print(json.dumps({"measured": measured, "onboard_log": seen["onboard_stderr"].splitlines()}, indent=1))
    assert measured["edge"]["pack"] == "sd15-random-large" and measured["small"]["pack"] == "sd15-random-small"
    assert report["ue_pack"] == "sd15-random-small"
    assert summary["scheduler_plan"]["steps"] == min(o.steps for o in DEFAULT_OPTIONS)  # cost alone: fewest steps
