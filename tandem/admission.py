"""What one request may cost an edge: the image sides it serves and a cap on pixel-steps.
The edge enforces these limits (from its flags) and advertises them; a device checks a request
against an edge's advertised limits before it sends it (services/ue_client/images.py).

The engine runs every admitted request at every iteration, so one request's size sets how long
everyone's iteration takes, and its size times its edge steps how long it holds a slot. Both are
bounded here, before the request is queued. Pure logic (no gRPC, no torch): the servicer maps
`RequestError` to INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.request import MAX_IMAGE_SIDE, MAX_STEPS, GenerationRequest, RequestError

# Default limits relative to the pack's own image size: sides from a quarter to twice it (4x its
# pixels: every iteration a larger request shares costs everyone in it about that much more),
# and edge work up to that of the largest image at the pack's default steps, or of an image of
# the pack's size at the most steps a request may have, whichever is more.
MIN_SIDE_DIVISOR = 4
MAX_SIDE_FACTOR = 2


class LimitError(ValueError):
    """Inconsistent limits; the message names the server flag."""


@dataclass(frozen=True)
class EdgeLimits:
    min_side: int
    max_side: int
    max_cost: int  # height * width * split, in pixel-steps; 0 = no cap

    def __post_init__(self) -> None:
        if not 8 <= self.min_side <= MAX_IMAGE_SIDE:
            raise LimitError(f"--min-image-side: must be in 8..{MAX_IMAGE_SIDE}, got {self.min_side}")
        if not self.min_side <= self.max_side <= MAX_IMAGE_SIDE:
            raise LimitError(f"--max-image-side: must be in {self.min_side} (the minimum)..{MAX_IMAGE_SIDE}, "
                             f"got {self.max_side}")
        if self.max_cost < 0:
            raise LimitError(f"--max-request-cost: must be >= 0, got {self.max_cost}")

    @classmethod
    def for_pack(cls, default_size: int, vae_factor: int, default_steps: int, min_side: int | None = None,
                 max_side: int | None = None, max_cost: int | None = None) -> "EdgeLimits":
        """The given limits, each defaulting to one relative to the pack's default image size."""
        if min_side is None:
            min_side = max(8, vae_factor, default_size // MIN_SIDE_DIVISOR // vae_factor * vae_factor)
        if max_side is None:
            max_side = min(MAX_IMAGE_SIDE, default_size * MAX_SIDE_FACTOR)
        if max_cost is None:
            max_cost = max(max_side * max_side * default_steps, default_size * default_size * MAX_STEPS)
        return cls(min_side, max_side, max_cost)

    def check(self, request: GenerationRequest) -> GenerationRequest:
        """`request` if this edge serves it; RequestError naming the field otherwise."""
        for name in ("height", "width"):
            side = getattr(request, name)
            if not self.min_side <= side <= self.max_side:
                raise RequestError(name, f"this edge serves image sides {self.min_side}..{self.max_side} px, "
                                         f"got {side}")
        cost = cost_of(request)
        if self.max_cost and cost > self.max_cost:
            raise RequestError("split", f"height x width x split = {cost} pixel-steps is above this edge's "
                                        f"cap of {self.max_cost} (--max-request-cost); run fewer steps on "
                                        f"the edge or ask for a smaller image")
        return request


def cost_of(request: GenerationRequest) -> int:
    """The edge work of a request: its pixels times the steps it runs here."""
    return request.height * request.width * request.split
