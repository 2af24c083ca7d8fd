"""Wire messages ↔ domain dataclasses, shared by the services (no logic beyond defaults)."""

from __future__ import annotations

from typing import cast

from tandem.codec.spec import Window
from tandem.handoff import DEFAULT_STRATEGY, CodecSpec
from tandem.packs import ModelPack
from tandem.request import GenerationRequest
from tandem.v1 import edge_pb2


def request_from_proto(message: edge_pb2.GenerateRequest, pack: ModelPack) -> tuple[GenerationRequest, CodecSpec]:
    """Validated request and codec. Unset (zero) optional fields take the pack's defaults;
    raises RequestError naming the bad field."""
    manifest = pack.manifest
    size = pack.default_image_size
    steps = message.steps or manifest.default_steps
    request = GenerationRequest(
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        steps=steps,
        split=message.split if message.HasField("split") else steps // 2,
        sampler=message.sampler or manifest.default_sampler,
        guidance_scale=message.guidance_scale or manifest.default_guidance,
        seed=message.seed,
        height=message.height or size,
        width=message.width or size,
        user=message.user or None,
    ).validate()
    pack.latent_shape(request.height, request.width)  # RequestError when not a multiple of the VAE factor
    codec_message = message.codec
    codec = CodecSpec(
        encoding=codec_message.encoding or "fp16",
        merge_ratio=float(codec_message.merge_ratio),
        strategy=codec_message.merge_strategy or DEFAULT_STRATEGY,
        window=cast(Window, codec_message.merge_window or "local"),  # validate() checks it
    ).validate()
    return request, codec


def request_to_proto(request: GenerationRequest, codec: CodecSpec) -> edge_pb2.GenerateRequest:
    return edge_pb2.GenerateRequest(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        split=request.split,
        sampler=request.sampler,
        guidance_scale=request.guidance_scale,
        seed=request.seed,
        height=request.height,
        width=request.width,
        user=request.user or "",
        codec=codec_to_proto(codec),
    )


def codec_to_proto(codec: CodecSpec) -> edge_pb2.Codec:
    return edge_pb2.Codec(
        encoding=codec.encoding, merge_ratio=codec.merge_ratio, merge_strategy=codec.strategy, merge_window=codec.window
    )
