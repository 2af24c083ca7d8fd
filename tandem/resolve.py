"""A request's defaults, resolved in one place: every entry point (the wire, so the edge server
and the device service; the CLI; the edge's warm-up; profiling; the benches) states what it was
given as a :class:`PartialRequest` and calls :func:`resolve` with its pack's
:class:`RequestDefaults` (``pack.request_defaults()``, which onboarding reads too).

As diffusers resolves a pipeline call's defaults from its components' configs in one step, and
vLLM turns a prompt and its sampling parameters into one complete engine request before the
engine sees it: nothing downstream of :func:`resolve` fills a gap. A scheduler's plan fills the
fields a user left unset through :meth:`PartialRequest.with_plan`, before resolving.

Torch-free: the CLI resolves (and so checks) a request before any model code loads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, Protocol, TypeVar

from tandem.codec.spec import CodecSpec
from tandem.request import (
    DEFAULT_GUIDANCE,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    GenerationRequest,
    default_split,
    split_for,
)

# The codec's fields in a partial request (named as the wire's Codec message names them) -> CodecSpec's.
CODEC_FIELDS = {"encoding": "encoding", "merge_ratio": "merge_ratio", "merge_strategy": "strategy",
                "merge_window": "window"}


@dataclass(frozen=True)
class RequestDefaults:
    """What a request leaves unset becomes: a pack's manifest's (``ModelPack.request_defaults``;
    ``PackManifest.request_defaults`` before the pack loads). These class defaults are those of a
    pack that declares none."""

    steps: int = DEFAULT_STEPS
    sampler: str = DEFAULT_SAMPLER
    guidance_scale: float = DEFAULT_GUIDANCE
    image_size: int = DEFAULT_IMAGE_SIZE  # height and width


class Plan(Protocol):
    """The part of a scheduler's plan that sets a request's fields (services.common.scheduler_client.ReceivedPlan)."""

    @property
    def steps(self) -> int: ...

    @property
    def split(self) -> int: ...

    @property
    def encoding(self) -> str: ...

    @property
    def merge_ratio(self) -> float: ...

    @property
    def merge_strategy(self) -> str: ...


@dataclass(frozen=True)
class PartialRequest:
    """A request as given, None where unset: GenerationRequest's fields, then the codec's
    (CODEC_FIELDS). The wire (services/common/wire.py) and the CLI's flags map onto these fields
    by name, so a new request field is a field here and in GenerationRequest, the proto's, and
    its flag."""

    prompt: str | None = None
    steps: int | None = None
    split: int | None = None  # unset: half the steps (default_split), or the plan's share of them
    sampler: str | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    user: str | None = None
    encoding: str | None = None
    merge_ratio: float | None = None
    merge_strategy: str | None = None
    merge_window: str | None = None

    @classmethod
    def of(cls, request: GenerationRequest, codec: CodecSpec) -> PartialRequest:
        """A complete request as a partial one, every field set."""
        return cls(**{f.name: getattr(request, f.name) for f in fields(request)},
                   **{name: getattr(codec, attr) for name, attr in CODEC_FIELDS.items()})

    def given(self) -> dict[str, Any]:
        """The fields that are set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def with_plan(self, plan: Plan) -> PartialRequest:
        """The plan's T, k, codec, merge ratio and merge strategy where this request leaves them
        unset. A T given here keeps the plan's split fraction (``split_for``), not its k."""
        split = self.split
        if split is None:
            split = plan.split if self.steps in (None, plan.steps) else split_for(self.steps, plan.split / plan.steps)
        return replace(self, steps=_given(self.steps, plan.steps), split=split,
                       encoding=_given(self.encoding, plan.encoding),
                       merge_ratio=_given(self.merge_ratio, plan.merge_ratio),
                       merge_strategy=_given(self.merge_strategy, plan.merge_strategy))


class ResolvedRequest(NamedTuple):
    request: GenerationRequest
    codec: CodecSpec


def resolve(partial: PartialRequest, defaults: RequestDefaults, *, validate: bool = True) -> ResolvedRequest:
    """The complete request and codec: unset fields take the pack's ``defaults`` where a pack has
    a say (T, k, sampler, guidance, size), else the type's own (GenerationRequest, CodecSpec).
    With ``validate`` (the default), raises RequestError naming the first bad field, the
    request's before the codec's. ``validate=False`` is for a process's own measuring requests
    only (the edge's warm-up, profiling), whose step counts are counts of calls, not a user's T."""
    given = partial.given()
    steps = given.get("steps", defaults.steps)
    from_pack = {"steps": steps, "split": default_split(steps), "sampler": defaults.sampler,
                 "guidance_scale": defaults.guidance_scale, "height": defaults.image_size,
                 "width": defaults.image_size}
    request_fields = {f.name for f in fields(GenerationRequest)}
    request = GenerationRequest(**{"prompt": "", **from_pack,
                                   **{name: value for name, value in given.items() if name in request_fields}})
    if validate:
        request.validate()
    return ResolvedRequest(request, resolve_codec(partial, validate=validate))


def resolve_codec(partial: PartialRequest, *, validate: bool = True) -> CodecSpec:
    """The codec alone (no pack has a say in it: unset fields take CodecSpec's own defaults), so
    it can be checked before any pack is read."""
    given = partial.given()
    codec = CodecSpec(**{attr: given[name] for name, attr in CODEC_FIELDS.items() if name in given})
    return codec.validate() if validate else codec


T = TypeVar("T")


def _given(value: T | None, default: T) -> T:
    return default if value is None else value
