"""Hostile callers against one real edge server: do well-behaved users notice? (issue 14)

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.attack_edge [--pack DIR] [--seconds 8] [--rounds 3] [--clients 3]

Starts an edge (the demo pack by default, tokens and --max-streams-per-user 2 on), then runs
`--clients` well-behaved users, each sending one request after another (the pack's size and
default steps, half of them on the edge), for `--seconds` without an attack and during each
attack, the phases interleaved over `--rounds`, in one run on this machine:

- control:    not an attack: the same load as odd-size at the users' size (load, not breakage);
- odd-size:   another image size (72 px on the demo pack) at 2 requests/s, joining their batches;
- large:      the issue's 512-1024 px requests (1 step, 2 s deadline) at 2/s;
- largest:    the largest image this edge serves, with the most edge steps its cost cap allows, 1/s;
- flood:      one user opens 40 concurrent streams at a time, `user` left empty.

Prints, per phase, the users' failed requests, their p99 latency and its ratio to the phase
without an attack, what the attacker got, and the edge's RSS after warm-up and after all attacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from services.common.launcher import ONE_THREAD, edge_server
from services.common.wire import request_to_proto
from tandem.packs import load_pack
from tandem.resolve import PartialRequest, resolve
from tandem.stats import percentile
from tandem.v1 import edge_pb2, edge_pb2_grpc

PROMPT = "a red circle at the left on a blue background"
MIB = 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) * 1024


async def call(stub, message, token: str, timeout: float) -> str:
    """The final status code's name of one Generate call."""
    try:
        events = [e async for e in stub.Generate(message, timeout=timeout,
                                                   metadata=(("authorization", f"Bearer {token}"),))]
        return "OK" if events and events[-1].WhichOneof("event") == "handoff" else "NO_HANDOFF"
    except grpc.RpcError as exc:
        return exc.code().name


async def user_loop(stub, message, token: str, until: float, latencies: list[float], codes: Counter) -> None:
    while time.monotonic() < until:
        began = time.perf_counter()
        code = await call(stub, message, token, timeout=60)
        latencies.append(time.perf_counter() - began)
        codes[code] += 1


async def at_rate(stub, messages, token: str, per_second: float, until: float, codes: Counter,
                  timeout: float = 60) -> None:
    tasks, i = [], 0
    while time.monotonic() < until:
        tasks.append(asyncio.ensure_future(call(stub, messages[i % len(messages)], token, timeout)))
        i += 1
        await asyncio.sleep(1 / per_second)
    for code in await asyncio.gather(*tasks):
        codes[code] += 1


async def flood(stub, message, token: str, width: int, until: float, codes: Counter) -> None:
    while time.monotonic() < until:
        for code in await asyncio.gather(*(call(stub, message, token, 60) for _ in range(width))):
            codes[code] += 1


