"""Real service processes on 127.0.0.1 for integration tests (started and stopped by the test),
through the one launcher (services/common/launcher.py) with the tests' defaults: one thread each,
logs in the test's tmp_path, run from the repository root."""

from __future__ import annotations

from pathlib import Path

import grpc

from services.common import launcher
from services.common.launcher import (  # noqa: F401 (re-exported for the tests)
    LaunchError,
    Process,
    free_port,
    metric_value,
    rss_bytes,
    wait_metric,
)

ROOT = Path(__file__).resolve().parent.parent
ServiceProcess = Process
TEST_OPTIONS = {"env": launcher.ONE_THREAD, "cwd": ROOT}


def edge_server(pack: Path, tmp_path: Path, *args: str, credentials: grpc.ChannelCredentials | None = None,
                port: int | None = None):
    """`port`: a fixed one (to restart a server where its clients expect it), else a free one."""
    return launcher.edge_server(pack, tmp_path, *args, credentials=credentials, port=port, **TEST_OPTIONS)


def device_service(pack: Path, tmp_path: Path, *args: str, credentials: grpc.ChannelCredentials | None = None):
    return launcher.device_service(pack, tmp_path, *args, credentials=credentials, **TEST_OPTIONS)


def scheduler_service(tmp_path: Path, *args: str):
    return launcher.scheduler_service(tmp_path, *args, **TEST_OPTIONS)


def fake_edge(pack: Path, tmp_path: Path):
    """tools/testbed/fake_edge.py: a hostile edge (the prompt's first word picks the attack) that
    counts the bearer tokens it is sent."""
    return launcher.running("tools.testbed.fake_edge", "--pack", str(pack), "--device", "cpu", log_dir=tmp_path,
                            **TEST_OPTIONS)


def wait_edges_live(scheduler: Process, count: int, timeout: float, failure: str) -> None:
    """Until the scheduler counts exactly `count` live edges (heartbeats in, silent ones dropped);
    AssertionError(`failure`) after `timeout` seconds."""
    wait_metric(scheduler, "tandem_scheduler_edges_live", count, timeout, failure)
