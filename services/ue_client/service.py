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
import io
import logging
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from PIL import Image
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
from services.edge_server.metrics import record_call
from services.ue_client.call import choose_edge, parse_call
from services.ue_client.device import CancelFlag, Cancelled, generate_via_edge
from services.ue_client.link import LinkBook, LinkSample
from services.ue_client.metrics import DeviceMetrics
from tandem.packs import ModelPack, PackError, load_pack
from tandem.phases import Phase
from tandem.request import RequestError
from tandem.v1 import device_pb2, device_pb2_grpc

log = logging.getLogger("tandem.ue")
SERVICE_NAME = device_pb2.DESCRIPTOR.services_by_name["DeviceService"].full_name


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    """Registered before the pack loads (so health answers NOT_SERVING meanwhile); calls get
    UNAVAILABLE until `attach` hands it the pack."""

    def __init__(self, metrics: DeviceMetrics, edges: Sequence[str] = (),
                 edge_security: ClientSecurity | None = None, pack: ModelPack | None = None,
                 channels: ChannelPool | None = None):
        """`edges`: the only edges this service uses (the first is the default); its
        `edge_security` (e.g. --edge-token) goes to them and nowhere else. `channels`: the
        service's channels to its edges, on the server's event loop (None: one per request)."""
        self.pack: ModelPack | None = pack
        self.edge_security = edge_security
        self.channels = channels
        self.metrics = metrics
        self.edges = tuple(edges)
        self.links = LinkBook()  # per edge, measured from every handoff received (services/ue_client/link.py)
        self._turn = asyncio.Lock()

    def attach(self, pack: ModelPack) -> None:
        self.pack = pack

    async def Generate(self, request, context):
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        recorded = delivered = False  # see record_call
        try:
            if self.pack is None:
                code = grpc.StatusCode.UNAVAILABLE
                recorded = record_call(self.metrics, code.name, began)
                await context.abort(code, "the device's model pack is still loading; retry shortly")
            try:
                call = parse_call(request, self.pack, self.edges)
            except RequestError as exc:
                code = grpc.StatusCode.INVALID_ARGUMENT
                recorded = record_call(self.metrics, code.name, began)
                await context.abort(code, str(exc))
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            cancel = CancelFlag()
            after_cancel = [0]  # device steps that finished once the call was cancelled
            measured: list[LinkSample] = []

            def on_link(sample: LinkSample) -> None:  # while this call holds the turn
                measured.append(sample)
                if call.edge:
                    self.links.record(call.edge, sample)

            def on_step(phase: str, done: int, total: int) -> None:  # worker thread, or this loop (edge events)
                if phase == Phase.DEVICE_STEPS and cancel.is_set():
                    after_cancel[0] += 1
                loop.call_soon_threadsafe(events.put_nowait, device_pb2.PhaseProgress(phase=phase, done=done, total=total))

            async with self._turn:
                job = asyncio.ensure_future(
                    asyncio.to_thread(generate_via_edge, self.pack, call.request, call.codec, call.edge,
                                      call.edge_timeout, on_step, self.edge_security, cancel, on_link,
                                      self.channels)
                )
                try:
                    while not job.done() or not events.empty():
                        getter = asyncio.ensure_future(events.get())
                        try:
                            await asyncio.wait({job, getter}, return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            if not getter.done():
                                getter.cancel()
                        if getter.done() and not getter.cancelled():
                            yield device_pb2.DeviceServiceGenerateResponse(progress=getter.result())
                finally:  # left early: cancelled (CancelledError) or the stream closed (GeneratorExit)
                    if not job.done():
                        await self._stop(job, cancel)
                        self.metrics.steps_after_cancel.inc(after_cancel[0])
                result = job.result()
            delivered = True  # a client that stops reading after the result has not cancelled it
            yield device_pb2.DeviceServiceGenerateResponse(
                result=self._result(result, self.pack.name, measured[-1] if measured else None))
        except (asyncio.CancelledError, GeneratorExit):
            if not delivered:
                code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if not recorded:
                record_call(self.metrics, code.name, began)

    async def _stop(self, job: asyncio.Future, cancel: CancelFlag) -> None:
        """The call was cancelled: the worker stops after its current step, and this call keeps the
        turn until it has, so abandoned work neither delays the next request nor runs beside it."""
        cancel.set()
        while not job.done():
            try:
                await asyncio.wait({job})
            except asyncio.CancelledError:  # cancelled again (e.g. shutdown): still wait, ≤ one step
                continue
        if not job.cancelled() and job.exception() is not None and not isinstance(job.exception(), Cancelled):
            log.warning("cancelled generation ended with %r", job.exception())

    async def GetLinkEstimate(self, request, context):
        try:
            edge = choose_edge(request.edge_address, self.edges)
        except RequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        estimate = self.links.estimate(edge) if edge else None
        if estimate is None:
            return device_pb2.GetLinkEstimateResponse()
        return device_pb2.GetLinkEstimateResponse(
            edge_address=edge, bandwidth_bps=estimate.bandwidth_bps, rtt_seconds=estimate.rtt_s,
            rate_samples=estimate.rate_samples, rtt_samples=estimate.rtt_samples)

    def _result(self, result, pack_name: str, link: LinkSample | None = None) -> device_pb2.DeviceResult:
        for phase, seconds in result.seconds.items():
            self.metrics.phase_seconds.labels(phase=phase).observe(seconds)
        self.metrics.steps.inc(result.device_steps)
        if result.fallback:
            self.metrics.fallbacks.inc()
        if result.handoff_bytes:
            self.metrics.handoff_bytes.observe(result.handoff_bytes)
        png = io.BytesIO()
        Image.fromarray(result.image).save(png, format="PNG")
        return device_pb2.DeviceResult(
            png=png.getvalue(),
            edge_steps=result.edge_steps,
            device_steps=result.device_steps,
            handoff_bytes=result.handoff_bytes,
            seconds=result.seconds,
            fallback=result.fallback or "",
            device_pack=pack_name,
            link_transfer_seconds=link.transfer_s if link and not result.fallback else 0.0,
            link_rtt_seconds=link.rtt_s if link and not result.fallback else 0.0,
        )


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
    add_server_tls_args(parser, _env)
    add_tokens_arg(parser, _env)
    add_client_args(parser, _env, prefix="edge-", what="edge servers")
    add_client_args(parser, _env, prefix="scheduler-", what="the scheduler")
    args = parser.parse_args(argv)
    if args.http_port < 0 or args.http_max_images_per_user < 0:
        parser.error("--http-port and --http-max-images-per-user must be >= 0")
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
    servicer = DeviceServicer(metrics, args.edge, edge_security, channels=channels)
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
    images = ImagesService(servicer, servicer._turn, scheduler, Quota(args.http_max_images_per_user, total=32),
                           args.http_previews)
    state = HttpState(started=int(time.time()), in_flight=lambda: sum(images.quota.held.values()))
    app = build_app(images, metrics, load_tokens(args.tokens) if args.tokens else None, state)
    http = HttpListener(app, sock, args.tls_cert, args.tls_key, args.tls_client_ca, state)
    await http.start()
    return http


def main(argv: list[str] | None = None) -> int:
    return run_server(serve, parse_args(argv), "tandem-ue", (PackError, SecurityError))
