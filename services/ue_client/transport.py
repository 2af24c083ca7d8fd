"""Talking to the edge server: stream a request's handoff, with a deadline on every call."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from services.common.security import ClientSecurity, aio_channel, call_metadata
from services.common.wire import request_to_proto
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


def channel_options(max_message: int = 8 * 1024 * 1024) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_message)]


async def fetch_handoff(
    address: str,
    request: GenerationRequest,
    codec: CodecSpec,
    timeout: float,
    on_event: EventCallback | None = None,
    security: ClientSecurity | None = None,
    limits: HandoffLimits | None = None,
    on_link: LinkCallback | None = None,
) -> EdgeHandoff:
    """Runs steps [0, k) on the edge and returns the handoff payload; raises EdgeError, or
    HandoffRejected when the stream goes past `limits` (the request's largest possible handoff).
    A complete handoff's link measurement also goes to `on_link`.

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
    # gRPC itself refuses a message larger than the whole allowed handoff, before buffering it.
    options = channel_options(min(8 * 1024 * 1024, limits.max_bytes + MESSAGE_OVERHEAD))
    async with aio_channel(address, security, options) as channel:
        stub = edge_pb2_grpc.EdgeServiceStub(channel)
        try:
            async for response in stub.Generate(request_to_proto(request, codec), timeout=timeout,
                                                metadata=call_metadata(security)):
                kind = response.WhichOneof("event")
                marks.setdefault("first_event", time.perf_counter())
                if kind == "queued":
                    _notify(on_event, Phase.QUEUE, response.queued.position, 0)
                elif kind == "progress":
                    marks.setdefault("edge_start", time.perf_counter())
                    if "transfer_start" not in marks:
                        marks["last_progress"] = time.perf_counter()
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


async def get_capabilities(address: str, timeout: float,
                           security: ClientSecurity | None = None) -> edge_pb2.GetCapabilitiesResponse:
    async with aio_channel(address, security, channel_options()) as channel:
        try:
            return await edge_pb2_grpc.EdgeServiceStub(channel).GetCapabilities(
                edge_pb2.GetCapabilitiesRequest(), timeout=timeout, metadata=call_metadata(security))
        except grpc.aio.AioRpcError as exc:
            raise EdgeError(exc.code().name, exc.details() or "") from exc


def _notify(callback: EventCallback | None, phase: str, done: int, total: int) -> None:
    if callback is not None:
        callback(phase, done, total)
