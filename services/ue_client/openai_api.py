"""OpenAI's images API as the device service speaks it: a request body → a Tandem request, and
errors in OpenAI's shape. Pure: no ASGI, no torch, no grpc (testable alone; the app is
services/ue_client/http_app.py, the generation services/ue_client/images.py).

``POST /v1/images/generations`` takes what the ``openai`` package sends (``model``, ``prompt``,
``n``, ``size``, ``response_format``, ``user``/``safety_identifier``, ``stream``,
``partial_images``) and Tandem's own knobs as extra body fields, the way vLLM-Omni takes its
sampling parameters (``client.images.generate(..., extra_body={"steps": 8})``): ``steps``,
``split``, ``seed``, ``guidance_scale``, ``sampler``, ``codec``, ``merge_ratio``,
``merge_strategy``, ``negative_prompt``, ``lora`` (the pack's personalized user: the gRPC
request's ``user``) and ``latency_budget`` (seconds: the scheduler then plans T, k and the codec).
Each is checked by the same code as the CLI's flag (tandem/resolve.py, tandem/request.py), so a
bad value gets the CLI's message, under the body field's name. ``user`` is the caller's identity
(quotas, the scheduler's plan), never a style or a LoRA.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from typing import Any

from tandem.echo import capped, shown
from tandem.request import MAX_SEED, RequestError
from tandem.resolve import PartialRequest

MAX_BODY_BYTES = 64 * 1024  # a prompt is at most 1,000 characters: 64 KiB is every field many times over
MAX_IMAGES = 4  # n
MAX_PARTIAL_IMAGES = 3  # OpenAI's own bound
MAX_IDENTITY_CHARS = 256
MODEL_ALIASES = ("tandem",)  # names the device's pack also answers to, besides its own
OWNER = "tandem"

# The request fields' names in the body, where they differ from PartialRequest's (the wire's).
BODY_FIELD = {"height": "size", "width": "size", "user": "lora", "encoding": "codec"}
# Tandem's knobs in the body → PartialRequest's field, with the JSON type each takes.
_KNOBS: dict[str, tuple[str, type | tuple[type, ...]]] = {
    "steps": ("steps", int),
    "split": ("split", int),
    "seed": ("seed", int),
    "guidance_scale": ("guidance_scale", (int, float)),
    "sampler": ("sampler", str),
    "codec": ("encoding", str),
    "merge_ratio": ("merge_ratio", (int, float)),
    "merge_strategy": ("merge_strategy", str),
    "negative_prompt": ("negative_prompt", str),
    "lora": ("user", str),
}
# OpenAI fields a Tandem image has no choice in: accepted at these values (None: any string),
# anything else is refused rather than silently not done.
_FIXED = {"background": ("auto", "opaque"), "output_format": ("png",), "quality": None, "style": None,
          "moderation": None}
_OPENAI = {"model", "prompt", "n", "size", "response_format", "user", "safety_identifier", "stream",
           "partial_images", "latency_budget", "output_compression", *_FIXED}
_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


class ApiError(Exception):
    """An answer other than 200, as OpenAI's API gives it: ``{"error": {"message", "type",
    "param", "code"}}`` with the HTTP status the ``openai`` package maps to its exception class."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_exceeded", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = capped(message)
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """400 naming ``param``; the message starts with it, as the CLI's starts with the flag."""
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def from_request_error(exc: RequestError) -> ApiError:
    """A request field's RequestError (tandem/request.py, the codec's, the device's user check)
    under the body field's name: the CLI's message, after the field as the body spells it."""
    return invalid(BODY_FIELD.get(exc.field, exc.field), exc.message)


@dataclass(frozen=True)
class ImagesCall:
    """One images request: `n` images, image i the request `partial` with seed + i."""

    partial: PartialRequest
    model: str
    n: int = 1
    stream: bool = False
    partial_images: int = 0
    identity: str | None = None  # `safety_identifier`, else `user`: quotas and the scheduler's plan
    latency_budget: float = 0.0  # 0: none (no plan)

    def image(self, index: int) -> PartialRequest:
        return replace(self.partial, seed=(self.partial.seed or 0) + index)


def parse_json(raw: bytes) -> Any:
    """The body as JSON; 400 when it is not (bad UTF-8, too deep, a number too long for Python)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int digits
        detail = str(exc) if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ApiError(400, f"the request body is not valid JSON ({capped(detail, 200)})",
                       code="invalid_json") from None


def served_models(pack_name: str) -> tuple[str, ...]:
    """The model names this device answers to: its pack's, then the aliases."""
    return (pack_name, *(alias for alias in MODEL_ALIASES if alias != pack_name))


