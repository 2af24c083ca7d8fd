"""The docker-compose topology without Docker: edge server, device (UE) service and, when present,
the scheduler, as child processes on one host (loopback by default) with the demo pack.

    python -m services.cli.topology [--free-ports] [--no-scheduler] [--log-dir out/logs]   (scripts/up.sh)

Waits until every service's grpc.health.v1 says SERVING, prints the addresses and metrics URLs,
writes each service's output to LOG_DIR/NAME.log and LOG_DIR/topology.json (addresses, pids),
and on Ctrl-C/SIGTERM stops the children gracefully (SIGTERM, then SIGKILL after --grace
seconds). Children also get SIGTERM if this process dies without cleaning up (PR_SET_PDEATHSIG),
so none is left behind. If a service exits on its own, the rest are stopped and the exit status
is 1. A port already in use is one line naming it and exit status 2, before anything starts: the
health checks would otherwise find somebody else's servers there and call the topology up.
The processes are started, waited for and stopped by services/common/launcher.py (as in the tests
and benches).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from services.common import launcher
from services.common.launcher import LaunchError, Process
from tandem.packs import DEMO_PACK

ServiceFailed = LaunchError  # a service exited, or was not SERVING in time (the message has its log's tail)


@dataclass
class Service:
    name: str
    module: str
    host: str
    port: int
    metrics_port: int
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    health_service: str = ""
    process: Process | None = None  # once started

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self.process.log_path if self.process else None


def free_port(host: str) -> int:
    return launcher.free_port(host)


def busy_ports(services: list[Service]) -> list[str]:
    """"NAME port N" for each port of `services` that something on this host already listens on."""
    from services.common.lifecycle import check_port_free
    from services.common.security import PortInUse

    busy = []
    for s in services:
        for what, port in (("gRPC", s.port), ("metrics", s.metrics_port)):
            try:
                check_port_free(s.host, port, what)
            except PortInUse:
                busy.append(f"{s.name} {what} port {port}")
    return busy


def scheduler_available() -> bool:
    """True when services/scheduler is a runnable module (python -m services.scheduler)."""
    spec = importlib.util.find_spec("services.scheduler")
    return bool(spec and spec.submodule_search_locations
                and any((Path(p) / "__main__.py").exists() for p in spec.submodule_search_locations))


class Topology:
    """The services as one launcher.Group: started together, each one's output in LOG_DIR/NAME.log,
    stopped together."""

    def __init__(self, services: list[Service], log_dir: Path):
        self.services = services
        self.log_dir = log_dir
        self.group = launcher.Group()

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for service in self.services:
            service.process = self.group.spawn(
                service.name, [sys.executable, "-m", service.module, *service.args],
                log_path=self.log_dir / f"{service.name}.log", env=service.env, header=True, die_with_parent=True,
                address=service.address, metrics_port=service.metrics_port, metrics_host=service.host,
                health_service=service.health_service)

    def check_alive(self) -> None:
        self.group.check_alive()

    def wait_healthy(self, timeout: float, stop: threading.Event) -> None:
        self.group.wait_healthy(timeout, stop)

    def stop(self, grace: float) -> None:
        self.group.stop(grace)

    @staticmethod
    def tail(service: Service, lines: int = 15) -> str:
        return service.process.tail(lines) if service.process else ""

    def describe(self) -> dict:
        return {"pid": os.getpid(), "log_dir": str(self.log_dir), "services": {
            s.name: {"address": s.address, "metrics_url": s.metrics_url, "pid": s.process.pid if s.process else None,
                     "log": str(s.log_path)} for s in self.services}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.cli.topology", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address every service binds (127.0.0.1)")
    parser.add_argument("--edge-port", type=int, default=50051)
    parser.add_argument("--edge-metrics-port", type=int, default=9101)
    parser.add_argument("--ue-port", type=int, default=50061)
    parser.add_argument("--ue-metrics-port", type=int, default=9102)
    parser.add_argument("--scheduler-port", type=int, default=50071)
    parser.add_argument("--scheduler-metrics-port", type=int, default=9103)
    parser.add_argument("--free-ports", action="store_true", help="pick free ports instead of the ones above")
    parser.add_argument("--edge-pack", default=str(DEMO_PACK / "large"), help="edge model pack (the demo pack)")
    parser.add_argument("--ue-pack", default=str(DEMO_PACK / "small"), help="device model pack (the demo pack)")
    parser.add_argument("--device", default=None, help="torch device of edge and UE (default: cuda if present)")
    parser.add_argument("--no-scheduler", action="store_true", help="do not start the scheduler")
    parser.add_argument("--log-dir", type=Path, default=Path("out/logs"), help="one log per service (out/logs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for SERVING (600)")
    parser.add_argument("--grace", type=float, default=40.0, help="seconds a service gets to drain (40)")
    parser.add_argument("--then", nargs=argparse.REMAINDER, metavar="TANDEM_ARGS",
                        help="once all are up, run `tandem TANDEM_ARGS` against them (--ue, and --scheduler "
                             "when it runs, are added), then stop everything and exit with its status")
    return parser.parse_args(argv)


def build_services(args: argparse.Namespace) -> list[Service]:
    def port(value: int) -> int:
        return free_port(args.host) if args.free_ports else value

    device = ["--device", args.device] if args.device else []
    edge = Service("edge", "services.edge_server", args.host, port(args.edge_port), port(args.edge_metrics_port),
                   health_service="tandem.v1.EdgeService")
    ue = Service("ue", "services.ue_client", args.host, port(args.ue_port), port(args.ue_metrics_port),
                 health_service="tandem.v1.DeviceService")
    services = [edge, ue]
    if not args.no_scheduler:
        if scheduler_available():
            scheduler = Service("scheduler", "services.scheduler", args.host, port(args.scheduler_port),
                                port(args.scheduler_metrics_port), env={"TANDEM_SCHEDULER_HOST": args.host})
            scheduler.args = ["--port", str(scheduler.port), "--metrics-port", str(scheduler.metrics_port)]
            edge.env["TANDEM_EDGE_SCHEDULER"] = scheduler.address  # load heartbeats, where the edge sends them
            services.insert(0, scheduler)
        else:
            print("note: services/scheduler has no __main__.py yet: starting without the scheduler", flush=True)
    edge.args = ["--pack", args.edge_pack, "--host", args.host, "--port", str(edge.port),
                 "--metrics-port", str(edge.metrics_port), *device]
    ue.args = ["--pack", args.ue_pack, "--host", args.host, "--port", str(ue.port),
               "--metrics-port", str(ue.metrics_port), "--edge", edge.address, *device]
    return services


def _tandem_command() -> str:
    """How to run `tandem` from here: the bare name only when it is on PATH (it is not until the
    virtualenv is activated), else the virtualenv's launcher beside this interpreter."""
    import shutil

    launcher, found = Path(sys.executable).parent / "tandem", shutil.which("tandem")
    if not launcher.exists() or (found and Path(found).resolve() == launcher.resolve()):
        return "tandem"
    try:
        return str(launcher.relative_to(Path.cwd()))
    except ValueError:
        return str(launcher)


