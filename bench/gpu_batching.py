"""The edge's batching and the device's GPU memory on a CUDA GPU, at true size (issue 26, part 4).

    python -m bench.gpu_batching --out DIR [--pair-dir DIR] [--tiny] [--device cuda|cpu]
        [--batches 1,2,4,8,16] [--repeats 5] [--warmup 2]
    python -m bench.gpu_batching --build-only [--pair-dir DIR] [--tiny]

1. Batching: one edge step of the pair's large pack (sd15: SD 1.5's UNet, fp16 on CUDA) at each
   batch size as the edge server runs it (tandem.sampling.denoise.advance on N requests: per-request
   timesteps, CFG rows, each request's sampler update), next to diffusers' own static batch of the
   same UNet (the body of StableDiffusionPipeline's loop: one unet() call on the 2N CFG rows at one
   timestep, the guidance combine, DPMSolverMultistepScheduler.step). Medians of --repeats after
   --warmup, the two sides and the batch sizes taking turns; images/s = N / (T × step) at the
   pack's default T.
2. Memory: the CUDA peak (torch.cuda.max_memory_allocated above what was allocated before, from
   loading the pack to the decoded image) of one request at the pack's image size (512 px for
   sd15): large-only (every step and the decode on the large pack), the device as its service
   loads by default (the small pack: the late steps from a handoff, the decode), and the device
   with --offload. A step's peak does not grow with T, so T = 4 with the handoff at k = 2. On a CPU
   the runs happen but no peak is read (ru_maxrss is the whole process's), and --offload (CUDA
   only) is skipped: the table says so.

Writes DIR/batching.json and DIR/batching.md. The pair is --pair-dir (default: tandem-pack's
cache, $TANDEM_PACK_CACHE/sd15 or ~/.cache/tandem/packs/sd15), built there if absent: the sd15
pair (tandem/true_size.py, ~3.1 GB), or with --tiny two tiny random packs (the dry run of
scripts/gpu_check.sh, on a CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from services.cli.pack import default_cache
from services.scheduler.learn.profiling import interleaved_medians, positive_ints
from tandem.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent

PROMPT = "a photograph of an astronaut riding a horse"
BATCHES = (1, 2, 4, 8, 16)
MEMORY_STEPS, MEMORY_SPLIT = 4, 2
GiB = 2**30


class BenchError(Exception):
    """A bad flag or a missing GPU: one line."""


def log(line: str) -> None:
    print(f"gpu_batching: {line}", file=sys.stderr, flush=True)


def ensure_pair(pair_dir: Path, tiny: bool) -> tuple[Path, Path]:
    """The pair's large and small pack directories, built first if absent."""
    from tandem.packs import MANIFEST_NAME
    from tandem.tiny_pack import build_tiny_pack
    from tandem.true_size import build_pair, cached_pair

    large, small = pair_dir / "large", pair_dir / "small"
    if tiny:
        if not (small / MANIFEST_NAME).is_file():  # the small pack is written last
            log(f"building two tiny random packs into {pair_dir}")
            build_tiny_pack(large, seed=1, unet_channels=(32, 64), role="large", name="tiny-random-large")
            build_tiny_pack(small, seed=2, unet_channels=(16, 32), role="small", name="tiny-random-small",
                            shared_from="../large")
    elif (why := cached_pair(pair_dir)) is not None:
        log(f"building the sd15 pair into {pair_dir} ({why})")
        build_pair("sd15", pair_dir, progress=log)
    return large, small


def request(pack, steps: int, split: int, seed: int = 0) -> GenerationRequest:
    size = pack.default_image_size
    return GenerationRequest(PROMPT, steps=steps, split=split, sampler=pack.manifest.default_sampler,
                             guidance_scale=pack.manifest.default_guidance, seed=seed, height=size, width=size)


# --- 1. batching --------------------------------------------------------------------------------

def edge_stepper(pack, n: int, calls: int) -> Callable[[], None]:
    """One edge step of `n` requests per call, through the UNet the edge server calls."""
    from tandem.pipeline import start
    from tandem.sampling.denoise import advance
    from tandem.traced import call_fast

    unet = call_fast(pack.unet, pack.device, True)
    states = [start(pack, request(pack, calls, calls, seed)) for seed in range(n)]
    return lambda: advance(unet, states)