def images_call(body: Any, pack_name: str) -> ImagesCall:
    """The body checked field by field (ApiError: 400 naming the field, 404 for an unknown model).
    Request fields are checked again with the pack's defaults by the caller (tandem.resolve): here,
    their JSON types and what needs no pack."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    unknown = sorted(key for key in body if key not in _OPENAI and key not in _KNOBS)
    if unknown:
        key = unknown[0]
        param = key if len(key) <= 80 and key.isascii() and key.isprintable() else "body"
        raise invalid(param, f"unknown parameter {shown(key)}", code="unknown_parameter")
    given = {key: value for key, value in body.items() if value is not None}  # null: unset, as OpenAI reads it
    model = _typed(given, "model", str, pack_name)
    if model not in served_models(pack_name):
        raise ApiError(404, f"model: {shown(model)} does not exist here; this device serves "
                            f"{', '.join(served_models(pack_name))}", param="model", code="model_not_found")
    if "prompt" not in given:
        raise invalid("prompt", "must not be empty")
    prompt = _typed(given, "prompt", str, None)
    n = _typed(given, "n", int, 1)
    if not 1 <= n <= MAX_IMAGES:
        raise invalid("n", f"must be in 1..{MAX_IMAGES} (one request per image), got {shown(n)}")
    fields: dict[str, Any] = {"prompt": prompt}
    size = _typed(given, "size", str, "auto")
    if size != "auto":
        match = _SIZE.match(size)
        if match is None:
            raise invalid("size", f"must be 'WIDTHxHEIGHT' in pixels (e.g. '64x64') or 'auto', got {shown(size)}")
        fields["width"], fields["height"] = int(match.group(1)), int(match.group(2))
    response_format = _typed(given, "response_format", str, "b64_json")
    if response_format == "url":
        raise invalid("response_format", "'url' is not served: this device keeps no images to link to; the image "
                                          "comes back in the response itself (b64_json, the default)")
    if response_format != "b64_json":
        raise invalid("response_format", f"unknown {shown(response_format)}; expected b64_json")
    for name, allowed in _FIXED.items():
        value = _typed(given, name, str, None)
        if value is not None and allowed is not None and value not in allowed:
            raise invalid(name, f"{shown(value)} is not served: a Tandem image is {' or '.join(allowed)}")
    if "output_compression" in given:
        raise invalid("output_compression", "applies to jpeg and webp; this device returns png")
    stream = _typed(given, "stream", bool, False)
    partial_images = _typed(given, "partial_images", int, 0)
    if not 0 <= partial_images <= MAX_PARTIAL_IMAGES:
        raise invalid("partial_images", f"must be in 0..{MAX_PARTIAL_IMAGES}, got {shown(partial_images)}")
    identity = _typed(given, "safety_identifier", str, None) or _typed(given, "user", str, None) or None
    if identity is not None and len(identity) > MAX_IDENTITY_CHARS:
        raise invalid("safety_identifier" if "safety_identifier" in given else "user",
                      f"longer than {MAX_IDENTITY_CHARS} characters")
    budget = float(_typed(given, "latency_budget", (int, float), 0.0))
    if not (math.isfinite(budget) and budget >= 0):  # the CLI's --latency-budget check (and finite)
        raise invalid("latency_budget", f"must be >= 0, got {budget:g}")
    for name, (field, kind) in _KNOBS.items():
        if name in given:
            fields[field] = _typed(given, name, kind, None)
    if fields.get("encoding") is not None and not fields["encoding"]:
        raise invalid("codec", "unknown ''; leave it out for the default")
    partial = PartialRequest(**fields)
    seed = partial.seed or 0
    if isinstance(seed, int) and 0 <= seed <= MAX_SEED and seed + n - 1 > MAX_SEED:
        raise invalid("seed", f"seed + n - 1 must be at most 2^63-1 (image i takes seed + i), got seed {seed} "
                              f"with n {n}")
    return ImagesCall(partial=partial, model=model, n=n, stream=stream, partial_images=partial_images if stream else 0,
                      identity=identity, latency_budget=budget)


def check_previews(call: ImagesCall, steps: int, split: int) -> None:
    """The previews a request can give: one at the edge's handoff (or after the device's first
    step when it runs all), then one per device step before the last (previews.preview_steps)."""
    most = steps - max(split, 1)
    if call.partial_images > most:
        raise invalid("partial_images", f"at most {most} for {steps} steps with {split} on the edge (a preview is "
                                        f"the handoff's or a device step's before the last), got {call.partial_images}")


def size_text(width: int, height: int) -> str:
    return f"{width}x{height}"


def _typed(given: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """``given[name]`` when it has the JSON type ``kind`` (a bool is no number), else 400."""
    if name not in given:
        return default
    value = given[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    else:
        ok = isinstance(value, kinds)
    if not ok:
        expected = {bool: "true or false", int: "an integer", str: "a string"}.get(kinds[0], "a number")
        raise invalid(name, f"must be {expected}, got {_kind(value)}", code="invalid_type")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, which no wire (nor reply) can carry
            raise invalid(name, f"must be UTF-8 text, got {shown(value)} (a lone surrogate)") from None
    return value


def _kind(value: Any) -> str:
    """A wrong-typed value, named and shown (cut)."""
    return f"{type(value).__name__} {shown(value)}"
