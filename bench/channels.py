"""Persistent gRPC channels against a new channel per call (issue 31): what connection setup costs.

    .venv/bin/python -m bench.channels [--quick] [--calls N] [--rtt-ms 50,150] [--loopback]

A tiny gRPC server (the health service: Check, a unary call, and Watch, a stream whose first
message comes at once, like a handoff's first event), plaintext and TLS (scripts/dev_certs.sh),
reached through tools/testbed/delay_proxy.py with --handshake (half the RTT each way, and a new
connection pays the TCP handshake the proxy itself answers at once). Where network namespaces
can be made, the server and the proxies run in an "edge" host and the client in a "phone" host,
joined by a veth pair (tools/testbed), as in bench/links.py; elsewhere (or with --loopback) all of
it runs on loopback.

Per RTT and security, the client measures the median over N calls of the time to the first byte
(the first Watch message) and the per-request latency (one Check), each with a new channel per
call (what the device service, the scheduler client and the CLI did: open, call, close) and over
one reused channel (services/common/channels.py's pool, warmed by one call first), and prints the
saving in round trips. Exit status 1 when the reused channel saves less than one round trip per
request (two with TLS), on either measure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from services.common import launcher

ROOT = Path(__file__).resolve().parent.parent  # where the processes run (python -m bench..., -m tools...)

REQUIRED_SAVING = {False: 1.0, True: 2.0}  # round trips per request, plaintext / TLS (issue 31)
TLS_NAME = "localhost"  # the dev server certificate's name; the testbed's addresses are not in it


# --- the server (in the edge host) ------------------------------------------------------------

async def serve(certs: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from services.common.channels import SERVER_KEEPALIVE_OPTIONS
    from services.common.lifecycle import NO_REUSEPORT, until_signalled

    server = grpc.aio.server(options=[NO_REUSEPORT, *SERVER_KEEPALIVE_OPTIONS])
    health = HealthServicer()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    plain = server.add_insecure_port("127.0.0.1:0")
    credentials = grpc.ssl_server_credentials([((certs / "server.key").read_bytes(), (certs / "server.pem").read_bytes())])
    tls = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    print(json.dumps({"plain": plain, "tls": tls}), flush=True)
    await until_signalled()
    await server.stop(grace=None)


# --- the client (in the phone host) ------------------------------------------------------------

async def measure_target(address: str, ca: bytes | None, calls: int) -> dict[str, float]:
    """Medians in seconds: ttfb / latency, new channel per call / reused."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.common.channels import ChannelPool, client_options
    from services.common.security import ClientSecurity, aio_channel

    security = ClientSecurity(ca=ca)
    extra = [("grpc.ssl_target_name_override", TLS_NAME)] if ca else []
    # A private subchannel pool: no connection of another channel in this process is reused.
    fresh = client_options([*extra, ("grpc.use_local_subchannel_pool", 1)])
    check = health_pb2.HealthCheckRequest()

    async def first_message(channel) -> None:
        call = health_pb2_grpc.HealthStub(channel).Watch(check, timeout=30)
        await call.read()
        call.cancel()

    async def one_check(channel) -> None:
        await health_pb2_grpc.HealthStub(channel).Check(check, timeout=30)

    async def new_channel(rpc) -> float:
        began = time.perf_counter()
        async with aio_channel(address, security, fresh) as channel:
            await rpc(channel)
            return time.perf_counter() - began

    async def reused(pool: ChannelPool, rpc) -> float:
        began = time.perf_counter()
        await rpc(pool.get(address, security, extra))
        return time.perf_counter() - began

    out: dict[str, float] = {}
    for name, rpc in (("ttfb", first_message), ("latency", one_check)):
        out[f"{name}_new"] = statistics.median([await new_channel(rpc) for _ in range(calls)])
    async with ChannelPool() as pool:
        await one_check(pool.get(address, security, extra))  # a long-lived process's channel is open
        for name, rpc in (("ttfb", first_message), ("latency", one_check)):
            out[f"{name}_reused"] = statistics.median([await reused(pool, rpc) for _ in range(calls)])
        out["connections"] = len(pool)
    return out


def measure(targets: list[dict], certs: Path, calls: int) -> list[dict]:
    ca = (certs / "ca.pem").read_bytes()
    return [{**t, **asyncio.run(measure_target(t["address"], ca if t["tls"] else None, calls))} for t in targets]


# --- the orchestration ---------------------------------------------------------------------------

@contextmanager
def started(argv: list[str], prefix: list[str]) -> Iterator[str]:
    """A process (in a host: `prefix`) whose first stdout line says it is ready; yields that line."""
    process = launcher.spawn(argv[2], argv, wrap=lambda command: [*prefix, *command], cwd=ROOT, env=launcher.ONE_THREAD,
                             stdout=subprocess.PIPE, text=True)
    try:
        line = process.proc.stdout.readline() if process.proc.stdout else ""
        if not line:
            raise RuntimeError(f"{' '.join(argv[:3])} did not start (exit {process.proc.wait(10)})")
        yield line
    finally:
        process.stop(grace=10)


