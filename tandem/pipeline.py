"""The hybrid pipeline as numbered stages, each usable on its own by the services:

1. encode the prompt            (each side with its own text encoder)
2. start a request              (schedule + seeded initial latent)
3. run denoising steps          (batched: `tandem.sampling.denoise.advance`)
4. hand off                     (latent + sampler state → codec bytes → latent + sampler state)
5. resume on the other pack     (same schedule, the device's UNet + LoRA)
6. decode the final latent      (VAE → RGB)

`HybridPipeline` chains them in one process: the reference the networked system must match.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from tandem.handoff import CodecSpec, Handoff, decode_handoff, encode_handoff
from tandem.memory import give_back_freed
from tandem.packs import ModelPack, check_pair
from tandem.phases import Phase
from tandem.request import GenerationRequest, RequestError
from tandem.sampling.denoise import DenoiseState, Guidance, advance, initial_latent
from tandem.sampling.schedule import make_schedule

# on_step(phase, done, total) is called after every step of a phase: progress bars hook in here.
StepCallback = Callable[[str, int, int], None]


@torch.no_grad()
def encode_prompt(pack: ModelPack, prompt: str, negative_prompt: str, guidance_scale: float) -> Guidance:
    """1. Text conditioning on `pack`'s own encoder (an unconditional row only when guided). The
    pack's aliases apply first (the demo pack reads "an" as "a"), for every client, not just the CLI."""
    prompt, negative_prompt = pack.manifest.normalize_prompt(prompt), pack.manifest.normalize_prompt(negative_prompt)
    texts = [prompt, negative_prompt] if guidance_scale != 1.0 else [prompt]
    with pack.encoding_text() as text:  # loaded on the first prompt this pack encodes
        tokens = text.tokenizer(
            texts,
            padding="max_length",
            max_length=text.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        hidden = text.encoder(tokens.input_ids.to(pack.device))[0].float()
        del text  # the pack's reference is the last one: a transient encoder goes as the block ends
    return Guidance(cond=hidden[0], uncond=hidden[1] if len(texts) == 2 else None, scale=float(guidance_scale))


def start(pack: ModelPack, request: GenerationRequest) -> DenoiseState:
    """2. A request at step 0 on `pack`: its schedule and its seeded noise."""
    schedule = make_schedule(request.sampler, request.steps, pack.sampler_config)
    shape = pack.latent_shape(request.height, request.width)
    guidance = encode_prompt(pack, request.prompt, request.negative_prompt, request.guidance_scale)
    latent = initial_latent(request.seed, shape, schedule).to(pack.device)
    return DenoiseState(schedule=schedule, step=0, latent=latent, guidance=guidance)


def run_steps(
    pack: ModelPack, state: DenoiseState, until: int, phase: str = "steps", on_step: StepCallback | None = None
) -> None:
    """3. Advances one request alone to step `until` (the services batch many with `advance`)."""
    total = until - state.step
    for done in range(1, total + 1):
        advance(pack.unet, [state])
        if on_step is not None:
            on_step(phase, done, total)


def run_in_batches(pack: ModelPack, states: list[DenoiseState], until: int, batch: int) -> None:
    """Advances many requests (all at the same step) to step `until`, `batch` per UNet call:
    offline measurement (quality profiles), where every request starts together."""
    for lo in range(0, len(states), batch):
        chunk = states[lo : lo + batch]
        while chunk and chunk[0].step < until:
            advance(pack.unet, chunk)


def decode_in_batches(pack: ModelPack, states: list[DenoiseState], batch: int) -> np.ndarray:
    """The final latents of `states` as RGB images, `batch` per VAE call."""
    return np.concatenate([decode_batch(pack, torch.stack([s.latent for s in states[lo : lo + batch]]))
                           for lo in range(0, len(states), batch)])


def make_handoff(state: DenoiseState, request: GenerationRequest) -> Handoff:
    """4a. What the device needs to continue exactly where this side stopped."""
    prev = state.prev_denoised
    return Handoff(
        request=request,
        schedule=state.schedule,
        step=state.step,
        latent=state.latent.detach().float().cpu(),
        prev_denoised=None if prev is None else prev.detach().float().cpu(),
    )


def resume(pack: ModelPack, handoff: Handoff) -> DenoiseState:
    """5. The handed-off request on `pack`: its own text encoding, the carried sampler state."""
    request = handoff.request
    expected = pack.latent_shape(request.height, request.width)
    if tuple(handoff.latent.shape) != expected:
        raise RequestError("handoff", f"latent shape {tuple(handoff.latent.shape)} does not fit {expected}")
    guidance = encode_prompt(pack, request.prompt, request.negative_prompt, request.guidance_scale)
    prev = handoff.prev_denoised
    return DenoiseState(
        schedule=handoff.schedule,
        step=handoff.step,
        latent=handoff.latent.to(pack.device),
        guidance=guidance,
        prev_denoised=None if prev is None else prev.to(pack.device),
    )


def decode(pack: ModelPack, latent: torch.Tensor) -> np.ndarray:
    """6. The final latent as an RGB image, uint8 [H, W, 3]."""
    return decode_batch(pack, latent[None])[0]


@torch.no_grad()
def decode_batch(pack: ModelPack, latents: torch.Tensor) -> np.ndarray:
    """Final latents [N, C, h, w] as RGB images, uint8 [N, H, W, 3], in one VAE call."""
    scaled = latents.to(pack.device, pack.dtype) / pack.latent_scaling
    shift = getattr(pack.vae.config, "shift_factor", None)
    if shift:
        scaled = scaled + shift
    images = pack.vae.decode(scaled).sample.float()
    images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def warm_up(pack: ModelPack) -> None:
    """One request's work at the pack's defaults, untimed, before a service serves: prompt
    encoding, one step and one decode, so the first user's request pays no first-call costs
    (allocator growth, kernel selection) that later requests do not; the cost profile the
    scheduler predicts with is measured warm."""
    from tandem.resolve import PartialRequest, resolve

    request = resolve(PartialRequest("warm-up", split=0), pack.request_defaults(), validate=False).request
    state = start(pack, request)
    run_steps(pack, state, 1)
    decode(pack, state.latent)
    if pack.transient_text:
        give_back_freed()


@dataclass
class GenerationResult:
    """An image and how it was made."""

    image: np.ndarray
    latent: torch.Tensor
    edge_steps: int
    device_steps: int
    handoff_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None  # why the device finished alone, if it had to


class PhaseTimer:
    """Seconds per phase (keys are the phases' names, tandem.phases), summed over its intervals."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, phase: Phase) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            name = Phase(phase).value
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin


def finish_on_device(pack: ModelPack, state: DenoiseState, total_steps: int, timer: PhaseTimer,
                     on_step: StepCallback | None = None) -> np.ndarray:
    """The device's part after its first step: the late steps up to ``total_steps`` and the
    decode, timed as device steps and decode; the decode shows as one decode step."""
    with timer.phase(Phase.DEVICE_STEPS):
        run_steps(pack, state, total_steps, Phase.DEVICE_STEPS, on_step)
    with timer.phase(Phase.DECODE):
        if pack.transient_text:  # a lean device: the steps' temporaries go before the decode's arrive
            give_back_freed()
        image = decode(pack, state.latent)
    if on_step is not None:
        on_step(Phase.DECODE, 1, 1)
    return image


class HybridPipeline:
    """Edge pack for steps [0, k), device pack (+ the user's LoRA) for [k, T), in one process."""

    def __init__(self, edge: ModelPack, ue: ModelPack):
        check_pair(edge, ue)
        self.edge = edge
        self.ue = ue

    def generate(
        self, request: GenerationRequest, codec: CodecSpec = CodecSpec(), on_step: StepCallback | None = None
    ) -> GenerationResult:
        request.validate()
        codec.validate()
        timer = PhaseTimer()
        payload = b""
        if request.split == 0:  # all on the device: no edge work, nothing on the wire
            self.ue.use_user(request.user)
            with timer.phase(Phase.DEVICE_STEPS):
                state = start(self.ue, request)
        else:
            with timer.phase(Phase.EDGE_STEPS):
                edge_state = start(self.edge, request)
                run_steps(self.edge, edge_state, request.split, Phase.EDGE_STEPS, on_step)
            with timer.phase(Phase.TRANSFER):
                payload = encode_handoff(make_handoff(edge_state, request), codec)
                handoff = decode_handoff(payload, request, make_schedule(request.sampler, request.steps,
                                                                         self.ue.sampler_config))
            self.ue.use_user(request.user)
            with timer.phase(Phase.DEVICE_STEPS):
                state = resume(self.ue, handoff)
        image = finish_on_device(self.ue, state, request.steps, timer, on_step)
        return GenerationResult(
            image=image,
            latent=state.latent.cpu(),
            edge_steps=request.split,
            device_steps=request.steps - request.split,
            handoff_bytes=len(payload),
            seconds=timer.seconds,
        )
