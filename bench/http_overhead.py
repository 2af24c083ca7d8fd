"""What the device service's OpenAI-compatible HTTP endpoint costs per image (issue 28).

    .venv/bin/python -m bench.http_overhead [--quick] [--rounds N] [--pack-dir DIR] [--size 64]

One edge server and one device service (the demo packs, CPU, 64 px) with --http-port. Each round
makes the same image (same fields, same seed) three ways, in a rotating order so that drift in
the machine's load falls on all three alike:

- grpc: the device service's own call (services/ue_client/client.py, what `tandem generate --ue` does)
- http: `openai.OpenAI(...).images.generate(...)` against /v1/images/generations
- http+previews: the same, streamed with partial_images=2 (two previews, then the image; decoded
  as --previews says: approx, the default, or vae)

and prints a markdown table of the median time per image and the ratios: http / grpc (target
<= 1.05) and http+previews / http (target <= 1.10), each the median over the rounds of that
round's ratio (the paired calls of a round see the same machine load; on a shared 2-core machine
a call varies by ±30 %). Exit status 1 when a target is missed; the images are checked equal on
the way (the three paths make the same PNG).
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from services.common import launcher

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"http / grpc": 1.05, "http+previews / http": 1.10}
PROMPT = "a red circle at the left on a blue background"


def main(argv: list[str] | None = None) -> int:
    from tandem.packs import DEMO_PACK

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (16 instead of 48)")
    parser.add_argument("--rounds", type=int, help="rounds of the three calls (default 48, --quick 16)")
    parser.add_argument("--pack-dir", type=Path, default=DEMO_PACK, help="holds large/ and small/ (the demo pack)")
    parser.add_argument("--size", type=int, default=64, help="image side, px (64)")
    parser.add_argument("--steps", type=int, help="T (default: the pack's)")
    parser.add_argument("--previews", choices=("approx", "vae"), default="approx",
                        help="the device service's --http-previews (approx)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (16 if args.quick else 48)

    import openai

    from services.common.wire import partial_to_proto
    from services.ue_client.client import generate_on_device_service
    from tandem.resolve import PartialRequest

    fields = {"seed": 7, **({"steps": args.steps} if args.steps else {})}
    size = f"{args.size}x{args.size}"
    with tempfile.TemporaryDirectory() as logs:
        log_dir = Path(logs)
        http_port = launcher.free_port()
        options = {"env": launcher.ONE_THREAD, "cwd": ROOT}
        with launcher.edge_server(args.pack_dir / "large", log_dir, **options) as edge, \
                launcher.device_service(args.pack_dir / "small", log_dir, "--edge", edge.address,
                                        "--http-port", str(http_port), "--http-previews", args.previews,
                                        **options) as ue:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="bench", max_retries=0)
            message = partial_to_proto(PartialRequest(prompt=PROMPT, height=args.size, width=args.size, **fields))

            def grpc_call() -> bytes:
                return generate_on_device_service(ue.address, message, None, 120.0).png

            def http_call() -> bytes:
                result = client.images.generate(prompt=PROMPT, size=size, extra_body=fields)
                return base64.b64decode(result.data[0].b64_json)

            def stream_call() -> bytes:
                events = list(client.images.generate(prompt=PROMPT, size=size, stream=True, partial_images=2,
                                                     extra_body=fields))
                assert [e.type for e in events].count("image_generation.partial_image") == 2, events
                return base64.b64decode(events[-1].b64_json)

            calls: dict[str, Callable[[], bytes]] = {"grpc": grpc_call, "http": http_call,
                                                     "http+previews": stream_call}
            times: dict[str, list[float]] = {name: [] for name in calls}
            images = {name: call() for name, call in calls.items()}  # warm-up: every path once
            if len(set(images.values())) != 1:
                print("the three paths made different images", file=sys.stderr)
                return 1
            names = list(calls)
            for r in range(rounds):
                for name in names[r % 3:] + names[:r % 3]:
                    began = time.perf_counter()
                    png = calls[name]()
                    times[name].append(time.perf_counter() - began)
                    if png != images[name]:
                        print(f"{name}: a different image in round {r}", file=sys.stderr)
                        return 1
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {"http / grpc": statistics.median(h / g for h, g in zip(times["http"], times["grpc"])),
              "http+previews / http": statistics.median(s / h for s, h in zip(times["http+previews"], times["http"]))}
    print(f"\nPer image at {size}, demo packs on CPU, previews {args.previews}, {rounds} rounds (median; the three "
          "in rotating order):\n")
    print("| path | median s/image | min | max |")
    print("|---|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {median[name]:.4f} | {min(values):.4f} | {max(values):.4f} |")
    print("\n| ratio (median of the rounds' own) | measured | target | |")
    print("|---|---|---|---|")
    missed = []
    for name, value in ratios.items():
        ok = value <= TARGETS[name]
        missed += [] if ok else [name]
        print(f"| {name} | {value:.3f} | <= {TARGETS[name]:.2f} | {'ok' if ok else 'MISSED'} |")
    if missed:
        print(f"\nmissed: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
