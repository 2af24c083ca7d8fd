"""Measure the cost models on this machine and write a CostProfile JSON (needs torch; the pure
cost logic in ``costs.py`` stays torch-free).

    python -m services.scheduler.learn.profiling --large tandem/demo_pack/large --small tandem/demo_pack/small \
        --device-class cpu-demo --out services/scheduler/profiles/demo_cpu.json [--device cpu] [--repeats 7]

* edge: seconds of one ``advance`` (one batched UNet call, CFG) of the large pack for batch sizes
  1, 2, 4, 8, 16, fitted to a_s + b_s·n by least squares (R² reported), with the UNet called as the
  edge server calls it (traced on a CPU, ``tandem.traced``; ``--no-trace-unet`` for an edge run so);
* device class: the small pack's step (batch 1, CFG) and VAE decode seconds;
* latent shape, and a check that the predicted handoff bytes equal real ``encode_handoff`` payloads;
* an edge round's fixed cost (``--rtt``): what one edge round costs beyond its k steps and its
  bytes, as the device measures it (``measured_phases`` in the scheduler puts it in transfer):
  one unary gRPC call on a kept loopback channel, the edge's admission of one request (prompt
  encoding with CFG, seeded noise) and the edge's coalescing window for a lone request
  (``--edge-coalesce-ms``, the edge's ``--coalesce-ms``). The profile's ``rtt_s`` is their sum.

Each figure is the median of ``--repeats`` runs after warm-up. The profile starts from ``--base``
(default: the built-in one) so other device classes and edge packs survive; measured entries are
put first because the scheduler uses the first edge pack when none is named.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

from services.scheduler.decide.costs import CostProfile, CostProfileError, DeviceClass, EdgeCoefficients, LatentShape

PROMPT = "a red circle at the left on a blue background"
DEFAULT_BATCHES = (1, 2, 4, 8, 16)
HANDOFF_STEPS = (10, 20, 25)  # T values the handoff-size check encodes
DEFAULT_POWER_W = 30.0  # a laptop CPU package under load; power is not measured here
EDGE_COALESCE_S = 0.010  # the edge server's --coalesce-ms default (the scheduler imports no edge code)
K = TypeVar("K")


class ProfilingError(Exception):
    """A bad flag or pack: printed as one line."""


@dataclass(frozen=True)
class EdgeFit:
    pack: str
    a_s: float
    b_s: float
    r2: float
    step_seconds: dict[int, float]  # batch size -> median seconds of one step
    traced: bool = False  # the UNet ran as a trace (tandem.traced), as the edge runs it on a CPU


@dataclass(frozen=True)
class DeviceFit:
    pack: str
    step_s: float
    decode_s: float


@dataclass(frozen=True)
class HandoffCheck:
    payloads: int  # real payloads encoded
    max_error_bytes: int  # largest |predicted - real| (0: the cost model is exact)


@dataclass(frozen=True)
class Measurement:
    device: str
    repeats: int
    torch_threads: int
    edge: EdgeFit
    small: DeviceFit
    handoff: HandoffCheck
    rtt_s: float | None  # the edge round's fixed cost written as the profile's rtt_s (the sum below)
    round_trip_s: float | None = None  # one gRPC call on a kept channel
    admission_s: float | None = None  # the edge's admission of one request
    coalesce_s: float | None = None  # the edge's coalescing window for a lone request


def interleaved_medians(calls: Mapping[K, Callable[[], object]], repeats: int, warmup: int,
                       sync: Callable[[], None] = lambda: None) -> dict[K, float]:
    """Median seconds of each call. The calls take turns within every round, so a burst of load
    from other processes (this is a shared machine) hits all of them alike, not one batch size."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[K, list[float]] = {key: [] for key in calls}
    for _ in range(repeats):
        for key, fn in calls.items():
            began = time.perf_counter()
            fn()
            sync()
            times[key].append(time.perf_counter() - began)
    return {key: statistics.median(values) for key, values in times.items()}


