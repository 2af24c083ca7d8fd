"""Profiles are checked on load: every number finite and in its physical range, a bad one refused
in one line naming its key (issue 31), by the profile classes, the scheduler's command line and
tandem-onboard's resume."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_procs import ROOT

from services.scheduler.decide.costs import CostProfile, CostProfileError
from services.scheduler.decide.quality import QualityProfile, QualityProfileError, synthetic_profile
from tandem.packs import DEMO_PACK

COMMITTED = sorted((ROOT / "services" / "scheduler" / "profiles").glob("*.json")) + [DEMO_PACK / "quality_profile.json"]
COST = ROOT / "services" / "scheduler" / "profiles" / "demo_cpu.json"
NAN, INF = float("nan"), float("inf")


def _with(data: dict, path: str, value) -> dict:
    """A deep copy of ``data`` with the value at a dotted key path (``[i]`` indexes a list) replaced."""
    out = copy.deepcopy(data)
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    node[last] = value
    return out


def _names(message: str, key: str) -> bool:
    """One line: "<key> = <value>: must be ..." (the key as written in the file)."""
    return "\n" not in message and message.startswith(f"{key} = ") and ": must be " in message


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_every_committed_profile_loads(path: Path):
    data = json.loads(path.read_text())
    profile = CostProfile.load(path) if "format" in data else QualityProfile.load(path)
    assert profile is not None


# Every number of a cost profile, each with a value out of its range (0 where none can be 0, a
# fraction where an integer belongs) besides NaN, inf and -1.
COST_FIELDS = {
    "edge.large.a_s": (), "edge.large.b_s": (0.0,),
    "devices.cpu.step_s": (0.0,), "devices.cpu.decode_s": (), "devices.cpu.power_w": (),
    "latent.channels": (0, 2.5), "latent.height": (0,), "latent.width": ("8",),
    "rtt_s": (), "max_batch": (0, True),
}


@pytest.mark.parametrize("key,value", [(k, v) for k, extra in COST_FIELDS.items() for v in (NAN, INF, -1, *extra)])
def test_a_cost_profile_with_a_number_out_of_range_is_refused_naming_its_key(key, value, tmp_path):
    bad = _with(json.loads(COST.read_text()), key, value)
    with pytest.raises(CostProfileError) as refused:
        CostProfile.from_dict(bad)
    assert _names(str(refused.value), key), refused.value
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(bad))  # NaN and Infinity as Python's json writes (and reads) them
    with pytest.raises(CostProfileError) as refused:
        CostProfile.load(path)
    assert _names(str(refused.value).removeprefix(f"{path}: "), key), refused.value


def test_a_cost_profile_that_is_not_an_object_is_refused():
    with pytest.raises(CostProfileError, match="not a cost profile"):
        CostProfile.from_dict([])  # type: ignore[arg-type]


POINT = "pairs.large+small.users.base.points[3]"
QUALITY_FIELDS = {
    f"{POINT}.steps": (0, 2.5), f"{POINT}.split_fraction": (1.5,), f"{POINT}.merge_ratio": (1.0,),
    f"{POINT}.accuracy": (1.5,), "codec_loss.int8": (-0.1,),
}


@pytest.mark.parametrize("key,value", [(k, v) for k, extra in QUALITY_FIELDS.items() for v in (NAN, INF, -2, *extra)])
def test_a_quality_profile_with_a_number_out_of_range_is_refused_naming_its_key(key, value, tmp_path):
    bad = _with(synthetic_profile().to_dict(), key, value)
    with pytest.raises(QualityProfileError) as refused:
        QualityProfile.from_dict(bad)
    assert _names(str(refused.value), key), refused.value
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(QualityProfileError) as refused:
        QualityProfile.load(path)
    assert _names(str(refused.value).removeprefix(f"{path}: "), key), refused.value


@pytest.mark.parametrize("flag,key,value", [("--cost-profile", "rtt_s", NAN), ("--cost-profile", "max_batch", INF),
                                            ("--quality-profile", f"{POINT}.accuracy", NAN)])
def test_the_scheduler_refuses_a_bad_profile_in_one_line(flag, key, value, tmp_path):
    """One line naming the file and the key, exit 2, no traceback; before it serves anything."""
    good = json.loads(COST.read_text()) if flag == "--cost-profile" else synthetic_profile().to_dict()
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_with(good, key, value)))
    other = ("--quality-profile", "synthetic") if flag == "--cost-profile" else ("--cost-profile", "builtin")
    done = subprocess.run([sys.executable, "-m", "services.scheduler", "--port", "0", "--metrics-port", "0",
                           "--policy", "greedy", flag, str(path), *other], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, output
    assert "\n" not in output and _names(output.removeprefix(f"tandem-scheduler: error: {path}: "), key), output


def test_onboard_refuses_a_bad_cost_profile_it_would_keep(tmp_path):
    """tandem-onboard resumes by keeping DIR's cost profile: a bad one is one line, not kept."""
    from services.onboard.cli import OnboardError, _cost_profile

    path = tmp_path / "cost_profile.json"
    path.write_text(json.dumps(_with(json.loads(COST.read_text()), "devices.cpu.step_s", -1)))
    with pytest.raises(OnboardError, match=r"devices\.cpu\.step_s = -1\.0: must be finite and > 0 \(--force"):
        _cost_profile(argparse.Namespace(force=False), path)
