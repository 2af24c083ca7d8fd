"""The device side of a split generation: get the handoff from the edge, run the late steps on
the small pack (+ the user's LoRA), decode. If the edge is unreachable, refuses, or fails
mid-stream, finish the whole image locally and say why: no request is lost."""

from __future__ import annotations

import asyncio
import logging

from services.security import ClientSecurity
from services.ue_client.transport import EdgeError, fetch_handoff
from tandem.codec.container import CodecError
from tandem.handoff import CodecSpec, decode_handoff
from tandem.packs import ModelPack
from tandem.pipeline import GenerationResult, PhaseTimer, StepCallback, finish_on_device, resume, start
from tandem.request import GenerationRequest

log = logging.getLogger("tandem.ue")
DEFAULT_TIMEOUT = 120.0


def generate_via_edge(
    pack: ModelPack,
    request: GenerationRequest,
    codec: CodecSpec,
    edge_address: str | None,
    timeout: float = DEFAULT_TIMEOUT,
    on_step: StepCallback | None = None,
    security: ClientSecurity | None = None,
) -> GenerationResult:
    """Steps [0, k) on the edge at `edge_address`, [k, T) here; all here when k = 0 or no edge."""
    request.validate()
    codec.validate()
    pack.use_user(request.user)
    timer = PhaseTimer()
    payload, fallback, state = b"", None, None
    if request.split > 0 and edge_address:
        try:
            edge = asyncio.run(fetch_handoff(edge_address, request, codec, timeout, on_step, security))
            payload = edge.payload
            timer.seconds.update(edge.seconds)
            with timer.phase("handoff"):
                state = resume(pack, decode_handoff(payload))
        except (EdgeError, CodecError) as exc:
            fallback = f"edge failed ({exc}); finished locally on the device model"
            log.info(fallback)
    elif request.split > 0:
        fallback = "no edge server given; finished locally on the device model"
    if state is None:
        with timer.phase("ue_steps"):
            state = start(pack, request)
    edge_steps = 0 if fallback else request.split
    image = finish_on_device(pack, state, request.steps, timer, on_step)
    return GenerationResult(
        image=image,
        latent=state.latent.cpu(),
        edge_steps=edge_steps,
        ue_steps=request.steps - edge_steps,
        handoff_bytes=len(payload) if not fallback else 0,
        seconds=timer.seconds,
        fallback=fallback,
    )
