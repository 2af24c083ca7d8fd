"""Load: N concurrent device clients against a scheduler and an edge server on loopback, for a
bounded time (stops by itself).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.load [--clients 8] [--minutes 3] [--pack tandem/demo_pack/large]

Each client loops: Plan (scheduler) -> the plan's edge steps (edge server, streamed handoff) ->
decode the handoff (what a device does before its own steps) -> Report. The device's own steps
are not run: they load the device, not the servers. Prints completed / rejected / lost requests
(lost = neither a handoff nor a clear status), p50 / p99 latency, throughput, and the servers'
RSS after warm-up vs at the end (issue 7 target: growth < 10 %).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from services.common.launcher import NO_PER_USER_CAPS, ONE_THREAD, edge_server, scheduler_service
from services.common.scheduler_client import report, request_plan
from services.ue_client.transport import EdgeError, fetch_handoff
from tandem.codec.container import unpack_container
from tandem.handoff import CodecSpec
from tandem.request import GenerationRequest
from tandem.stats import percentile

PROMPTS = [f"a {c} {s} at the {p} on a {b} background" for c, s, p, b in
           [("red", "circle", "left", "blue"), ("green", "square", "top", "white"),
            ("yellow", "triangle", "center", "black"), ("purple", "circle", "bottom", "orange")]]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.rejected: dict[str, int] = {}
        self.lost: list[str] = []

    def ok(self, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)

    def reject(self, code: str) -> None:
        with self.lock:
            self.rejected[code] = self.rejected.get(code, 0) + 1


async def one_request(sched: str, i: int, tally: Tally, size: int = 64) -> None:
    plan = await asyncio.to_thread(request_plan, sched, "cpu-demo", bandwidth_bps=100e6, timeout=30)
    if plan is None or not plan.edge_address or plan.split == 0:
        tally.reject("no edge in plan")
        return
    request = GenerationRequest(PROMPTS[i % len(PROMPTS)], steps=plan.steps, split=plan.split, seed=i,
                                guidance_scale=4.0, height=size, width=size).validate()
    codec = CodecSpec(plan.encoding, plan.merge_ratio, plan.merge_strategy)
    began = time.perf_counter()
    try:
        edge = await fetch_handoff(plan.edge_address, request, codec, timeout=120)
        meta, _ = unpack_container(edge.payload)  # the handoff answers this request, at its split
        assert meta["step"] == plan.split and meta["request"] == request.digest()
    except EdgeError as exc:
        if exc.code in ("RESOURCE_EXHAUSTED", "UNAVAILABLE"):
            tally.reject(exc.code)
        else:
            tally.lost.append(f"{exc.code}: {exc.message}")
        return
    except Exception as exc:  # noqa: BLE001 - anything else is a lost request, counted and shown
        tally.lost.append(f"{type(exc).__name__}: {exc}")
        return
    seconds = time.perf_counter() - began
    tally.ok(seconds)
    await asyncio.to_thread(report, sched, plan.plan_id, edge.seconds, plan.split, 0, len(edge.payload), timeout=30)


async def client(sched: str, index: int, clients: int, until: float, tally: Tally, size: int) -> None:
    i = index
    while time.monotonic() < until:
        await one_request(sched, i, tally, size)
        i += clients


async def run(sched: str, clients: int, seconds: float, tally: Tally, size: int = 64) -> None:
    """`clients` loops until `seconds` have passed; `size`: image side (the pack's, 64 for the demo)."""
    until = time.monotonic() + seconds
    await asyncio.gather(*(client(sched, c, clients, until, tally, size) for c in range(clients)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--warmup-seconds", type=float, default=30.0)
    parser.add_argument("--pack", type=Path, default=Path("tandem/demo_pack/large"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp, scheduler_service(Path(tmp), env=ONE_THREAD) as sched, \
            edge_server(args.pack, Path(tmp), "--scheduler", sched.address, *NO_PER_USER_CAPS, env=ONE_THREAD) as edge:
        time.sleep(2.0)  # first heartbeat
        procs = {"edge": edge.proc.pid, "scheduler": sched.proc.pid}
        warm = Tally()
        asyncio.run(run(sched.address, args.clients, args.warmup_seconds, warm))
        rss_warm = {name: rss_kib(pid) for name, pid in procs.items()}
        tally = Tally()
        began = time.perf_counter()
        asyncio.run(run(sched.address, args.clients, args.minutes * 60, tally))
        wall = time.perf_counter() - began
        rss_end = {name: rss_kib(pid) for name, pid in procs.items()}
        alive = {name: proc.poll() is None for name, proc in (("edge", edge.proc), ("scheduler", sched.proc))}
    lat = sorted(tally.latencies)
    print(f"### Load: {args.clients} clients for {args.minutes:g} min after {args.warmup_seconds:g} s warm-up "
          f"(load average {os.getloadavg()[0]:.2f} at the end)\n")
    print("| completed | rejected (clear status) | lost | throughput | edge latency p50 | p99 |")
    print("|---|---|---|---|---|---|")
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(tally.rejected.items())) or "0"
    print(f"| {len(lat)} | {rejected} | {len(tally.lost)} | {len(lat) / wall:.2f} req/s | "
          f"{(statistics.median(lat) if lat else float('nan')):.3f} s | {(percentile(lat, 99) if lat else float('nan')):.3f} s |\n")
    print("| server | RSS after warm-up | RSS at the end | growth | alive |")
    print("|---|---|---|---|---|")
    for name in procs:
        growth = (rss_end[name] - rss_warm[name]) / max(rss_warm[name], 1)
        print(f"| {name} | {rss_warm[name] / 1024:.0f} MiB | {rss_end[name] / 1024:.0f} MiB | {growth:+.1%} | "
              f"{alive[name]} |")
    for line in tally.lost[:5]:
        print(f"lost: {line}")


if __name__ == "__main__":
    main()
