"""Real service processes on 127.0.0.1 for integration tests (started and stopped by the test)."""

from __future__ import annotations

import difflib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServiceProcess:
    proc: subprocess.Popen
    address: str
    metrics_port: int
    log_path: Path

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


def wait_healthy(address: str, proc: subprocess.Popen, timeout: float = 90.0, service: str = "",
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    """`credentials`: for a TLS server (an mTLS one needs them with a client certificate)."""
    deadline = time.monotonic() + timeout
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode} before becoming healthy")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout} s")


def _service(module: str, pack: Path, tmp_path: Path, *args: str, credentials=None, port: int | None = None):
    return _process(module, tmp_path, "--pack", str(pack), "--device", "cpu", *args, credentials=credentials,
                    port=port)


PORT_ATTEMPTS = 3


@contextmanager
def _process(module: str, tmp_path: Path, *args: str, credentials: grpc.ChannelCredentials | None = None,
             port: int | None = None):
    """`port`: a fixed one (to restart a server where its clients expect it), else a free one."""
    service = _start(module, tmp_path, args, credentials, port)
    proc = service.proc
    try:
        yield service
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _start(module: str, tmp_path: Path, args: tuple[str, ...], credentials: grpc.ChannelCredentials | None,
           fixed_port: int | None) -> ServiceProcess:
    """A healthy server. A port free_port() found can be taken before the server binds it (an
    outgoing connection's ephemeral port, say); servers refuse a busy port (exit 2, "already in
    use"), so such a start is tried again on new ports."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port, metrics_port = fixed_port or free_port(), free_port()
        log_path = tmp_path / f"{module.rsplit('.', 1)[-1]}-{port}.log"
        command = [sys.executable, "-m", module, "--port", str(port), "--metrics-port", str(metrics_port), *args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        service = ServiceProcess(proc, f"127.0.0.1:{port}", metrics_port, log_path)
        try:
            wait_healthy(service.address, proc, credentials=credentials)
            return service
        except RuntimeError:  # exited before becoming healthy
            if attempt == PORT_ATTEMPTS or proc.returncode != 2 or "already in use" not in service.log():
                raise
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    raise AssertionError("unreachable")


def edge_server(pack: Path, tmp_path: Path, *args: str, credentials: grpc.ChannelCredentials | None = None,
                port: int | None = None):
    return _service("services.edge_server", pack, tmp_path, *args, credentials=credentials, port=port)


def device_service(pack: Path, tmp_path: Path, *args: str, credentials: grpc.ChannelCredentials | None = None):
    return _service("services.ue_client", pack, tmp_path, *args, credentials=credentials)


def scheduler_service(tmp_path: Path, *args: str):
    return _process("services.scheduler", tmp_path, *args)


# The sample names of a metric family `x`: x (gauge), x_total (counter), x_bucket/_count/_sum
# (histogram), x_created.
SAMPLE_SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")


def metric_value(text: str, name: str, labels: str = "", default: float | None = None) -> float:
    """The value of the sample `name{labels}` in a Prometheus text exposition; `labels` is the
    sample's whole label set (`code="OK",method="Plan"`, any order). A missing sample raises
    AssertionError naming what is there, so a renamed metric fails its test instead of reading 0.
    `default`: the value of a label set not used yet (prometheus_client exports a labelled
    metric's samples only from its first use); the metric itself must still be declared."""
    families = list(text_string_to_metric_families(text))
    wanted = _labels(labels)
    samples = [s for f in families for s in f.samples]
    for sample in samples:
        if sample.name == name and sample.labels == wanted:
            return sample.value
    declared = any(name == f.name + suffix for f in families for suffix in SAMPLE_SUFFIXES)
    if declared and default is not None:
        return default
    key = f"{name}{{{labels}}}" if labels else name
    others = sorted({_render(s.labels) for s in samples if s.name == name})
    if others:
        hint = f"{name} has only {', '.join(others)}"
    elif declared:
        hint = f"{name} is declared but has no samples yet (a label set not used yet? pass default=)"
    else:
        names = {s.name for s in samples if not s.name.endswith("_created")} | {f.name for f in families if not f.samples}
        hint = f"similar names: {', '.join(difflib.get_close_matches(name, names, n=5, cutoff=0.6)) or 'none'}"
    raise AssertionError(f"no sample {key} in the metrics; {hint}")


def _labels(labels: str) -> dict[str, str]:
    """`code="OK",method="Plan"` as the parser reads a sample's labels (quoting and escapes alike)."""
    if not labels:
        return {}
    (family,) = text_string_to_metric_families(f"m{{{labels}}} 0\n")
    return family.samples[0].labels


def _render(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def wait_edges_live(scheduler: ServiceProcess, count: int, timeout: float, failure: str) -> None:
    """Until the scheduler counts exactly `count` live edges (heartbeats in, silent ones dropped);
    AssertionError(`failure`) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while metric_value(scheduler.metrics(), "tandem_scheduler_edges_live") != count:
        assert time.monotonic() < deadline, failure
        time.sleep(0.2)


def fake_edge(pack: Path, tmp_path: Path):
    """tests/fake_edge.py: a hostile edge (the prompt's first word picks the attack) that counts
    the bearer tokens it is sent."""
    return _service("tests.fake_edge", pack, tmp_path)


def rss_bytes(proc: subprocess.Popen) -> int:
    """Resident memory of a running service process (Linux /proc)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {proc.pid}")
