"""The EdgeService gRPC servicer: validation, engine submission, event streaming. No denoising
or scheduling logic lives here."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping

import grpc

from services.common.metrics import record_call
from services.common.tokens import bearer_token, token_user
from services.common.wire import EDGE_KEEPALIVE_S, request_from_proto
from services.edge_server.batching import Closed, QueueFull
from services.edge_server.engine import EdgeEngine, Failed, Finished, Progress, Queued
from services.edge_server.limits import StreamLimiter, user_key
from tandem.admission import EdgeLimits
from tandem.codec.spec import ENCODINGS, MAX_MERGE_RATIO
from tandem.request import MAX_PROMPT_CHARS, MAX_STEPS, RequestError
from tandem.sampling.schedule import SAMPLERS, noise_process
from tandem.v1 import edge_pb2, edge_pb2_grpc

CHUNK_BYTES = 256 * 1024


class EdgeServicer(edge_pb2_grpc.EdgeServiceServicer):
    """Registered before the model loads (so health answers NOT_SERVING meanwhile); calls get
    UNAVAILABLE until `attach` hands it the engine."""

    def __init__(self, engine: EdgeEngine | None = None, chunk_bytes: int = CHUNK_BYTES,
                 max_streams_per_user: int = 0, tokens: Mapping[str, str] | None = None):
        self.engine: EdgeEngine | None = None
        self.chunk_bytes = chunk_bytes
        self.limiter = StreamLimiter(max_streams_per_user)
        self.tokens = dict(tokens or {})  # checked by the token interceptor; here to key the cap
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: EdgeEngine, limits: EdgeLimits | None = None) -> None:
        self.pack = engine.pack
        self.metrics = engine.metrics
        defaults = self.pack.request_defaults()
        self.limits = limits or EdgeLimits.for_pack(defaults.image_size, self.pack.vae_scale_factor, defaults.steps)
        self.engine = engine

    def _caller(self, request, context) -> str:
        """Whose a call is (see user_key): its stream slot, its turn in the engine's fair queue and
        its per-user caps on waiting and running requests."""
        user = token_user(self.tokens, bearer_token(context.invocation_metadata())) if self.tokens else None
        return user_key(request.user, context.peer(), user)

    async def _require_engine(self, context) -> None:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model still loading; retry shortly")

    async def GetCapabilities(self, request, context):
        await self._require_engine(context)
        config = self.engine.batcher.config
        return edge_pb2.GetCapabilitiesResponse(
            pack_name=self.pack.name,
            latent_channels=self.pack.latent_channels,
            vae_scale_factor=self.pack.vae_scale_factor,
            default_image_size=self.pack.default_image_size,
            samplers=list(SAMPLERS),
            encodings=list(ENCODINGS),
            max_merge_ratio=MAX_MERGE_RATIO,
            max_steps=MAX_STEPS,
            min_image_side=self.limits.min_side,
            max_image_side=self.limits.max_side,
            max_request_cost=self.limits.max_cost,
            max_prompt_chars=MAX_PROMPT_CHARS,
            max_batch_size=config.max_batch_size,
            max_queue=config.max_queue,
            noise_process_json=json.dumps(noise_process(self.pack.sampler_config), sort_keys=True),
            device=str(self.pack.device),
        )

    async def Generate(self, request, context):
        await self._require_engine(context)
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        recorded = False  # see record_call
        entry = None
        holder = None  # whose stream slot this call holds
        try:
            try:
                domain_request, codec = request_from_proto(request, self.pack)
                self.limits.check(domain_request)
            except RequestError as exc:
                code = grpc.StatusCode.INVALID_ARGUMENT
                recorded = record_call(self.metrics, code.name, began)
                await context.abort(code, str(exc))
            key = self._caller(request, context)
            if not self.limiter.try_acquire(key):
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                recorded = record_call(self.metrics, code.name, began)
                await context.abort(code, f"{key} already has {self.limiter.max_per_user} streams in flight "
                                          f"(the per-user limit); retry when one finishes")
            holder = key
            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def sink(event) -> None:  # called on the engine thread
                loop.call_soon_threadsafe(events.put_nowait, event)

            try:
                entry = self.engine.submit(domain_request, codec, sink, timeout=context.time_remaining(), owner=key)
            except QueueFull as exc:  # the whole queue, or this caller's share of it (OwnerQueueFull)
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                recorded = record_call(self.metrics, code.name, began)
                await context.abort(code, str(exc))
            except Closed as exc:
                code = grpc.StatusCode.UNAVAILABLE
                recorded = record_call(self.metrics, code.name, began)
                await context.abort(code, str(exc))
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), EDGE_KEEPALIVE_S)
                except TimeoutError:  # waiting or busy, not gone (services/common/wire.py)
                    yield edge_pb2.GenerateResponse()
                    continue
                if isinstance(event, Queued):
                    yield edge_pb2.GenerateResponse(queued=edge_pb2.Queued(position=event.position))
                elif isinstance(event, Progress):
                    yield edge_pb2.GenerateResponse(progress=edge_pb2.Progress(step=event.step, total=event.total))
                elif isinstance(event, Finished):
                    for chunk in self._chunks(event.payload):
                        yield chunk
                    return
                elif isinstance(event, Failed):
                    code = grpc.StatusCode[event.code]
                    recorded = record_call(self.metrics, code.name, began)
                    await context.abort(code, event.message)
        except (asyncio.CancelledError, GeneratorExit):  # cancelled while awaiting, or closed at a yield
            code = grpc.StatusCode.CANCELLED
            if entry is not None:
                self.engine.cancel(entry)
            raise
        finally:
            if holder is not None:
                self.limiter.release(holder)
            if not recorded:
                record_call(self.metrics, code.name, began)

    def _chunks(self, payload: bytes):
        count = max(1, -(-len(payload) // self.chunk_bytes))
        for index in range(count):
            data = payload[index * self.chunk_bytes : (index + 1) * self.chunk_bytes]
            yield edge_pb2.GenerateResponse(
                handoff=edge_pb2.HandoffChunk(data=data, index=index, count=count, total_bytes=len(payload))
            )
