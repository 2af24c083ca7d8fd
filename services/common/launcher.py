"""Starting Tandem's servers as child processes: the one launcher that the topology command
(services/cli/topology.py), the integration tests (tests/service_procs.py) and the benches use.

    with running("services.edge_server", "--pack", pack, "--device", "cpu", log_dir=tmp) as edge:
        ...edge.address, edge.metrics(), edge.log()...

- `free_port()`: a port nothing listens on now (a server started on it may still lose it to another
  socket before it binds: `start_server` then tries new ports).
- `spawn()`: a command as a child process, its output in a log file; `wrap` is the hook that
  changes where it runs (e.g. `lambda argv: ["ip", "netns", "exec", NS, *argv]`).
- `Process`: its handle: wait for grpc.health.v1 SERVING, metrics, log tail, graceful stop.
- `start_server()` / `running()`: `python -m MODULE --port P --metrics-port M ARGS`, healthy or
  `LaunchError` (with the last lines of its log); `edge_server()`, `device_service()`,
  `scheduler_service()`: the three services that way (a pack, the CPU by default).
- `Group`: a topology: several processes started together, waited for, stopped together (SIGTERM,
  then SIGKILL after a grace), the first one that exits on its own reported with its log.
- `metric_value()`: one sample of a Prometheus text exposition (what the services' /metrics say).
"""

from __future__ import annotations

import ctypes
import difflib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

PR_SET_PDEATHSIG = 1
PORT_ATTEMPTS = 3
DEFAULT_GRACE = 30.0

Wrap = Callable[[list[str]], list[str]]


class LaunchError(RuntimeError):
    """A process exited, or did not become healthy in time; the message ends with its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health_check(address: str, service: str = "", timeout: float = 2.0, credentials: Any = None) -> bool:
    """True when `address` answers grpc.health.v1 SERVING for `service` ("" = the whole server).
    `credentials` (grpc.ChannelCredentials): for a TLS server (mTLS: with a client certificate)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the graceful stop still applies
        pass


@dataclass
class Process:
    """A started child process. `address`: its gRPC server (HOST:PORT; "" when it has none);
    `metrics_port`: its Prometheus endpoint on `metrics_host` (0: none)."""

    name: str
    proc: subprocess.Popen
    log_path: Path | None = None
    address: str = ""
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    health_service: str = ""
    credentials: Any = None  # grpc.ChannelCredentials for the health checks of a TLS server
    grace: float = DEFAULT_GRACE  # seconds between SIGTERM and SIGKILL when stopped as a context manager

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics_host}:{self.metrics_port}/metrics"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return response.read().decode()

    def metric(self, name: str, labels: str = "", default: float | None = None) -> float:
        return metric_value(self.metrics(), name, labels, default)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def failure(self, what: str) -> LaunchError:
        where = f"; last lines of {self.log_path}:\n{self.tail()}" if self.log_path else ""
        return LaunchError(f"{self.name} {what}{where}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise self.failure(f"exited with status {self.proc.returncode}")

    def healthy(self, timeout: float = 2.0) -> bool:
        return health_check(self.address, self.health_service, timeout, self.credentials)

    def wait_healthy(self, timeout: float = 90.0, stop: threading.Event | None = None) -> None:
        wait_healthy([self], timeout, stop)

    def rss_bytes(self) -> int:
        return rss_bytes(self.proc.pid)

    def stop(self, grace: float | None = None) -> None:
        terminate([self], self.grace if grace is None else grace)

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(name: str, command: Sequence[str], *, log_path: Path | None = None, env: dict[str, str] | None = None,
          cwd: Path | str | None = None, wrap: Wrap | None = None, die_with_parent: bool = False,
          stdin: int | IO[Any] | None = subprocess.DEVNULL, stdout: int | IO[Any] | None = None,
          text: bool = False, header: bool = False, **handle: Any) -> Process:
    """`command` as a child process. Its environment is ours plus PYTHONUNBUFFERED=1 plus `env`;
    its output (stdout too, unless `stdout` is given) goes to `log_path` (a `header` line first:
    the command). `wrap`: the hook that changes how it is run (a namespace, a different user).
    `die_with_parent`: SIGTERM when the thread that started it dies without stopping it (Linux
    PR_SET_PDEATHSIG, set by a preexec_fn: for a launcher's main thread, not a threaded test). `handle`: the Process's other fields."""
    argv = list(command)
    argv = wrap(argv) if wrap else argv
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    preexec = _die_with_parent if die_with_parent else None
    if log_path is None:
        proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdin=stdin, stdout=stdout, text=text, preexec_fn=preexec)
    else:
        with open(log_path, "w") as log:  # the child keeps its own descriptor
            if header:
                log.write(f"$ {' '.join(argv)}\n")
                log.flush()
            proc = subprocess.Popen(argv, cwd=cwd, env=full_env, stdin=stdin, stdout=log if stdout is None else stdout,
                                    stderr=log, text=text, preexec_fn=preexec)
    return Process(name, proc, log_path, **handle)


