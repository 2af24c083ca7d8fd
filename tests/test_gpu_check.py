"""The prepared GPU run cannot rot (issue 26, part 4): scripts/gpu_check.sh --dry-run (the same
stages with tiny packs on this CPU) writes every file the GPU run writes, into one folder the
device tool can bring back, and its profiles load with the scheduler's own loader; without
diffusers and without wheels it stops in one line; scripts/gpu_wheels.sh pins each wheel to the
version in this environment and names no package index (shown with --print: no network)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.scheduler.decide.costs import CostProfile

ROOT = Path(__file__).resolve().parent.parent
CHECK, WHEELS = ROOT / "scripts" / "gpu_check.sh", ROOT / "scripts" / "gpu_wheels.sh"
RESULTS = {"README.md", "stages.json", "batching.json", "batching.md", "cuda_tests.xml", "log.txt",
           "profiles/demo_cuda.json", "profiles/sd15_cuda.json"}
STAGES = ["wheels", "card", "tests", "packs", "batching", "profile-demo", "profile-sd15"]


def run(*args, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_check") / "results"
    done = run(CHECK, "--dry-run", "--out", out, timeout=2000)  # past the dry run's budget: a bound against a hang
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return out


@pytest.mark.slow
def test_the_dry_run_writes_every_result_into_one_folder_the_device_tool_brings_back(dry_run):
    files = {p.relative_to(dry_run).as_posix() for p in dry_run.rglob("*") if p.is_file()}
    assert files == RESULTS
    # the device tool's $OUT: at most 8 files, one folder down at most, plain names
    assert len(files) <= 8 and all(f.count("/") <= 1 and re.fullmatch(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)?", f)
                                   for f in files)


@pytest.mark.slow
def test_every_stage_passed_and_the_tables_say_what_ran(dry_run):
    summary = json.loads((dry_run / "stages.json").read_text())
    assert summary["ok"] and summary["dry_run"]
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert {s["status"] for s in summary["stages"]} == {"ok"}
    tests = summary["tests"]
    assert tests["failed"] == 0 and tests["passed"] == 2  # the fp16 checks ran on the CPU; the others need CUDA
    assert {c["outcome"] for c in tests["not_passed"]} == {"skipped"}
    batching = json.loads((dry_run / "batching.json").read_text())
    assert [r["batch"] for r in batching["batching"]] == [1, 2, 4, 8, 16]
    assert all(r["tandem_step_s"] > 0 and r["diffusers_step_s"] > 0 for r in batching["batching"])
    assert [r["option"] for r in batching["memory"]] == ["large-only", "device (default)", "device --offload"]
    readme = (dry_run / "README.md").read_text()
    for header in ("| stage | status | seconds | note |", "| batch | edge ms/step | diffusers ms/step",
                   "| option | CUDA peak | / large-only", "| file | device | edge pack"):
        assert header in readme
    assert "Dry run: tiny packs on the CPU" in readme


@pytest.mark.slow
def test_the_profiles_load_with_the_schedulers_loader(dry_run):
    for name, edge, device_class in (("demo_cuda.json", "tandem-demo-large", "cuda-demo"),
                                     ("sd15_cuda.json", "tiny-random-large", "cuda-sd15")):
        profile = CostProfile.load(dry_run / "profiles" / name)
        assert not profile.synthetic and next(iter(profile.edge)) == edge and device_class in profile.devices


def test_without_diffusers_or_wheels_the_run_stops_in_one_line(tmp_path):
    hidden = tmp_path / "hide"  # a diffusers that fails to import, first on the path
    (hidden / "diffusers").mkdir(parents=True)
    (hidden / "diffusers" / "__init__.py").write_text("raise ImportError('hidden for the test')\n")
    out = tmp_path / "results"
    done = run(CHECK, "--dry-run", "--out", out, env={"PYTHONPATH": str(hidden), "GPU_WHEELS": str(tmp_path / "none")})
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"diffusers is not importable and {tmp_path / 'none'} holds no wheels" in done.stdout
    summary = json.loads((out / "stages.json").read_text())
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [("wheels", "failed")] and not summary["ok"]


def test_the_wheel_script_pins_each_wheel_to_this_environments_version_and_names_no_index(tmp_path):
    done = run(WHEELS, "--print", "--dir", tmp_path / "wheels")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    for line, name in zip(lines, ("diffusers", "importlib_metadata", "lazy-importer")):
        assert line.split()[-1] == f"{name}=={importlib.metadata.version(name)}"
        for flag in ("download --no-deps", "--only-binary=:all:", "--python-version 3.12", "--implementation cp",
                     "--platform manylinux_2_28_x86_64", "--platform any", f"-d {tmp_path / 'wheels'}"):
            assert flag in line, (flag, line)
        assert "index" not in line and "://" not in line
    assert not (tmp_path / "wheels").exists()  # --print downloads nothing


@pytest.mark.parametrize("script", [CHECK, WHEELS], ids=["gpu_check", "gpu_wheels"])
def test_an_unknown_flag_is_one_line(script):
    done = run(script, "--bogus", timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "unknown argument --bogus" in done.stderr
