"""True size on this machine: the sd15 pair (SD 1.5 on the edge, BK-SDM-Small on the device, seeded
random weights; tandem-pack) measured where the demo pack cannot tell.

    .venv/bin/python -m bench.sd_scale [--quick] [--pair-dir DIR]

1. Parameters and fp16 weight bytes per component, next to the published counts.
2. Handoff bytes at 512 px: predicted (tandem.codec.spec.handoff_size) = measured (encode_handoff
   of a real edge state), fp16 and int8 at r = 0 and 0.5.
3. One UNet step (CFG: two rows a request), large vs small, at batch 1, 2 (and 4 without --quick),
   and the edge's a + b·n fitted to the large one.
4. Device memory: the peak RSS of one process per option, one 512 px request each (load, its
   steps, decode), above the import floor (a process that imports the same modules and loads
   nothing): the large-only process (all T steps on SD 1.5, no split) vs the device (the late
   steps on BK-SDM-Small from a handoff) as it loads by default, and with --compact-weights.
   Target: device ≤ 0.5 × large-only (seed 000 reports −52 % of UE GPU memory).
Exits 1 when a target fails (counts within 1 %, predicted = measured bytes, memory ratio); tables last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.cli.pack import default_cache
from tandem.codec.spec import CodecSpec, handoff_size
from tandem.request import GenerationRequest

PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 512
STEPS, SPLIT = 2, 1  # the memory runs: one edge step, one device step
MEMORY_TARGET = 0.5


def request(seed: int = 0, steps: int = STEPS, split: int = SPLIT) -> GenerationRequest:
    return GenerationRequest(PROMPT, steps=steps, split=split, height=SIZE, width=SIZE, guidance_scale=7.5, seed=seed)


def ensure_pair(pair_dir: Path) -> tuple[Path, Path]:
    from tandem.true_size import build_pair, cached_pair

    if cached_pair(pair_dir) is not None:
        print(f"building the sd15 pair into {pair_dir} (tandem-pack build sd15)", file=sys.stderr)
        build_pair("sd15", pair_dir, progress=lambda line: print(f"  {line}", file=sys.stderr))
    return pair_dir / "large", pair_dir / "small"


# --- 1. parameters ------------------------------------------------------------------------------

def parameters(pair_dir: Path) -> tuple[list[str], bool]:
    from tandem.true_size import PAIRS, parameter_table

    lines = ["| pack | component | parameters | published | deviation | fp16 weights |", "| --- | --- | --- | --- | --- | --- |"]
    ok = True
    for row in parameter_table(PAIRS["sd15"]):
        weights = sum(f.stat().st_size for f in (pair_dir / row.pack / row.component.name).glob("*.safetensors"))
        ok &= abs(row.deviation) <= 0.01
        lines.append(f"| {row.pack} | {row.component.name} ({row.component.published_as}) | {row.parameters:,} | "
                     f"{row.component.published_parameters:,} | {row.deviation:+.2%} | {weights / 1e6:,.1f} MB |")
    return lines, ok


# --- 2. handoff bytes ---------------------------------------------------------------------------

def handoff_bytes(edge) -> tuple[list[str], bool]:
    from tandem.handoff import encode_handoff
    from tandem.pipeline import make_handoff, run_steps, start

    req = request(steps=4, split=2)  # k = 2: DPM-Solver++'s history travels too
    state = start(edge, req)
    run_steps(edge, state, req.split)
    handoff = make_handoff(state, req)
    lines = ["| codec | merge ratio | predicted bytes | measured bytes |", "| --- | --- | --- | --- |"]
    ok = True
    for spec in (CodecSpec("fp16", 0.0), CodecSpec("fp16", 0.5), CodecSpec("int8", 0.0), CodecSpec("int8", 0.5)):
        predicted = handoff_size(4, SIZE // 8, SIZE // 8, spec, req.steps, req.split)
        measured = len(encode_handoff(handoff, spec))
        ok &= predicted == measured
        lines.append(f"| {spec.encoding} | {spec.merge_ratio} | {predicted:,} | {measured:,} |")
    return lines, ok


# --- 3. step time -------------------------------------------------------------------------------

def step_seconds(pack, batch: int, repeats: int) -> float:
    from tandem.pipeline import start
    from tandem.sampling.denoise import advance

    states = [start(pack, request(seed=i, steps=50, split=50)) for i in range(batch)]
    advance(pack.unet, states)  # warm-up: first-call allocations
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        advance(pack.unet, states)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_times(edge, device, batches: list[int], repeats: int) -> list[str]:
    import numpy as np

    lines = ["| batch (requests; CFG rows ×2) | SD 1.5 UNet s/step | BK-SDM-Small UNet s/step | small / large |",
             "| --- | --- | --- | --- |"]
    large = []
    for n in batches:
        big, small = step_seconds(edge, n, repeats), step_seconds(device, n, repeats)
        large.append(big)
        lines.append(f"| {n} | {big:.2f} | {small:.2f} | {small / big:.2f} |")
    b, a = np.polyfit(batches, large, 1)
    lines.append(f"\nEdge step at true size, fitted: {a:.2f} s + {b:.2f} s × n (n = requests in the batch)")
    return lines


# --- 4. memory (one child process per option) ---------------------------------------------------

# The device's options: (weights held compact, text encoder held only while it encodes).
# --transient-text also gives freed memory back to the OS between phases (tandem/memory.py).
DEVICE_OPTIONS = {"device": (False, False), "device --compact-weights": (True, False),
                  "device --transient-text": (False, True), "device --compact-weights --transient-text": (True, True)}


def child(mode: str, large: str, small: str, handoff_file: str) -> str:
    """Runs one option's request in this process and returns its image's digest; the parent
    reads the peak RSS."""
    import torch  # noqa: F401  - the import floor holds torch and the pack code, as every option does

    from tandem.handoff import decode_handoff
    from tandem.packs import load_pack
    from tandem.pipeline import PhaseTimer, decode, finish_on_device, resume, run_steps, start
    from tandem.sampling.schedule import make_schedule

    if mode == "floor":
        return "-"
    if mode == "handoff":
        write_handoff(Path(large), Path(handoff_file))
        return "-"
    req = request()
    if mode == "large-only":
        pack = load_pack(large, device="cpu")
        state = start(pack, req)
        run_steps(pack, state, req.steps)
    else:
        compact, transient = DEVICE_OPTIONS[mode]
        pack = load_pack(small, device="cpu", compact=compact, transient_text=transient, lazy_text=True)
        schedule = make_schedule(req.sampler, req.steps, pack.sampler_config)
        state = resume(pack, decode_handoff(Path(handoff_file).read_bytes(), req, schedule))
        return hashlib.sha256(finish_on_device(pack, state, req.steps, PhaseTimer()).tobytes()).hexdigest()[:12]
    return hashlib.sha256(decode(pack, state.latent).tobytes()).hexdigest()[:12]


def high_water_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across fork and exec, so a child of a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_rss(mode: str, large: Path, small: Path, handoff_file: Path) -> tuple[int, str]:
    """Peak resident bytes of a fresh process running `mode`, and its image's digest."""
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(large), str(small), str(handoff_file)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} process failed: {done.stderr.strip().splitlines()[-1:]}")
    digest, peak = done.stdout.split()[-2:]
    return int(peak), digest


