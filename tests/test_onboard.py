"""tandem-onboard end to end on the tiny packs (--quick): both profiles written, a rerun resumes
without measuring again, bad inputs are one line, and a scheduler started on the output plans with
the measured quality."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
from service_procs import scheduler_service

from services.scheduler.decide.quality import QualityProfile
from tandem.v1 import scheduler_pb2 as pb
from tandem.v1 import scheduler_pb2_grpc


def onboard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.onboard", *args, "--quiet"], capture_output=True,
                          text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                       "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def onboarded(tiny_packs, tmp_path_factory):
    out = tmp_path_factory.mktemp("onboard")
    done = onboard(str(tiny_packs["large"]), str(tiny_packs["small"]), "--out", str(out), "--quick",
                   "--device-class", "tiny-cpu", "--measure-random")  # tiny packs are random: fidelity anyway
    assert done.returncode == 0, done.stderr
    return out, done


def test_writes_both_profiles_and_the_scheduler_command(onboarded):
    out, done = onboarded
    costs = json.loads((out / "cost_profile.json").read_text())
    assert "tiny-cpu" in costs["devices"] and costs["synthetic"] is False
    quality = QualityProfile.load(out / "quality_profile.json")
    assert not quality.synthetic and quality.users() == ("base",)
    # All on the edge at the grid's largest T is the reference image itself (up to the fp16 handoff).
    assert quality.accuracy(4, 1.0, 0.0) > 0.95
    assert all(0.0 <= quality.accuracy(4, f, r) <= 1.0 for f in (0, 0.5, 1) for r in (0, 0.5))
    # int8 is measured beside fp16 at every handoff option and priced by its loss.
    assert quality.codecs == ("fp16", "int8") and 0.0 <= quality.codec_loss["int8"] < 0.5
    assert quality.accuracy(4, 0.5, 0.0, codec="int8") == pytest.approx(quality.accuracy(4, 0.5, 0.0) - quality.codec_loss["int8"])
    assert f"--quality-profile {out / 'quality_profile.json'}" in done.stdout
    assert f"--cost-profile {out / 'cost_profile.json'}" in done.stdout
    assert "--policy " in done.stdout and "policies/general" in done.stdout  # a policy for profiles it never saw


def test_a_second_run_resumes_instead_of_measuring_again(onboarded, tiny_packs):
    out, _ = onboarded
    points = (out / "quality_points.jsonl").read_text()
    again = onboard(str(tiny_packs["large"]), str(tiny_packs["small"]), "--out", str(out), "--quick",
                    "--device-class", "tiny-cpu", "--measure-random")
    assert again.returncode == 0, again.stderr
    assert "keeping" in again.stderr and "7 already measured" in again.stderr
    assert (out / "quality_points.jsonl").read_text() == points


@pytest.mark.parametrize("args,needle", [
    (["nowhere", "SMALL"], "LARGE: no pack directory at nowhere"),
    (["LARGE", "SMALL", "--users", "carol"], "--users: the small pack has no user carol"),
    (["LARGE", "SMALL", "--n", "0"], "--n: must be >= 1"),
    (["LARGE", "SMALL", "--codecs", "int4"], "--codecs: unknown codec 'int4'"),
])
def test_bad_input_is_one_line(tiny_packs, tmp_path, args, needle):
    args = [str(tiny_packs[a.lower()]) if a in ("LARGE", "SMALL") else a for a in args]
    done = onboard(*args, "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_scheduler_on_the_output_plans_with_the_measured_quality(onboarded, tmp_path):
    out, _ = onboarded
    quality = QualityProfile.load(out / "quality_profile.json")
    with scheduler_service(tmp_path, "--quality-profile", str(out / "quality_profile.json"),
                           "--cost-profile", str(out / "cost_profile.json")) as scheduler:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(scheduler.address))
        reply = stub.Plan(pb.PlanRequest(device_class="tiny-cpu", link=pb.LinkEstimate(bandwidth_bps=50e6,
                                                                                       rtt_seconds=0.01)), timeout=30)
    expected = quality.accuracy(reply.steps, reply.split / reply.steps, reply.codec.merge_ratio)
    assert reply.predicted_quality == pytest.approx(expected, abs=1e-6)