def run(args: argparse.Namespace, certs: Path, stack: ExitStack) -> tuple[str, list[dict]]:
    where, server_prefix, client_prefix, listen_host = "loopback", [], [], "127.0.0.1"
    if not args.loopback:
        from tools.testbed.netns import Testbed

        reason = Testbed.available()
        if reason is None:
            bed = stack.enter_context(Testbed())
            edge, phone = bed.host("edge"), bed.host("phone")
            link = bed.link(edge, phone, rate_mbit=100)
            server_prefix, client_prefix = bed.command(edge, []), bed.command(phone, [])
            listen_host, where = link.a_ip, "namespace testbed (veth, tbf 100 Mbit/s)"
        else:
            print(f"channels.py: no namespace testbed ({reason}); on loopback", file=sys.stderr)
    ports = json.loads(stack.enter_context(started([sys.executable, "-m", "bench.channels", "serve",
                                                    "--certs", str(certs)], server_prefix)))
    targets = []
    for rtt_ms in args.rtt_ms:
        for tls in (False, True):
            banner = stack.enter_context(started(
                [sys.executable, "-m", "tools.testbed.delay_proxy", "--listen", f"{listen_host}:0", "--target",
                 f"127.0.0.1:{ports['tls' if tls else 'plain']}", "--delay-ms", str(rtt_ms / 2), "--handshake"],
                server_prefix))
            targets.append({"rtt_ms": rtt_ms, "tls": tls, "address": banner.split()[2]})  # "delay proxy HOST:PORT -> ..."
    done = subprocess.run([*client_prefix, sys.executable, "-m", "bench.channels", "measure", "--certs",
                           str(certs), "--calls", str(args.calls), "--targets", json.dumps(targets)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the client failed:\n{done.stderr[-3000:]}")
    return where, json.loads(done.stdout)


def table(rows: list[dict]) -> tuple[str, bool]:
    lines = ["| RTT | security | TTFB new | TTFB reused | saved (RTTs) | latency new | latency reused | saved (RTTs) "
             "| needed |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    ok = True
    for r in rows:
        rtt = r["rtt_ms"] / 1e3
        saved = {m: (r[f"{m}_new"] - r[f"{m}_reused"]) / rtt for m in ("ttfb", "latency")}
        needed = REQUIRED_SAVING[r["tls"]]
        ok &= min(saved.values()) >= needed
        lines.append(f"| {r['rtt_ms']:g} ms | {'TLS' if r['tls'] else 'plaintext'} | {r['ttfb_new'] * 1e3:.0f} ms "
                     f"| {r['ttfb_reused'] * 1e3:.0f} ms | {saved['ttfb']:.2f} | {r['latency_new'] * 1e3:.0f} ms "
                     f"| {r['latency_reused'] * 1e3:.0f} ms | {saved['latency']:.2f} | ≥ {needed:g} |")
    return "\n".join(lines), ok


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="channels.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="7 calls per median (default 25)")
    parser.add_argument("--calls", type=int, default=None, help="calls per median")
    parser.add_argument("--rtt-ms", type=lambda s: [float(x) for x in s.split(",")], default=[50.0, 150.0],
                        help="round-trip times, comma-separated (default 50,150)")
    parser.add_argument("--loopback", action="store_true", help="loopback even where a namespace testbed can be made")
    args = parser.parse_args(argv)
    if args.calls is None:
        args.calls = 7 if args.quick else 25
    if args.calls < 1 or any(not 0 < r <= 10_000 for r in args.rtt_ms):
        parser.error("--calls must be >= 1 and --rtt-ms in (0, 10000]")
    return args


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        asyncio.run(serve(Path(argv[argv.index("--certs") + 1])))
        return 0
    if argv[:1] == ["measure"]:
        sub = argparse.ArgumentParser()
        sub.add_argument("--certs", type=Path)
        sub.add_argument("--calls", type=int)
        sub.add_argument("--targets", type=json.loads)
        a = sub.parse_args(argv[1:])
        print(json.dumps(measure(a.targets, a.certs, a.calls)))
        return 0
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tandem-channels-") as tmp, ExitStack() as stack:
        certs = Path(tmp)
        subprocess.run(["bash", str(ROOT / "scripts" / "dev_certs.sh"), str(certs)], check=True, capture_output=True)
        os.chmod(tmp, 0o755)  # read by the client and server processes
        where, rows = run(args, certs, stack)
    text, ok = table(rows)
    print(f"channels.py: {where}; delay proxy with --handshake; median of {args.calls} calls each; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(text)
    print("reused channel saves ≥ 1 RTT per request (≥ 2 with TLS): " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
