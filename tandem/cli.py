"""`tandem` command line: generate an image through the split pipeline.

    tandem generate "a red circle at the left on a blue background" --out x.png --user alice

Without --large/--small it uses the demo pack shipped with Tandem; if that is not installed it
falls back to tiny random packs and says so (their images are noise).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tandem.handoff import DEFAULT_STRATEGY, ENCODINGS, STRATEGIES, CodecSpec
from tandem.request import GenerationRequest, RequestError
from tandem.sampling.schedule import SAMPLERS

DEMO_PACK = Path(__file__).parent / "demo_pack"
TINY_PACK_CACHE = Path.home() / ".cache" / "tandem" / "tiny-random-v1"

# Request/codec field → the flag that sets it, so errors name what the user typed.
FLAGS = {
    "prompt": "PROMPT",
    "negative_prompt": "--negative-prompt",
    "steps": "--steps",
    "split": "--split",
    "sampler": "--sampler",
    "guidance_scale": "--guidance",
    "seed": "--seed",
    "height": "--size",
    "width": "--size",
    "user": "--user",
    "codec": "--codec",
    "merge_ratio": "--merge-ratio",
    "merge_strategy": "--merge-strategy",
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


@dataclass(frozen=True)
class PackChoice:
    large: Path
    small: Path
    random: bool


def default_packs() -> PackChoice:
    if (DEMO_PACK / "large").is_dir() and (DEMO_PACK / "small").is_dir():
        return PackChoice(DEMO_PACK / "large", DEMO_PACK / "small", random=False)
    from tandem.tiny_pack import build_tiny_pack

    large, small = TINY_PACK_CACHE / "large", TINY_PACK_CACHE / "small"
    if not (small / "tandem_pack.json").is_file():
        build_tiny_pack(large, seed=1, unet_channels=(32, 64), role="large", name="tiny-random-large")
        build_tiny_pack(small, seed=2, unet_channels=(16, 32), role="small", name="tiny-random-small", shared_from="../large")
    return PackChoice(large, small, random=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Split text-to-image diffusion (edge + device).")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate one image through the split pipeline")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--out", type=Path, default=Path("tandem.png"), help="PNG to write (default tandem.png)")
    gen.add_argument("--steps", type=int, help="total denoising steps T (default: the pack's)")
    gen.add_argument("--split", type=int, help="steps run on the edge, k in 0..T (default T/2)")
    gen.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the pack's)")
    gen.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pack's)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--size", type=int, help="image height and width in pixels (default: the pack's)")
    gen.add_argument("--user", help="personalize the device steps with this user's LoRA")
    # Default None: with --scheduler, options left unset come from the plan.
    gen.add_argument("--codec", choices=ENCODINGS, help="handoff precision (default fp16)")
    gen.add_argument("--merge-ratio", type=float, help="token merge ratio r in [0, 0.75] (default 0)")
    gen.add_argument("--merge-strategy", choices=STRATEGIES, help=f"what token merging merges (default {DEFAULT_STRATEGY})")
    gen.add_argument("--large", type=Path, help="edge model pack directory or hub id (default: demo pack)")
    gen.add_argument("--small", type=Path, help="device model pack directory or hub id (default: demo pack)")
    gen.add_argument("--device", help="torch device for both packs (default: cuda if present, else cpu)")
    gen.add_argument("--edge", metavar="HOST:PORT", help="run the edge steps on this edge server (gRPC)")
    gen.add_argument("--ue", metavar="HOST:PORT", help="send the request to a running device service instead")
    gen.add_argument("--timeout", type=float, default=120.0, help="deadline for the edge call in seconds (120)")
    gen.add_argument("--scheduler", metavar="HOST:PORT", help="ask this scheduler for T, k, r, codec and the edge")
    gen.add_argument("--device-class", default="laptop-gpu", help="this device's class, for the scheduler (laptop-gpu)")
    gen.add_argument("--link-mbps", type=float, default=100.0, help="this device's downlink estimate, for the scheduler (100)")
    gen.add_argument("--latency-budget", type=float, default=0.0, help="seconds the image may take, for the scheduler (0: none)")
    from services.security import add_client_args, tandem_env

    add_client_args(gen, tandem_env, what="the edge, device service and scheduler")
    gen.add_argument("--json", action="store_true", help="print the breakdown as JSON on stdout")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _generate(args)
    except CliError as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
    except RequestError as exc:
        print(f"tandem: error: {FLAGS.get(exc.field, exc.field)}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tandem generate ... --json | head`
        return 0


def _generate(args: argparse.Namespace) -> int:
    from tandem.packs import PackError, load_pack
    from tandem.pipeline import HybridPipeline

    if args.out.suffix.lower() != ".png":
        raise CliError(f"--out: {str(args.out)!r} must end in .png")
    if not args.out.parent.exists():
        raise CliError(f"--out: directory {str(args.out.parent)!r} does not exist")
    if args.timeout <= 0:
        raise CliError(f"--timeout: must be positive, got {args.timeout:g}")
    args.security = _client_security(args)
    from services.ue_client.trust import credentials_for_edge, trusted_edges

    trusted = trusted_edges(args.edge)  # before a scheduler's plan can fill in args.edge
    plan = _apply_plan(args) if args.scheduler else None
    codec = CodecSpec(encoding=args.codec or "fp16", merge_ratio=args.merge_ratio or 0.0,
                      strategy=args.merge_strategy or DEFAULT_STRATEGY).validate()
    if args.ue:
        return _generate_on_device_service(args, codec, plan)
    choice = default_packs() if args.large is None and args.small is None else None
    large = args.large or (choice.large if choice else None)
    small = args.small or (choice.small if choice else None)
    if small is None or (large is None and not args.edge):
        raise CliError("--large and --small go together (or leave both out for the demo pack; with --edge, --small alone)")
    if choice is not None and choice.random:
        print(
            "tandem: NOTE: the trained demo pack is not installed; using tiny RANDOM packs "
            f"({TINY_PACK_CACHE}): the image will be noise",
            file=sys.stderr,
        )
    try:
        ue_pack = load_pack(small, device=args.device)
        # With --edge the large pack lives on the edge server; in-process we load it here.
        edge_pack = None if args.edge else load_pack(large, device=args.device)
        pipeline = HybridPipeline(edge_pack, ue_pack) if edge_pack is not None else None
    except PackError as exc:
        raise CliError(str(exc)) from exc
    manifest = (edge_pack or ue_pack).manifest
    steps = args.steps if args.steps is not None else manifest.default_steps
    size = args.size if args.size is not None else (edge_pack or ue_pack).default_image_size
    request = GenerationRequest(
        prompt=args.prompt,
        steps=steps,
        split=args.split if args.split is not None else steps // 2 if isinstance(steps, int) else 0,
        sampler=args.sampler or manifest.default_sampler,
        guidance_scale=args.guidance if args.guidance is not None else manifest.default_guidance,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        height=size,
        width=size,
        user=args.user,
    ).validate()
    if request.user is not None and request.user not in ue_pack.users:
        known = ", ".join(ue_pack.users) or "none"
        raise RequestError("user", f"unknown user {request.user!r} for pack {ue_pack.name!r} (users: {known})")
    progress = None if args.quiet else _ProgressBars(request)
    try:
        if pipeline is not None:
            result = pipeline.generate(request, codec, on_step=progress)
        else:
            from services.ue_client.device import generate_via_edge

            security, note = credentials_for_edge(args.edge, args.security, trusted)
            if note:
                print(f"tandem: NOTE: {note}", file=sys.stderr)
            result = generate_via_edge(ue_pack, request, codec, args.edge, args.timeout, on_step=progress,
                                       security=security)
    finally:
        if progress is not None:
            progress.close()
    _save_png(result.image, args.out)
    edge_name = edge_pack.name if edge_pack is not None else f"edge {args.edge}"
    report = _report(request, codec, result, args.out, edge_name, ue_pack.name, random=bool(choice and choice.random))
    report["mode"] = "grpc" if args.edge else "in-process"
    report["plan"] = _report_plan(args, plan, result.seconds, result.edge_steps, result.ue_steps,
                                  result.handoff_bytes, result.fallback)
    if result.fallback:
        print(f"tandem: NOTE: {result.fallback}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_format(report))
    return 0


def _generate_on_device_service(args: argparse.Namespace, codec: CodecSpec, plan) -> int:
    """--ue: the device service holds the packs; unset options take its pack's defaults."""
    from services.ue_client.client import generate_on_device_service
    from services.ue_client.transport import EdgeError
    from tandem.v1 import edge_pb2
    from tandem.wire import codec_to_proto

    message = edge_pb2.GenerateRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps or 0,
        sampler=args.sampler or "",
        guidance_scale=args.guidance or 0.0,
        seed=args.seed,
        height=args.size or 0,
        width=args.size or 0,
        user=args.user or "",
        codec=codec_to_proto(codec),
    )
    if args.split is not None:
        message.split = args.split
    progress = None if args.quiet else _ProgressBars(None)
    try:
        result = generate_on_device_service(args.ue, message, args.edge, args.timeout, progress, args.security)
    except EdgeError as exc:
        if exc.code == "INVALID_ARGUMENT":
            field, _, message_text = exc.message.partition(": ")
            raise RequestError(field, message_text) from exc
        raise CliError(f"device service {args.ue}: {exc}") from exc
    finally:
        if progress is not None:
            progress.close()
    args.out.write_bytes(result.png)
    report = {
        "out": str(args.out),
        "mode": "device-service",
        "device_service": args.ue,
        "edge": args.edge,
        "ue_pack": result.device_pack,
        "edge_steps": result.edge_steps,
        "ue_steps": result.device_steps,
        "handoff_bytes": result.handoff_bytes,
        "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
        "fallback": result.fallback or None,
        "plan": _report_plan(args, plan, dict(result.seconds), result.edge_steps, result.device_steps,
                             result.handoff_bytes, result.fallback),
    }
    if result.fallback:
        print(f"tandem: NOTE: {result.fallback}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {args.out} via device service {args.ue}: {result.edge_steps} edge + {result.device_steps} device steps, "
              f"handoff {result.handoff_bytes} bytes, {sum(result.seconds.values()):.3f} s"
              + (f"\n  FALLBACK: {result.fallback}" if result.fallback else ""))
    return 0