def diffusers_stepper(pack, n: int, calls: int) -> Callable[[], None]:
    """One step of diffusers' static batch of `n` per call: StableDiffusionPipeline's loop body."""
    from diffusers import DPMSolverMultistepScheduler

    from tandem.pipeline import encode_prompt

    scale = pack.manifest.default_guidance
    guidance = encode_prompt(pack, PROMPT, "", scale)
    assert guidance.uncond is not None, "the pack's default guidance must be above 1 (CFG)"
    hidden = torch.stack([guidance.uncond] * n + [guidance.cond] * n).to(pack.device, pack.dtype)
    scheduler = DPMSolverMultistepScheduler.from_config(pack.sampler_config)
    scheduler.set_timesteps(calls, device=pack.device)
    size = pack.default_image_size
    shape = (n, *pack.latent_shape(size, size))
    latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(0)).to(pack.device, pack.dtype)
    latents = latents * scheduler.init_noise_sigma
    timesteps = iter(scheduler.timesteps)

    @torch.no_grad()
    def step() -> None:
        nonlocal latents
        t = next(timesteps)
        rows = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = pack.unet(rows, t, encoder_hidden_states=hidden, return_dict=False)[0].chunk(2)
        latents = scheduler.step(uncond + scale * (cond - uncond), t, latents, return_dict=False)[0]

    return step


def batching(pack, batches: tuple[int, ...], repeats: int, warmup: int) -> list[dict[str, Any]]:
    calls = warmup + repeats
    steppers: dict[tuple[str, int], Callable[[], None]] = {}
    for n in batches:
        steppers["tandem", n] = edge_stepper(pack, n, calls)
        steppers["diffusers", n] = diffusers_stepper(pack, n, calls)
    sync = torch.cuda.synchronize if pack.device.type == "cuda" else (lambda: None)
    seconds = interleaved_medians(steppers, repeats, warmup, sync)
    steps = pack.manifest.default_steps
    rows = []
    for n in batches:
        ours, theirs = seconds["tandem", n], seconds["diffusers", n]
        log(f"batch {n:>2}: edge {ours * 1000:8.2f} ms/step, diffusers {theirs * 1000:8.2f} ms/step")
        rows.append({"batch": n, "tandem_step_s": ours, "diffusers_step_s": theirs,
                     "tandem_images_per_s": n / (steps * ours), "diffusers_images_per_s": n / (steps * theirs),
                     "tandem_over_diffusers": ours / theirs})
    return rows


# --- 2. memory ----------------------------------------------------------------------------------

def memory(large_dir: Path, small_dir: Path, device: torch.device) -> list[dict[str, Any]]:
    """One request per option, each measured from before its pack loads to its decoded image."""
    from tandem.packs import load_pack
    from tandem.pipeline import decode, make_handoff, resume, run_steps, start

    cuda = device.type == "cuda"
    handoff = None

    def large_only() -> None:
        nonlocal handoff
        pack = load_pack(large_dir, device)
        r = request(pack, MEMORY_STEPS, MEMORY_SPLIT)
        state = start(pack, r)
        run_steps(pack, state, r.split)
        handoff = make_handoff(state, r)  # what the device options continue from
        run_steps(pack, state, r.steps)
        decode(pack, state.latent)

    def on_device(offload: bool) -> Callable[[], None]:
        def run() -> None:
            assert handoff is not None, "large-only runs first: it makes the handoff"
            pack = load_pack(small_dir, device, offload=offload)  # as the device service loads it
            state = resume(pack, handoff)
            run_steps(pack, state, state.schedule.steps)
            decode(pack, state.latent)
        return run

    options = [("large-only", large_only), ("device (default)", on_device(False)), ("device --offload", on_device(True))]
    rows: list[dict[str, Any]] = []
    for name, run in options:
        row: dict[str, Any] = {"option": name, "peak_bytes": None, "vs_large_only": None, "seconds": None, "note": ""}
        rows.append(row)
        if "offload" in name and not cuda:
            row["note"] = "skipped: --offload needs CUDA"
            continue
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
            row["peak_bytes"] = torch.cuda.max_memory_allocated() - before
        else:
            row["note"] = "no per-option peak on a CPU"
        row["seconds"] = time.perf_counter() - began
        peak = "-" if row["peak_bytes"] is None else f"{row['peak_bytes'] / GiB:.2f} GiB"
        log(f"memory {name}: peak {peak}, {row['seconds']:.1f} s")
    base = rows[0]["peak_bytes"]
    for row in rows:
        if base and row["peak_bytes"] is not None:
            row["vs_large_only"] = row["peak_bytes"] / base
    return rows


