"""Tandem against diffusers' own pipeline, side by side in one run (ratios, not absolutes).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.peer_diffusers [--pack tandem/demo_pack] [--users 16]
        [--steps 20] [--rounds 3] [--gap 0.1] [--only batch,staggered,memory]
        [--device-python "$(bench/device_env.sh)"]

1. batch: N users arrive together. diffusers' StableDiffusionPipeline runs them as one static batch
   of N in this process (output_type="latent", no decode); the edge server (its own process, gRPC,
   continuous batching) gets N concurrent clients that run every step on the edge (k = T, fp16
   handoff of the final latent: like for like). Images/s, interleaved rounds, medians.
2. staggered: a request every `--gap` s. diffusers "batch whoever is waiting" (each batch starts
   with the requests that arrived while the previous one ran) vs the edge; mean latency and
   throughput.
3. memory: peak RSS of a fresh process that runs the device's part (small pack, late T/2 steps and
   the decode) vs one that makes the whole image on the large pack, and the import floor of each;
   the device five times: loaded in full as before issue 18 (the whole VAE), lean and encoding its
   prompt itself, lean and given the prompt embeddings (as if the handoff carried them: no text
   encoder loads), and both lean ones again with --compact-weights (fp16-stored weights held as
   stored; their steps + decode timed against the plain lean device, in the same processes).
   Medians over `--rounds` interleaved fresh processes. With --device-python, every
   memory process runs in this environment (.venv: every extra) and in one with the device's
   dependencies only (`tandem[ue]`, as the device's image installs; bench/device_env.sh makes it),
   interleaved. Then, per environment, the import floor one import after another, and the SD
   1.5-scale text encoder against the prompt embedding a handoff would carry instead.

Both sides run one torch thread per process (the services' setting on a 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = ["a red circle at the left on a blue background", "a green square at the top on a black background",
           "a yellow triangle at the center on a white background", "a blue circle at the bottom on a red background"]


def diffusers_pipeline(pack: Path):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pack / "large"), safety_checker=None,
                                                   requires_safety_checker=False, torch_dtype=torch.float32)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, size: int) -> None:
    import torch

    generators = [torch.Generator().manual_seed(s) for s in seeds]
    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generators, height=size, width=size,
         output_type="latent")


def edge_requests(n: int, steps: int, guidance: float, size: int, offset: int = 0):
    from tandem.request import GenerationRequest

    return [GenerationRequest(PROMPTS[i % len(PROMPTS)], steps=steps, split=steps, seed=offset + i,
                              guidance_scale=guidance, height=size, width=size) for i in range(n)]


async def edge_together(address: str, requests) -> None:
    from services.ue_client.transport import fetch_handoff
    from tandem.handoff import CodecSpec

    await asyncio.gather(*(fetch_handoff(address, r, CodecSpec("fp16"), 600) for r in requests))


async def edge_staggered(address: str, requests, gap: float) -> list[float]:
    from services.ue_client.transport import fetch_handoff
    from tandem.handoff import CodecSpec

    async def one(i, r):
        await asyncio.sleep(i * gap)
        began = time.perf_counter()
        await fetch_handoff(address, r, CodecSpec("fp16"), 600)
        return time.perf_counter() - began

    return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))


def diffusers_staggered(pipe, n: int, gap: float, steps: int, guidance: float, size: int) -> list[float]:
    """Arrivals every `gap` s on a timer thread; the serving loop batches whoever is waiting."""
    arrivals: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def arrive():
        for i in range(n):
            time.sleep(max(0.0, start + i * gap - time.perf_counter()))
            with lock:
                arrivals.append(time.perf_counter())

    feeder = threading.Thread(target=arrive)
    feeder.start()
    latencies, served = [], 0
    while served < n:
        with lock:
            waiting = arrivals[served:]
        if not waiting:
            time.sleep(0.001)
            continue
        ids = list(range(served, served + len(waiting)))
        run_diffusers(pipe, [PROMPTS[i % len(PROMPTS)] for i in ids], ids, steps, guidance, size)
        done = time.perf_counter()
        latencies += [done - t for t in waiting]
        served += len(waiting)
    feeder.join()
    return latencies


MEMORY_SCRIPT = """
import json, resource, sys, time
role, pack, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
from tandem.threads import configure_threads
configure_threads(1)
from tandem.packs import load_pack
from tandem.pipeline import decode, run_steps, start
from tandem.request import GenerationRequest
from tandem.sampling.denoise import DenoiseState, Guidance, initial_latent
from tandem.sampling.schedule import make_schedule
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel  # what load_pack imports: the import floor
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
def rss_kib(kind="VmRSS"):  # resident now (ru_maxrss is a peak: import-time spikes would hide the load)
    return int(next(line for line in open("/proc/self/status") if line.startswith(kind)).split()[1])
