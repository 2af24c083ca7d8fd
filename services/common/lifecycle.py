"""What every Tandem server process does around its servicer: health status, waiting for
SIGTERM/SIGINT, its ports (one line naming a busy one), reflection."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import socket
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from services.common.security import PortInUse

# gRPC sets SO_REUSEPORT by default: a second server on a busy port then starts "ready" and the
# kernel splits connections between the two. Every Tandem server turns it off.
NO_REUSEPORT = ("grpc.so_reuseport", 0)
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def check_port_free(host: str, port: int, flag: str) -> None:
    """Raises PortInUse when something listens on host:port (0 = any free port: nothing to check).
    Checked before the model loads, so a clash fails in a second, not after the load."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{flag}: port {port} on {host} is already in use (another server?)") from None
            raise PortInUse(f"{flag}: cannot bind {host}:{port} ({exc.strerror or exc})") from None


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Server reflection as v1alpha and v1 (current clients such as grpcurl try v1 first). The two
    protocols differ only in their package name, so v1 is the v1alpha servicer under the v1 name."""
    from grpc_reflection.v1alpha._async import ReflectionServicer

    names = (*service_names, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    servicer = ReflectionServicer(names)
    handler = grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString),
    })
    server.add_generic_rpc_handlers((handler,))


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


def run_server(serve: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], args: argparse.Namespace, prog: str,
               startup_errors: tuple[type[BaseException], ...]) -> int:
    """Runs ``serve`` until it returns; a startup error (a busy port included) is one line and exit
    status 2, no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        check_port_free(args.host, args.port, "--port")
        check_port_free(args.host, getattr(args, "metrics_port", 0), "--metrics-port")
        asyncio.run(serve(args))
    except Exception as exc:
        if isinstance(exc, OSError) and not isinstance(exc, PortInUse) and exc.errno == errno.EADDRINUSE:
            # the metrics port taken between the check and the model loaded (checked first: a
            # service whose startup errors include OSError would otherwise print errno's words)
            message = f"--metrics-port: port {args.metrics_port} on {args.host} is already in use"
        elif isinstance(exc, (PortInUse, *startup_errors)):
            message = str(exc)
        else:
            raise
        print(f"{prog}: error: {message}", flush=True)
        return 2
    return 0


def describe(doc: str) -> str:
    """A module docstring's first paragraph as one line: the server's --help description (its first
    line alone stopped mid-sentence)."""
    return " ".join(doc.split("\n\n", 1)[0].split())
