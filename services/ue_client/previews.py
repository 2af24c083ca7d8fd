"""Streamed previews for the images endpoint: which steps, what a preview is, and the server-sent
events they travel in (OpenAI's ``image_generation.partial_image`` / ``image_generation.completed``).

A preview shows the sampler's prediction of the clean latent (x̂0, which every sampler step
leaves in ``DenoiseState.prev_denoised``) at that step; at the edge's handoff, the x̂0 the handoff
carries, else the latent itself. Two decoders (the device service's --http-previews):

- ``approx`` (the default): a linear map of x̂0's latent channels to RGB (plus a constant), at the
  latent's resolution and scaled up, the way diffusion UIs show cheap previews ("latent2rgb").
  Its coefficients are the pack's own, not borrowed: least squares against the pack's VAE, on
  every image the device finishes (its final latent and the pixels the VAE made of it); before
  the first, on the very first preview, which is then a real VAE decode (once per service).
  Microseconds per preview; blurry colour fields, honest ones.
- ``vae``: the pack's VAE decodes x̂0 at full size: the real picture, at a decode's cost per
  preview (at 64 px on a CPU about two and a half device steps: bench/http_overhead.py).

Either reads the state without changing it, so the final image is the one a request without
previews gets.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from PIL import Image

from tandem.packs import ModelPack
from tandem.sampling.denoise import DenoiseState

PreviewSink = Callable[[int, bytes], None]  # (partial_image_index, PNG): called on the worker thread
PreviewDecoder = Callable[[DenoiseState], np.ndarray]  # a state → an RGB uint8 preview, on the worker thread
DECODERS = ("approx", "vae")


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB uint8 image as PNG, encoded exactly as the gRPC servicer encodes its results (so the
    same image is the same bytes through either)."""
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def preview_steps(count: int, start: int, steps: int) -> tuple[int, ...]:
    """The steps after which a preview is taken: `count` evenly spaced over the steps the device
    holds before the last, from max(start, 1) (`start`: the step it holds first, k after a
    handoff; step 0 is pure noise) to steps - 1; the completed image closes the series. Fewer
    when there are not that many steps."""
    low = max(start, 1)
    span = steps - low
    count = min(count, span)
    if count <= 0:
        return ()
    return tuple(low + int(j * span / count + 0.5) for j in range(count))


class PreviewTaker:
    """A generation's on_state hook (services/ue_client/device.py StateCallback): decodes x̂0 at
    the preview steps and hands each PNG to `sink`. Runs on the worker thread."""

    def __init__(self, decoder: PreviewDecoder, count: int, steps: int, sink: PreviewSink):
        self.decoder, self.count, self.steps, self.sink = decoder, count, steps, sink
        self.at: tuple[int, ...] | None = None  # chosen when the device first holds the state
        self.taken = 0
        self.seconds = 0.0  # spent decoding and encoding previews

    def __call__(self, state: DenoiseState) -> None:
        if self.at is None:
            self.at = preview_steps(self.count, state.step, self.steps)
        if self.taken < len(self.at) and state.step == self.at[self.taken]:
            began = time.perf_counter()
            image = self.decoder(state)
            self.sink(self.taken, png_bytes(image))
            self.taken += 1
            self.seconds += time.perf_counter() - began


def predicted(state: DenoiseState):
    """x̂0 where the sampler has one, else the latent."""
    return state.prev_denoised if state.prev_denoised is not None else state.latent


class VaeDecoder:
    """``vae``: the pack's VAE on x̂0, full size."""

    def __init__(self, pack: ModelPack):
        self.pack = pack

    def __call__(self, state: DenoiseState) -> np.ndarray:
        from tandem.pipeline import decode

        return decode(self.pack, predicted(state))