def rss_bytes(process: Process | subprocess.Popen | int) -> int:
    """Resident memory of a running process now (Linux /proc)."""
    pid = process if isinstance(process, int) else process.pid
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def terminate(processes: Iterable[Process | subprocess.Popen], grace: float = DEFAULT_GRACE) -> None:
    """SIGTERM to every process still running, SIGKILL to those not gone after `grace` seconds."""
    procs = [p.proc if isinstance(p, Process) else p for p in processes]
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(processes: Sequence[Process], timeout: float, stop: threading.Event | None = None) -> None:
    """Until every process's server says SERVING. LaunchError when one exits first (with its log)
    or `timeout` seconds pass; KeyboardInterrupt when `stop` is set meanwhile."""
    deadline = time.monotonic() + timeout
    waiting = [p for p in processes if p.address]
    while waiting:
        for p in waiting:
            p.check_alive()
        if stop is not None and stop.is_set():
            raise KeyboardInterrupt
        waiting = [p for p in waiting if not p.healthy(timeout=max(0.1, min(2.0, deadline - time.monotonic())))]
        if not waiting:
            return
        if time.monotonic() > deadline:
            if len(waiting) == 1:
                raise waiting[0].failure(f"not SERVING at {waiting[0].address} after {timeout:g} s")
            raise LaunchError(f"not SERVING after {timeout:g} s: {', '.join(p.name for p in waiting)}")
        if stop is not None:
            stop.wait(0.2)
        else:
            time.sleep(0.2)


