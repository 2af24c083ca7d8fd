"""The device side of a split generation: get the handoff from the edge, run the late steps on
the small pack (+ the user's LoRA), decode. If the edge is unreachable, refuses, fails mid-stream,
or sends a handoff that does not answer this request (services/ue_client/integrity.py), finish the
whole image locally and say why: no request is lost, and no edge's output is trusted blindly."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from services.common.channels import ChannelPool
from services.common.security import ClientSecurity
from services.ue_client.integrity import HandoffLimits, HandoffRejected, check_header
from services.ue_client.transport import EdgeError, EdgeHandoff, EventCallback, LinkCallback, fetch_handoff
from tandem.codec.container import CodecError, unpack_container
from tandem.handoff import CodecSpec, decode_handoff
from tandem.packs import ModelPack
from tandem.phases import Phase
from tandem.pipeline import GenerationResult, PhaseTimer, StepCallback, finish_on_device, resume, start
from tandem.request import GenerationRequest, RequestError
from tandem.sampling.denoise import DenoiseState
from tandem.sampling.schedule import make_schedule

log = logging.getLogger("tandem.ue")
DEFAULT_TIMEOUT = 120.0
T = TypeVar("T")
# on_state(state): the device's own trajectory, on the worker thread: once when the device holds
# it (the edge's handoff resumed, or its own start), then after every device step. Read-only: it
# must not change the state (previews decode a copy of its prediction, services/ue_client/previews.py).
StateCallback = Callable[[DenoiseState], None]


class Cancelled(Exception):
    """The caller cancelled; the worker stopped after the step it was in."""


@dataclass
class CancelFlag:
    """Set by the caller's thread, read by the worker after every step (cooperative: a torch call
    cannot be interrupted, so at most the step in flight finishes after the cancel)."""

    event: threading.Event = field(default_factory=threading.Event)

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def check(self, where: str = "a phase boundary") -> None:
        if self.event.is_set():
            raise Cancelled(f"cancelled at {where}")


async def stop_after_current_step(job: asyncio.Future, cancel: CancelFlag) -> None:
    """The caller left: the worker stops after its current step, and the caller keeps the device's
    turn until it has, so abandoned work neither delays the next request nor runs beside it."""
    cancel.set()
    while not job.done():
        try:
            await asyncio.wait({job})
        except asyncio.CancelledError:  # cancelled again (e.g. shutdown): still wait, at most one step
            continue
    if not job.cancelled() and job.exception() is not None and not isinstance(job.exception(), Cancelled):
        log.warning("cancelled generation ended with %r", job.exception())


async def events_until_done(job: asyncio.Future, events: asyncio.Queue[T]) -> AsyncGenerator[T, None]:
    """`events` until `job` is done and they are drained: progress is yielded as it comes, and none queued is lost at the end."""
    while not job.done() or not events.empty():
        if events.empty():
            getter = asyncio.ensure_future(events.get())
            try:
                await asyncio.wait({job, getter}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when cancelled while waiting: no getter is left to take a later event
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield getter.result()
        else:
            yield events.get_nowait()


def generate_via_edge(
    pack: ModelPack,
    request: GenerationRequest,
    codec: CodecSpec,
    edge_address: str | None,
    timeout: float = DEFAULT_TIMEOUT,
    on_step: StepCallback | None = None,
    security: ClientSecurity | None = None,
    cancel: CancelFlag | None = None,
    on_link: LinkCallback | None = None,
    channels: ChannelPool | None = None,
    on_state: StateCallback | None = None,
    round_started: Awaitable[EdgeHandoff] | None = None,
) -> GenerationResult:
    """Steps [0, k) on the edge at `edge_address`, [k, T) here; all here when k = 0 or no edge.
    With `cancel`, raises Cancelled at the next step after it is set. `on_link` gets what the
    edge round measured of the link (services/ue_client/link.py). With `channels` (a long-lived
    caller's pool, made on another thread's event loop), the edge call runs on that loop over
    the pool's channel; without, on a loop and channel of its own. `on_state`: see
    StateCallback. `round_started`: this request's edge round (`edge_round`) already under way
    on `channels`' loop, used instead of starting one (a caller with several images starts
    their rounds together so that the edge batches them); its failure falls back as any."""
    request.validate()
    codec.validate()
    if cancel is not None:
        cancel.check("the start")  # cancelled while it waited for its turn
    pack.use_user(request.user)
    step = _cancellable(on_step, cancel)
    timer = PhaseTimer()
    payload, fallback, state = b"", None, None
    if request.split > 0 and edge_address:
        try:
            state, payload = _resume_from_edge(pack, request, codec, edge_address, timeout, step, security, timer,
                                               cancel, on_link, channels, round_started)
        except (EdgeError, CodecError) as exc:
            fallback = f"edge failed ({exc}); finished locally on the device model"
        except HandoffRejected as exc:
            fallback = f"edge handoff rejected ({exc}); finished locally on the device model"
        if fallback:
            log.info(fallback)
    elif request.split > 0:
        fallback = "no edge server given; finished locally on the device model"
    if cancel is not None:
        cancel.check("the device phase")
    if state is None:
        with timer.phase(Phase.DEVICE_STEPS):
            state = start(pack, request)
    edge_steps = 0 if fallback else request.split
    if on_state is not None:
        on_state(state)
        step = _watching(step, state, on_state)
    image = finish_on_device(pack, state, request.steps, timer, step)
    return GenerationResult(
        image=image,
        latent=state.latent.cpu(),
        edge_steps=edge_steps,
        device_steps=request.steps - edge_steps,
        handoff_bytes=len(payload) if not fallback else 0,
        seconds=timer.seconds,
        fallback=fallback,
    )


def edge_round(pack: ModelPack, request: GenerationRequest, codec: CodecSpec, address: str, timeout: float,
               on_event: EventCallback | None = None, security: ClientSecurity | None = None,
               on_link: LinkCallback | None = None,
               channels: ChannelPool | None = None) -> Coroutine[Any, Any, EdgeHandoff]:
    """Steps [0, k) of `request` on the edge at `address`, as generate_via_edge runs them (the
    handoff capped at what the request may need): a coroutine to run on `channels`' loop."""
    limits = HandoffLimits.for_request(request, pack.latent_shape(request.height, request.width), codec)
    return fetch_handoff(address, request, codec, timeout, on_event, security, limits, on_link, channels)


