"""The device (UE) service: a long-running process that keeps the small pack and LoRAs warm.

    python -m services.ue_client --pack tandem/demo_pack/small --port 50061 --metrics-port 9102

One generation at a time (one device accelerator); others wait their turn. Callers are checked as
on the edge and the scheduler (services/common/security.py, tokens.py): --tls-cert/--tls-key
[--tls-client-ca] for TLS (mTLS), --tokens for per-user bearer tokens (health and reflection
exempt; a request naming another user than its token's is PERMISSION_DENIED). Every flag also
reads TANDEM_UE_<FLAG> from the environment. --http-port serves OpenAI's images API over HTTP
beside gRPC, in the same event loop (services/ue_client/http_app.py).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.common.channels import SERVER_KEEPALIVE_OPTIONS, ChannelPool
from services.common.decoding import DecodeErrorInterceptor
from services.common.details import DetailsCapInterceptor
from services.common.envargs import EnvParser
from services.common.lifecycle import NO_REUSEPORT, describe, enable_reflection, run_server, set_health, until_signalled
from services.common.security import (
    ClientSecurity,
    SecurityError,
    add_client_args,
    add_port,
    add_server_tls_args,
    client_security,
    env_flag,
    env_lookup,
    server_tls,
)
from services.common.tokens import add_tokens_arg, interceptors, load_tokens
from services.ue_client.metrics import DeviceMetrics
from services.ue_client.servicer import DeviceServicer
from tandem.packs import PackError, load_pack
from tandem.pipeline import warm_up
from tandem.v1 import device_pb2, device_pb2_grpc

SERVICE_NAME = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name


_env = env_lookup("ue")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from tandem.packs import DEMO_PACK

    # Variables go in as text, converted by the flag's type= (EnvParser names the variable in errors).
    parser = EnvParser(prog="tandem-ue", description=describe(__doc__))
    parser.add_argument("--pack", default=_env("pack", str(DEMO_PACK / "small")), help="small model pack")
    parser.add_argument("--edge", action="append", metavar="HOST:PORT",
                        help="an edge server this service may use (repeatable; the first is the default; "
                             "TANDEM_UE_EDGE: comma-separated). Callers can pick only among these")
    parser.add_argument("--host", default=_env("host", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=_env("port", 50061))
    parser.add_argument("--metrics-port", type=int, default=_env("metrics_port", 9102), help="0 = none")
    parser.add_argument("--http-port", type=int, default=_env("http_port", 0),
                        help="serve OpenAI's images API (POST /v1/images/generations, GET /v1/models, GET /health) "
                             "over HTTP on this port, on --host, with the same TLS and --tokens (0 = off)")
    parser.add_argument("--max-waiting", type=int, default=_env("max_waiting", 16),
                        help="gRPC generations that may wait for the device's turn; one more gets RESOURCE_EXHAUSTED "
                             "at once (0: no bound; the HTTP listener has its own quotas)")
    parser.add_argument("--http-max-images-per-user", type=int, default=_env("http_max_images_per_user", 8),
                        help="images one caller may have in flight over HTTP; more is a 429 (0 = no cap)")
    parser.add_argument("--http-previews", choices=("approx", "vae"), default=_env("http_previews", "approx"),
                        help="how streamed previews (partial_images) are decoded: approx, a linear map of the latent "
                             "to colours fitted to the pack's VAE (microseconds), or vae, the VAE itself (a decode "
                             "each) (approx)")
    parser.add_argument("--scheduler", metavar="HOST:PORT", default=_env("scheduler", None),
                        help="the scheduler that plans an HTTP request's latency_budget (else such a request is a 400)")
    parser.add_argument("--device-class", default=_env("device_class", "laptop-gpu"),
                        help="this device's class, for the scheduler's plans (laptop-gpu)")
    parser.add_argument("--device", default=_env("device", None))
    parser.add_argument("--offload", action="store_true",
                        default=env_flag(_env, "offload", False),
                        help="keep the weights in CPU memory and move each layer to the GPU as it runs "
                             "(accelerate's CPU offload: a CUDA GPU smaller than the pack)")
    parser.add_argument("--compact-weights", action="store_true",
                        default=env_flag(_env, "compact_weights", False),
                        help="hold weights stored narrower than the compute dtype (fp16 files on a CPU) as "
                             "stored and widen each layer as it runs: half the weights' memory, the same "
                             "images, slower steps")
    parser.add_argument("--transient-text", action="store_true",
                        default=env_flag(_env, "transient_text", False),
                        help="hold the text encoder only while it encodes a prompt, and give freed memory "
                             "back to the OS between a request's phases: a lower peak, the same images, a "
                             "text encoder load per request (with --compact-weights: 0.4x the memory of the "
                             "large pack alone at 512 px, BENCHMARKS.md 'True size')")
    parser.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=env_flag(_env, "warm_up", True),
                        help="before serving, run one request's work at the pack's defaults (prompt encoding, one "
                             "step, one decode), so the first request pays no first-call costs (on; one step and "
                             "one decode of start-up time)")
    add_server_tls_args(parser, _env)
    add_tokens_arg(parser, _env)
    add_client_args(parser, _env, prefix="edge-", what="edge servers")
    add_client_args(parser, _env, prefix="scheduler-", what="the scheduler")
    args = parser.parse_args(argv)
    if args.http_port < 0 or args.http_max_images_per_user < 0 or args.max_waiting < 0:
        parser.error("--http-port, --http-max-images-per-user and --max-waiting must be >= 0")
    if args.scheduler:
        from services.common.addresses import AddressError, check_address

        try:
            check_address(args.scheduler, "--scheduler")
        except AddressError as exc:
            parser.error(str(exc))
    if args.edge is None:  # argparse would append flags to a default list, so the env is read here
        args.edge = [edge.strip() for edge in str(_env("edge", "")).split(",") if edge.strip()]
    return args


async def serve(args: argparse.Namespace) -> None:
    tls, edge_security = server_tls(args), client_security(args, "edge-")  # bad files fail before anything
    scheduler_security = client_security(args, "scheduler-")
    http_socket = None
    if args.http_port:
        from services.ue_client.http_app import bind

        http_socket = bind(args.host, args.http_port)  # a busy port fails now, in one line
    health = HealthServicer()
    server = grpc.aio.server(interceptors=[DetailsCapInterceptor(), *interceptors(args), DecodeErrorInterceptor()],
                             options=[("grpc.max_receive_message_length", 64 * 1024), NO_REUSEPORT,
                                      *SERVER_KEEPALIVE_OPTIONS])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                      server)
    metrics = DeviceMetrics()
    channels = ChannelPool()  # one connection per edge for the service's life, not one per request
    servicer = DeviceServicer(metrics, args.edge, edge_security, channels=channels, max_waiting=args.max_waiting)
    device_pb2_grpc.add_DeviceServiceServicer_to_server(servicer, server)
    port = add_port(server, f"{args.host}:{args.port}", tls)
    await set_health(health, SERVICE_NAME, serving=False)
    await server.start()  # health answers NOT_SERVING while the pack loads
    http = await _start_http(args, http_socket, servicer, metrics, scheduler_security) if http_socket else None
    try:
        pack = await asyncio.to_thread(load_pack, args.pack, args.device, offload=args.offload,
                                        compact=args.compact_weights, transient_text=args.transient_text)
        for user in pack.users:  # warm every user's LoRA now, not on their first request
            pack.use_user(user)
        pack.use_user(None)
        if args.warm_up:  # one request's work now, not in the first user's request (still NOT_SERVING)
            await asyncio.to_thread(warm_up, pack)
    except PackError:
        await server.stop(grace=None)  # else its finalizer complains after the one-line error
        if http is not None:
            await http.stop()
        raise
    servicer.attach(pack)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host, registry=metrics.registry)
    await set_health(health, SERVICE_NAME, serving=True)
    held = f", weights held compact: {', '.join(pack.compact)}" if pack.compact else ""
    held += ", text encoder held only while it encodes" if pack.transient_text else ""
    http_note = f"; OpenAI images API http{'s' if tls else ''}://{args.host}:{http.port}/v1" if http else ""
    print(f"device service ready on {args.host}:{port} (pack {pack.name}, {pack.device}{held}); "
          f"metrics :{args.metrics_port}{http_note}", flush=True)
    await until_signalled()
    if http is not None:
        http.state.draining = True  # new HTTP generations: 503 while those in flight finish
    await health.enter_graceful_shutdown()
    await asyncio.gather(server.stop(grace=30), *([http.stop()] if http is not None else []))
    await channels.close()
    print("device service stopped", flush=True)


async def _start_http(args: argparse.Namespace, sock, servicer: DeviceServicer, metrics: DeviceMetrics,
                      scheduler_security: ClientSecurity):
    """The HTTP listener on the servicer's parts and turn, answering 503 until the pack is attached."""
    from services.ue_client.http_app import HttpListener, HttpState, build_app
    from services.ue_client.images import ImagesService, Quota, Scheduler

    scheduler = Scheduler(args.scheduler, scheduler_security, args.device_class) if args.scheduler else None
    images = ImagesService(servicer, servicer.turn, scheduler, Quota(args.http_max_images_per_user, total=32),
                           args.http_previews)
    state = HttpState(started=int(time.time()), in_flight=lambda: sum(images.quota.held.values()))
    app = build_app(images, metrics, load_tokens(args.tokens) if args.tokens else None, state)
    http = HttpListener(app, sock, args.tls_cert, args.tls_key, args.tls_client_ca, state)
    await http.start()
    return http


def main(argv: list[str] | None = None) -> int:
    return run_server(serve, parse_args(argv), "tandem-ue", (PackError, SecurityError))
