"""Edge service figures, measured side by side in one run on this machine (ratios, not absolutes).

    .venv/bin/python -m bench.edge_service [--large DIR --small DIR] [--requests 16] [--steps 20]

1. Edge throughput: N concurrent requests (continuous batching) vs the same N one at a time.
2. End-to-end latency of one request over loopback gRPC vs the in-process hybrid pipeline.
3. Handoff bytes per codec next to the PNG of the same image.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from services.common.launcher import NO_PER_USER_CAPS, ONE_THREAD, edge_server
from services.ue_client.device import generate_via_edge
from services.ue_client.transport import fetch_handoff
from tandem.handoff import CodecSpec
from tandem.packs import load_pack
from tandem.pipeline import HybridPipeline
from tandem.resolve import PartialRequest, resolve

PROMPT = "a red circle at the left on a blue background"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, default=Path("tandem/demo_pack/large"))
    parser.add_argument("--small", type=Path, default=Path("tandem/demo_pack/small"))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    large, small = load_pack(args.large, device="cpu"), load_pack(args.small, device="cpu")
    defaults = large.request_defaults()
    size = defaults.image_size

    def request(**fields):
        """A request at the large pack's defaults (half the steps on the edge) but for T and ``fields``."""
        return resolve(PartialRequest(PROMPT, steps=args.steps, sampler="dpmpp_2m", **fields), defaults).request

    with tempfile.TemporaryDirectory() as tmp, edge_server(args.large, Path(tmp), "--max-batch", str(args.requests),
                                                                 *NO_PER_USER_CAPS, env=ONE_THREAD) as edge:
        edge_only = [request(split=args.steps, seed=i) for i in range(args.requests)]

        async def concurrent():
            return await asyncio.gather(*(fetch_handoff(edge.address, r, CodecSpec(), 600) for r in edge_only))

        async def one_at_a_time():
            for r in edge_only:
                await fetch_handoff(edge.address, r, CodecSpec(), 600)

        asyncio.run(fetch_handoff(edge.address, edge_only[0], CodecSpec(), 600))  # warm-up
        sequential_s, batched_s = [], []
        for _ in range(max(1, args.repeats // 2)):
            began = time.perf_counter()
            asyncio.run(one_at_a_time())
            sequential_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            asyncio.run(concurrent())
            batched_s.append(time.perf_counter() - began)
        seq, bat = min(sequential_s), min(batched_s)
        print(f"### Edge throughput ({large.name}, {size}px, T={args.steps} all on the edge, {args.requests} requests)\n")
        print("| mode | seconds (best of runs) | images/s |\n|---|---|---|")
        print(f"| one at a time | {seq:.2f} | {args.requests / seq:.2f} |")
        print(f"| {args.requests} concurrent (batched) | {bat:.2f} | {args.requests / bat:.2f} |")
        print(f"\n**throughput ratio: {seq / bat:.2f}×**\n")

        one = request(seed=1)
        pipeline = HybridPipeline(large, small)
        local_s, remote_s = [], []
        for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
            began = time.perf_counter()
            pipeline.generate(one, CodecSpec())
            local_s.append(time.perf_counter() - began)
            began = time.perf_counter()
            result = generate_via_edge(small, one, CodecSpec(), edge.address, timeout=600)
            remote_s.append(time.perf_counter() - began)
            assert result.fallback is None, result.fallback
        local, remote = statistics.median(local_s), statistics.median(remote_s)
        print(f"### One request end to end (T={args.steps}, k={args.steps // 2}, fp16), median of {args.repeats}\n")
        print("| path | seconds |\n|---|---|")
        print(f"| in-process hybrid | {local:.3f} |\n| loopback gRPC (edge process + this device) | {remote:.3f} |")
        print(f"\n**loopback / in-process: {remote / local:.2f}×**\n")

        print("### Handoff bytes per codec (k = T/2) next to the PNG\n")
        print("| codec | handoff bytes |\n|---|---|")
        png = io.BytesIO()
        Image.fromarray(result.image).save(png, format="PNG")
        for spec in (CodecSpec("fp32"), CodecSpec("fp16"), CodecSpec("int8"), CodecSpec("fp16", 0.5), CodecSpec("int8", 0.75)):
            r = generate_via_edge(small, one, spec, edge.address, timeout=600)
            name = spec.encoding + (f" r={spec.merge_ratio:g}" if spec.merge_ratio else "")
            print(f"| {name} | {r.handoff_bytes:,} |")
        print(f"| (PNG of the final {size}×{size} image) | {len(png.getvalue()):,} |")


if __name__ == "__main__":
    main()