def _resume_from_edge(pack: ModelPack, request: GenerationRequest, codec: CodecSpec, address: str, timeout: float,
                      on_event: EventCallback | None, security: ClientSecurity | None, timer: PhaseTimer,
                      cancel: CancelFlag | None, on_link: LinkCallback | None = None,
                      channels: ChannelPool | None = None,
                      round_started: Awaitable[EdgeHandoff] | None = None) -> tuple[DenoiseState, bytes]:
    """The edge's handoff, checked against `request` before anything in it is used."""
    latent_shape = pack.latent_shape(request.height, request.width)
    if round_started is not None and channels is None:
        raise ValueError("an edge round already started runs on a ChannelPool's loop: pass its channels")
    work = _until_cancelled(round_started if round_started is not None else
                            edge_round(pack, request, codec, address, timeout, on_event, security, on_link, channels),
                            cancel)
    if channels is None:
        edge = asyncio.run(work)
    else:  # grpc.aio channels work only on the loop they were made on: the pool's
        edge = asyncio.run_coroutine_threadsafe(work, channels.loop).result()
    timer.seconds.update(edge.seconds)
    # Decoding the payload is transfer (it grows with the bytes); the device's own prompt encoding
    # inside resume is device work, so the scheduler's link model never sees text-encoder time.
    with timer.phase(Phase.TRANSFER):
        meta, _ = unpack_container(edge.payload)
        check_header(meta, request, latent_shape)  # before any tensor is decoded
        schedule = make_schedule(request.sampler, request.steps, pack.sampler_config)
        try:
            handoff = decode_handoff(edge.payload, request, schedule)
        except CodecError as exc:
            raise HandoffRejected(str(exc)) from exc
    with timer.phase(Phase.DEVICE_STEPS):
        try:
            return resume(pack, handoff), edge.payload
        except (RequestError, RuntimeError, ValueError) as exc:  # torch shape/dtype faults included
            raise HandoffRejected(f"could not resume it: {exc}") from exc


async def _until_cancelled(work: Awaitable[T], cancel: CancelFlag | None, poll_s: float = 0.05) -> T:
    """`work`'s result; with `cancel`, stopped within `poll_s` of the cancel even while the edge
    is silent (queued, or stalling), so a cancelled call never waits out the edge's deadline."""
    task = asyncio.ensure_future(work)
    while cancel is not None and not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if cancel.is_set() and not task.done():
            task.cancel()
            await asyncio.wait({task})
            raise Cancelled("cancelled while waiting for the edge")
    return await task


def _watching(on_step: StepCallback | None, state: DenoiseState, on_state: StateCallback) -> StepCallback:
    """`on_step`, then `on_state(state)` after each device step (once the step's cancel check passed)."""

    def step(phase: str, done: int, total: int) -> None:
        if on_step is not None:
            on_step(phase, done, total)
        if phase == Phase.DEVICE_STEPS:
            on_state(state)

    return step


def _cancellable(on_step: StepCallback | None, cancel: CancelFlag | None) -> StepCallback | None:
    if cancel is None:
        return on_step

    def step(phase: str, done: int, total: int) -> None:
        if on_step is not None:
            on_step(phase, done, total)
        cancel.check(f"{phase} {done}/{total}")

    return step