def _request(pack, steps: int, split: int, seed: int = 0):
    """A request at the pack's defaults; ``steps`` may be a count of timed calls beyond a user's T."""
    from tandem.resolve import PartialRequest, resolve

    return resolve(PartialRequest(PROMPT, steps=steps, split=split, seed=seed), pack.request_defaults(),
                   validate=False).request


def _states(pack, n: int, steps: int):
    """``n`` real, guided requests at step 0 with room for ``steps`` more steps."""
    from tandem.pipeline import start

    return [start(pack, _request(pack, steps, steps, seed)) for seed in range(n)]


def _sync(pack) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if pack.device.type == "cuda" else (lambda: None)


def _stepper(pack, unet, batch: int, calls: int) -> Callable[[], None]:
    """One batched denoising step of ``batch`` requests (CFG rows included) per call."""
    from tandem.sampling.denoise import advance

    states = _states(pack, batch, calls)
    return lambda: advance(unet, states)


def measure_edge(pack, batches: Sequence[int], repeats: int, warmup: int, log: Callable[[str], None],
                 trace_unet: bool = True) -> EdgeFit:
    from tandem.traced import TracedUNet, call_fast

    unet = call_fast(pack.unet, pack.device, trace_unet)  # what the edge server calls
    calls = {n: _stepper(pack, unet, n, warmup + repeats) for n in batches}
    seconds = interleaved_medians(calls, repeats, warmup, _sync(pack))
    for n, s in seconds.items():
        log(f"edge {pack.name}: batch {n:>2}  {s * 1000:8.2f} ms/step")
    if len(seconds) < 2:  # one batch size: all of it per request
        fit, r2 = EdgeCoefficients(0.0, max(seconds[batches[0]], 1e-6)), 1.0
    else:
        fit, r2 = EdgeCoefficients.fit(list(seconds), list(seconds.values()))
    a, b = fit.a_s, fit.b_s
    traced = isinstance(unet, TracedUNet) and unet.traced_shapes > 0  # a trace that differed ran eager
    log(f"edge fit: a_s = {a * 1000:.2f} ms + b_s = {b * 1000:.2f} ms × batch (R² = {r2:.4f}; "
        f"UNet {'traced' if traced else 'eager'})")
    return EdgeFit(pack.name, a, b, r2, seconds, traced)


def measure_device(pack, repeats: int, warmup: int, log: Callable[[str], None]) -> DeviceFit:
    from tandem.pipeline import decode

    latent = _states(pack, 1, 1)[0].latent
    calls = {"step": _stepper(pack, pack.unet, 1, warmup + repeats), "decode": lambda: decode(pack, latent)}
    seconds = interleaved_medians(calls, repeats, warmup, _sync(pack))
    log(f"device {pack.name}: {seconds['step'] * 1000:.2f} ms/step, decode {seconds['decode'] * 1000:.2f} ms")
    return DeviceFit(pack.name, seconds["step"], seconds["decode"])


def _real_handoff_bytes(pack, steps: int, split: int, codec: str, ratio: float, cache: dict) -> int:
    """Bytes of a real handoff of ``pack`` after ``split`` real steps (run once per (T, k) and ``cache``)."""
    from tandem.handoff import CodecSpec, encode_handoff
    from tandem.pipeline import make_handoff, run_steps, start

    key = (steps, split)
    if key not in cache:
        request = _request(pack, steps, split)
        state = start(pack, request)
        run_steps(pack, state, split)
        cache[key] = make_handoff(state, request)
    return len(encode_handoff(cache[key], CodecSpec(codec, ratio)))


