"""The device service's OpenAI-compatible HTTP listener (``--http-port``): a Starlette app served by
uvicorn as one more task in the device service's own event loop (no second process, no thread
per request), beside the gRPC server, sharing its pack, edges, channels, metrics and tokens.

    POST /v1/images/generations   OpenAI's images API (services/ue_client/openai_api.py), streamed
                                  previews as server-sent events (services/ue_client/previews.py)
    GET  /v1/models               the pack's name and its aliases
    GET  /health                  the gRPC health status: 200 SERVING, else 503

Errors come in OpenAI's shape with the status the ``openai`` package maps to its exception: 400
(a field, named), 401 (no or an unknown bearer token, with --tokens: the gRPC table), 403 (a
``user``/``lora`` other than the token's), 404, 413 (a body over 64 KiB, refused before it is
read), 429 (the edge's queue or the caller's quota), 503 (the pack loading, the service draining).
A client that leaves (or closes a stream) cancels its request: the device stops at its next step
and the edge round is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.security import PortInUse
from services.common.tokens import check_access, token_user
from services.ue_client.device import events_until_done
from services.ue_client.images import ImagesService, MadeImage, Prepared
from services.ue_client.metrics import DeviceMetrics
from services.ue_client.openai_api import (
    MAX_BODY_BYTES,
    ApiError,
    ImagesCall,
    images_call,
    parse_json,
    served_models,
)
from services.ue_client.previews import USAGE, EventStream, completed_event, error_event, partial_event, until_disconnected

log = logging.getLogger("tandem.ue.http")
T = TypeVar("T")
ROUTES = ("/v1/images/generations", "/v1/models", "/health")
MAX_HEADER_BYTES = 16 * 1024  # request line + headers


@dataclass
class HttpState:
    draining: bool = False  # set at SIGTERM: new generations get 503 while those in flight finish
    started: int = 0  # Unix time the service started (a model's `created`)
    in_flight: Callable[[], int] = field(default=lambda: 0)  # images being made (the drain waits for them)


class ClientGone(Exception):
    """The client disconnected while its request was being prepared or run."""


def build_app(images: ImagesService, metrics: DeviceMetrics, tokens: Mapping[str, str] | None,
              state: HttpState) -> Any:
    """The ASGI app: the routes under a metrics layer (requests, latency and status per route)."""
    tokens = dict(tokens or {})

    def authenticated(request: Request, claimed: tuple[str | None, ...] = ()) -> str | None:
        """The token's user (None without --tokens); 401/403 as the gRPC interceptor decides."""
        if not tokens:
            return None
        header = request.headers.get("authorization", "")
        token = header[len("Bearer "):].strip() or None if header.startswith("Bearer ") else None
        denial = check_access(tokens, token, [c for c in claimed if c])
        if denial is not None:
            status = 401 if denial.code.name == "UNAUTHENTICATED" else 403
            message = "missing 'Authorization: Bearer TOKEN' header" if token is None else denial.message
            raise ApiError(status, message, code="invalid_api_key" if status == 401 else "permission_denied")
        return token_user(tokens, token)

    async def generations(request: Request) -> Any:
        if state.draining:
            raise ApiError(503, "this device service is shutting down; retry on another", code="draining",
                           retry_after=5.0)
        authenticated(request)  # before the body is read
        call = images_call(parse_json(await _read_body(request)), images.pack.name)
        user = authenticated(request, (call.identity, call.partial.user))
        caller = user or call.identity or (request.client.host if request.client else "anonymous")
        prepared = await _unless_gone(images.prepare(call, caller), request)
        if call.stream:  # closed however the stream ends, even one that never started
            return EventStream(_events(images, prepared), on_close=lambda left: images.close(prepared))
        try:
            made = await _unless_gone(images.run(prepared), request)
        finally:
            images.close(prepared)  # its quota and rounds, even when run was cancelled before it began
        return JSONResponse(_images_response(call, prepared, made))

    async def models(request: Request) -> Any:
        authenticated(request)
        names = served_models(images.pack.name)
        return JSONResponse({"object": "list", "data": [_model(name, state.started) for name in names]})

    async def model(request: Request) -> Any:
        authenticated(request)
        name = request.path_params["model"]
        if name not in served_models(images.pack.name):
            raise ApiError(404, f"model: the model {name[:80]!r} does not exist here", param="model",
                           code="model_not_found")
        return JSONResponse(_model(name, state.started))

    async def health(request: Request) -> Any:
        serving = images.parts.pack is not None and not state.draining
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, status_code=200 if serving else 503)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        headers = {"retry-after": f"{exc.retry_after:g}"} if exc.retry_after else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path[:80]!r}; this device serves {', '.join(ROUTES)}",
                   405: f"{request.method} is not allowed on {request.url.path[:80]!r}"}.get(
            exc.status_code, str(exc.detail))
        return await api_error(request, ApiError(exc.status_code, message, code="not_found"
                                                 if exc.status_code == 404 else "method_not_allowed"))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error answering %s %s", request.method, request.url.path[:80])
        return await api_error(request, ApiError(500, "internal error on the device service", code="internal_error"))

    async def client_gone(request: Request, exc: Exception) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": only the metrics see it

    app = Starlette(
        routes=[Route("/v1/images/generations", generations, methods=["POST"]),
                Route("/v1/models", models, methods=["GET"]),
                Route("/v1/models/{model:path}", model, methods=["GET"]),
                Route("/health", health, methods=["GET"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error, ClientGone: client_gone,
                            Exception: server_error},
    )
    return _Measured(app, metrics)


class _Measured:
    """ASGI middleware: every answer counted by route and status, its latency observed (a stream's
    to its end), and the requests in flight."""

    def __init__(self, app: Any, metrics: DeviceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "unmatched"
        status = [500]
        began = time.perf_counter()

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.http_in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.http_in_flight.dec()
            self.metrics.http_requests.labels(route=route, status=str(status[0])).inc()
            self.metrics.http_seconds.labels(route=route).observe(time.perf_counter() - began)


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past MAX_BODY_BYTES: by its Content-Length before a byte is read,
    else as soon as the bytes pass the cap (a chunked body), never kept whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes or more; this device takes at most {MAX_BODY_BYTES}",
                    code="request_too_large")


async def _unless_gone(work: Awaitable[T], request: Request) -> T:
    """`work`'s result, or ClientGone as soon as the client disconnects (then `work` is cancelled
    and awaited: its device steps stop, its edge rounds are cancelled)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():  # the client left (or this handler was cancelled): stop the work
            task.cancel()
            await asyncio.wait({task})
        watcher.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _events(images: ImagesService, prepared: Prepared) -> AsyncIterator[bytes]:
    """The stream: each image's previews as they are decoded, then its completed event. Closed
    early (the client left): the generation is cancelled and this waits until it has stopped."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    call = prepared.call

    def on_preview(image: int, index: int, png: bytes) -> None:
        queue.put_nowait(partial_event(png, prepared.size, index))

    def on_image(image: int, made: MadeImage) -> None:
        queue.put_nowait(completed_event(made.png, prepared.size, made.tandem, call.identity))

    task = asyncio.ensure_future(images.run(prepared, on_preview, on_image))
    try:
        async with aclosing(events_until_done(task, queue)) as events:
            async for event in events:
                yield event
        if task.exception() is not None:
            exc = task.exception()
            error = exc if isinstance(exc, ApiError) else ApiError(500, "internal error on the device service",
                                                                    code="internal_error")
            if not isinstance(exc, ApiError):
                log.error("generation failed mid-stream", exc_info=exc)
            yield error_event(error.body())
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # the device has stopped (at most one step after the cancel)


def _model(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tandem"}


def _images_response(call: ImagesCall, prepared: Prepared, made: list[MadeImage]) -> dict[str, Any]:
    import base64

    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(image.png).decode("ascii")} for image in made],
        "background": "opaque", "output_format": "png", "size": prepared.size, "usage": USAGE,
        "tandem": [image.tandem for image in made],
    }
    if call.identity:
        body["safety_identifier"] = call.identity
    return body