def _client_security(args: argparse.Namespace):
    """--tls-ca/--tls-cert/--tls-key/--token for every connection this command makes."""
    from services.security import SecurityError, client_security

    try:
        return client_security(args)
    except SecurityError as exc:
        raise CliError(str(exc)) from exc


def _apply_plan(args: argparse.Namespace):
    """--scheduler: options the user did not set come from the plan; without one, the defaults."""
    from services.scheduler.client import request_plan
    from services.scheduler.options import split_for

    errors: list[str] = []
    plan = request_plan(args.scheduler, args.device_class, bandwidth_bps=args.link_mbps * 1e6, personalized_user=args.user,
                        latency_budget_s=args.latency_budget, prompt_chars=len(args.prompt),
                        timeout=min(args.timeout, 5.0), on_error=errors.append, security=args.security)
    if plan is None:
        reason = errors[0] if errors else "no answer"
        print(f"tandem: NOTE: scheduler {args.scheduler} gave no plan ({reason}); using the default options", file=sys.stderr)
        return None
    if args.split is None:  # the plan's split fraction, also when --steps overrides its T
        args.split = plan.split if args.steps in (None, plan.steps) else split_for(args.steps, plan.split / plan.steps)
    args.steps = plan.steps if args.steps is None else args.steps
    args.codec = args.codec or plan.encoding
    args.merge_ratio = plan.merge_ratio if args.merge_ratio is None else args.merge_ratio
    args.merge_strategy = args.merge_strategy or plan.merge_strategy
    args.edge = args.edge or plan.edge_address or None
    return plan


