"""What every Tandem server process does around its servicer: health status, waiting for
SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Awaitable, Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer


async def set_health(health: HealthServicer, service_name: str, serving: bool) -> None:
    """The same status for the server as a whole ("") and for its service."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", service_name):
        await health.set(name, status)


async def until_signalled() -> None:
    """Returns at the first SIGTERM or SIGINT (the process then stops gracefully)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def run_server(serve: Callable[[argparse.Namespace], Awaitable[None]], args: argparse.Namespace, prog: str,
               startup_errors: tuple[type[BaseException], ...]) -> int:
    """Runs ``serve`` until it returns; a startup error is one line and exit status 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(serve(args))
    except startup_errors as exc:
        print(f"{prog}: error: {exc}", flush=True)
        return 2
    return 0
