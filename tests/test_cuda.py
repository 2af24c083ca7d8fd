"""CUDA checks (issue 26, part 4; `pytest -m cuda`, run on a GPU host by scripts/gpu_check.sh): the
edge's batched steps in fp16, the device with --offload, GPU memory handed back after a large
request, and the same image as diffusers' StableDiffusionPipeline at fp16 tolerance. Tiny random
packs (tests/conftest.py).

Without a CUDA GPU every test skips, unless TANDEM_CUDA_TESTS_ON_CPU=1 (the dry run of
scripts/gpu_check.sh): then the two that need no CUDA (fp16 steps, diffusers) run on the CPU in
fp16, so their logic runs where no GPU is and cannot rot unseen."""

from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch

from services.edge_server.batching import BatchConfig
from services.edge_server.engine import EdgeEngine, Failed, Finished
from tandem.handoff import CodecSpec, decode_handoff, encode_handoff
from tandem.packs import ModelPack, load_pack
from tandem.pipeline import PhaseTimer, decode, finish_on_device, make_handoff, resume, run_steps, start
from tandem.request import GenerationRequest
from tandem.sampling.denoise import initial_latent
from tandem.sampling.schedule import make_schedule

pytestmark = pytest.mark.cuda

NO_CUDA = "needs a CUDA GPU: torch.cuda.is_available() is False"
PROMPTS = ["a red circle at the left on a blue background", "a green square at the top on a black background",
           "a yellow triangle at the center on a white background", "a blue circle at the bottom on a red background"]
# fp16 tolerances, ~10x what fp16 against fp32 (or diffusers' fp16 latents against our fp32 ones)
# gave on a CPU, several times under what a wrong prompt, guidance or sampler gives on the tiny
# packs: 8-bit images (a wrong one: 0.9-1.6 levels off on average), latents relative to their
# largest magnitude (fp16: 5e-4; another prompt: 5e-2).
IMAGE_MAX_LEVELS, IMAGE_MEAN_LEVELS = 4, 0.25
LATENT_RTOL = 5e-3
MiB = 2**20


def needs_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)


@pytest.fixture(scope="module")
def device() -> torch.device:
    """CUDA; the CPU (in fp16) when TANDEM_CUDA_TESTS_ON_CPU=1; else the test skips."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TANDEM_CUDA_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip(f"{NO_CUDA} (TANDEM_CUDA_TESTS_ON_CPU=1 runs the fp16 checks on the CPU)")


def load_fp16(path, device: torch.device, **kw) -> ModelPack:
    """On CUDA load_pack picks fp16 itself (checked); a CPU computes fp32 unless told."""
    pack = load_pack(path, device=device, dtype=None if device.type == "cuda" else torch.float16, **kw)
    assert pack.dtype == torch.float16 and pack.device.type == device.type
    return pack


@pytest.fixture(scope="module")
def edge16(tiny_packs, device) -> ModelPack:
    return load_fp16(tiny_packs["large"], device)


def request(i: int = 0, **kw) -> GenerationRequest:
    base = dict(prompt=PROMPTS[i % len(PROMPTS)], steps=8, split=4, guidance_scale=3.0, seed=10 + i, height=32, width=32)
    return GenerationRequest(**{**base, **kw})


def assert_close_latents(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    error = (got.float().cpu() - want.float().cpu()).abs().max().item()
    scale = want.abs().max().item()
    assert error <= LATENT_RTOL * scale, f"{what}: max |difference| {error:.4g} > {LATENT_RTOL} × {scale:.4g}"


def assert_close_images(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, what
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= IMAGE_MAX_LEVELS and diff.mean() <= IMAGE_MEAN_LEVELS, \
        f"{what}: differs by up to {diff.max()} levels, {diff.mean():.3f} on average"


def serve(engine: EdgeEngine, requests: list[GenerationRequest], codec: CodecSpec) -> list[bytes]:
    """The handoff payloads of `requests`, submitted together and stepped by the caller's thread."""
    events: list[list] = [[] for _ in requests]
    for r, sink in zip(requests, events):
        engine.submit(r, codec, sink.append)
    for _ in range(10 * max(r.split for r in requests) + 10):  # a bound, not a timing: no hang
        if all(any(isinstance(e, (Finished, Failed)) for e in sink) for sink in events):
            break
        engine.step()
    finished = [next((e for e in sink if isinstance(e, (Finished, Failed))), None) for sink in events]
    assert all(isinstance(f, Finished) for f in finished), finished
    return [f.payload for f in finished]  # type: ignore[union-attr]