floor, heap_floor, file_floor = rss_kib(), rss_kib("RssAnon"), rss_kib("RssFile")  # heap; file-backed: code
if role == "device-loaded-in-full":  # as load_pack did before issue 18: the whole VAE
    import tandem.packs
    tandem.packs._load_vae = lambda directory, dtype: AutoencoderKL.from_pretrained(directory, torch_dtype=dtype)
given = role.endswith("given-embedding")
p = load_pack(pack + ("/large" if role == "large" else "/small"), device="cpu", lazy_text=given,
              compact=role.startswith("device-compact"))  # fp16 files held as stored, widened layer by layer
size = p.default_image_size
r = GenerationRequest("a red circle at the left on a blue background", steps=steps, split=steps // 2,
                      guidance_scale=4.0, height=size, width=size)
if given:  # the prompt embeddings arrive with the handoff (their shape, zeros here):
    hidden = json.load(open(p.text_dirs[0] / "config.json"))["hidden_size"]  # no text encoder loads
    tokens = json.load(open(p.text_dirs[1] / "tokenizer_config.json")).get("model_max_length", 77)
    schedule = make_schedule(r.sampler, steps, p.sampler_config)
    s = DenoiseState(schedule=schedule, step=0, latent=initial_latent(r.seed, p.latent_shape(size, size), schedule),
                     guidance=Guidance(cond=torch.zeros(tokens, hidden), uncond=torch.zeros(tokens, hidden), scale=4.0))
else:
    s = start(p, r)
if role != "large":  # from the handoff's place: steps [k, T) and the decode (x0-history as a handoff carries it)
    s.step, s.prev_denoised = steps // 2, torch.zeros_like(s.latent)
began = time.perf_counter()
run_steps(p, s, steps)
decode(p, s.latent)
seconds = time.perf_counter() - began
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"floor_kib": floor, "peak_kib": peak, "end_kib": rss_kib(), "heap_floor_kib": heap_floor,
                  "heap_end_kib": rss_kib("RssAnon"), "file_floor_kib": file_floor,
                  "file_end_kib": rss_kib("RssFile"), "seconds": seconds}}))
