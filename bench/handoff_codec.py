"""Handoff bytes and fidelity per codec, merge ratio and merge strategy.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.handoff_codec [--large DIR --small DIR] [--prompts 16] [--steps 20]

1. Bytes of a real handoff payload (DPM-Solver++ at k = T/2, so the multistep history travels)
   for the demo latent and Stable-Diffusion-shaped latents (4×64×64, 4×128×128).
2. Fidelity of the final image on a real pack pair: MSE (pixels in [0, 1]) and PSNR against the
   uncompressed hybrid output (fp32, r = 0) for the same seed and plan, averaged over prompts.
3. For SD-shaped latents (no SD weights offline): latent-level relative error of x_k and x̂0 on
   synthetic smooth latents with the schedule's noise at k.
Prints markdown tables; figures go to BENCHMARKS.md with this command.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from tandem.handoff import CodecSpec, Handoff, decode_handoff, encode_handoff
from tandem.request import GenerationRequest
from tandem.resolve import PartialRequest, resolve
from tandem.sampling.schedule import make_schedule
from tandem.tiny_pack import SD_SAMPLER_CONFIG

SPECS = [CodecSpec("fp32"), CodecSpec("fp16"), CodecSpec("int8")] + [
    CodecSpec(enc, r, strategy)
    for enc in ("fp16", "int8")
    for r in (0.25, 0.5, 0.75)
    for strategy in ("latent", "denoised")
]


def label(spec: CodecSpec) -> str:
    return spec.encoding if spec.merge_ratio == 0 else f"{spec.encoding} r={spec.merge_ratio:g} {spec.strategy}"


def synthetic_handoff(shape: tuple[int, int, int], steps: int, k: int, seed: int) -> Handoff:
    """Smooth 'clean' latent (SD latents are spatially correlated) + the schedule's noise at k."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    coarse = torch.randn(1, c, max(1, h // 8), max(1, w // 8), generator=g)
    clean = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic")[0] + 0.1 * torch.randn(shape, generator=g)
    schedule = make_schedule("dpmpp_2m", steps, SD_SAMPLER_CONFIG)
    latent = schedule.signal[k] * clean + schedule.noise[k] * torch.randn(shape, generator=g)
    request = GenerationRequest("bench", steps=steps, split=k, sampler="dpmpp_2m", height=h * 8, width=w * 8)
    return Handoff(request, schedule, k, latent, clean)


def bytes_table(shapes, steps: int) -> None:
    print("\n### Handoff bytes (DPM-Solver++, k = T/2: latent + multistep history)\n")
    print("| codec | " + " | ".join(f"{c}×{h}×{w}" for c, h, w in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for spec in SPECS:
        sizes = [len(encode_handoff(synthetic_handoff(s, steps, steps // 2, 0), spec)) for s in shapes]
        print(f"| {label(spec)} | " + " | ".join(f"{n:,}" for n in sizes) + " |")


def latent_fidelity_table(shapes, steps: int) -> None:
    print(f"\n### Latent-level error on synthetic SD-shaped latents (k = T/2 of {steps}; rel. MSE = MSE / mean square)\n")
    print("| codec | " + " | ".join(f"{c}×{h}×{w} x_k / x̂0" for c, h, w in shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    for spec in SPECS:
        cells = []
        for shape in shapes:
            handoff = synthetic_handoff(shape, steps, steps // 2, 1)
            back = decode_handoff(encode_handoff(handoff, spec), handoff.request, handoff.schedule)
            rel = lambda a, b: ((a - b).pow(2).mean() / b.pow(2).mean()).item()  # noqa: E731
            cells.append(f"{rel(back.latent, handoff.latent):.2e} / {rel(back.prev_denoised, handoff.prev_denoised):.2e}")
        print(f"| {label(spec)} | " + " | ".join(cells) + " |")


def image_fidelity_table(large: Path, small: Path, prompts: int, steps: int, user: str | None) -> None:
    from tandem.demo.grammar import COLORS, POSITIONS, SHAPES
    from tandem.packs import load_pack
    from tandem.pipeline import HybridPipeline

    edge, ue = load_pack(large, device="cpu"), load_pack(small, device="cpu")
    pipeline = HybridPipeline(edge, ue)
    defaults = edge.request_defaults()
    rng = np.random.default_rng(0)
    requests = []
    for i in range(prompts):
        color, bg = rng.choice(COLORS, 2, replace=False)
        prompt = f"a {color} {rng.choice(SHAPES)} at the {rng.choice(POSITIONS)} on a {bg} background"
        given = PartialRequest(prompt, steps=steps, sampler="dpmpp_2m", seed=i, user=user)  # k = T/2: the default
        requests.append(resolve(given, defaults).request)
    began = time.perf_counter()
    reference = [pipeline.generate(r, CodecSpec("fp32")).image.astype(np.float64) / 255 for r in requests]
    print(f"\n### Image fidelity vs the uncompressed hybrid output ({edge.name} → {ue.name}{' + ' + user if user else ''}, "
          f"{prompts} prompts, T={steps}, k={steps // 2}, DPM-Solver++)\n")
    print("| codec | handoff bytes | image MSE | PSNR dB |")
    print("|---|---|---|---|")
    for spec in SPECS:
        mses, nbytes = [], 0
        for req, ref in zip(requests, reference):
            result = pipeline.generate(req, spec)
            mses.append(float(((result.image.astype(np.float64) / 255 - ref) ** 2).mean()))
            nbytes = result.handoff_bytes
        mse = float(np.mean(mses))
        psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
        print(f"| {label(spec)} | {nbytes:,} | {mse:.2e} | {psnr:.1f} |")
    print(f"\n({time.perf_counter() - began:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, default=Path("tandem/demo_pack/large"))
    parser.add_argument("--small", type=Path, default=Path("tandem/demo_pack/small"))
    parser.add_argument("--user", default=None)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    shapes = [(4, 8, 8), (4, 64, 64), (4, 128, 128)]
    bytes_table(shapes, args.steps)
    latent_fidelity_table(shapes, args.steps)
    if args.large.is_dir() and args.small.is_dir():
        image_fidelity_table(args.large, args.small, args.prompts, args.steps, args.user)
    else:
        print(f"\n(no pack at {args.large}: image fidelity skipped)")


if __name__ == "__main__":
    main()
