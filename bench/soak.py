"""Soak: the whole topology under mixed users and chaos for a bounded time (issue 29, item 1).

    .venv/bin/python -m bench.soak [--quick | --minutes 20] [--links auto|netns|loopback] [--json FILE]

Starts, with the one launcher (services/common/launcher.py), a scheduler (with --state-file),
two edge servers (tandem/demo_pack/large) and four device services (tandem/demo_pack/small):
three shared by six benign users, two each, and one that the misbehaving users use. With root and
network namespaces (tools/testbed) the edges and the scheduler run in hosts of their own and the
device services reach each edge over a tbf-shaped veth link (50 Mbit/s); otherwise everything
runs on loopback (said in the output).

Phases (`--minutes` is the quiet and the soak phase together, half each; --quick: 2 minutes):
1. warm-up (not counted): the benign users' traffic and one round of each misbehaving user,
   so every kind of request has been served once; every service's RSS counts from its end;
2. quiet: the benign users alone, no chaos: Poisson and bursty arrivals (3/4 of the phase),
   then every benign user keeps 2 requests waiting (the last 1/4: "backlogged");
3. soak: the same benign sends (same seeds), plus the misbehaving users (bursts far above their
   share, odd sizes, cancel storms, absurd plans and reports: bench/soak_traffic.py) and, during
   the arrivals, the chaos schedule (bench/soak_report.py: chaos_schedule), one event after the
   other: kill -9 of an edge and its restart on the same address, a restart of a device
   service, SIGSTOP/SIGCONT of the other edge, with the testbed a link slowed to 0.5 Mbit/s and
   restored, and a restart of the scheduler (restoring its --state-file). A restart can take a
   minute on a loaded machine: the arrivals go on until the last event is over and the
   scheduler's next plans are in (the header says how long they ran); then the backlogged
   segment (no chaos). A restarted process's RSS counts from a warm-up as long as the first.

Every call is recorded (answered or not, gRPC status, the device's fallback and why, latency),
every service's RSS sampled (psutil, else /proc VmRSS). At the end one table: the targets of
the issue, each passed or failed, and the figures around them; exit status 1 when a target
fails, 2 when the topology could not start. Benign latency percentiles count the arrival
segments (the backlogged ones measure queueing by design); shares count the backlogged one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.soak_report import (
    Check,
    benign_users,
    chaos_schedule,
    evaluate,
    failed,
    render,
)
from bench.soak_topology import LINK_MBIT, Topology, after, build, enter, leave, log, run_chaos, start_all, testbed_or_why
from services.common import launcher


@dataclass(frozen=True)
class Durations:
    warm_up: float
    open: float  # arrivals, in each of quiet and soak
    backlog: float  # all benign users backlogged, in each of quiet and soak
    misbehave_period: float
    sample_every: float
    after_chaos: float  # the soak's arrivals go on this long after the last chaos event is over

    @classmethod
    def of(cls, minutes: float, quick: bool) -> "Durations":
        phase = minutes * 60 / 2
        return cls(warm_up=15.0 if quick else 60.0, open=0.75 * phase, backlog=0.25 * phase,
                   misbehave_period=15.0 if quick else 30.0, sample_every=1.0 if quick else 5.0,
                   after_chaos=20.0 if quick else max(30.0, 0.1 * phase))


# --- the run ----------------------------------------------------------------------------------------------

async def soak(topo: Topology, d: Durations, devices: int, rate_hz: float, seed: int) -> dict:
    from bench.soak_traffic import Traffic

    users = benign_users(devices, rate_hz)
    slots = topo.slots
    traffic = Traffic(topo.t0, slots["scheduler"].address, [slots[f"dev{i}"].address for i in range(devices)],
                      slots["dev-rogue"].address, [slots["edge0"].address, slots["edge1"].address])
    marks: dict[str, float] = {}
    try:
        log(f"warm-up: {d.warm_up:.0f} s")
        stop = asyncio.Event()  # every kind of request once before the RSS is taken
        misbehaving = asyncio.ensure_future(traffic.misbehave("warm-up", stop, d.warm_up / 2, seed + 3))
        await traffic.open_arrivals(users, "warm-up", d.warm_up, seed)
        stop.set()
        await misbehaving
        await traffic.drain(120)
        marks["warm-up end"] = topo.now()
        for phase in ("quiet", "soak"):
            log(f"{phase}: {d.open:.0f} s of arrivals, then {d.backlog:.0f} s backlogged")
            marks[phase] = topo.now()
            stop = asyncio.Event()
            misbehaving = chaos = longer = None
            if phase == "soak":
                misbehaving = asyncio.ensure_future(traffic.misbehave(phase, stop, d.misbehave_period, seed + 7))
                chaos = asyncio.ensure_future(run_chaos(topo, chaos_schedule(d.open, topo.bed is not None),
                                                        topo.now(), d.warm_up))
                longer = after(chaos, topo, d.after_chaos)
            # The same sends in both phases; the soak's go on until the chaos is over (a restart
            # can take minutes on a loaded machine) and the scheduler's next plans are in.
            await traffic.open_arrivals(users, phase, d.open, seed + 1, longer, most=6 * d.open)
            marks[f"{phase} arrivals end"] = topo.now()
            if chaos is not None:
                marks["chaos"] = await chaos
            await traffic.drain(120)  # the backlogged segment starts with every device's queue empty
            begin = marks[f"{phase} backlog"] = topo.now()
            await traffic.backlogged(users, phase, d.backlog, depth=2, seed=seed + 1)
            marks[f"{phase} backlog end"] = topo.now()
            stop.set()
            if misbehaving is not None:
                await misbehaving
            left = await traffic.drain(120)
            log(f"{phase} done ({left} calls still open after 120 s)" if left else f"{phase} done")
            marks[f"{phase} backlog window"] = (begin, marks[f"{phase} backlog end"])
        marks["end"] = topo.now()
    finally:
        await traffic.close()
    return {"marks": marks, "records": traffic.records, "users": [u.name for u in users]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="quiet + soak phases together (20)")
    parser.add_argument("--quick", action="store_true", help="2 minutes, the same targets at a smaller scale")
    parser.add_argument("--links", choices=("auto", "netns", "loopback"), default="auto",
                        help="shaped links between network namespaces (root), loopback, or netns when possible (auto)")
    parser.add_argument("--rate", type=float, default=0.15, help="each benign user's requests per second (0.15)")
    parser.add_argument("--devices", type=int, default=3, help="benign device services, two users each (3)")
    parser.add_argument("--warm-up", type=float, help="seconds of warm-up (15 with --quick, else 60)")
    parser.add_argument("--timing-targets", choices=("assert", "report"), default="assert",
                        help="latency targets (benign p99, prediction error after the restart) fail the run "
                             "(assert), or are printed only (report: CI, whose machine's other load moves them)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-dir", type=Path, help="services' logs and the state file (default: a temporary dir)")
    parser.add_argument("--json", type=Path, help="write every record, chaos event and RSS sample here")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 2.0
    if not (args.minutes > 0 and args.rate > 0 and args.devices >= 2):
        parser.error("--minutes and --rate must be > 0, --devices >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    d = Durations.of(args.minutes, args.quick)
    if args.warm_up is not None:
        d = replace(d, warm_up=args.warm_up)
    bed, why = testbed_or_why(args.links)
    original_ns = enter(bed.hosts[0].name) if bed is not None else None
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        logs = args.log_dir or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        topo = Topology(logs, time.monotonic(), bed)
        sampler_stop = threading.Event()
        load_before = os.getloadavg()
        try:
            build(topo, args.devices)
            try:
                start_all(topo, args.devices)
            except launcher.LaunchError as exc:
                print(f"bench.soak: error: the topology did not start: {exc}", file=sys.stderr)
                return 2
            sampler = threading.Thread(target=topo.sample_rss, args=(sampler_stop, d.sample_every), daemon=True)
            sampler.start()
            result = asyncio.run(soak(topo, d, args.devices, args.rate, args.seed))
            sampler_stop.set()
            sampler.join()
        finally:
            sampler_stop.set()
            topo.stop_all()
            if bed is not None:
                leave(original_ns)
                bed.__exit__(None, None, None)
        marks = result["marks"]
        chaos = marks.get("chaos", [])
        windows = {p: marks[f"{p} backlog window"] for p in ("quiet", "soak")}
        instances = topo.final_instances(marks["warm-up end"])
        checks = evaluate(result["records"], chaos, instances, topo.samples, marks["end"], result["users"], windows)
        for c in chaos:
            if c.note.startswith("FAILED"):
                checks.append(Check(f"chaos step {c.event.label}", c.note, "done", False))
        header(args, d, why, load_before, marks, len(result["records"]))
        timing = args.timing_targets == "assert"
        print(render(checks, timing))
        bad = failed(checks, timing)
        print(f"\n{len(bad)} target(s) failed: {', '.join(c.what for c in bad)}" if bad else "\nall targets met")
        if args.json:
            args.json.write_text(json.dumps({
                "records": [asdict(r) for r in result["records"]], "chaos": [asdict(c) for c in chaos],
                "samples": topo.samples, "instances": [asdict(i) for i in instances],
                "marks": {k: v for k, v in marks.items() if k != "chaos"}}, default=str))
        return 1 if bad else 0


def header(args: argparse.Namespace, d: Durations, why: str | None, load_before: tuple, marks: dict, calls: int) -> None:
    links = (f"loopback ({why})" if why else
             f"network namespaces, device services to each edge over a tbf-shaped veth at {LINK_MBIT:g} Mbit/s")
    arrivals = {p: marks[f"{p} arrivals end"] - marks[p] for p in ("quiet", "soak")}
    backlog = {p: marks[f"{p} backlog end"] - marks[f"{p} backlog"] for p in ("quiet", "soak")}
    print(f"### Soak: {'--quick' if args.quick else f'--minutes {args.minutes:g}'}, links: {links}\n")
    print(f"{os.cpu_count()} CPU cores, load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} at the end; "
          f"warm-up {d.warm_up:.0f} s; quiet: {arrivals['quiet']:.0f} s of arrivals + {backlog['quiet']:.0f} s "
          f"backlogged; soak: {arrivals['soak']:.0f} s of arrivals (planned {d.open:.0f} s, on until "
          f"{d.after_chaos:.0f} s after the chaos) + {backlog['soak']:.0f} s backlogged; 2 edges, a scheduler, "
          f"{args.devices} benign device services (2 users each, {args.rate:g} req/s each) and one for the "
          f"misbehaving users; {calls} calls\n")


if __name__ == "__main__":
    sys.exit(main())
