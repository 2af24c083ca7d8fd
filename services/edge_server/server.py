"""Edge server process: loads the large pack, serves EdgeService + health + reflection over
grpc.aio, metrics on their own port, drains gracefully on SIGTERM/SIGINT.

    python -m services.edge_server --pack tandem/demo_pack/large --port 50051 --metrics-port 9101

Every flag also reads an environment variable (TANDEM_EDGE_<FLAG>), for containers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.common.advertise import AdvertiseError, resolve_advertise
from services.common.channels import SERVER_KEEPALIVE_OPTIONS
from services.common.decoding import DecodeErrorInterceptor
from services.common.details import DetailsCapInterceptor
from services.common.envargs import EnvParser
from services.common.lifecycle import NO_REUSEPORT, describe, enable_reflection, run_server, set_health, until_signalled
from services.common.security import SecurityError, add_client_args, add_port, add_server_tls_args, client_security, env_flag, env_lookup, server_tls
from services.common.tokens import add_tokens_arg, interceptors, load_tokens
from services.edge_server.batching import BatchConfig
from services.edge_server.engine import EdgeEngine
from services.edge_server.heartbeat import LEAVING_TIMEOUT_S, Work, send_heartbeats
from services.edge_server.metrics import EdgeMetrics
from services.edge_server.servicer import EdgeServicer
from tandem.admission import EdgeLimits, LimitError
from tandem.packs import PackError, load_pack
from tandem.v1 import edge_pb2, edge_pb2_grpc

log = logging.getLogger("tandem.edge")
SERVICE_NAME = edge_pb2.DESCRIPTOR.services_by_name["EdgeService"].full_name
# Requests are small; a handoff travels server → client in chunks. Bound both on purpose.
MAX_RECEIVE_BYTES = 64 * 1024
MAX_SEND_BYTES = 4 * 1024 * 1024


_env = env_lookup("edge")
# One user's share of the edge by default: a quarter of the default batch running, an eighth of the
# default queue waiting beyond that; a 13th request of one user at once is refused, nobody else's.
MAX_QUEUED_PER_USER = 8
MAX_RUNNING_PER_USER = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from tandem.packs import DEMO_PACK

    # Variables go in as text: the flag's type= and the checks below apply to both (EnvParser).
    parser = EnvParser(prog="tandem-edge", description=describe(__doc__))
    parser.add_argument("--pack", default=_env("pack", str(DEMO_PACK / "large")), help="large model pack")
    parser.add_argument("--host", default=_env("host", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=_env("port", 50051))
    parser.add_argument("--metrics-port", type=int, default=_env("metrics_port", 9101), help="0 = no metrics endpoint")
    parser.add_argument("--max-batch", type=int, default=_env("max_batch", 16))
    parser.add_argument("--max-queue", type=int, default=_env("max_queue", 64))
    parser.add_argument("--max-queued-per-user", type=int, default=_env("max_queued_per_user", MAX_QUEUED_PER_USER),
                        help="requests one user may have waiting beyond those it may run (--max-running-per-user, "
                             "else the batch); beyond it a request is refused (RESOURCE_EXHAUSTED): by default one "
                             "user holds 4 + 8 at most. A user: the token's with --tokens, else the request's `user` "
                             "(claimed: anyone can claim any name), else the caller's host. Waiting requests start "
                             f"round-robin by user, not first come first served; 0 = no cap ({MAX_QUEUED_PER_USER})")
    parser.add_argument("--max-running-per-user", type=int, default=_env("max_running_per_user", MAX_RUNNING_PER_USER),
                        help="requests of one user in the running batch at once; its others wait, the other users' "
                             f"go first; 0 = no cap ({MAX_RUNNING_PER_USER})")
    parser.add_argument("--max-streams-per-user", type=int, default=_env("max_streams_per_user", 0),
                        help="concurrent Generate streams per user (as for --max-queued-per-user); 0 = no cap (0)")
    parser.add_argument("--min-image-side", type=int, default=_env("min_image_side", None),
                        help="smallest image side served, px (default: a quarter of the pack's size)")
    parser.add_argument("--max-image-side", type=int, default=_env("max_image_side", None),
                        help="largest image side served, px (default: twice the pack's size)")
    parser.add_argument("--max-request-cost", type=int, default=_env("max_request_cost", None),
                        help="cap on height x width x split per request, pixel-steps; 0 = none "
                             "(default: the largest image at the pack's default steps)")
    parser.add_argument("--coalesce-ms", type=float, default=_env("coalesce_ms", 10),
                        help="an idle engine starts once no request has arrived for this long, so that requests "
                             "sent together start together; 0 = start at once")
    parser.add_argument("--coalesce-max-ms", type=float, default=_env("coalesce_max_ms", 50),
                        help="... and at the latest this long after the first arrival (>= --coalesce-ms)")
    parser.add_argument("--max-growth", type=float, default=_env("max_growth", 0.5),
                        help="per iteration, a running batch's step cost grows by this fraction at most "
                             "(newcomers wait a step beyond it); 0 = no cap")
    parser.add_argument("--trace-unet", action=argparse.BooleanOptionalAction,
                        default=env_flag(_env, "trace_unet", True),
                        help="on a CPU, run the UNet as a TorchScript trace checked equal to it (less Python "
                             "per step; a shape whose trace differs runs eager)")
    parser.add_argument("--progress-interval", type=float, default=_env("progress_interval", 0.1),
                        help="seconds between a request's progress events (the first and last always go)")
    parser.add_argument("--drain-seconds", type=float, default=_env("drain_seconds", 30))
    parser.add_argument("--device", default=_env("device", None))
    parser.add_argument("--scheduler", default=_env("scheduler", None), metavar="HOST:PORT",
                        help="send load heartbeats to this scheduler")
    parser.add_argument("--advertise", default=_env("advertise", None), metavar="HOST:PORT",
                        help="the address devices reach this server at (default: --host:--port); auto:PORT = this "
                             "host's own IP (each replica of a scaled edge its own, services/common/advertise.py)")
    add_server_tls_args(parser, _env)
    add_tokens_arg(parser, _env)
    add_client_args(parser, _env, prefix="scheduler-", what="the --scheduler")
    args = parser.parse_args(argv)
    for flag in ("max_streams_per_user", "max_queued_per_user", "max_running_per_user"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')}: must be >= 0, got {getattr(args, flag)}")
    for flag in ("coalesce_ms", "coalesce_max_ms", "max_growth", "progress_interval"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0:
            parser.error(f"--{flag.replace('_', '-')}: must be a number >= 0, got {value}")
    if args.coalesce_max_ms < args.coalesce_ms:
        parser.error(f"--coalesce-max-ms: must be >= --coalesce-ms ({args.coalesce_ms}), got {args.coalesce_max_ms}")
    if args.advertise:
        try:
            args.advertise = resolve_advertise(args.advertise)
        except AdvertiseError as exc:
            parser.error(f"--advertise: {exc}")
    return args


async def serve(args: argparse.Namespace) -> None:
    tls, scheduler_security = server_tls(args), client_security(args, "scheduler-")  # bad files fail before anything
    health = HealthServicer()
    servicer = EdgeServicer(max_streams_per_user=args.max_streams_per_user,
                            tokens=load_tokens(args.tokens) if args.tokens else None)
    server = grpc.aio.server(
        interceptors=[DetailsCapInterceptor(), *interceptors(args), DecodeErrorInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            NO_REUSEPORT,
            *SERVER_KEEPALIVE_OPTIONS,  # devices keep one channel open, pinged while idle
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(servicer, server)
    enable_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    port = add_port(server, f"{args.host}:{args.port}", tls)
    await set_health(health, SERVICE_NAME, serving=False)
    await server.start()  # health answers NOT_SERVING while the model loads
    log.info("loading pack %s", args.pack)
    try:
        pack = await asyncio.to_thread(load_pack, args.pack, args.device)
        defaults = pack.request_defaults()
        limits = EdgeLimits.for_pack(defaults.image_size, pack.vae_scale_factor, defaults.steps,
                                     args.min_image_side, args.max_image_side, args.max_request_cost)
    except (PackError, LimitError):
        await server.stop(grace=None)  # else its finalizer complains after the one-line error
        raise
    metrics = EdgeMetrics()
    config = BatchConfig(args.max_batch, args.max_queue, coalesce_s=args.coalesce_ms / 1000,
                         coalesce_max_s=args.coalesce_max_ms / 1000, max_growth=args.max_growth,
                         max_queued_per_owner=args.max_queued_per_user, max_running_per_owner=args.max_running_per_user)
    engine = EdgeEngine(pack, config, metrics, progress_interval_s=args.progress_interval, trace_unet=args.trace_unet)
    await asyncio.to_thread(engine.warm_up)  # still NOT_SERVING: the first request pays no trace
    servicer.attach(engine, limits)
    engine.start()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host, registry=metrics.registry)
    await set_health(health, SERVICE_NAME, serving=True)
    print(f"edge server ready on {args.host}:{port} (pack {pack.name}, {pack.device}); metrics :{args.metrics_port}", flush=True)
    heartbeats, leaving = None, asyncio.Event()
    if args.scheduler:
        advertise = args.advertise or f"{args.host}:{port}"
        heartbeats = asyncio.ensure_future(send_heartbeats(args.scheduler, advertise, engine.load,
                                                           security=scheduler_security, work=lambda: work_done(metrics),
                                                           leaving=leaving))

    await until_signalled()
    print("edge server draining: new requests get UNAVAILABLE", flush=True)
    leaving.set()  # the last heartbeat says so, now: the scheduler routes no new plan here (not after its TTL)
    await health.enter_graceful_shutdown()
    engine.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.drain_seconds
    while engine.busy and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await server.stop(grace=min(5.0, max(0.0, deadline - loop.time())) + 1.0)
    engine.stop()
    if heartbeats is not None:  # sent long ago unless the scheduler is slow; its own timeout bounds it
        try:
            await asyncio.wait_for(heartbeats, LEAVING_TIMEOUT_S + 1.0)
        except Exception:  # noqa: BLE001 - best effort: a heartbeat never fails the shutdown
            log.debug("the last heartbeat did not finish", exc_info=True)
    print("edge server stopped", flush=True)


def work_done(metrics: EdgeMetrics) -> Work:
    """The engine's UNet counters (iterations, request-steps, seconds) as its metrics count them."""
    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    return Work(int(sample("tandem_edge_iteration_seconds_count")), int(sample("tandem_edge_steps_total")),
                sample("tandem_edge_iteration_seconds_sum"))


def main(argv: list[str] | None = None) -> int:
    return run_server(serve, parse_args(argv), "tandem-edge", (PackError, SecurityError, LimitError))