def run_against(topology: Topology, tandem_args: list[str]) -> int:
    """Runs one `tandem` command through the running services: the device service does the
    work, the scheduler (when up) plans it."""
    from services.cli import generate as cli

    by_name = {s.name: s for s in topology.services}
    argv = [*tandem_args, "--ue", by_name["ue"].address]
    if "scheduler" in by_name:
        argv += ["--scheduler", by_name["scheduler"].address]
    print("$ tandem " + " ".join(shlex.quote(a) for a in argv), flush=True)
    return cli.main(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    topology = Topology(build_services(args), args.log_dir)
    busy = busy_ports(topology.services)
    if busy:
        print(f"tandem topology: error: already in use on {args.host}: {', '.join(busy)} (stop what runs there, "
              "or use --free-ports)", file=sys.stderr, flush=True)
        return 2
    state_file = args.log_dir / "topology.json"
    state_file.unlink(missing_ok=True)
    status = 0
    try:
        topology.start()
        print(f"starting {', '.join(s.name for s in topology.services)} (logs in {args.log_dir}/)", flush=True)
        topology.wait_healthy(args.timeout, stop)
        partial = state_file.with_suffix(".tmp")  # readers never see half a file
        partial.write_text(json.dumps(topology.describe(), indent=2) + "\n")
        partial.replace(state_file)
        print("tandem topology is up:", flush=True)
        for s in topology.services:
            print(f"  {s.name:<10} {s.address:<22} metrics {s.metrics_url:<36} log {s.log_path}", flush=True)
        ue = next(s for s in topology.services if s.name == "ue")
        if args.then:
            status = run_against(topology, args.then)
            return status
        print(f'try: {_tandem_command()} generate "a red circle at the left on a blue background" --ue {ue.address}',
              flush=True)
        print("Ctrl-C (or SIGTERM) stops everything.", flush=True)
        while not stop.wait(0.5):
            topology.check_alive()
    except KeyboardInterrupt:
        pass
    except ServiceFailed as exc:
        print(f"tandem topology: error: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        print("stopping...", flush=True)
        topology.stop(args.grace)
        state_file.unlink(missing_ok=True)
        print("all services stopped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
