"""The edge server's heartbeat to the scheduler: its load and measured speed about once a second,
so plans are routed to the live edge where they would finish first; and, when the edge starts
draining, one last heartbeat saying it is leaving, so that no new plan comes here while in-flight
requests finish. Best effort: a failed beat is logged (once per outage) and the next one tries
again; serving never depends on the scheduler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from services.common.channels import client_options
from services.common.security import ClientSecurity, aio_channel, call_metadata
from services.edge_server.engine import EngineLoad
from tandem.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("tandem.edge")
LEAVING_TIMEOUT_S = 1.0  # the last heartbeat waits this long at most: draining never waits on the scheduler


@dataclass(frozen=True)
class Work:
    """Counters of what the engine's UNet has done so far (an interval's: the difference of two)."""

    iterations: int = 0  # batched UNet calls
    steps: int = 0  # request-steps they advanced (a batch of n: n)
    busy_seconds: float = 0.0  # the seconds they took


async def send_heartbeats(scheduler: str, advertise: str, load: Callable[[], EngineLoad],
                          interval_s: float = 1.0, security: ClientSecurity | None = None,
                          work: Callable[[], Work] | None = None, leaving: asyncio.Event | None = None,
                          leaving_timeout_s: float = LEAVING_TIMEOUT_S) -> None:
    """Runs until cancelled, or until ``leaving`` is set: then (at once, after a beat already on
    its way) it sends one heartbeat with ``leaving`` true, waiting ``leaving_timeout_s`` at most,
    and returns. ``work``: the engine's counters (the interval's measured speed travels with each
    beat; None: none sent)."""
    loop = asyncio.get_running_loop()
    last, last_at = load(), loop.time()
    last_work = work() if work is not None else Work()
    failing = False

    def message(is_leaving: bool) -> scheduler_pb2.ReportEdgeLoadRequest:
        nonlocal last, last_at, last_work
        now_load, now = load(), loop.time()
        rate = (now_load.steps - last.steps) / (now - last_at) if now > last_at else 0.0
        done = work() if work is not None else Work()
        iterations, steps = done.iterations - last_work.iterations, done.steps - last_work.steps
        busy = done.busy_seconds - last_work.busy_seconds
        last, last_at, last_work = now_load, now, done
        if not (iterations > 0 and steps >= iterations and busy > 0):  # none ran (or the counters disagree)
            iterations, steps, busy = 0, 0, 0.0
        return scheduler_pb2.ReportEdgeLoadRequest(
            address=advertise, queue_depth=now_load.queue_depth, running_requests=now_load.running_requests,
            steps_per_second=max(rate, 0.0), leaving=is_leaving, interval_iterations=iterations,
            interval_steps=steps, interval_busy_seconds=busy)

    async with aio_channel(scheduler, security, client_options()) as channel:  # one channel, kept alive, for its life
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        while leaving is None or not leaving.is_set():
            try:
                await stub.ReportEdgeLoad(message(False), timeout=max(0.5, interval_s), metadata=call_metadata(security))
                if failing:
                    log.info("scheduler %s reachable again", scheduler)
                failing = False
            except grpc.RpcError as exc:
                if not failing:
                    log.info("heartbeat to scheduler %s failed (%s); retrying every %g s",
                             scheduler, exc.code().name, interval_s)
                failing = True
            if leaving is None:
                await asyncio.sleep(interval_s)
                continue
            try:  # the next beat, or at once the last one when the edge starts draining
                await asyncio.wait_for(leaving.wait(), interval_s)
            except TimeoutError:
                pass
        # Sequential on purpose: no earlier beat (which would make the edge routable again) can
        # reach the scheduler after this one.
        try:
            await stub.ReportEdgeLoad(message(True), timeout=leaving_timeout_s, metadata=call_metadata(security))
            log.info("told scheduler %s this edge is leaving", scheduler)
        except grpc.RpcError as exc:
            log.info("could not tell scheduler %s this edge is leaving (%s): it stops routing here after its TTL",
                     scheduler, exc.code().name)
