"""Wire messages ↔ domain dataclasses, shared by the services. No defaults here: a message's
fields map by name onto tandem.resolve.PartialRequest's (the codec's inside its Codec message),
and what a message leaves unset is resolved by tandem.resolve."""

from __future__ import annotations

from typing import Any

from tandem.handoff import CodecSpec
from tandem.packs import ModelPack
from tandem.request import GenerationRequest
from tandem.resolve import CODEC_FIELDS, PartialRequest, resolve
from tandem.v1 import edge_pb2

# The edge's Generate stream is never silent longer than this: with no event to send it sends an
# empty GenerateResponse (a keepalive). A device gives up on an edge silent for EDGE_STALL_S.
EDGE_KEEPALIVE_S = 0.25
EDGE_STALL_S = 2.0  # 8 keepalives missed: a frozen or cut-off edge, not a busy one


def request_from_proto(message: edge_pb2.GenerateRequest, pack: ModelPack) -> tuple[GenerationRequest, CodecSpec]:
    """Validated request and codec. Unset (zero) optional fields take the pack's defaults;
    raises RequestError naming the bad field."""
    request, codec = resolve(partial_from_proto(message), pack.request_defaults())
    pack.latent_shape(request.height, request.width)  # RequestError when not a multiple of the VAE factor
    return request, codec


def partial_from_proto(message: edge_pb2.GenerateRequest) -> PartialRequest:
    """The request as sent. A field with presence (``optional``: the split, where 0 is a value) is
    unset when absent; any other is unset at its zero value (proto3 has no other way to say so)."""
    values: dict[str, Any] = {}
    for name in PartialRequest.__dataclass_fields__:
        holder: Any = message.codec if name in CODEC_FIELDS else message
        value = getattr(holder, name)
        present = holder.HasField(name) if holder.DESCRIPTOR.fields_by_name[name].has_presence else bool(value)
        values[name] = value if present else None
    return PartialRequest(**values)


def partial_to_proto(partial: PartialRequest) -> edge_pb2.GenerateRequest:
    """An unset field travels as unset, for the receiver to resolve with its own pack."""
    message = edge_pb2.GenerateRequest()
    message.codec.SetInParent()
    for name, value in partial.given().items():
        setattr(message.codec if name in CODEC_FIELDS else message, name, value)
    return message


def request_to_proto(request: GenerationRequest, codec: CodecSpec) -> edge_pb2.GenerateRequest:
    return partial_to_proto(PartialRequest.of(request, codec))
