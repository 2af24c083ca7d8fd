"""The images endpoint's generations, on the device service's own parts: its pack, its edges and
their pooled channels, its link book, its metrics, and its turn (one generation at a time on the
device, shared with the gRPC servicer). No ASGI here: services/ue_client/http_app.py maps HTTP
onto `prepare` and `run`.

Each image is the gRPC path's: the body becomes a PartialRequest, then the very message a
``tandem generate --ue`` call sends (tandem.resolve → services.common.wire) and the device
service's own check of it (services/ue_client/call.py), then ``generate_via_edge``; the PNG is
encoded as the servicer encodes it. So the same fields and seed give the same bytes as the CLI.

`n` images are n requests (seeds seed..seed+n−1) whose edge rounds start together, before the
device's turn, so that the edge batches them; the device then finishes them one by one. A refusal
by the edge for load (RESOURCE_EXHAUSTED: its queue is full, or the caller's stream quota) is a
429 here, where the gRPC path would finish the image alone: an HTTP client retries on 429.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import grpc

from services.common.channels import ChannelPool
from services.common.security import ClientSecurity
from services.common.wire import partial_to_proto
from services.ue_client.call import DeviceCall, parse_call
from services.ue_client.device import CancelFlag, edge_round, generate_via_edge, stop_after_current_step
from services.ue_client.link import LinkBook, LinkSample
from services.ue_client.metrics import DeviceMetrics
from services.ue_client.openai_api import ApiError, ImagesCall, check_previews, from_request_error, invalid, size_text
from services.ue_client.previews import ApproxDecoder, PreviewTaker, VaeDecoder, png_bytes, preview_decoder
from services.ue_client.transport import EdgeError, get_capabilities
from tandem.admission import EdgeLimits, LimitError
from tandem.packs import ModelPack
from tandem.phases import Phase
from tandem.pipeline import GenerationResult
from tandem.request import RequestError
from tandem.resolve import PartialRequest, resolve
from tandem.v1 import device_pb2

log = logging.getLogger("tandem.ue.http")
CAPABILITIES_TTL_S = 30.0
CAPABILITIES_TIMEOUT_S = 2.0
PLAN_TIMEOUT_S = 5.0
RETRY_AFTER_S = 1.0
# Scheduler request fields → the body's, for its INVALID_ARGUMENT answers (the CLI maps them to flags).
_PLAN_FIELDS = {"latency_budget_seconds": "latency_budget", "personalized_user": "lora", "user_id": "user"}


class DeviceParts(Protocol):
    """What the listener shares with the gRPC servicer (services/ue_client/servicer.py DeviceServicer)."""

    pack: ModelPack | None
    edges: tuple[str, ...]
    edge_security: ClientSecurity | None
    channels: ChannelPool | None
    metrics: DeviceMetrics
    links: LinkBook


@dataclass(frozen=True)
class Scheduler:
    """The scheduler a `latency_budget` is planned with (the device service's --scheduler)."""

    address: str
    security: ClientSecurity | None = None
    device_class: str = "laptop-gpu"


class Quota:
    """Images in flight (waiting for the edge, for the device's turn, or running) per caller and in
    all: past either cap a request is a 429, before it costs anything."""

    def __init__(self, per_user: int, total: int):
        self.per_user, self.total = per_user, total
        self.held: dict[str, int] = {}

    def take(self, who: str, n: int) -> Callable[[], None]:
        mine, everyone = self.held.get(who, 0), sum(self.held.values())
        if self.per_user and mine + n > self.per_user:
            raise ApiError(429, f"{who} already has {mine} image(s) in flight here, and {n} more would pass the "
                                f"per-user quota of {self.per_user}; retry when they finish",
                           code="quota_exceeded", retry_after=RETRY_AFTER_S)
        if self.total and everyone + n > self.total:
            raise ApiError(429, f"this device has {everyone} image(s) in flight, and {n} more would pass its cap of "
                                f"{self.total}; retry shortly", code="device_busy", retry_after=RETRY_AFTER_S)
        self.held[who] = mine + n
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.held[who] -= n
                if not self.held[who]:
                    del self.held[who]

        return release


@dataclass
class Prepared:
    """A request checked and admitted, its edge rounds done (or failed: those images finish alone)."""

    call: ImagesCall
    calls: list[DeviceCall]
    rounds: list[asyncio.Future | None]
    size: str
    release: Callable[[], None]
    plan: Any = None  # services.common.scheduler_client.ReceivedPlan
    plan_note: str = ""
    measured: list[LinkSample] = field(default_factory=list)


@dataclass(frozen=True)
class MadeImage:
    png: bytes
    tandem: dict[str, Any]  # how it was made: the response's extra field


OnPreview = Callable[[int, int, bytes], None]  # (image, preview index, PNG), on the event loop
OnImage = Callable[[int, "MadeImage"], None]  # (image, what it made), on the event loop


class ImagesService:
    def __init__(self, parts: DeviceParts, turn: asyncio.Lock, scheduler: Scheduler | None = None,
                 quota: Quota | None = None, previews: str = "approx"):
        """`previews`: how a streamed preview is decoded, "approx" or "vae" (services/ue_client/previews.py)."""
        self.parts = parts
        self.previews = previews
        self._decoder: ApproxDecoder | VaeDecoder | None = None
        self.turn = turn  # the servicer's: HTTP and gRPC generations take turns on the one device
        self.scheduler = scheduler
        self.quota = quota or Quota(per_user=8, total=32)
        self._capabilities: dict[str, tuple[float, EdgeLimits | None]] = {}
        self._background: set[asyncio.Task] = set()

    @property
    def decoder(self) -> ApproxDecoder | VaeDecoder:
        if self._decoder is None or self._decoder.pack is not self.pack:
            self._decoder = preview_decoder(self.previews, self.pack)
        return self._decoder

    @property
    def pack(self) -> ModelPack:
        if self.parts.pack is None:
            raise ApiError(503, "the device's model pack is still loading; retry shortly", code="pack_loading",
                           retry_after=5.0)
        return self.parts.pack

    # --- before any answer: checks, plan, quota, edge rounds ---------------------------------
    async def prepare(self, call: ImagesCall, caller: str) -> Prepared:
        """Everything that can refuse the request with a status: the fields against the pack and the
        edge's served sizes, the plan, the quota, and the edge rounds (started together, awaited).
        Cancelled (the client left): the rounds are cancelled, the edge's slots freed."""
        pack = self.pack
        partial, plan, note = call.partial, None, ""
        if call.latency_budget > 0:
            plan, note = await self._plan(call)
            if plan is not None:
                partial = partial.with_plan(plan)
        edge_choice = plan.edge_address if plan is not None and plan.edge_address in self.parts.edges else ""
        calls = [await self._device_call(pack, replace(partial, seed=call.image(i).seed), edge_choice)
                 for i in range(call.n)]  # image i: seed + i
        first = calls[0].request
        check_previews(call, first.steps, first.split)
        release = self.quota.take(caller, call.n)
        prepared = Prepared(call, calls, [None] * call.n, size_text(first.width, first.height), release, plan, note)
        try:
            self._start_rounds(prepared)
            await self._until_rounds_end(prepared)
        except BaseException:
            self.close(prepared)
            raise
        return prepared

    async def _device_call(self, pack: ModelPack, partial: PartialRequest, edge: str) -> DeviceCall:
        """The device service's own check of the message `tandem generate --ue` would send, then
        the edge's served sizes and cost cap (RequestError → 400 naming the body's field)."""
        try:
            resolve(partial, pack.request_defaults())  # first: the proto takes only values in range
            message = device_pb2.DeviceServiceGenerateRequest(request=partial_to_proto(partial), edge_address=edge)
            device_call = parse_call(message, pack, self.parts.edges)
            if device_call.edge and device_call.request.split > 0:
                limits = await self._edge_limits(device_call.edge)
                if limits is not None:
                    limits.check(device_call.request)
        except RequestError as exc:
            raise from_request_error(exc) from None
        return device_call

    async def _edge_limits(self, edge: str) -> EdgeLimits | None:
        """The image sides and cost the edge serves (its GetCapabilities, kept 30 s); None when it
        does not answer (then it is not asked again for 30 s either, and the image may finish alone)."""
        now = time.monotonic()
        known = self._capabilities.get(edge)
        if known is not None and now - known[0] < CAPABILITIES_TTL_S:
            return known[1]
        limits = None
        try:
            caps = await get_capabilities(edge, CAPABILITIES_TIMEOUT_S, self.parts.edge_security, self.parts.channels)
            limits = EdgeLimits(caps.min_image_side, caps.max_image_side, caps.max_request_cost)
        except (EdgeError, LimitError) as exc:
            log.info("edge %s gave no capabilities (%s): its sizes are not checked before the call", edge, exc)
        self._capabilities[edge] = (now, limits)
        return limits

    async def _plan(self, call: ImagesCall) -> tuple[Any, str]:
        """The scheduler's plan for the budget (as the CLI asks it); (None, why) when it gives none
        for an outage, 400 when it refuses a field."""
        if self.scheduler is None:
            raise invalid("latency_budget", "this device service has no scheduler to plan it (its --scheduler)")
        from services.common.scheduler_client import request_plan

        errors: list[str] = []
        estimate = self.parts.links.estimate(self.parts.edges[0] if self.parts.edges else None)
        scheduler = self.scheduler
        plan = await asyncio.to_thread(
            request_plan, scheduler.address, scheduler.device_class, bandwidth_bps=estimate.bandwidth_bps,
            rtt_s=estimate.rtt_s, personalized_user=call.partial.user, latency_budget_s=call.latency_budget,
            prompt_chars=len(call.partial.prompt or ""), user_id=call.identity or "", timeout=PLAN_TIMEOUT_S,
            on_error=errors.append, security=scheduler.security)
        if plan is not None:
            return plan, ""
        reason = errors[0] if errors else "no answer"
        code, _, detail = reason.partition(": ")
        if code == "INVALID_ARGUMENT":
            name, _, message = detail.partition(": ")
            param = _PLAN_FIELDS.get(name, "latency_budget")
            raise invalid(param, message or detail)
        log.info("scheduler %s gave no plan (%s); using the pack's defaults", scheduler.address, reason)
        return None, f"scheduler {scheduler.address} gave no plan ({reason}); the pack's defaults were used"

    def _start_rounds(self, prepared: Prepared) -> None:
        """Every image's edge round at once, on the service's channels (the edge batches them)."""
        parts = self.parts
        if parts.channels is None:
            return  # rounds then run inside generate_via_edge, one by one

        def on_link(sample: LinkSample, edge: str) -> None:
            prepared.measured.append(sample)
            parts.links.record(edge, sample)

        for i, device_call in enumerate(prepared.calls):
            edge = device_call.edge
            if edge and device_call.request.split > 0:
                prepared.rounds[i] = asyncio.ensure_future(edge_round(
                    self.pack, device_call.request, device_call.codec, edge, device_call.edge_timeout, None,
                    parts.edge_security, functools.partial(on_link, edge=edge), parts.channels))

    async def _until_rounds_end(self, prepared: Prepared) -> None:
        """Waits for the rounds; 429 when the edge refused one for load."""
        rounds = [r for r in prepared.rounds if r is not None]
        if not rounds:
            return
        await asyncio.wait(rounds)
        for task in rounds:
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, EdgeError) and exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED.name \
                    and isinstance(exc.__cause__, grpc.aio.AioRpcError):
                raise ApiError(429, f"the edge is busy: {exc.message}", code="edge_busy", retry_after=RETRY_AFTER_S)

    def close(self, prepared: Prepared) -> None:
        """Whatever the request still holds: its rounds (cancelled: the edge stops them) and quota."""
        for task in prepared.rounds:
            if task is not None and not task.done():
                task.cancel()
        prepared.release()

    # --- the device's part, one image at a time -------------------------------------------------
    async def run(self, prepared: Prepared, on_preview: OnPreview | None = None,
                  on_image: OnImage | None = None) -> list[MadeImage]:
        """The images, in order. With `on_preview`, the request's previews are taken and each is
        handed over as soon as it is decoded; `on_image` gets each image as it is done. Cancelled
        (the client left): the image running stops at its next step, the others never start, and
        the request's rounds and quota are given back."""
        try:
            made = []
            for i, device_call in enumerate(prepared.calls):
                made.append(await self._one(prepared, i, device_call, on_preview))
                if on_image is not None:
                    on_image(i, made[-1])
            return made
        finally:
            self.close(prepared)

    async def _one(self, prepared: Prepared, index: int, call: DeviceCall,
                   on_preview: OnPreview | None) -> MadeImage:
        pack, parts = self.pack, self.parts
        loop = asyncio.get_running_loop()
        cancel = CancelFlag()
        after_cancel = [0]

        def on_step(phase: str, done: int, total: int) -> None:  # worker thread
            if phase == Phase.DEVICE_STEPS and cancel.is_set():
                after_cancel[0] += 1

        previews = None
        if prepared.call.partial_images and on_preview is not None:
            def sink(i: int, png: bytes) -> None:  # worker thread → this loop, in order
                loop.call_soon_threadsafe(on_preview, index, i, png)
                parts.metrics.http_previews.inc()

            previews = PreviewTaker(self.decoder, prepared.call.partial_images, call.request.steps, sink)
        async with self.turn:
            job = asyncio.ensure_future(asyncio.to_thread(
                generate_via_edge, pack, call.request, call.codec, call.edge, call.edge_timeout, on_step,
                parts.edge_security, cancel, None, parts.channels, previews, prepared.rounds[index]))
            try:
                await asyncio.wait({job})
            finally:
                if not job.done():  # cancelled: the worker stops after its step, holding the turn till then
                    await stop_after_current_step(job, cancel)
                    parts.metrics.steps_after_cancel.inc(after_cancel[0])
                    parts.metrics.http_images.labels(outcome="cancelled").inc()
        try:
            result = job.result()
        except Exception:
            parts.metrics.http_images.labels(outcome="failed").inc()
            raise
        parts.metrics.http_images.labels(outcome="completed").inc()
        _observe(parts.metrics, result)
        decoder = self.decoder
        if isinstance(decoder, ApproxDecoder):  # every finished image sharpens the approximate previews
            decoder.learn(result.latent, result.image)
        self._report(prepared, result)
        return MadeImage(png_bytes(result.image), self._breakdown(prepared, call, result, previews))

    def _breakdown(self, prepared: Prepared, call: DeviceCall, result: GenerationResult,
                   previews: PreviewTaker | None) -> dict[str, Any]:
        request = call.request
        breakdown: dict[str, Any] = {
            "seed": request.seed, "steps": request.steps, "split": request.split, "sampler": request.sampler,
            "guidance_scale": request.guidance_scale, "codec": call.codec.encoding,
            "merge_ratio": call.codec.merge_ratio, "lora": request.user, "edge": call.edge,
            "edge_steps": result.edge_steps, "device_steps": result.device_steps,
            "handoff_bytes": result.handoff_bytes, "fallback": result.fallback,
            "seconds": {name: round(value, 6) for name, value in result.seconds.items()},
            "device_pack": self.pack.name,
        }
        if previews is not None:
            breakdown["previews"] = {"steps": list(previews.at or ()), "seconds": round(previews.seconds, 6),
                                     "decoder": self.previews}
        if prepared.plan is not None:
            plan = prepared.plan
            breakdown["plan"] = {"id": plan.plan_id, "predicted_seconds": dict(plan.predicted_seconds),
                                 "meets_budget": plan.meets_budget}
        elif prepared.plan_note:
            breakdown["plan"] = {"note": prepared.plan_note}
        return breakdown

    def _report(self, prepared: Prepared, result: GenerationResult) -> None:
        """What the image measured, back to the scheduler that planned it (best effort, not awaited)."""
        if prepared.plan is None or self.scheduler is None:
            return
        from services.common.scheduler_client import report

        plan, scheduler = prepared.plan, self.scheduler
        task = asyncio.ensure_future(asyncio.to_thread(
            report, scheduler.address, plan.plan_id, dict(result.seconds), result.edge_steps, result.device_steps,
            result.handoff_bytes, bool(result.fallback), timeout=PLAN_TIMEOUT_S, security=scheduler.security))
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _observe(metrics: DeviceMetrics, result: GenerationResult) -> None:
    """A finished image in the device's metrics, as the gRPC servicer counts its results."""
    for phase, seconds in result.seconds.items():
        metrics.phase_seconds.labels(phase=phase).observe(seconds)
    metrics.steps.inc(result.device_steps)
    if result.fallback:
        metrics.fallbacks.inc()
    if result.handoff_bytes:
        metrics.handoff_bytes.observe(result.handoff_bytes)