def _report_plan(args, plan, seconds: dict, edge_steps: int, ue_steps: int, handoff_bytes: int, fallback) -> dict | None:
    """Sends the measured phases for the plan (best effort); the plan as the breakdown shows it."""
    if plan is None:
        return None
    from services.scheduler.client import report

    reported = report(args.scheduler, plan.plan_id, seconds, edge_steps, ue_steps, handoff_bytes, bool(fallback),
                      timeout=min(args.timeout, 5.0), security=args.security)
    return {"id": plan.plan_id, "scheduler": args.scheduler, "predicted_seconds": dict(plan.predicted_seconds),
            "frame_size": plan.frame_size, "reported": reported}


class _ProgressBars:
    """One tqdm bar per phase on stderr, opened when the phase reports its first step."""

    LABELS = {"queue": "edge queue", "edge": "edge steps", "transfer": "handoff bytes", "device": "device steps",
              "decode": "decode"}

    def __init__(self, request: GenerationRequest | None):
        self.request = request
        self.bars: dict = {}
        self.first_position = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            self.close()  # phases run one after the other: finish the previous bar first
            if phase == "queue":  # `done` is the queue position; count down to 0
                total, self.first_position = done + 1, done
            unit = {"transfer": "B", "queue": "slot", "decode": "image"}.get(phase, "step")
            bar = self.bars[phase] = tqdm(total=total, desc=self.LABELS.get(phase, phase), unit=unit, leave=True)
        value = self.first_position - done + 1 if phase == "queue" else done
        bar.update(value - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _save_png(image, out: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(out)


def _report(request, codec, result, out: Path, edge_name: str, ue_name: str, random: bool) -> dict:
    return {
        "out": str(out),
        "width": int(result.image.shape[1]),
        "height": int(result.image.shape[0]),
        "prompt": request.prompt,
        "seed": request.seed,
        "user": request.user,
        "sampler": request.sampler,
        "total_steps": request.steps,
        "split": request.split,
        "edge_steps": result.edge_steps,
        "ue_steps": result.ue_steps,
        "codec": codec.to_dict(),
        "handoff_bytes": result.handoff_bytes,
        "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
        "edge_pack": edge_name,
        "ue_pack": ue_name,
        "random_pack": random,
        "fallback": result.fallback,
        "mode": "in-process",
    }


def _format(report: dict) -> str:
    s = report["seconds"]
    codec = report["codec"]
    lines = [f"wrote {report['out']} ({report['width']}x{report['height']}, seed {report['seed']}, {report['mode']})"]
    if "queue" in s:
        lines.append(f"  queue  {s['queue']:.3f} s")
    lines += [
        f"  edge   {report['edge_pack']}: {report['edge_steps']} steps   {s.get('edge_steps', 0.0):.3f} s",
        f"  handoff {report['handoff_bytes']} bytes ({codec['encoding']}, merge ratio {codec['merge_ratio']:g})"
        f"   {s.get('transfer', 0.0) + s.get('handoff', 0.0):.3f} s",
        f"  device {report['ue_pack']}{' + ' + report['user'] if report['user'] else ''}: "
        f"{report['ue_steps']} steps   {s.get('ue_steps', 0.0):.3f} s",
        f"  decode {s.get('decode', 0.0):.3f} s   total {sum(s.values()):.3f} s",
    ]
    if report["plan"]:
        plan = report["plan"]
        lines.append(f"  plan   {plan['id'][:8]} from {plan['scheduler']} (frame of {plan['frame_size']}): "
                     f"predicted {plan['predicted_seconds']['total']:.3f} s")
    if report["fallback"]:
        lines.append(f"  FALLBACK: {report['fallback']}")
    if report["random_pack"]:
        lines.append("  (tiny RANDOM packs: the image is noise; install the demo pack for real images)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
