"""The DeviceService gRPC servicer: parses a call, runs it on the device (through the edge it
names, else alone) one at a time, streams its progress and answers with the image. The
denoising lives in services/ue_client/device.py; the process around it in server.py."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager

import grpc
from PIL import Image

from services.common.channels import ChannelPool
from services.common.metrics import record_call
from services.common.security import ClientSecurity
from services.ue_client.call import choose_edge, parse_call
from services.ue_client.device import CancelFlag, events_until_done, generate_via_edge, stop_after_current_step
from services.ue_client.link import LinkBook, LinkSample
from services.ue_client.metrics import DeviceMetrics
from tandem.packs import ModelPack
from tandem.phases import Phase
from tandem.request import RequestError
from tandem.v1 import device_pb2, device_pb2_grpc

log = logging.getLogger("tandem.ue")


class DeviceServicer(device_pb2_grpc.DeviceServiceServicer):
    """Registered before the pack loads (so health answers NOT_SERVING meanwhile); calls get
    UNAVAILABLE until `attach` hands it the pack."""

    def __init__(self, metrics: DeviceMetrics, edges: Sequence[str] = (),
                 edge_security: ClientSecurity | None = None, pack: ModelPack | None = None,
                 channels: ChannelPool | None = None, max_waiting: int = 0):
        """`edges`: the only edges this service uses (the first is the default); its
        `edge_security` (e.g. --edge-token) goes to them and nowhere else. `channels`: the
        service's channels to its edges, on the server's event loop (None: one per request).
        `max_waiting`: gRPC calls that may wait for the device's turn (0: no bound); one more is
        answered RESOURCE_EXHAUSTED at once, not queued past its caller's deadline."""
        self.pack: ModelPack | None = pack
        self.edge_security = edge_security
        self.channels = channels
        self.metrics = metrics
        self.edges = tuple(edges)
        self.links = LinkBook()  # per edge, measured from every handoff received (services/ue_client/link.py)
        self.turn = asyncio.Lock()  # one generation at a time on this device: gRPC and HTTP calls take it
        self.max_waiting = max_waiting
        self.waiting = 0  # gRPC calls waiting for the turn (the HTTP path has its own quota)

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

            if self.max_waiting and self.turn.locked() and self.waiting >= self.max_waiting:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                recorded = record_call(self.metrics, code.name, began)
                await context.abort(code, f"the device is busy: {self.waiting} generations are waiting for its turn "
                                          f"(--max-waiting {self.max_waiting}); retry later")
            async with self._my_turn():
                job = asyncio.ensure_future(
                    asyncio.to_thread(generate_via_edge, self.pack, call.request, call.codec, call.edge,
                                      call.edge_timeout, on_step, self.edge_security, cancel, on_link,
                                      self.channels)
                )
                try:
                    async with aclosing(events_until_done(job, events)) as progress:
                        async for event in progress:
                            yield device_pb2.DeviceServiceGenerateResponse(progress=event)
                finally:  # left early: cancelled (CancelledError) or the stream closed (GeneratorExit)
                    if not job.done():
                        await stop_after_current_step(job, cancel)
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

    @asynccontextmanager
    async def _my_turn(self) -> AsyncIterator[None]:
        """The device's turn, counted among the waiting calls until it is this call's."""
        self.waiting += 1
        self.metrics.waiting.inc()
        try:
            await self.turn.acquire()
        finally:
            self.waiting -= 1
            self.metrics.waiting.dec()
        try:
            yield
        finally:
            self.turn.release()

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