def write_handoff(large: Path, handoff_file: Path) -> None:
    """The memory table's handoff (step k of the 512 px request), made by the edge pack in a child
    process, so that this one stays small."""
    from tandem.handoff import encode_handoff
    from tandem.packs import load_pack
    from tandem.pipeline import make_handoff, run_steps, start

    edge = load_pack(large, device="cpu")
    req = request()
    state = start(edge, req)
    run_steps(edge, state, req.split)
    handoff_file.write_bytes(encode_handoff(make_handoff(state, req), CodecSpec("fp16", 0.0)))


def memory(large: Path, small: Path) -> tuple[list[str], bool]:
    with tempfile.TemporaryDirectory() as tmp:
        handoff_file = Path(tmp) / "handoff.bin"
        subprocess.run([sys.executable, __file__, "--child", "handoff", str(large), str(small), str(handoff_file)],
                       check=True, capture_output=True)
        return memory_table(large, small, handoff_file)


def memory_table(large: Path, small: Path, handoff_file: Path) -> tuple[list[str], bool]:
    modes = ["floor", "large-only", *DEVICE_OPTIONS]
    runs = {mode: peak_rss(mode, large, small, handoff_file) for mode in modes}
    floor = runs["floor"][0]
    base = runs["large-only"][0] - floor
    reference = runs["device"][1]
    lines = ["| process (one 512 px request) | peak RSS | above the import floor | / large-only | image |",
             "| --- | --- | --- | --- | --- |"]
    for mode in modes:
        peak, digest = runs[mode]
        ratio = "" if mode == "floor" else f"{(peak - floor) / base:.2f}"
        image = "" if mode in ("floor", "large-only") else ("= device" if digest == reference else "DIFFERS")
        lines.append(f"| {mode} | {peak / 2**30:.2f} GiB | {(peak - floor) / 2**30:.2f} GiB | {ratio} | {image} |")
    met = {m: (runs[m][0] - floor) / base for m in DEVICE_OPTIONS if runs[m][1] == reference}
    best = min(met, key=met.__getitem__)
    lines.append(f"\nBest device option with the same image: `{best}`, {met[best]:.2f} × the large-only process "
                 f"above the floor (target ≤ {MEMORY_TARGET})")
    return lines, met[best] <= MEMORY_TARGET


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # one option of the memory table, in a process of its own
        digest = child(*argv[1:])
        print(digest, high_water_bytes())
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 2, one timed step each")
    parser.add_argument("--pair-dir", type=Path, default=None, help="the sd15 pair (default: tandem-pack's cache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--only", default="params,handoff,steps,memory",
                        help="sections to run, comma-separated (default: all)")
    args = parser.parse_args(argv)
    from tandem.packs import load_pack

    pair_dir = args.pair_dir or default_cache() / "sd15"
    large, small = ensure_pair(pair_dir)
    only = set(args.only.split(","))
    tables: dict[str, list[str]] = {}
    failed = []
    if "params" in only:
        tables["Parameters"], ok = parameters(pair_dir)
        failed += [] if ok else ["a parameter count is more than 1 % off"]
    if "memory" in only:  # first: the children's figures are their own, but this process stays small
        tables["Device memory"], ok = memory(large, small)
        failed += [] if ok else [f"device memory above {MEMORY_TARGET} × large-only"]
    if only & {"handoff", "steps"}:
        edge = load_pack(large, device="cpu")
        if "handoff" in only:
            tables["Handoff bytes at 512 px"], ok = handoff_bytes(edge)
            failed += [] if ok else ["predicted handoff bytes differ from measured"]
        if "steps" in only:
            device = load_pack(small, device="cpu")
            batches = [1, 2] if args.quick else [1, 2, 4]
            tables["UNet step"] = step_times(edge, device, batches, repeats=1 if args.quick else 3)
    for title, lines in tables.items():
        print(f"\n### {title}\n")
        print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(tables, indent=2))
    print(f"\npeak RSS of this bench process: {high_water_bytes() / 2**30:.1f} GiB")
    for failure in failed:
        print(f"sd_scale: target missed: {failure}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
