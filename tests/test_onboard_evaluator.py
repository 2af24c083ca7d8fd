"""tandem-onboard on the demo pack, which ships an evaluator: quality is the evaluator's accuracy
(attributes and the user's style), not fidelity; --no-evaluator gives fidelity; a bad --evaluator
is one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.scheduler.decide.quality import QualityProfile
from services.scheduler.defaults import DEMO_COSTS
from tandem.packs import DEMO_PACK

N = 8  # prompts per point: accuracies are multiples of 1/8


def onboard(out: Path, *args: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(DEMO_COSTS, out / "cost_profile.json")  # kept (resumed): this test is about quality
    return subprocess.run([sys.executable, "-m", "services.onboard", str(DEMO_PACK / "large"), str(DEMO_PACK / "small"),
                           "--out", str(out), "--quick", "--n", str(N), "--device", "cpu", "--quiet", *args],
                          capture_output=True, text=True, timeout=900,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-onboard")
    done = onboard(out)
    assert done.returncode == 0, done.stderr
    return out, done


def test_the_demo_pack_is_scored_by_its_evaluator(evaluated):
    out, done = evaluated
    assert "scored by the pack's evaluator" in done.stderr
    profile = json.loads((out / "quality_profile.json").read_text())
    assert profile["metric"].startswith("evaluator accuracy")
    quality = QualityProfile.load(out / "quality_profile.json")
    assert set(quality.users()) == {"base", "alice", "bob"}
    measured = [json.loads(line) for line in (out / "quality_points_evaluator.jsonl").read_text().splitlines()]
    points = [p for p in measured if p["codec"] == "fp16"]
    assert len(points) == 15 and len(measured) == 17  # + int8 at the 2 handoff options, to price it
    assert quality.codecs == ("fp16", "int8")
    for p in points:
        assert (p["accuracy"] * N).is_integer()  # a share of N images, not an SSIM
        assert quality.accuracy(p["steps"], p["split"] / p["steps"], p["merge_ratio"], p["user"]) == pytest.approx(
            round(p["accuracy"], 4))
    # A LoRA user's all-device image is its own fidelity reference (SSIM 1): the profile holds the
    # evaluator's verdict instead, and its style needs device steps, so all-edge scores lower.
    alice = {(p["split"], p["merge_ratio"]): p for p in points if p["user"] == "alice"}
    assert alice[(0, 0.0)]["ssim"] == pytest.approx(1.0)
    assert quality.accuracy(4, 0.0, 0.0, "alice") == alice[(0, 0.0)]["accuracy"]
    assert quality.accuracy(4, 1.0, 0.0, "alice") < quality.accuracy(4, 0.0, 0.0, "alice")


def test_no_evaluator_measures_fidelity(tmp_path):
    done = onboard(tmp_path, "--no-evaluator", "--users", "none", "--n", "2")
    assert done.returncode == 0, done.stderr
    assert "scored by the pack's evaluator" not in done.stderr
    profile = json.loads((tmp_path / "quality_profile.json").read_text())
    assert profile["metric"].startswith("fidelity (SSIM")
    assert not (tmp_path / "quality_points_evaluator.jsonl").exists() and (tmp_path / "quality_points.jsonl").is_file()


@pytest.mark.parametrize("args,needle", [
    (["--evaluator", "nowhere"], "--evaluator: no evaluator at nowhere"),
    (["--evaluator", str(DEMO_PACK / "evaluator"), "--no-evaluator"], "--evaluator and --no-evaluator"),
])
def test_bad_evaluator_flags_are_one_line(tmp_path, args, needle):
    done = onboard(tmp_path, *args)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