"""
MEMORY_ROLES = ("device-loaded-in-full", "device", "device-given-embedding", "device-compact",
                "device-compact-given-embedding", "large")
DEVICE_ROLES = (("device-loaded-in-full", "loaded in full as before issue 18"), ("device", "its own text encoder"),
                ("device-given-embedding", "prompt embeddings given"),
                ("device-compact", "--compact-weights, its own text encoder"),
                ("device-compact-given-embedding", "--compact-weights, prompt embeddings given"))
# The import floor alone, in fresh processes: what load_pack imported before issue 18 (diffusers'
# and transformers' top levels) and what it imports now (the model classes' own modules).
FLOOR_IMPORTS = {
    "before": "from diffusers import AutoencoderKL, UNet2DConditionModel\n"
              "from transformers import CLIPTextModel, CLIPTokenizer",
    "now": "from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel\n"
           "from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL",
}
FLOOR_SCRIPT = """
import torch
{imports}
print(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
"""
# Where the floor comes from: RSS after each import, one after another in one fresh process (each
# row counts what the rows above did not already import). Rows 2-5 are what diffusers' package
# __init__s import on the way to the model classes (torch._dynamo: diffusers.utils.torch_utils;
# scipy: its schedulers and transformers' losses, whenever scipy is installed; transformers:
# diffusers.quantizers; peft: diffusers.hooks), then what the device service adds, then the torch
# code (file-backed pages of libtorch) that running each op kind once touches, whatever the model.
FLOOR_STEPS = ("torch", "torch._dynamo", "scipy.stats", "scipy.optimize", "accelerate", "transformers", "peft",
               "diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl",
               "services.ue_client.server")
FLOOR_STEPS_SCRIPT = """
import importlib.util, json, sys
def rss_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
seen = {{"python": rss_kib()}}
for name in {steps!r}:
    if importlib.util.find_spec(name.split(".")[0]) is not None:  # scipy: only where installed
        __import__(name)
        seen[name] = rss_kib()
import torch, torch.nn.functional as F
with torch.no_grad():  # the op kinds a UNet, a VAE decoder and CLIP run, once each on tiny tensors
    x = F.silu(F.group_norm(F.conv2d(torch.randn(2, 32, 8, 8), torch.randn(32, 32, 3, 3), padding=1), 8))
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    q = torch.randn(2, 4, 16, 8)
    x = F.scaled_dot_product_attention(q, q, q)
    x = F.layer_norm(F.gelu(F.linear(torch.randn(2, 16, 32), torch.randn(64, 32))), (64,))
    x = F.embedding(torch.tensor([[1, 2]]), torch.randn(10, 8))
seen["first ops, tiny tensors, no weights"] = rss_kib()
print(json.dumps(seen))
"""


# Shipping the prompt embedding instead of loading a text encoder, at SD 1.5 scale: SD's CLIP
# ViT-L/14 text encoder built from its published configuration (random weights: nothing from a
# hub, and weights' values do not change memory), encoding a prompt and its negative, in the
# dtype a device runs it in; the tokenizer is not counted (its vocabulary files are not at hand).
SD_TEXT_SCRIPT = """
import json, resource, sys
import torch
from transformers.models.clip.configuration_clip import CLIPTextConfig
from transformers.models.clip.modeling_clip import CLIPTextModel
def rss_kib():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1])
torch.set_num_threads(1)
floor = rss_kib()
config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
torch.set_default_dtype(getattr(torch, sys.argv[1]))
model = CLIPTextModel(config).eval()
with torch.no_grad():
    hidden = model(torch.randint(0, config.vocab_size, (2, 77)))[0]
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "floor_kib": floor,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "embedding_bytes": hidden[0].numel() * hidden.element_size()}))
"""


def sd_text_lines(rounds: int) -> list[str]:
    from tandem.codec.spec import CodecSpec, handoff_size

    handoff = handoff_size(4, 64, 64, CodecSpec("fp16"), 20, 10)  # SD 1.5 at 512 px, k = T/2
    lines = []
    for dtype in ("float32", "float16"):
        runs = [json.loads(fresh_python(SD_TEXT_SCRIPT, dtype)) for _ in range(rounds)]
        above = statistics.median(r["peak_kib"] - r["floor_kib"] for r in runs) / 1024
        embedding = runs[0]["embedding_bytes"]
        lines.append(f"SD 1.5 scale, {dtype}: the text encoder ({runs[0]['params'] / 1e6:.0f}M params) encoding a "
                     f"prompt peaks {above:.0f} MiB above its floor; the embedding it makes is {embedding:,} B "
                     f"(+ as much again for the negative) vs the fp16 handoff at k = T/2 {handoff:,} B -> "
                     f"{embedding / handoff:.1f}x, with the negative {2 * embedding / handoff:.1f}x")
    return lines


def fresh_python(script: str, *args: str, python: str = sys.executable) -> str:
    # PYTHONPATH: the checkout's own code (the device environment has no tandem installed, bench/device_env.sh)
    done = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, check=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(ROOT)})
    return done.stdout.strip().splitlines()[-1]


def memory(pack: Path, steps: int, rounds: int, pythons: dict[str, str]) -> dict[str, dict[str, dict[str, float]]]:
    """Each environment's and role's figures, medians over `rounds` interleaved fresh processes."""
    script = MEMORY_SCRIPT.format()  # (its doubled braces)
    runs: dict[str, dict[str, list[dict[str, int]]]] = {env: {role: [] for role in MEMORY_ROLES} for env in pythons}
    for _ in range(rounds):
        for env, python in pythons.items():
            for role in MEMORY_ROLES:
                runs[env][role].append(json.loads(fresh_python(script, role, str(pack), str(steps), python=python)))
    return {env: {role: {key: statistics.median(r[key] for r in seen) for key in seen[0]}
                  for role, seen in by_role.items()} for env, by_role in runs.items()}


def import_floors(rounds: int, pythons: dict[str, str]) -> dict[str, float]:
    """Median RSS (KiB) after each import set, in interleaved fresh processes: the sets of
    FLOOR_IMPORTS in this environment, "now" in the others."""
    tries = {name: (imports, sys.executable) for name, imports in FLOOR_IMPORTS.items()}
    tries |= {f"now, {env}": (FLOOR_IMPORTS["now"], python) for env, python in pythons.items() if env != "dev"}
    seen: dict[str, list[int]] = {name: [] for name in tries}
    for _ in range(rounds):
        for name, (imports, python) in tries.items():
            seen[name].append(int(fresh_python(FLOOR_SCRIPT.format(imports=imports), python=python)))
    return {name: statistics.median(values) for name, values in seen.items()}


def floor_steps(rounds: int, pythons: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per environment, the median RSS (KiB) after each of FLOOR_STEPS (those installed)."""
    script = FLOOR_STEPS_SCRIPT.format(steps=FLOOR_STEPS)
    seen: dict[str, list[dict[str, int]]] = {env: [] for env in pythons}
    for _ in range(rounds):
        for env, python in pythons.items():
            seen[env].append(json.loads(fresh_python(script, python=python)))
    return {env: {step: statistics.median(r[step] for r in runs) for step in runs[0]} for env, runs in seen.items()}