# --- report -------------------------------------------------------------------------------------

def markdown(result: dict[str, Any]) -> str:
    steps = result["images_per_s_at_steps"]
    lines = [f"### Edge batching: {result['large']} on {result['where']}, {result['dtype']}, "
             f"{result['image_size']} px (medians of {result['repeats']} after {result['warmup']} warm-up)", "",
             f"| batch | edge ms/step | diffusers ms/step | edge / diffusers | edge images/s (T={steps}) | "
             f"diffusers images/s (T={steps}) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in result["batching"]:
        lines.append(f"| {r['batch']} | {r['tandem_step_s'] * 1000:.2f} | {r['diffusers_step_s'] * 1000:.2f} | "
                     f"{r['tandem_over_diffusers']:.2f} | {r['tandem_images_per_s']:.2f} | {r['diffusers_images_per_s']:.2f} |")
    lines += ["", f"### Device GPU memory: one {result['image_size']} px request (T={MEMORY_STEPS}, handoff at "
              f"k={MEMORY_SPLIT}), {result['large']} / {result['small']}", "",
              "| option | CUDA peak | / large-only | seconds | note |", "| --- | --- | --- | --- | --- |"]
    for r in result["memory"]:
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GiB:.2f} GiB"
        ratio = "-" if r["vs_large_only"] is None else f"{r['vs_large_only']:.2f}"
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['option']} | {peak} | {ratio} | {seconds} | {r['note']} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tandem.packs import PackManifest, load_pack

    large_dir, small_dir = ensure_pair(args.pair_dir, args.tiny)
    if args.build_only:
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device here (--device cpu runs it on the CPU)")
    device = torch.device(args.device)
    edge = load_pack(large_dir, device)
    result: dict[str, Any] = {
        "where": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device": args.device, "torch": torch.__version__, "dtype": str(edge.dtype).removeprefix("torch."),
        "pair_dir": str(args.pair_dir), "large": edge.name, "small": PackManifest.read(small_dir).name,
        "image_size": edge.default_image_size, "images_per_s_at_steps": edge.manifest.default_steps,
        "repeats": args.repeats, "warmup": args.warmup,
    }
    log(f"batching: {edge.name} on {result['where']} ({result['dtype']}), batches {','.join(map(str, args.batches))}")
    result["batching"] = batching(edge, args.batches, args.repeats, args.warmup)
    del edge
    result["memory"] = memory(large_dir, small_dir, device)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder: batching.json and batching.md go there")
    parser.add_argument("--pair-dir", type=Path, help="the pack pair (default: tandem-pack's cache; built if absent)")
    parser.add_argument("--tiny", action="store_true", help="tiny random packs instead of sd15 (a dry run)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--batches", type=positive_ints, default=BATCHES, help="edge batch sizes (1,2,4,8,16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per figure; the median is kept (5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    parser.add_argument("--build-only", action="store_true", help="build the pair if absent, then exit")
    args = parser.parse_args(argv)
    if args.out is None and not args.build_only:
        parser.error("--out is required (or --build-only)")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.pair_dir is None:
        args.pair_dir = default_cache() / ("tiny" if args.tiny else "sd15")
    return args


def main(argv: list[str] | None = None) -> int:
    from tandem.packs import PackError

    args = parse_args(argv)
    try:
        result = run(args)
    except (BenchError, PackError) as exc:
        print(f"gpu_batching: error: {exc}", file=sys.stderr)
        return 2
    if args.build_only:
        log(f"pair ready in {args.pair_dir}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batching.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "batching.md").write_text(markdown(result))
    log(f"wrote {args.out / 'batching.json'} and {args.out / 'batching.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