# --- the listener, in the caller's event loop ---------------------------------------------------
class _InLoopServer(uvicorn.Server):
    """uvicorn without its signal handlers: the device service handles SIGTERM/SIGINT itself
    (services/common/lifecycle.py until_signalled) and stops this server in its own order."""

    def capture_signals(self):  # type: ignore[override]
        from contextlib import nullcontext

        return nullcontext()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the pack loads (a busy port fails in a second, one line)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP said outright: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto
    # says TCP, and a keep-alive client's delayed ACK then held every response's body 40 ms
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise PortInUse(f"--http-port: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.setblocking(False)
    return sock


class HttpListener:
    """uvicorn serving `app` on an already bound socket as a task of the running loop."""

    def __init__(self, app: Any, sock: socket.socket, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None, state: HttpState | None = None, grace_s: int = 30):
        import ssl

        self.sock = sock
        self.state = state or HttpState()  # the app's: draining is set here at SIGTERM
        config = uvicorn.Config(
            app, loop="none", http="h11", ws="none", lifespan="off", log_config=None, log_level="warning",
            access_log=False, proxy_headers=False, server_header=False, timeout_graceful_shutdown=grace_s,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
            ssl_ca_certs=tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE)
        self.server = _InLoopServer(config)
        self.task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # its startup failed: raise why
                raise RuntimeError("the HTTP listener stopped at startup")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float = 30.0) -> None:
        """Drains, then stops: while images are in flight (up to `grace_s`) new generations are
        answered 503 (so a client learns to go elsewhere, as gRPC health's NOT_SERVING tells), then
        the listener closes and uvicorn lets open connections end."""
        if self.task is None:
            return
        self.state.draining = True
        deadline = time.monotonic() + grace_s
        while self.state.in_flight() and time.monotonic() < deadline and not self.task.done():
            await asyncio.sleep(0.05)
        self.server.should_exit = True
        await self.task
