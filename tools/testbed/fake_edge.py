"""A hostile edge server for the device's tenancy tests and bench/attack_device.py.

    python -m tools.testbed.fake_edge --pack PACK --port P --metrics-port M

It speaks EdgeService, counts the Generate calls it gets with and without a bearer token
(`fake_edge_generate_total{token="yes"|"no"}` on the metrics port), and answers each with the
attack the prompt's first word names (so one process serves every attack):

  other:  a well-formed handoff for another prompt and seed
  big:    a well-formed 512x512 handoff, whatever size was asked
  fewer:  a well-formed handoff for 2 steps fewer than asked
  flood:  endless 4 MiB chunks
  stall:  nothing at all, until the caller goes away
  (else)  the same as "other"
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses

import grpc
import torch
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry, Counter, start_http_server

from services.common.wire import request_from_proto
from tandem.handoff import CodecSpec, encode_handoff
from tandem.packs import ModelPack, load_pack
from tandem.pipeline import make_handoff, start
from tandem.request import GenerationRequest
from tandem.v1 import edge_pb2, edge_pb2_grpc

CHUNK_BYTES = 32 * 1024  # under the device's message cap: the declared sizes are what it must check
FLOOD_CHUNK = bytes(4 * 1024 * 1024)


def tampered(request: GenerationRequest, attack: str) -> GenerationRequest:
    if attack == "big":
        return dataclasses.replace(request, height=512, width=512)
    if attack == "fewer":
        steps = max(1, request.steps - 2)
        return dataclasses.replace(request, steps=steps, split=min(request.split, steps))
    return dataclasses.replace(request, prompt=request.prompt + ", and a cat", seed=request.seed + 1)


@torch.no_grad()
def hostile_payload(pack: ModelPack, request: GenerationRequest, codec: CodecSpec) -> bytes:
    """A structurally valid handoff for `request` at its split (the latent is its seeded noise:
    a hostile edge need not run the steps to be believed)."""
    handoff = make_handoff(start(pack, request), request)
    prev = handoff.latent.clone() if request.split > 0 else None  # DPM-Solver++ expects history
    return encode_handoff(dataclasses.replace(handoff, step=request.split, prev_denoised=prev), codec)


class FakeEdge(edge_pb2_grpc.EdgeServiceServicer):
    def __init__(self, pack: ModelPack, calls: Counter):
        self.pack = pack
        self.calls = calls

    async def Generate(self, request, context):
        token = any(key == "authorization" for key, _ in context.invocation_metadata() or ())
        self.calls.labels(token="yes" if token else "no").inc()
        attack = request.prompt.split(":", 1)[0]
        if attack == "stall":
            await asyncio.Event().wait()
        if attack == "flood":
            index = 0
            while True:
                yield edge_pb2.GenerateResponse(handoff=edge_pb2.HandoffChunk(
                    data=FLOOD_CHUNK, index=index, count=1 << 30, total_bytes=1 << 50))
                index += 1
        domain, codec = request_from_proto(request, self.pack)
        payload = await asyncio.to_thread(hostile_payload, self.pack, tampered(domain, attack), codec)
        count = max(1, -(-len(payload) // CHUNK_BYTES))
        for index in range(count):
            yield edge_pb2.GenerateResponse(handoff=edge_pb2.HandoffChunk(
                data=payload[index * CHUNK_BYTES:(index + 1) * CHUNK_BYTES], index=index, count=count,
                total_bytes=len(payload)))


async def serve(args: argparse.Namespace) -> None:
    pack = await asyncio.to_thread(load_pack, args.pack, args.device)
    registry = CollectorRegistry()
    calls = Counter("fake_edge_generate", "Generate calls by whether a token came", ["token"], registry=registry)
    server = grpc.aio.server()
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    edge_pb2_grpc.add_EdgeServiceServicer_to_server(FakeEdge(pack, calls), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    start_http_server(args.metrics_port, addr="127.0.0.1", registry=registry)
    print(f"fake edge ready on 127.0.0.1:{args.port}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--pack", "--device"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
