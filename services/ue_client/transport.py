"""Talking to the edge server: stream a request's handoff, with a deadline on every call.

Calls go over a ChannelPool's channel (services/common/channels.py: a long-lived process keeps
one per edge); without a pool, over a channel opened for that call alone (one-shot callers).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import grpc

from services.common.channels import ChannelPool
from services.common.security import ClientSecurity, call_metadata
from services.common.wire import EDGE_STALL_S, request_to_proto
from services.ue_client.integrity import HandoffLimits
from services.ue_client.link import LinkSample
from tandem.handoff import CodecSpec
from tandem.phases import Phase
from tandem.request import GenerationRequest
from tandem.v1 import edge_pb2, edge_pb2_grpc

# on_event(phase, done, total): queue (position), edge_steps (step of k), transfer (bytes).
EventCallback = Callable[[str, int, int], None]
LinkCallback = Callable[[LinkSample], None]  # what one round measured of the link (services/ue_client/link.py)
MAX_HANDOFF_BYTES = 64 * 1024 * 1024  # without a request's own limits (HandoffLimits)
MESSAGE_OVERHEAD = 64 * 1024  # a chunk message's framing around its data


class EdgeError(Exception):
    """The edge could not deliver the handoff; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class EdgeHandoff:
    payload: bytes
    seconds: dict[str, float] = field(default_factory=dict)  # queue, edge_steps, transfer
    link: LinkSample | None = None


@asynccontextmanager
async def _channel(address: str, security: ClientSecurity | None,
                   channels: ChannelPool | None) -> AsyncIterator[grpc.aio.Channel]:
    """The pool's channel to `address`, or without a pool one for this call, closed after it."""
    if channels is not None:
        yield channels.get(address, security)
        return
    async with ChannelPool() as own:
        yield own.get(address, security)


async def fetch_handoff(
    address: str,
    request: GenerationRequest,
    codec: CodecSpec,
    timeout: float,
    on_event: EventCallback | None = None,
    security: ClientSecurity | None = None,
    limits: HandoffLimits | None = None,
    on_link: LinkCallback | None = None,
    channels: ChannelPool | None = None,
    stall_s: float = EDGE_STALL_S,
) -> EdgeHandoff:
    """Runs steps [0, k) on the edge and returns the handoff payload; raises EdgeError, or
    HandoffRejected when the stream goes past `limits` (the request's largest possible handoff).
    A complete handoff's link measurement also goes to `on_link`. With `channels`, the call goes
    over its channel to `address` (no connection setup when that channel is open). An edge that
    sends nothing, not even its keepalive, for `stall_s` before its last step is given up
    (EdgeError UNAVAILABLE): a frozen or cut-off edge then costs that long, not the whole
    deadline. The handoff's bytes after the last step are bounded by the deadline alone.

    Timers: queue = call opened -> first progress (connecting, admission, step 1, waiting);
    edge_steps = first -> last progress (steps 2..k); transfer = last progress -> last handoff
    byte (the edge's encoding and the bytes on the wire: on a slow link the wire time is the
    link's, never the edge's steps')."""
    limits = limits or HandoffLimits(MAX_HANDOFF_BYTES)
    began = time.perf_counter()
    marks: dict[str, float] = {}
    chunks: list[bytes] = []
    received = 0
    expected_count = expected_total = None
    # One channel serves requests of every size, so this request's cap is checked here, on each
    # message as it arrives: one larger than the whole allowed handoff (plus framing) is refused
    # with gRPC's own status for it, before it is kept.
    max_message = limits.max_bytes + MESSAGE_OVERHEAD
    async with _channel(address, security, channels) as channel:
        call = edge_pb2_grpc.EdgeServiceStub(channel).Generate(
            request_to_proto(request, codec), timeout=timeout, metadata=call_metadata(security))
        try:
            responses = aiter(call)
            stepped = False  # the edge's last step is done: the rest is the handoff's bytes
            while True:
                try:
                    # Not once the steps are done: a chunk on a slow link can take longer than
                    # stall_s to arrive whole, and no keepalive can pass it; the deadline bounds it.
                    response = await asyncio.wait_for(anext(responses), None if stepped else stall_s)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise EdgeError("UNAVAILABLE", f"the edge sent nothing for {stall_s:g} s, not even its "
                                                   "keepalive: frozen or cut off") from None
                if (size := response.ByteSize()) > max_message:
                    raise EdgeError("RESOURCE_EXHAUSTED", f"received message larger than max ({size} vs. {max_message})")
                kind = response.WhichOneof("event")
                if kind is None:  # a keepalive: the edge is there (it times nothing)
                    continue
                marks.setdefault("first_event", time.perf_counter())
                if kind == "queued":
                    _notify(on_event, Phase.QUEUE, response.queued.position, 0)
                elif kind == "progress":
                    marks.setdefault("edge_start", time.perf_counter())
                    if "transfer_start" not in marks:
                        marks["last_progress"] = time.perf_counter()
                    stepped = response.progress.step >= response.progress.total
                    _notify(on_event, Phase.EDGE_STEPS, response.progress.step, response.progress.total)
                elif kind == "handoff":
                    chunk = response.handoff
                    marks.setdefault("transfer_start", time.perf_counter())
                    if chunk.index != len(chunks) or expected_count not in (None, chunk.count) \
                            or expected_total not in (None, chunk.total_bytes):
                        raise EdgeError("DATA_LOSS", f"handoff chunk {chunk.index} out of order")
                    received += len(chunk.data)
                    limits.check_chunk(chunk.index, chunk.count, chunk.total_bytes, received)
                    expected_count, expected_total = chunk.count, chunk.total_bytes
                    chunks.append(chunk.data)
                    _notify(on_event, Phase.TRANSFER, received, chunk.total_bytes)
        except grpc.aio.AioRpcError as exc:
            raise EdgeError(exc.code().name, exc.details() or "") from exc
        finally:
            call.cancel()  # refused or cancelled mid-stream: the edge stops sending (no-op once done)
    payload = b"".join(chunks)
    if expected_count is None or len(chunks) != expected_count or len(payload) != expected_total:
        raise EdgeError("DATA_LOSS", f"stream ended after {len(chunks)} of {expected_count or '?'} handoff chunks")
    end = time.perf_counter()
    transfer_start = marks.get("last_progress", marks.get("transfer_start", end))
    edge_start = marks.get("edge_start", transfer_start)
    link = LinkSample(len(payload), end - marks["last_progress"] if "last_progress" in marks else 0.0,
                      marks.get("first_event", end) - began)
    if on_link is not None:
        on_link(link)
    return EdgeHandoff(
        payload,
        {Phase.QUEUE.value: edge_start - began, Phase.EDGE_STEPS.value: transfer_start - edge_start,
         Phase.TRANSFER.value: end - transfer_start},
        link,
    )


async def get_capabilities(address: str, timeout: float, security: ClientSecurity | None = None,
                           channels: ChannelPool | None = None) -> edge_pb2.GetCapabilitiesResponse:
    async with _channel(address, security, channels) as channel:
        try:
            return await edge_pb2_grpc.EdgeServiceStub(channel).GetCapabilities(
                edge_pb2.GetCapabilitiesRequest(), timeout=timeout, metadata=call_metadata(security))
        except grpc.aio.AioRpcError as exc:
            raise EdgeError(exc.code().name, exc.details() or "") from exc


def _notify(callback: EventCallback | None, phase: str, done: int, total: int) -> None:
    if callback is not None:
        callback(phase, done, total)