def check_handoff(pack, latent: LatentShape, log: Callable[[str], None],
                  steps: Sequence[int] = HANDOFF_STEPS) -> HandoffCheck:
    """Real payloads of ``pack`` against the cost model's exact prediction, over codecs, merge
    ratios and T (they must agree to the byte: the header is fixed by shape, codec and k)."""
    profile = CostProfile(latent=latent)
    cache: dict = {}
    checked, worst = 0, 0
    for codec in ("fp32", "fp16", "int8"):
        for ratio in (0.0, 0.25, 0.75):
            for t in steps:
                real = _real_handoff_bytes(pack, t, t // 2, codec, ratio, cache)
                worst = max(worst, abs(profile.handoff_bytes(t, t // 2, codec, ratio) - real))
                checked += 1
    log(f"handoff bytes: predicted vs {checked} real payloads, largest difference {worst} B")
    return HandoffCheck(checked, worst)


def measure_rtt(repeats: int, warmup: int, log: Callable[[str], None]) -> float:
    """One unary call (health Check) on a kept loopback channel: request + reply, what the device
    pays per handoff on top of the bytes now that it keeps one channel per edge (issue 31; a fresh
    channel per call also paid the TCP and HTTP/2 set-up)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)

    def call() -> None:
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)

    try:
        rtt = interleaved_medians({"rtt": call}, repeats, warmup)["rtt"]
    finally:
        channel.close()
        server.stop(0)
    log(f"loopback RTT (one call on a kept gRPC channel): {rtt * 1000:.2f} ms")
    return rtt


def measure_admission(pack, repeats: int, warmup: int, log: Callable[[str], None]) -> float:
    """The edge's admission of one request before its first step: the prompt encoded (with CFG)
    and the seeded noise made, as ``start`` does it for every request the edge takes."""
    from tandem.pipeline import start

    request = _request(pack, 10, 10)
    seconds = interleaved_medians({"admission": lambda: start(pack, request)}, repeats, warmup, _sync(pack))["admission"]
    log(f"edge admission (prompt encoding + noise) {pack.name}: {seconds * 1000:.2f} ms")
    return seconds


@dataclass(frozen=True)
class ProfilingConfig:
    large: Path
    small: Path
    device_class: str
    device: str | None = None
    repeats: int = 7
    warmup: int = 2
    batches: tuple[int, ...] = DEFAULT_BATCHES
    power_w: float | None = None  # None: the base profile's value for the class, else DEFAULT_POWER_W
    rtt: bool = False
    threads: int | None = None  # torch CPU threads (None: torch's default); match the services'
    base: CostProfile = CostProfile()
    trace_unet: bool = True  # the edge's UNet traced on a CPU, as the edge server runs it by default
    handoff_steps: tuple[int, ...] = HANDOFF_STEPS  # T of the handoff-size check (each runs T // 2 real steps)
    edge_coalesce_s: float = EDGE_COALESCE_S  # the edge's --coalesce-ms: a lone request's wait for company


def profile(cfg: ProfilingConfig, log: Callable[[str], None] = lambda _: None) -> tuple[CostProfile, Measurement]:
    """Measures the packs and returns ``cfg.base`` with the measured entries replaced or added."""
    import torch

    from tandem.packs import load_pack

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    large = load_pack(cfg.large, device=cfg.device)
    small = load_pack(cfg.small, device=cfg.device)
    log(f"packs {large.name} / {small.name} on {large.device} ({torch.get_num_threads()} threads), "
        f"{cfg.repeats} repeats after {cfg.warmup} warm-up")
    channels, height, width = large.latent_shape(large.default_image_size, large.default_image_size)
    latent = LatentShape(channels, height, width)
    edge = measure_edge(large, cfg.batches, cfg.repeats, cfg.warmup, log, cfg.trace_unet)
    dev = measure_device(small, cfg.repeats, cfg.warmup, log)
    handoff = check_handoff(large, latent, log, cfg.handoff_steps)
    round_trip = admission = None
    if cfg.rtt:
        round_trip = measure_rtt(cfg.repeats, cfg.warmup, log)
        admission = measure_admission(large, cfg.repeats, cfg.warmup, log)
    rtt = None if round_trip is None or admission is None else round_trip + admission + cfg.edge_coalesce_s
    if rtt is not None:
        log(f"edge round fixed cost (rtt_s): {rtt * 1000:.2f} ms = round trip + admission + "
            f"coalescing window {cfg.edge_coalesce_s * 1000:g} ms")
    base = cfg.base
    power = cfg.power_w or (base.devices[cfg.device_class].power_w if cfg.device_class in base.devices else DEFAULT_POWER_W)
    measured = replace(
        base,
        edge={large.name: EdgeCoefficients(edge.a_s, edge.b_s), **{k: v for k, v in base.edge.items() if k != large.name}},
        devices={cfg.device_class: DeviceClass(dev.step_s, dev.decode_s, power),
                 **{k: v for k, v in base.devices.items() if k != cfg.device_class}},
        latent=latent,
        rtt_s=base.rtt_s if rtt is None else rtt,
        max_batch=max(base.max_batch, max(cfg.batches)),
        synthetic=False,
    )
    return measured, Measurement(str(large.device), cfg.repeats, torch.get_num_threads(), edge, dev, handoff, rtt,
                                 round_trip, admission, cfg.edge_coalesce_s if cfg.rtt else None)


def write(profile_: CostProfile, measurement: Measurement, out: Path) -> None:
    """The profile JSON plus a ``measured`` record (ignored by CostProfile.load) of how it was made."""
    data = profile_.to_dict()
    data["measured"] = asdict(measurement)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")


def positive_ints(text: str) -> tuple[int, ...]:
    """An argparse type: "1,2,4" -> (1, 2, 4), sorted and deduplicated, every value >= 1."""
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler.learn.profiling", description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=Path, required=True, help="edge (large) pack directory")
    parser.add_argument("--small", type=Path, required=True, help="device (small) pack directory")
    parser.add_argument("--device-class", required=True, help="name of the device class the small pack's figures go to")
    parser.add_argument("--out", type=Path, required=True, help="cost profile JSON to write")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="torch device (default: cuda if present)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure; the median is kept (7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (2)")
    parser.add_argument("--batches", type=positive_ints, default=DEFAULT_BATCHES, help="edge batch sizes (1,2,4,8,16)")
    parser.add_argument("--power-w", type=float, help="device power while computing (default: the base profile's, else 30)")
    parser.add_argument("--rtt", action="store_true",
                        help="also measure an edge round's fixed cost: loopback gRPC round trip + the edge's admission "
                             "+ its coalescing window")
    parser.add_argument("--edge-coalesce-ms", type=float, default=EDGE_COALESCE_S * 1000,
                        help="the edge's --coalesce-ms, counted in the round's fixed cost with --rtt "
                             f"({EDGE_COALESCE_S * 1000:g})")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; use what the services get)")
    parser.add_argument("--base", type=Path, help="profile to start from (default: the built-in one)")
    parser.add_argument("--trace-unet", action=argparse.BooleanOptionalAction, default=True,
                        help="time the edge's UNet traced on a CPU, as the edge server runs it unless --no-trace-unet (on)")
    args = parser.parse_args(argv)
    for flag, ok in (("--repeats", args.repeats >= 1), ("--warmup", args.warmup >= 0),
                     ("--power-w", args.power_w is None or args.power_w > 0),
                     ("--threads", args.threads is None or args.threads >= 1),
                     ("--edge-coalesce-ms", math.isfinite(args.edge_coalesce_ms) and 0 <= args.edge_coalesce_ms <= 1000)):
        if not ok:
            parser.error(f"{flag}: out of range, got {getattr(args, flag[2:].replace('-', '_'))}")
    if not args.device_class.strip():
        parser.error("--device-class: must not be empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(line: str) -> None:
        print(f"profiling: {line}", file=sys.stderr, flush=True)

    try:
        base = CostProfile.load(args.base) if args.base else CostProfile()
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ProfilingError("--device cuda: no CUDA device here")
        cfg = ProfilingConfig(args.large, args.small, args.device_class, args.device, args.repeats, args.warmup,
                              args.batches, args.power_w, args.rtt, args.threads, base, args.trace_unet,
                              edge_coalesce_s=args.edge_coalesce_ms / 1000)
        measured, measurement = profile(cfg, log)
        write(measured, measurement, args.out)
    except (ProfilingError, CostProfileError, OSError, ValueError, json.JSONDecodeError) as exc:
        print(f"profiling: error: {exc}", file=sys.stderr)
        return 2
    log(f"wrote {args.out} (device class {args.device_class!r}, edge pack {measurement.edge.pack!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