class ApproxDecoder:
    """``approx``: RGB = x̂0's channels · W + b at each latent position, scaled up to the image's
    size; W and b fitted by least squares to the pack's VAE (see the module's docstring)."""

    KEPT = 16  # the finished images the fit uses (the newest)

    def __init__(self, pack: ModelPack):
        self.pack = pack
        self._lock = threading.Lock()
        self._finished: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=self.KEPT)
        self._seeded: list[tuple[np.ndarray, np.ndarray]] = []
        self._weights: np.ndarray | None = None  # [C + 1, 3]

    def learn(self, latent, image: np.ndarray) -> None:
        """A finished image: its final latent [C, h, w] and the VAE's pixels [H, W, 3]."""
        pair = _pair(np.asarray(latent.float().cpu()), image)
        with self._lock:
            self._finished.append(pair)
            self._weights = None  # refit at the next preview

    def weights(self) -> np.ndarray | None:
        """The fitted map; None before anything was learned."""
        with self._lock:
            if self._weights is None:
                pairs = list(self._finished) if len(self._finished) >= 2 else [*self._finished, *self._seeded]
                if not pairs:
                    return None
                features = np.concatenate([f for f, _ in pairs])
                targets = np.concatenate([t for _, t in pairs])
                self._weights = np.linalg.lstsq(features, targets, rcond=None)[0]
            return self._weights

    def __call__(self, state: DenoiseState) -> np.ndarray:
        latent = np.asarray(predicted(state).float().cpu())  # [C, h, w]
        channels, h, w = latent.shape
        weights = self.weights()
        if weights is None:  # nothing to fit yet: this preview is the VAE's, and the first fit's data
            from tandem.pipeline import decode

            image = decode(self.pack, predicted(state))
            with self._lock:
                self._seeded.append(_pair(latent, image))
                self._weights = None
            return image
        rgb = latent.reshape(channels, -1).T @ weights[:channels] + weights[channels]
        small = np.clip(rgb, 0, 255).round().astype(np.uint8).reshape(h, w, 3)
        factor = self.pack.vae_scale_factor
        return np.asarray(Image.fromarray(small).resize((w * factor, h * factor), Image.Resampling.BILINEAR))


def _pair(latent: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rows: each latent position's channels (and 1), and the mean colour of the
    image pixels it covers."""
    channels, h, w = latent.shape
    pixels = image.astype(np.float64).reshape(h, image.shape[0] // h, w, image.shape[1] // w, 3).mean(axis=(1, 3))
    features = np.concatenate([latent.reshape(channels, -1).T, np.ones((h * w, 1))], axis=1)
    return features.astype(np.float64), pixels.reshape(-1, 3)


def preview_decoder(kind: str, pack: ModelPack) -> VaeDecoder | ApproxDecoder:
    if kind not in DECODERS:
        raise ValueError(f"--http-previews: unknown {kind!r}; expected one of {', '.join(DECODERS)}")
    return ApproxDecoder(pack) if kind == "approx" else VaeDecoder(pack)


# --- server-sent events, shaped as OpenAI's image stream events ---------------------------------
def image_fields(png: bytes, size: str) -> dict[str, Any]:
    return {"b64_json": base64.b64encode(png).decode("ascii"), "created_at": int(time.time()), "size": size,
            "quality": "auto", "background": "opaque", "output_format": "png"}


USAGE = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}, "output_tokens": 0,
         "total_tokens": 0}  # a diffusion image is not billed in tokens


def partial_event(png: bytes, size: str, index: int) -> bytes:
    return sse("image_generation.partial_image", {**image_fields(png, size), "partial_image_index": index})


def completed_event(png: bytes, size: str, tandem: dict[str, Any], identity: str | None) -> bytes:
    event = {**image_fields(png, size), "usage": USAGE, "tandem": tandem}
    if identity:
        event["safety_identifier"] = identity
    return sse("image_generation.completed", event)


def error_event(body: dict[str, Any]) -> bytes:
    """An error after the stream began (the status was sent already): the openai package raises
    APIError with it."""
    return sse("error", body)


def sse(kind: str, data: dict[str, Any]) -> bytes:
    payload = {"type": kind, **data} if kind != "error" else data
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


class EventStream:
    """An ASGI response streaming `events` (bytes) as text/event-stream, that notices the client
    leaving while nothing is being sent (waiting for a step) and then stops the stream: cancelling
    its iterator, whose generation stops at its next step (services/ue_client/images.py)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[bool], None] | None = None):
        self.events = events
        self.on_close = on_close  # called with True when the client left before the end
        self.status_code = 200

    async def __call__(self, scope, receive, send) -> None:
        left = False

        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for chunk in self.events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streaming = asyncio.ensure_future(pump())
        watching = asyncio.ensure_future(until_disconnected(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
            left = watching.done() and not streaming.done()
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.wait({streaming, watching})
            closer = getattr(self.events, "aclose", None)
            if closer is not None:
                await closer()
            if self.on_close is not None:
                self.on_close(left)
        if not left and not streaming.cancelled() and streaming.exception() is not None:
            exc = streaming.exception()
            if not isinstance(exc, OSError):  # the client went away mid-send
                raise exc  # type: ignore[misc]


async def until_disconnected(receive) -> None:
    """Returns when the client has gone (after its request body was read, ASGI's receive
    answers only that)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
