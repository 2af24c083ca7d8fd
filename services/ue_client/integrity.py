"""What a device checks before it trusts a handoff from an edge.

An edge (hostile, buggy, or one a scheduler was tricked into naming) could answer with another
user's prompt and seed, a 512 px latent for a 64 px request, a schedule with fewer steps than
asked, or an endless stream of chunks. A handoff's header carries digests of the request it
answers and of the schedule it was made with, and is otherwise fixed by (latent shape, codec, k,
T): so the device knows the exact size to expect before the first chunk, caps the stream at it,
compares the header with its own request and the latent shape its pack expects before decoding
anything, and `decode_handoff` checks the schedule against the one the device computes itself.
Any mismatch raises HandoffRejected with the reason; the caller finishes the image locally.
Pure logic: no gRPC, no model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tandem.codec.spec import CodecSpec, handoff_size
from tandem.echo import shown
from tandem.request import GenerationRequest, as_float32

MAX_CHUNKS = 1024  # the edge sends 256 KiB chunks: a 2048 px handoff is a few of them


class HandoffRejected(Exception):
    """The handoff does not answer this device's request; str() is the reason."""


@dataclass(frozen=True)
class HandoffLimits:
    """Caps on one handoff stream, from the request it must answer."""

    max_bytes: int
    max_chunks: int = MAX_CHUNKS

    @classmethod
    def for_request(cls, request: GenerationRequest, latent_shape: tuple[int, int, int],
                    codec: CodecSpec) -> "HandoffLimits":
        """Exactly the size of the handoff that answers `request` with `codec`."""
        channels, height, width = latent_shape
        return cls(max_bytes=handoff_size(channels, height, width, wire_codec(codec), request.steps, request.split))

    def check_chunk(self, index: int, count: int, total_bytes: int, received: int) -> None:
        """Before a chunk is kept: its declared sizes and what has arrived so far stay in bounds."""
        if total_bytes > self.max_bytes:
            raise HandoffRejected(f"handoff declares {total_bytes} bytes; this request's can be at most {self.max_bytes}")
        if not 1 <= count <= self.max_chunks:
            raise HandoffRejected(f"handoff declares {count} chunks; at most {self.max_chunks} are accepted")
        if index >= count or received > total_bytes:
            raise HandoffRejected(f"handoff chunk {index} goes past the declared {count} chunks / {total_bytes} bytes")


def wire_codec(codec: CodecSpec) -> CodecSpec:
    """The codec as the edge receives it: the merge ratio crosses the wire as a float32."""
    return replace(codec, merge_ratio=as_float32(codec.merge_ratio))


def check_header(meta: dict[str, Any], request: GenerationRequest, latent_shape: tuple[int, int, int]) -> None:
    """The handoff's header answers `request` (before any tensor is decoded)."""
    if meta.get("request") != request.digest():
        raise HandoffRejected("handoff answers another request (its request digest differs)")
    if meta.get("step") != request.split:
        raise HandoffRejected(f"handoff stops at step {shown(meta.get('step'))}, the request splits at {request.split}")
    if meta.get("latent_shape") != list(latent_shape):
        raise HandoffRejected(f"handoff latent shape {shown(meta.get('latent_shape'))} is not the expected {list(latent_shape)}")