def server_command(module: str, port: int, metrics_port: int, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", module, "--port", str(port), "--metrics-port", str(metrics_port), *args]


def start_server(module: str, *args: str, log_dir: Path, name: str | None = None, host: str = "127.0.0.1",
                 port: int | None = None, env: dict[str, str] | None = None, cwd: Path | str | None = None,
                 credentials: Any = None, health_service: str = "", timeout: float = 90.0,
                 wrap: Wrap | None = None, grace: float = DEFAULT_GRACE) -> Process:
    """`python -m MODULE --port P --metrics-port M ARGS`, SERVING (or LaunchError). `port`: a
    fixed one (to restart a server where its clients expect it), else a free one. A free port can
    be taken by another socket before the server binds it; servers refuse a busy port (exit 2,
    "already in use"), so such a start is tried again on new ports."""
    name = name or module.rsplit(".", 1)[-1]
    for attempt in range(1, PORT_ATTEMPTS + 1):
        grpc_port, metrics_port = port or free_port(host), free_port(host)
        process = spawn(name, server_command(module, grpc_port, metrics_port, args),
                        log_path=log_dir / f"{name}-{grpc_port}.log", env=env, cwd=cwd, wrap=wrap,
                        address=f"{host}:{grpc_port}", metrics_port=metrics_port, metrics_host=host,
                        health_service=health_service, credentials=credentials, grace=grace)
        try:
            process.wait_healthy(timeout)
            return process
        except LaunchError:
            busy = process.proc.poll() == 2 and "already in use" in process.log()
            if attempt == PORT_ATTEMPTS or not busy:
                terminate([process], grace=5)
                raise
            if port:  # a fixed port: its last user may still be letting go of it
                time.sleep(0.5)
        except BaseException:
            terminate([process], grace=5)
            raise
    raise AssertionError("unreachable")


@contextmanager
def running(module: str, *args: str, grace: float = DEFAULT_GRACE, **options: Any) -> Iterator[Process]:
    """start_server() as a context manager: started on entry, stopped (SIGTERM, then SIGKILL after
    `grace`) on exit."""
    process = start_server(module, *args, grace=grace, **options)
    try:
        yield process
    finally:
        process.stop(grace)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what the tests and benches give a service beside others on few cores
# Edge flags for a bench whose one client stands for many users (its requests share one identity,
# which the edge's per-user caps, 8 queued and 4 running by default, would refuse beyond them).
NO_PER_USER_CAPS = ("--max-queued-per-user", "0", "--max-running-per-user", "0")


def edge_server(pack: Path | str, log_dir: Path, *args: str, device: str = "cpu", **options: Any):
    """An edge server (services.edge_server) on `pack`, as a context manager (see `running`)."""
    return running("services.edge_server", "--pack", str(pack), "--device", device, *args, log_dir=log_dir, **options)


def device_service(pack: Path | str, log_dir: Path, *args: str, device: str = "cpu", **options: Any):
    """A device service (services.ue_client) on `pack`, as a context manager (see `running`)."""
    return running("services.ue_client", "--pack", str(pack), "--device", device, *args, log_dir=log_dir, **options)


def scheduler_service(log_dir: Path, *args: str, **options: Any):
    """A scheduler (services.scheduler), as a context manager (see `running`)."""
    return running("services.scheduler", *args, log_dir=log_dir, **options)


@dataclass
class Group:
    """Processes that run together (a topology): stopped together, in reverse order of start."""

    processes: list[Process] = field(default_factory=list)
    grace: float = DEFAULT_GRACE

    def add(self, process: Process) -> Process:
        self.processes.append(process)
        return process

    def spawn(self, name: str, command: Sequence[str], **options: Any) -> Process:
        return self.add(spawn(name, command, **options))

    def wait_healthy(self, timeout: float, stop: threading.Event | None = None) -> None:
        wait_healthy(self.processes, timeout, stop)

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()

    def stop(self, grace: float | None = None) -> None:
        terminate(reversed(self.processes), self.grace if grace is None else grace)

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- what a service's /metrics says ----------------------------------------------------------------

# The sample names of a metric family `x`: x (gauge), x_total (counter), x_bucket/_count/_sum
# (histogram), x_created.
SAMPLE_SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")


def metric_value(text: str, name: str, labels: str = "", default: float | None = None) -> float:
    """The value of the sample `name{labels}` in a Prometheus text exposition; `labels` is the
    sample's whole label set (`code="OK",method="Plan"`, any order). A missing sample raises
    AssertionError naming what is there, so a renamed metric fails its test instead of reading 0.
    `default`: the value of a label set not used yet (prometheus_client exports a labelled
    metric's samples only from its first use); the metric itself must still be declared."""
    from prometheus_client.parser import text_string_to_metric_families

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
    from prometheus_client.parser import text_string_to_metric_families

    if not labels:
        return {}
    (family,) = text_string_to_metric_families(f"m{{{labels}}} 0\n")
    return family.samples[0].labels


def _render(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def wait_metric(process: Process, name: str, value: float, timeout: float, failure: str) -> None:
    """Until `process`'s metric `name` is exactly `value`; AssertionError(`failure`) after `timeout` s."""
    deadline = time.monotonic() + timeout
    while process.metric(name) != value:
        assert time.monotonic() < deadline, failure
        time.sleep(0.2)
