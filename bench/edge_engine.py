"""The edge engine against diffusers' own pipeline in ONE process, side by side (ratios, not absolutes).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.edge_engine [--pack tandem/demo_pack] [--users 16]
        [--steps 20] [--rounds 3] [--gap 0.1]

bench/peer_diffusers.py compares the edge *server* (its own process, gRPC) with diffusers in the
bench's process: on a shared, loaded machine two processes get more CPU than one, which flatters
the edge. Here both run on the same thread budget of one process, interleaved round by round:
`EdgeEngine` (its loop thread; requests submitted as the servicer does) vs diffusers'
StableDiffusionPipeline (static batch, and "batch whoever is waiting" for staggered arrivals).
Each engine setting is measured in the same rounds, so the effect of each change shows:
"plain" is the engine with no coalescing window and no growth cap, "eager" the default admission
with the UNet called eagerly as diffusers calls it (the scheduling alone), "default" the engine
as the server runs it (on a CPU, its UNet a TorchScript trace: tandem/traced.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

from bench.peer_diffusers import (
    diffusers_pipeline,
    diffusers_staggered,
    edge_requests,
    run_diffusers,
)

ROOT = Path(__file__).resolve().parent.parent

# name -> (BatchConfig arguments, trace the UNet)
SETTINGS = {"plain": (dict(coalesce_s=0.0, max_growth=0.0), False), "eager": ({}, False), "default": ({}, True)}


def run_engine(pack, config, requests, gap: float, payloads: dict | None = None, trace: bool = True
               ) -> tuple[list[float], float, dict[int, int]]:
    """Latencies, wall seconds and the batch-size histogram of `requests` arriving every `gap` s
    (their fp32 handoffs into `payloads`, by index, if given)."""
    from services.edge_server.engine import EdgeEngine, Failed, Finished
    from tandem.handoff import CodecSpec

    engine = EdgeEngine(pack, config, trace_unet=trace)
    engine.start()
    done = threading.Semaphore(0)
    latencies: list[float] = []
    codec = CodecSpec("fp32" if payloads is not None else "fp16")
    began = time.perf_counter()
    try:
        for i, request in enumerate(requests):
            time.sleep(max(0.0, began + i * gap - time.perf_counter()))

            def sink(event, arrived=time.perf_counter(), i=i):
                if isinstance(event, (Finished, Failed)):
                    assert isinstance(event, Finished), event
                    latencies.append(time.perf_counter() - arrived)
                    if payloads is not None:
                        payloads[i] = event.payload
                    done.release()

            engine.submit(request, codec, sink)
        for _ in requests:
            done.acquire()
        wall = time.perf_counter() - began
    finally:
        engine.stop()
    return latencies, wall, dict(sorted(engine.stats.batch_sizes.items()))


def agreement(pack, pipe, requests, payloads: dict[int, bytes], steps: int, guidance: float, size: int) -> float:
    """Largest |difference| between the engine's final latents and diffusers' for the same batch."""
    import torch

    from tandem.handoff import decode_handoff
    from tandem.sampling.schedule import make_schedule

    generators = [torch.Generator().manual_seed(r.seed) for r in requests]
    theirs = pipe([r.prompt for r in requests], num_inference_steps=steps, guidance_scale=guidance,
                  generator=generators, height=size, width=size, output_type="latent").images
    schedule = make_schedule(requests[0].sampler, steps, pack.sampler_config)
    ours = torch.stack([decode_handoff(payloads[i], r, schedule).latent for i, r in enumerate(requests)])
    return float((ours - theirs.float()).abs().max())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, default=ROOT / "tandem/demo_pack")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.1)
    args = parser.parse_args()

    import torch

    from services.edge_server.batching import BatchConfig
    from tandem.packs import load_pack

    torch.set_num_threads(1)
    pack = load_pack(args.pack / "large", device="cpu")
    defaults = pack.request_defaults()
    guidance, size = float(defaults.guidance_scale), defaults.image_size
    pipe = diffusers_pipeline(args.pack)
    configs = {name: BatchConfig(max_batch_size=max(16, args.users), **kw) for name, (kw, _) in SETTINGS.items()}
    traced = {name: trace for name, (_, trace) in SETTINGS.items()}
    run_diffusers(pipe, ["a", "b"], [0, 1], args.steps, guidance, size)  # warm-up both
    for name in configs:  # the traced engines trace on their first call
        run_engine(pack, configs[name], edge_requests(2, args.steps, guidance, size), 0.0, trace=traced[name])

    payloads: dict[int, bytes] = {}
    same = edge_requests(args.users, args.steps, guidance, size, offset=10_000)
    run_engine(pack, configs["default"], same, 0.0, payloads)
    diff = agreement(pack, pipe, same, payloads, args.steps, guidance, size)
    print(f"final latents of {args.users} requests run together, engine vs diffusers: max |difference| {diff:.2e}")
    together: dict[str, list[float]] = {name: [] for name in [*configs, "diffusers"]}
    stag_lat: dict[str, list[float]] = {name: [] for name in together}
    stag_tp: dict[str, list[float]] = {name: [] for name in together}
    histograms: dict[str, dict[int, int]] = {}
    for k in range(args.rounds):  # interleaved: machine noise hits every side alike
        requests = edge_requests(args.users, args.steps, guidance, size, offset=100 * k)
        for name, config in configs.items():
            _, wall, histograms[name] = run_engine(pack, config, requests, 0.0, trace=traced[name])
            together[name].append(args.users / wall)
        began = time.perf_counter()
        run_diffusers(pipe, [r.prompt for r in requests], [r.seed for r in requests], args.steps, guidance, size)
        together["diffusers"].append(args.users / (time.perf_counter() - began))
        for name, config in configs.items():
            lat, wall, _ = run_engine(pack, config, requests, args.gap, trace=traced[name])
            stag_lat[name].append(statistics.mean(lat))
            stag_tp[name].append(args.users / wall)
        began = time.perf_counter()
        lat = diffusers_staggered(pipe, args.users, args.gap, args.steps, guidance, size)
        stag_tp["diffusers"].append(args.users / (time.perf_counter() - began))
        stag_lat["diffusers"].append(statistics.mean(lat))

    med = {name: statistics.median(v) for name, v in together.items()}
    lat = {name: statistics.median(v) for name, v in stag_lat.items()}
    tp = {name: statistics.median(v) for name, v in stag_tp.items()}
    print(f"{args.users} together (img/s): diffusers static batch {med['diffusers']:.2f}; " + "; ".join(
        f"engine {n} {med[n]:.2f} -> {med[n] / med['diffusers']:.2f}x (UNet calls by batch size {histograms[n]})"
        for n in configs))
    print(f"a request every {args.gap} s: diffusers 'batch whoever is waiting' mean latency {lat['diffusers']:.2f} s, "
          f"{tp['diffusers']:.2f} img/s; " + "; ".join(
              f"engine {n} {lat[n]:.2f} s -> {lat[n] / lat['diffusers']:.2f}x, {tp[n]:.2f} img/s -> "
              f"{tp[n] / tp['diffusers']:.2f}x" for n in configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