async def phase(address: str, users: list[edge_pb2.GenerateRequest], attack, seconds: float):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        until = time.monotonic() + seconds
        latencies: list[float] = []
        codes, attacker = Counter(), Counter()
        jobs = [user_loop(stub, m, f"tok-user{i}", until, latencies, codes) for i, m in enumerate(users)]
        if attack is not None:
            jobs.append(attack(stub, until, attacker))
        await asyncio.gather(*jobs)
    return latencies, codes, attacker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, default=Path("tandem/demo_pack/large"))
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    pack = load_pack(args.pack, device="cpu")
    defaults = pack.request_defaults()
    size, steps, f = defaults.image_size, defaults.steps, pack.vae_scale_factor
    odd = size + f  # another latent shape, inside the served range

    def wire(**fields) -> edge_pb2.GenerateRequest:
        """A request at the pack's defaults (half the steps on the edge) but for ``fields``."""
        return request_to_proto(*resolve(PartialRequest(PROMPT, sampler="dpmpp_2m", **fields), defaults))

    users = [wire(seed=i, user=f"user{i}") for i in range(args.clients)]
    odd_requests = [wire(seed=i, height=odd, width=odd) for i in range(4)]
    same_requests = [wire(seed=i) for i in range(4)]
    large_requests = [wire(steps=1, split=1, seed=i, height=side, width=side) for i, side in enumerate((512, 768, 1024))]
    tokens = {f"tok-user{i}": f"user{i}" for i in range(args.clients)} | {"tok-mallory": "mallory"}
    anonymous = wire()
    anonymous.user = ""

    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = Path(tmp) / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        with edge_server(args.pack, Path(tmp), "--tokens", str(tokens_file), "--max-streams-per-user", "2",
                         env=ONE_THREAD) as edge:
            caps_max = _capabilities(edge.address)
            largest_split = max(1, min(steps, caps_max.max_request_cost // (caps_max.max_image_side ** 2)))
            side = caps_max.max_image_side
            largest = [wire(split=largest_split, seed=i, height=side, width=side) for i in range(2)]
            attacks = {
                "none": None,
                # Not an attack: the same load as odd-size, batchable, to tell load from breakage.
                f"control: same load at {size} px (2/s)":
                    lambda s, u, c: at_rate(s, same_requests, "tok-mallory", 2, u, c),
                f"odd-size ({odd} px, 2/s)": lambda s, u, c: at_rate(s, odd_requests, "tok-mallory", 2, u, c),
                "large (512-1024 px, 1 step, 2 s deadline, 2/s)":
                    lambda s, u, c: at_rate(s, large_requests, "tok-mallory", 2, u, c, timeout=2),
                f"largest served ({caps_max.max_image_side} px, {largest_split} edge steps, 1/s)":
                    lambda s, u, c: at_rate(s, largest, "tok-mallory", 1, u, c),
                "flood (40 streams, user empty)": lambda s, u, c: flood(s, anonymous, "tok-mallory", 40, u, c),
            }
            asyncio.run(phase(edge.address, users, None, 3))  # warm-up
            # Phases interleaved over rounds, so the machine's other load hits each alike.
            latencies = {name: [] for name in attacks}
            codes = {name: Counter() for name in attacks}
            attacker = {name: Counter() for name in attacks}
            first_rss = {}
            for _ in range(args.rounds):
                for name, attack in attacks.items():
                    first_rss.setdefault(name, rss(edge.proc.pid))
                    times, users_got, attacker_got = asyncio.run(phase(edge.address, users, attack, args.seconds))
                    latencies[name] += times
                    codes[name].update(users_got)
                    attacker[name].update(attacker_got)
            final_rss = rss(edge.proc.pid)
            reference = percentile(latencies["none"], 99) if latencies["none"] else math.nan
            rows = []
            for name in attacks:
                failed = sum(n for code, n in codes[name].items() if code != "OK")
                tail = percentile(latencies[name], 99) if latencies[name] else math.nan
                rows.append((name, sum(codes[name].values()), failed, tail, tail / reference, dict(attacker[name])))

    print(f"### Edge under attack ({pack.name}, users at {size} px T={steps} k={steps // 2}, {args.clients} users, "
          f"{args.rounds} rounds of {args.seconds:g} s per phase, interleaved)\n")
    print("| attack | users' requests | users' failed | users' p99 s | p99 vs none | attacker got |")
    print("|---|---|---|---|---|---|")
    for name, total, failed, tail, ratio, attacker_got in rows:
        got = ", ".join(f"{code} {n}" for code, n in sorted(attacker_got.items())) or "-"
        print(f"| {name} | {total} | {failed} | {tail:.2f} | {ratio:.2f}× | {got} |")
    start = first_rss["none"]
    print(f"\nEdge RSS: {start / MIB:.0f} MiB after warm-up, {final_rss / MIB:.0f} MiB after every attack "
          f"({final_rss / start - 1:+.1%}); at the start of each attack's first phase: "
          + ", ".join(f"{name.split(' ')[0]} {value / MIB:.0f}" for name, value in first_rss.items()))


def _capabilities(address: str) -> edge_pb2.GetCapabilitiesResponse:
    with grpc.insecure_channel(address) as channel:
        return edge_pb2_grpc.EdgeServiceStub(channel).GetCapabilities(
            edge_pb2.GetCapabilitiesRequest(), timeout=10, metadata=(("authorization", "Bearer tok-mallory"),))


if __name__ == "__main__":
    main()