def memory_lines(m: dict[str, dict[str, float]], steps: int, env: str) -> list[str]:
    large = m["large"]
    lines = []
    for role, what in DEVICE_ROLES:
        d = m[role]
        above = (d["peak_kib"] - d["floor_kib"]) / max(1, large["peak_kib"] - large["floor_kib"])
        lines.append(f"[{env}] device process (small pack, {what}, late {steps // 2} of {steps} steps + decode): peak "
                     f"{d['peak_kib'] / 1024:.0f} MiB vs large pack whole image {large['peak_kib'] / 1024:.0f} MiB "
                     f"-> {d['peak_kib'] / large['peak_kib']:.2f}x; above the import floor "
                     f"({d['floor_kib'] / 1024:.0f} MiB; large {large['floor_kib'] / 1024:.0f} MiB) {above:.2f}x")
    full = m["device-loaded-in-full"]
    lean_above, full_above = m["device"]["peak_kib"] - m["device"]["floor_kib"], full["peak_kib"] - full["floor_kib"]
    lines.append(f"[{env}] device lean vs loaded in full: above the import floor {lean_above / 1024:.0f} vs "
                 f"{full_above / 1024:.0f} MiB -> {lean_above / full_above:.2f}x")
    for kind, what in (("heap", "heap (RssAnon)"), ("file", "code and files (RssFile)")):
        grew = {role: (m[role][f"{kind}_end_kib"] - m[role][f"{kind}_floor_kib"]) / 1024 for role in m}
        lines.append(f"[{env}] {what} above the floor after the image, large {grew['large']:.0f} MiB; device "
                     + ", ".join(f"{role} {grew[role]:.0f} MiB {grew[role] / grew['large']:.2f}x"
                                 for role, _ in DEVICE_ROLES))
    # compact weights cost time: each layer widened per call (timed in the same processes, so
    # run this part under the bench lock when the figure matters)
    lines.append(f"[{env}] device steps + decode, --compact-weights vs not: "
                 f"{m['device-compact']['seconds']:.3f} vs {m['device']['seconds']:.3f} s -> "
                 f"{m['device-compact']['seconds'] / m['device']['seconds']:.2f}x")
    return lines