def test_edge_steps_run_batched_in_fp16_and_match_fp32(edge16, large_pack):
    """The edge engine batches four requests into one fp16 UNet call per step; each handoff equals
    that request run alone in fp32 on the CPU, at fp16 tolerance (batch-mates change nothing)."""
    assert {p.dtype for p in edge16.unet.parameters()} == {torch.float16}
    assert {p.device.type for p in edge16.unet.parameters()} == {edge16.device.type}
    engine = EdgeEngine(edge16, BatchConfig(coalesce_s=0.0))
    requests = [request(i) for i in range(4)]
    payloads = serve(engine, requests, CodecSpec("fp32"))
    assert engine.stats.batch_sizes[4] == requests[0].split  # every step of the four: one call
    for i, (r, payload) in enumerate(zip(requests, payloads)):
        handoff = decode_handoff(payload, r, make_schedule(r.sampler, r.steps, edge16.sampler_config))
        reference = start(large_pack, r)
        run_steps(large_pack, reference, r.split)
        assert torch.isfinite(handoff.latent).all()
        assert_close_latents(handoff.latent, reference.latent, f"request {i}'s latent after {r.split} fp16 steps")


def device_image(pack: ModelPack, payload: bytes, r: GenerationRequest) -> np.ndarray:
    """What the device service does with a handoff: resume on its own pack, late steps, decode."""
    handoff = decode_handoff(payload, r, make_schedule(r.sampler, r.steps, pack.sampler_config))
    return finish_on_device(pack, resume(pack, handoff), r.steps, PhaseTimer())


def test_the_device_with_offload_makes_the_same_image_holding_its_weights_off_the_gpu(edge16, tiny_packs):
    needs_cuda()
    r = request(1, steps=8, split=3)
    state = start(edge16, r)
    run_steps(edge16, state, r.split)
    payload = encode_handoff(make_handoff(state, r), CodecSpec("fp16"))
    gc.collect()
    before = torch.cuda.memory_allocated()
    offloaded = load_fp16(tiny_packs["small"], edge16.device, offload=True)
    held_offloaded = torch.cuda.memory_allocated() - before
    plain = load_fp16(tiny_packs["small"], edge16.device)
    held_plain = torch.cuda.memory_allocated() - before - held_offloaded
    assert {p.device.type for p in offloaded.unet.parameters()} == {"meta"}  # weights come in per layer
    assert held_offloaded < held_plain / 2, (held_offloaded, held_plain)
    assert_close_images(device_image(offloaded, payload, r), device_image(plain, payload, r), "offloaded device")
    assert {p.device.type for p in offloaded.unet.parameters()} == {"meta"}  # and leave again


def test_gpu_memory_is_handed_back_after_a_large_request(edge16):
    """A request far above the pack's own size fills PyTorch's caching allocator; once it leaves,
    the engine releases the cache (services/edge_server/memory.py): allocated and reserved memory
    return to what they were before it."""
    needs_cuda()
    engine = EdgeEngine(edge16, BatchConfig(coalesce_s=0.0))
    serve(engine, [request(0, steps=3, split=2)], CodecSpec("fp16"))  # warm: caches of a usual request
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    serve(engine, [request(1, steps=3, split=2, height=1024, width=1024)], CodecSpec("fp16"))
    gc.collect()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_reserved() - reserved
    assert peak >= 32 * MiB, f"the large request reserved only {peak / MiB:.1f} MiB: not large enough to tell"
    assert torch.cuda.memory_allocated() - allocated <= 1 * MiB
    kept = torch.cuda.memory_reserved() - reserved
    assert kept <= 4 * MiB, f"{kept / MiB:.1f} MiB of the large request's {peak / MiB:.1f} MiB still reserved"


def test_the_same_image_as_diffusers_at_fp16_tolerance(edge16):
    """The large pack alone, all steps: Tandem's pipeline against diffusers' StableDiffusionPipeline
    on the same modules, the same noise and DPM-Solver++ (2M), both in fp16."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    r = request(2, steps=8, split=8)
    state = start(edge16, r)
    run_steps(edge16, state, r.steps)
    ours = decode(edge16, state.latent)

    pipe = StableDiffusionPipeline(unet=edge16.unet, vae=edge16.vae, text_encoder=edge16.text_encoder,
                                   tokenizer=edge16.tokenizer,
                                   scheduler=DPMSolverMultistepScheduler.from_config(edge16.sampler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    schedule = make_schedule(r.sampler, r.steps, edge16.sampler_config)
    noise = initial_latent(r.seed, edge16.latent_shape(r.height, r.width), schedule) / schedule.init_noise_sigma
    theirs = pipe(r.prompt, negative_prompt=r.negative_prompt, num_inference_steps=r.steps,
                  guidance_scale=r.guidance_scale, height=r.height, width=r.width, output_type="np",
                  latents=noise[None].to(edge16.device, edge16.dtype)).images[0]
    assert_close_images(ours, (theirs * 255).round().astype(np.uint8), "Tandem vs diffusers")
