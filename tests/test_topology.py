"""End to end: `python -m services.cli.topology` (scripts/up.sh) on loopback with the demo pack, driven by
the CLI; every /metrics endpoint scraped; stopped by SIGTERM (and by SIGKILL) with no child left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from service_procs import ROOT, metric_value

from services.cli import generate as cli
from services.cli.topology import scheduler_available
from services.common.launcher import terminate

PROMPT = "a red circle at the left on a blue background"


def running(pid: int) -> bool:
    """Alive and not a zombie (an unreaped child of an init that does not reap counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_gone(pids: list[int], timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if running(p)]


@contextmanager
def topology(tmp_path: Path, *args: str):
    """Starts the topology; yields (process, its topology.json); stops it if the test did not."""
    log_dir = tmp_path / "logs"
    output = tmp_path / "topology.out"
    command = [sys.executable, "-m", "services.cli.topology", "--free-ports", "--device", "cpu", "--log-dir", str(log_dir),
               "--grace", "20", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(output, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    pids: list[int] = []
    try:
        state_file = log_dir / "topology.json"
        deadline = time.monotonic() + 600
        while not state_file.exists():
            assert proc.poll() is None, f"topology exited with {proc.returncode}:\n{output.read_text()}"
            assert time.monotonic() < deadline, f"topology not up:\n{output.read_text()}"
            time.sleep(0.3)
        state = json.loads(state_file.read_text())
        pids = [s["pid"] for s in state["services"].values()]
        state["output"] = output
        yield proc, state
    finally:
        terminate([proc], grace=60)
        for pid in wait_gone(pids, timeout=30):
            os.kill(pid, signal.SIGKILL)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def generate(tmp_path: Path, capsys, name: str, *args: str) -> dict:
    argv = ["generate", PROMPT, "--out", str(tmp_path / f"{name}.png"), "--steps", "4", "--json", "--quiet", *args]
    assert cli.main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_topology_serves_generations_exposes_metrics_and_stops_cleanly(tmp_path, capsys):
    with topology(tmp_path) as (proc, state):
        services = state["services"]
        assert set(services) == ({"edge", "ue", "scheduler"} if scheduler_available() else {"edge", "ue"})
        printed = state["output"].read_text()
        for service in services.values():
            assert service["address"] in printed and service["metrics_url"] in printed
            assert Path(service["log"]).exists() and running(service["pid"])
        ue, edge = services["ue"]["address"], services["edge"]["address"]

        first = generate(tmp_path, capsys, "a", "--ue", ue, "--split", "2")
        assert first["mode"] == "device-service" and first["fallback"] is None
        assert first["edge_steps"] == 2 and first["device_steps"] == 2 and first["handoff_bytes"] > 0
        second = generate(tmp_path, capsys, "b", "--ue", ue, "--split", "2", "--user", "alice", "--codec", "int8")
        assert second["fallback"] is None and second["edge_steps"] == 2
        third = generate(tmp_path, capsys, "c", "--edge", edge, "--split", "3")  # device steps in this process
        assert third["fallback"] is None and third["edge_steps"] == 3 and third["device_steps"] == 1

        edge_metrics = scrape(services["edge"]["metrics_url"])
        assert metric_value(edge_metrics, "tandem_edge_requests_total", 'code="OK"') == 3
        assert metric_value(edge_metrics, "tandem_edge_steps_total") == 2 + 2 + 3
        assert metric_value(edge_metrics, "tandem_edge_handoff_bytes_count") == 3
        assert metric_value(edge_metrics, "tandem_edge_batch_size_count") > 0
        ue_metrics = scrape(services["ue"]["metrics_url"])
        assert metric_value(ue_metrics, "tandem_ue_requests_total", 'code="OK"') == 2
        assert metric_value(ue_metrics, "tandem_ue_steps_total") == 2 + 2
        assert metric_value(ue_metrics, "tandem_ue_handoff_bytes_count") == 2
        assert metric_value(ue_metrics, "tandem_ue_handoff_bytes_sum") == first["handoff_bytes"] + second["handoff_bytes"]
        assert metric_value(ue_metrics, "tandem_ue_fallbacks_total") == 0
        if "scheduler" in services:
            assert "tandem_scheduler_" in scrape(services["scheduler"]["metrics_url"])

        pids = [s["pid"] for s in services.values()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert wait_gone(pids) == [], "a service outlived the topology"
        output = state["output"].read_text()
        assert "all services stopped" in output
        assert "edge server stopped" in Path(services["edge"]["log"]).read_text()
        assert "device service stopped" in Path(services["ue"]["log"]).read_text()
        assert not (tmp_path / "logs" / "topology.json").exists()


@pytest.mark.slow
def test_killed_topology_leaves_no_children(tmp_path):
    with topology(tmp_path, "--no-scheduler") as (proc, state):
        assert set(state["services"]) == {"edge", "ue"}
        pids = [s["pid"] for s in state["services"].values()]
        proc.kill()  # no chance to clean up: the children's parent-death signal stops them
        proc.wait()
        assert wait_gone(pids) == [], "a service outlived a killed topology"


@pytest.mark.slow
def test_then_runs_one_generation_through_the_services_and_stops(tmp_path):
    """`--then` (the README's main job): up, one image via device service + scheduler, all down."""
    log_dir, out = tmp_path / "logs", tmp_path / "then.png"
    command = [sys.executable, "-m", "services.cli.topology", "--free-ports", "--device", "cpu", "--log-dir", str(log_dir),
               "--grace", "20", "--then", "generate", PROMPT, "--out", str(out), "--steps", "4", "--json", "--quiet"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.is_file()
    report = json.loads(done.stdout[done.stdout.index("{"): done.stdout.rindex("}") + 1])
    assert report["mode"] == "device-service" and report["fallback"] is None
    assert report["edge_steps"] + report["device_steps"] == 4
    if scheduler_available():
        assert report["plan"]["scheduler"] in done.stdout
    assert "all services stopped" in done.stdout
    assert not (log_dir / "topology.json").exists()