def floor_lines(floors: dict[str, float], steps: dict[str, dict[str, float]], rounds: int) -> list[str]:
    before = floors["before"]
    lines = [f"import floor (torch + model classes, median of {rounds} fresh processes): before "
             f"{before / 1024:.1f} MiB, " + ", ".join(f"{name} {kib / 1024:.1f} MiB -> {kib / before:.3f}x"
                                                    for name, kib in floors.items() if name != "before")]
    for env, rss in steps.items():
        names = list(rss)
        grew = ", ".join(f"{name} +{(rss[name] - rss[prev]) / 1024:.0f}" for prev, name in zip(names, names[1:]))
        lines.append(f"[{env}] RSS one import after another, then the first ops (MiB): {grew}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, default=ROOT / "tandem/demo_pack")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gap", type=float, default=0.1)
    parser.add_argument("--only", default="batch,staggered,memory")
    parser.add_argument("--device-python", help="memory: also run every process under this interpreter, one of "
                        "an environment with the device's dependencies only (bench/device_env.sh)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    lines = []
    if parts & {"batch", "staggered"}:
        import torch

        from services.common.launcher import NO_PER_USER_CAPS, ONE_THREAD, edge_server
        from tandem.packs import PackManifest

        torch.set_num_threads(1)
        manifest = PackManifest.read(args.pack / "large")
        defaults = manifest.request_defaults()  # before the pack loads: a size it declares, else the library's
        guidance, size = float(defaults.guidance_scale), defaults.image_size
        pipe = diffusers_pipeline(args.pack)
        with tempfile.TemporaryDirectory() as tmp, edge_server(args.pack / "large", Path(tmp), "--max-batch",
                                                               str(max(16, args.users)), *NO_PER_USER_CAPS,
                                                               env=ONE_THREAD) as edge:
            run_diffusers(pipe, PROMPTS[:2], [0, 1], args.steps, guidance, size)  # warm-up both
            asyncio.run(edge_together(edge.address, edge_requests(2, args.steps, guidance, size)))
            if "batch" in parts:
                ours, theirs = [], []
                for k in range(args.rounds):  # interleaved rounds: machine noise hits both alike
                    requests = edge_requests(args.users, args.steps, guidance, size, offset=100 * k)
                    began = time.perf_counter()
                    asyncio.run(edge_together(edge.address, requests))
                    ours.append(args.users / (time.perf_counter() - began))
                    began = time.perf_counter()
                    run_diffusers(pipe, [r.prompt for r in requests], [r.seed for r in requests], args.steps,
                                  guidance, size)
                    theirs.append(args.users / (time.perf_counter() - began))
                o, t = statistics.median(ours), statistics.median(theirs)
                lines.append(f"batch of {args.users} together: edge {o:.2f} img/s, diffusers static batch "
                             f"{t:.2f} img/s -> {o / t:.2f}x")
            if "staggered" in parts:
                ours_lat, theirs_lat, ours_tp, theirs_tp = [], [], [], []
                for k in range(args.rounds):
                    requests = edge_requests(args.users, args.steps, guidance, size, offset=1000 + 100 * k)
                    began = time.perf_counter()
                    lat = asyncio.run(edge_staggered(edge.address, requests, args.gap))
                    ours_tp.append(args.users / (time.perf_counter() - began))
                    ours_lat.append(statistics.mean(lat))
                    began = time.perf_counter()
                    lat = diffusers_staggered(pipe, args.users, args.gap, args.steps, guidance, size)
                    theirs_tp.append(args.users / (time.perf_counter() - began))
                    theirs_lat.append(statistics.mean(lat))
                ol, tl = statistics.median(ours_lat), statistics.median(theirs_lat)
                otp, ttp = statistics.median(ours_tp), statistics.median(theirs_tp)
                lines.append(f"arrivals every {args.gap} s: mean latency edge {ol:.2f} s vs diffusers 'batch whoever "
                             f"is waiting' {tl:.2f} s -> {ol / tl:.2f}x; throughput {otp:.2f} vs {ttp:.2f} img/s "
                             f"-> {otp / ttp:.2f}x")
    if "memory" in parts:
        pythons = {"dev": sys.executable} | ({"device env": args.device_python} if args.device_python else {})
        for env, figures in memory(args.pack, args.steps, args.rounds, pythons).items():
            lines += memory_lines(figures, args.steps, env)
        lines += floor_lines(import_floors(args.rounds, pythons), floor_steps(args.rounds, pythons), args.rounds)
        lines += sd_text_lines(args.rounds)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
