"""The edge server's heartbeat to the scheduler: its load about once a second, so plans are
routed to the least-loaded live edge. Best effort: a failed beat is logged (once per outage)
and the next one tries again; serving never depends on the scheduler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from services.common.channels import client_options
from services.common.security import ClientSecurity, aio_channel, call_metadata
from services.edge_server.engine import EngineLoad
from tandem.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("tandem.edge")


async def send_heartbeats(scheduler: str, advertise: str, load: Callable[[], EngineLoad],
                          interval_s: float = 1.0, security: ClientSecurity | None = None) -> None:
    """Runs until cancelled."""
    loop = asyncio.get_running_loop()
    last, last_at = load(), loop.time()
    failing = False
    async with aio_channel(scheduler, security, client_options()) as channel:  # one channel, kept alive, for its life
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        while True:
            now_load, now = load(), loop.time()
            rate = (now_load.steps - last.steps) / (now - last_at) if now > last_at else 0.0
            last, last_at = now_load, now
            message = scheduler_pb2.ReportEdgeLoadRequest(
                address=advertise, queue_depth=now_load.queue_depth,
                running_requests=now_load.running_requests, steps_per_second=rate)
            try:
                await stub.ReportEdgeLoad(message, timeout=max(0.5, interval_s), metadata=call_metadata(security))
                if failing:
                    log.info("scheduler %s reachable again", scheduler)
                failing = False
            except grpc.RpcError as exc:
                if not failing:
                    log.info("heartbeat to scheduler %s failed (%s); retrying every %g s",
                             scheduler, exc.code().name, interval_s)
                failing = True
            await asyncio.sleep(interval_s)
