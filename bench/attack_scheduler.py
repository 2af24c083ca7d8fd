"""Scheduler multi-tenant attacks (issue 14), measured against real scheduler processes.

    .venv/bin/python -m bench.attack_scheduler [--plans 200] [--flood 10000]

For each attack, what a hostile caller achieves after the fix:
  hijack     fake edge heartbeats (every plan's turn) for an address not its own, with and without
             --edge-tokens (then with a user's token): plans routed to the fake edge;
  poison     one hostile measurement (Plan RTT/rate, Report phases): did a benign user's plan change;
  flood      unreported plans with 15 KB user_ids, then with distinct 128-char ids, then from one
             user: scheduler RSS after vs before, and whether a benign user's pending plan survives;
  infeasible a frame of 4 users with vs without a fifth whose budget cannot be met (1e-300 s, 0.5 s):
             the 4 users' mean quality and predicted latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the schedulers started here inherit it

import grpc  # noqa: E402

from services.common.launcher import free_port, metric_value, rss_bytes, scheduler_service  # noqa: E402
from tandem.v1 import scheduler_pb2 as pb  # noqa: E402
from tandem.v1 import scheduler_pb2_grpc  # noqa: E402

FAKE = "10.66.0.1:50051"


def plan_request(**kw) -> pb.PlanRequest:
    base = dict(device_class="phone", link=pb.LinkEstimate(bandwidth_bps=50e6, rtt_seconds=0.02))
    return pb.PlanRequest(**{**base, **kw})


def meta(token: str | None):
    return [("authorization", f"Bearer {token}")] if token else None


def code(call, *args, **kw) -> str:
    try:
        call(*args, **kw)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def decision(reply: pb.PlanResponse) -> tuple:
    p = reply.predicted
    return (reply.steps, reply.split, reply.codec.encoding, reply.codec.merge_ratio,
            *(float(f"{x:.12g}") for x in (p.edge, p.transfer, p.device, reply.predicted_quality)))


def hijack(tmp: Path, n_plans: int) -> None:
    print(f"\n## hijack: a fake edge beats before each of {n_plans} plans (target: 0 hijacked)")
    users, edges = tmp / "users.json", tmp / "edges.json"
    users.write_text(json.dumps({"tok-alice": "alice", "tok-mallory": "mallory"}))
    edges.write_text(json.dumps({"edge-secret": "edge-a"}))
    honest = f"127.0.0.1:{free_port()}"
    for label, flags, user_token, edge_token in (
            ("no edge auth (own address / --edge only)", [], None, None),
            ("--tokens + --edge-tokens, attacker has a user token", ["--tokens", str(users), "--edge-tokens", str(edges)],
             "tok-alice", "edge-secret")):
        with scheduler_service(tmp, "--frame-ms", "1", *flags) as sched:
            s = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(sched.address))
            attacker_token = "tok-mallory" if user_token else None
            codes, routed = {}, {FAKE: 0, honest: 0, "": 0}
            for i in range(n_plans):
                c = code(s.ReportEdgeLoad, pb.ReportEdgeLoadRequest(address=FAKE), timeout=10, metadata=meta(attacker_token))
                codes[c] = codes.get(c, 0) + 1
                if i % 10 == 0:
                    s.ReportEdgeLoad(pb.ReportEdgeLoadRequest(address=honest), timeout=10, metadata=meta(edge_token))
                reply = s.Plan(plan_request(user_id="alice" if user_token else ""), timeout=10, metadata=meta(user_token))
                routed[reply.edge_address] = routed.get(reply.edge_address, 0) + 1
            print(f"{label}: fake heartbeats answered {codes}; plans to the fake edge {routed[FAKE]}/{n_plans}, "
                  f"to the honest edge {routed[honest]}, device-only {routed['']}")


def poison(tmp: Path) -> None:
    print("\n## poison: one hostile measurement, then a benign user's plan (target: unchanged)")
    with scheduler_service(tmp, "--edge", "127.0.0.1:50999") as sched:
        s = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(sched.address))
        benign = plan_request(user_id="bob", latency_budget_seconds=30.0)
        first = decision(s.Plan(benign, timeout=10))

        def report(**measured):
            plan = s.Plan(plan_request(user_id="mallory"), timeout=10)
            return code(s.Report, pb.ReportRequest(plan_id=plan.plan_id, measured=pb.MeasuredPhases(**measured),
                                                   handoff_bytes=plan.predicted_handoff_bytes), timeout=10)

        attacks = [
            ("Plan rtt_seconds=1e300", lambda: code(s.Plan, plan_request(
                link=pb.LinkEstimate(bandwidth_bps=5e6, rtt_seconds=1e300)), timeout=10)),
            ("Plan rtt_seconds=9.9 (in bounds)", lambda: code(s.Plan, plan_request(
                link=pb.LinkEstimate(bandwidth_bps=1e3, rtt_seconds=9.9)), timeout=10)),
            ("Plan spectral_efficiency=inf", lambda: code(s.Plan, plan_request(
                link=pb.LinkEstimate(spectral_efficiency=float("inf"))), timeout=10)),
            ("Report edge_steps=1e308 s", lambda: report(edge_steps=1e308)),
            ("Report every phase NaN", lambda: report(queue=float("nan"))),
            ("Report every phase 3000 s (in bounds)", lambda: report(queue=3000, edge_steps=3000, transfer=3000,
                                                                     device_steps=3000, decode=3000)),
            ("Report every phase 1e-6 s (in bounds)", lambda: report(queue=1e-6, edge_steps=1e-6, transfer=1e-6,
                                                                     device_steps=1e-6, decode=1e-6)),
        ]
        for label, attack in attacks:
            answered = attack()
            after = decision(s.Plan(benign, timeout=10))
            print(f"{label}: answered {answered}; benign plan changed: {'YES' if after != first else 'no'}")


async def _flood(address: str, requests, concurrency: int = 64, report: bool = False) -> dict[str, int]:
    """Plans (and, with ``report``, their reports) ``concurrency`` at a time; status counts."""
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        s = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        for start in range(0, len(requests), concurrency):
            replies = await asyncio.gather(*(s.Plan(r, timeout=60) for r in requests[start:start + concurrency]),
                                           return_exceptions=True)
            for r in replies:
                name = r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK"
                codes[name] = codes.get(name, 0) + 1
            if report:
                await asyncio.gather(*(s.Report(pb.ReportRequest(plan_id=r.plan_id), timeout=60)
                                       for r in replies if not isinstance(r, Exception)))
    return codes


def flood(tmp: Path, n: int) -> None:
    print(f"\n## flood: {n} unreported plans per wave (target: RSS <= +10%, bob's plan kept)")
    with scheduler_service(tmp, "--frame-ms", "5") as sched:
        s = scheduler_pb2_grpc.SchedulerServiceStub(grpc.insecure_channel(sched.address))
        # Before: after as many plans, reported (the server's buffers and arenas warmed, no state kept).
        asyncio.run(_flood(sched.address, [plan_request(user_id="warm") for _ in range(n)], report=True))
        bob = s.Plan(plan_request(user_id="bob"), timeout=10)
        base = rss_bytes(sched.proc)
        for label, requests in (
                ("15 KB user_ids", [plan_request(user_id=f"{i:06d}" + "x" * 15000) for i in range(n)]),
                ("distinct 128-char user_ids", [plan_request(user_id=f"{i:06d}" + "y" * 122) for i in range(n)]),
                ("one user", [plan_request(user_id="mallory") for _ in range(n)])):
            codes = asyncio.run(_flood(sched.address, requests))
            del requests
            rss = rss_bytes(sched.proc)
            print(f"{label}: answered {codes}; pending {metric_value(sched.metrics(), 'tandem_scheduler_pending_plans'):.0f}; "
                  f"RSS {base / 2**20:.1f} -> {rss / 2**20:.1f} MiB ({rss / base:.2f}x)")
        kept = code(s.Report, pb.ReportRequest(plan_id=bob.plan_id), timeout=10)
        print(f"bob's plan, issued before the floods, reported: {kept}")


def _together(address: str, requests) -> list[pb.PlanResponse]:
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            s = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            return await asyncio.gather(*(s.Plan(r, timeout=120) for r in requests))

    return list(asyncio.run(run()))


def infeasible(tmp: Path) -> None:
    print("\n## infeasible: 4 users with vs without a fifth whose budget cannot be met (target: identical)")
    normal = [plan_request(user_id=f"u{i}", device_class=d, latency_budget_seconds=b)
              for i, (d, b) in enumerate((("phone", 30.0), ("laptop-gpu", 0.0), ("cpu", 60.0), ("phone", 0.0)))]
    with scheduler_service(tmp, "--frame-ms", "60000", "--max-frame", "4") as alone, \
            scheduler_service(tmp, "--frame-ms", "60000", "--max-frame", "5") as mixed:
        without = _together(alone.address, normal)
        for budget in (1e-300, 0.5):
            replies = _together(mixed.address, [*normal, plan_request(user_id="x", latency_budget_seconds=budget)])
            mean = lambda rs, f: statistics.fmean(f(r) for r in rs)  # noqa: E731
            q0, q1 = mean(without, lambda r: r.predicted_quality), mean(replies[:4], lambda r: r.predicted_quality)
            t0, t1 = mean(without, lambda r: r.predicted.total), mean(replies[:4], lambda r: r.predicted.total)
            same = [decision(a) == decision(b) for a, b in zip(without, replies[:4])]
            x = replies[4]
            print(f"budget {budget:g} s: others' quality {q0:.3f} -> {q1:.3f}, predicted {t0:.2f} -> {t1:.2f} s, "
                  f"plans identical {sum(same)}/4; fifth: budget_infeasible={x.budget_infeasible} "
                  f"({x.infeasible_reason}), T={x.steps} k={x.split}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plans", type=int, default=200)
    parser.add_argument("--flood", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hijack(Path(tmp), args.plans)
        poison(Path(tmp))
        infeasible(Path(tmp))
        flood(Path(tmp), args.flood)


if __name__ == "__main__":
    main()
