"""`tandem` command line: generate an image through the split pipeline.

    tandem generate "a red circle at the left on a blue background" --out x.png --user alice

Without --large/--small it uses the demo pack shipped with Tandem; if that is not installed it
falls back to tiny random packs and says so (their images are noise).

Flags are checked before torch or any model code loads (the imports at the top are torch-free),
so a mistake costs a fraction of a second and one line, never a usage block or a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from services.common.envargs import EnvParser
from services.ue_client.link import LinkBook, LinkEstimate, LinkSample, load_book, save_book, state_path
from tandem.codec.spec import DEFAULT_STRATEGY, ENCODINGS, STRATEGIES, CodecSpec
from tandem.packs import DEMO_PACK
from tandem.request import GenerationRequest, RequestError
from tandem.sampling.names import SAMPLERS
from tandem.threads import parse_threads

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


class EdgeRequired(Exception):
    """--require-edge and the edge did not deliver: printed as one line, exit status 3."""


class _Parser(EnvParser):
    """argparse that reports a bad flag in one line (`tandem: error: --sampler: invalid choice ...`)
    instead of the usage block; a variable standing for the flag is named in front."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", lambda m: m.group(1).split("/")[0] + ": ", message)
        self.exit(2, f"tandem: error: {self.name_variable(message)} (see `tandem generate --help`)\n")


def _thread_count(text: str) -> int:
    """--threads (and TANDEM_THREADS, its default): configure_threads' own check, made while parsing."""
    try:
        return parse_threads(text, "--threads")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None


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
    from services.common.security import add_client_args, tandem_env

    parser = _Parser(prog="tandem", description="Split text-to-image diffusion (edge + device).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
    gen.add_argument("--device", help="torch device for both packs: cpu, cuda, cuda:N, mps (default: cuda if present, else cpu)")
    # An empty TANDEM_THREADS is unset, as configure_threads reads it for every other command.
    gen.add_argument("--threads", type=_thread_count, default=tandem_env("threads", None) or None,
                     help="CPU threads for torch (default: TANDEM_THREADS, else half the cores, 1..4)")
    gen.add_argument("--edge", metavar="HOST:PORT", help="run the edge steps on this edge server (gRPC)")
    gen.add_argument("--require-edge", action="store_true",
                     help="fail (exit 3) instead of finishing on the device model when the edge does not deliver")
    gen.add_argument("--ue", metavar="HOST:PORT", help="send the request to a running device service instead")
    gen.add_argument("--timeout", type=float, default=120.0, help="deadline for the edge call in seconds (120)")
    gen.add_argument("--scheduler", metavar="HOST:PORT", help="ask this scheduler for T, k, r, codec and the edge")
    gen.add_argument("--device-class", default="laptop-gpu", help="this device's class, for the scheduler (laptop-gpu)")
    gen.add_argument("--link-mbps", type=float,
                     help="override this device's downlink for the scheduler, Mbit/s (default: measured from the "
                          "earlier handoffs, see --link-state; before any, the scheduler's own estimate)")
    gen.add_argument("--link-state", type=Path,
                     help="JSON file keeping the measured link between runs (default: $TANDEM_LINK_STATE, else "
                          "$XDG_CACHE_HOME/tandem/links.json)")
    gen.add_argument("--latency-budget", type=float, default=0.0, help="seconds the image may take, for the scheduler (0: none)")
    add_client_args(gen, tandem_env, what="the edge, device service and scheduler")
    gen.add_argument("--json", action="store_true", help="print the breakdown as JSON on stdout")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; as the `tandem` program (argv None) the process ends right after its
    output is flushed: tearing down torch's and diffusers' modules took 1.2-1.6 s and does nothing."""
    code = _main(argv)
    if argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
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
    except EdgeRequired as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("tandem: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `tandem generate ... --json | head`
        return 0


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")


def check_address(text: str, flag: str) -> str:
    """HOST:PORT (or [IPv6]:PORT, or unix:PATH); CliError naming the flag otherwise. gRPC would take
    "127.0.0.1" as port 443 and fail much later, as if the edge were down."""
    if text.startswith("unix:"):
        return text
    host, sep, port = text.rpartition(":")
    bad_host = not host or (":" in host and not (host.startswith("[") and host.endswith("]")))
    if not sep or bad_host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CliError(f"{flag}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    return text


def _check_pack_source(source: Path | None, flag: str) -> None:
    if source is None or source.expanduser().is_dir():
        return
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):  # a hub id: fetched later
        return
    raise CliError(f"{flag}: model pack {text!r} not found: no such directory")


def _check_flags(args: argparse.Namespace) -> None:
    """Everything that can be checked without torch."""
    if args.out.suffix.lower() != ".png":
        raise CliError(f"--out: {str(args.out)!r} must end in .png")
    if not args.out.parent.exists():
        raise CliError(f"--out: directory {str(args.out.parent)!r} does not exist")
    if args.timeout <= 0:
        raise CliError(f"--timeout: must be positive, got {args.timeout:g}")
    if args.device is not None and not _DEVICE.match(args.device):
        raise CliError(f"--device: unknown device {args.device!r} (cpu, cuda, cuda:N or mps)")
    for flag in ("edge", "ue", "scheduler"):
        if getattr(args, flag):
            check_address(getattr(args, flag), f"--{flag}")
    if args.large is not None and args.small is None:
        raise CliError("--large needs --small too (the device pack), or leave both out for the demo pack")
    if args.small is not None and args.large is None and not (args.edge or args.scheduler or args.ue):
        raise CliError("--small needs --large too (the edge pack) or --edge HOST:PORT, or leave both out for the demo pack")
    _check_pack_source(args.large, "--large")
    _check_pack_source(args.small, "--small")
    if args.require_edge and not (args.edge or args.scheduler or args.ue):
        raise CliError("--require-edge needs --edge, --ue or --scheduler (there is no edge to require)")
    if args.latency_budget < 0:
        raise CliError(f"--latency-budget: must be >= 0, got {args.latency_budget:g}")
    if args.link_mbps is not None and not (math.isfinite(args.link_mbps) and 0 < args.link_mbps <= 1e6):
        raise CliError(f"--link-mbps: must be a positive number of Mbit/s up to 1e6, got {args.link_mbps:g}")
    CodecSpec(encoding=args.codec or "fp16", merge_ratio=args.merge_ratio or 0.0,
              strategy=args.merge_strategy or DEFAULT_STRATEGY).validate()


def _check_device_available(device: str | None) -> None:
    """After torch loads: a CUDA or MPS device this machine does not have is one line."""
    if device is None or device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
        if int(device.partition(":")[2] or 0) >= torch.cuda.device_count():
            raise CliError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise CliError("--device mps: MPS is not available here; use --device cpu")


def _generate(args: argparse.Namespace) -> int:
    from tandem.threads import configure_threads

    _check_flags(args)
    args.security = _client_security(args)
    configure_threads(args.threads)  # before torch loads
    from services.ue_client.trust import credentials_for_edge, trusted_edges

    trusted = trusted_edges(args.edge)  # before a scheduler's plan can fill in args.edge
    choice = default_packs() if args.large is None and args.small is None else None
    large = args.large or (choice.large if choice else None)
    small = args.small or (choice.small if choice else None)
    pack_dir = small if choice is None or not choice.random else None
    _check_request_early(args, large if large is not None and not args.ue else pack_dir, pack_dir)
    args.prompt = _check_prompt(args.prompt, pack_dir)
    links = _LinkState.open(args)
    plan = _apply_plan(args, links) if args.scheduler else None
    codec = CodecSpec(encoding=args.codec or "fp16", merge_ratio=args.merge_ratio or 0.0,
                      strategy=args.merge_strategy or DEFAULT_STRATEGY).validate()
    if args.require_edge and not args.edge and not args.ue:
        raise EdgeRequired("--require-edge: the scheduler's plan names no edge for this request")
    if args.ue:
        return _generate_on_device_service(args, codec, plan, links)
    if small is None or (large is None and not args.edge):
        raise CliError("--small alone needs an edge: --edge HOST:PORT, or a --scheduler that names one")
    from tandem.packs import PackError, load_pack
    from tandem.pipeline import HybridPipeline

    _check_device_available(args.device)
    if choice is not None and choice.random:
        print(
            "tandem: NOTE: the trained demo pack is not installed; using tiny RANDOM packs "
            f"({TINY_PACK_CACHE}): the image will be noise",
            file=sys.stderr,
        )
    try:
        ue_pack = load_pack(small, device=args.device)
    except PackError as exc:
        raise CliError(f"--small: {exc}" if args.small else str(exc)) from exc
    try:  # with --edge the large pack lives on the edge server; in-process we load it here
        edge_pack = load_pack(large, device=args.device) if large is not None and not args.edge else None
        pipeline = HybridPipeline(edge_pack, ue_pack) if edge_pack is not None else None
    except PackError as exc:
        raise CliError(f"--large: {exc}" if args.large else str(exc)) from exc
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
    _warn_lora_unused(request.user, request.split, request.steps)
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
                                       security=security, on_link=links.recorder(args.edge))
    finally:
        if progress is not None:
            progress.close()
    if result.fallback and args.require_edge:
        raise EdgeRequired(f"--require-edge: {_explain_fallback(args, result.fallback)}")
    _save_png(result.image, args.out)
    edge_name = edge_pack.name if edge_pack is not None else f"edge {args.edge}"
    report = _report(request, codec, result, args.out, edge_name, ue_pack.name, random=bool(choice and choice.random))
    report["mode"] = "grpc" if args.edge else "in-process"
    report["plan"] = _report_plan(args, plan, result.seconds, result.edge_steps, result.device_steps,
                                  result.handoff_bytes, result.fallback)
    report["link"] = links.report()
    links.save()
    if result.fallback:
        print(f"tandem: NOTE: {_explain_fallback(args, result.fallback)}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_format(report))
    return 0


def _generate_on_device_service(args: argparse.Namespace, codec: CodecSpec, plan, links: _LinkState) -> int:
    """--ue: the device service holds the packs; unset options take its pack's defaults."""
    from services.common.wire import codec_to_proto
    from services.ue_client.client import generate_on_device_service
    from services.ue_client.transport import EdgeError
    from tandem.v1 import edge_pb2

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
    if result.fallback and args.require_edge:
        raise EdgeRequired(f"--require-edge: {_explain_fallback(args, result.fallback)}")
    args.out.write_bytes(result.png)
    if args.user and result.device_steps == 0:
        _warn_lora_unused(args.user, result.edge_steps, result.edge_steps)
    report = _device_service_report(args, codec, result)
    report["plan"] = _report_plan(args, plan, dict(result.seconds), result.edge_steps, result.device_steps,
                                  result.handoff_bytes, result.fallback)
    if result.link_rtt_seconds > 0:
        links.sample = LinkSample(result.handoff_bytes, result.link_transfer_seconds, result.link_rtt_seconds)
    report["link"] = links.report()
    if result.fallback:
        print(f"tandem: NOTE: {_explain_fallback(args, result.fallback)}", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else _format(report))
    return 0


def _client_security(args: argparse.Namespace):
    """--tls-ca/--tls-cert/--tls-key/--token for every connection this command makes."""
    from services.common.security import SecurityError, client_security

    try:
        return client_security(args)
    except SecurityError as exc:
        raise CliError(str(exc)) from exc


def _check_prompt(prompt: str, pack: Path | None) -> str:
    """The prompt with the pack's aliases applied ("an" -> "a" for the demo pack); one warning
    naming the words its vocabulary lacks: the image would silently ignore them. Packs that declare
    no vocabulary (real Stable Diffusion packs, hub ids) are not checked."""
    from tandem.packs import PackError, PackManifest
    from tandem.vocabulary import unknown_words

    if pack is None or not Path(pack).expanduser().is_dir():
        return prompt
    try:
        manifest = PackManifest.read(Path(pack).expanduser())
    except PackError as exc:
        raise CliError(str(exc)) from exc
    prompt = manifest.normalize_prompt(prompt)
    unknown = unknown_words(prompt, manifest.vocabulary)
    if unknown:
        print(f"tandem: WARNING: pack {manifest.name!r} does not know {', '.join(map(repr, unknown))}: the image "
              f"will not follow {'it' if len(unknown) == 1 else 'them'}. Its words: {', '.join(manifest.vocabulary)}",
              file=sys.stderr)
    return prompt


def _check_request_early(args: argparse.Namespace, edge_dir: Path | None, device_dir: Path | None) -> None:
    """The request's flags against the packs' manifests (cheap JSON), so that --split 30 or
    --user carol fails before the models load, not after. Values a scheduler plan may still set
    are left to the full check after the plan."""
    from tandem.packs import PackError, PackManifest

    dirs = [Path(d).expanduser() for d in (edge_dir, device_dir) if d is not None]
    if not dirs or not all(d.is_dir() for d in dirs):
        return  # a hub id: its manifest comes with it
    try:
        manifest, device = PackManifest.read(dirs[0]), PackManifest.read(dirs[-1])
    except PackError as exc:
        raise CliError(str(exc)) from exc
    steps = args.steps if args.steps is not None else manifest.default_steps
    split = args.split if args.split is not None and not (args.scheduler and args.steps is None) else steps // 2
    GenerationRequest(prompt=args.prompt, steps=steps, split=split, sampler=args.sampler or manifest.default_sampler,
                      guidance_scale=args.guidance if args.guidance is not None else manifest.default_guidance,
                      seed=args.seed, negative_prompt=args.negative_prompt, height=args.size or 64,
                      width=args.size or 64, user=args.user).validate()
    if args.user is not None and not args.ue and args.user not in device.users:
        known = ", ".join(sorted(device.users)) or "none"
        raise RequestError("user", f"unknown user {args.user!r} for pack {device.name!r} (users: {known})")


def _warn_lora_unused(user: str | None, split: int | None, steps: int | None) -> None:
    if user and split is not None and steps is not None and split >= steps:
        print(f"tandem: NOTE: --user {user} has no effect with --split {split} of {steps} steps: the user's LoRA "
              "runs only in the device steps (give --split below --steps)", file=sys.stderr)


_TLS_SIGNS = ("ssl", "tls", "handshake", "socket closed", "wrong_version", "certificate")


def _explain_fallback(args: argparse.Namespace, fallback: str) -> str:
    """The fallback reason, plus what it most likely means when it is a misconfiguration."""
    low = fallback.lower()
    if "unauthenticated" in low or "permission_denied" in low:
        hint = ("the edge refused the token (--token / TANDEM_TOKEN)" if args.token
                else "the edge requires a token: give --token")
    elif any(sign in low for sign in _TLS_SIGNS):
        hint = ("TLS handshake with the edge failed: does it serve TLS with a certificate signed by --tls-ca?"
                if args.security.tls else "the edge may require TLS: this client connected in plaintext (give --tls-ca)")
    else:
        return fallback
    return f"{fallback} [{hint}]"


# Scheduler request fields → the flags that set them, for its INVALID_ARGUMENT answers.
_PLAN_FLAGS = {"device_class": "--device-class", "latency_budget_seconds": "--latency-budget",
               "personalized_user": "--user", "link": "--link-mbps", "link.bandwidth_bps": "--link-mbps"}


def _plan_error(args: argparse.Namespace, reason: str) -> None:
    """A scheduler answer that is the user's misconfiguration, not an outage: one line, exit 2."""
    code, _, detail = reason.partition(": ")
    if code == "INVALID_ARGUMENT":
        field, _, message = detail.partition(": ")
        flag = _PLAN_FLAGS.get(field)
        raise CliError(f"{flag}: {message}" if flag else f"--scheduler {args.scheduler} refused the request: {detail}")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        what = "refused the token (--token)" if args.token else "requires a token: give --token"
        raise CliError(f"--scheduler {args.scheduler} {what} ({reason})")


def _note_budget(args: argparse.Namespace, plan) -> None:
    """An unmeetable --latency-budget: say so, and what the best-effort plan gave up for speed."""
    if not args.latency_budget or (plan.meets_budget and not getattr(plan, "budget_infeasible", False)):
        return
    why = getattr(plan, "infeasible_reason", "") or f"predicted {plan.predicted_seconds['total']:.2f} s at best"
    print(f"tandem: NOTE: --latency-budget {args.latency_budget:g} s cannot be met ({why}); the plan traded quality "
          f"for speed: {plan.steps} steps, {plan.split} on the edge, codec {plan.encoding}, merge ratio "
          f"{plan.merge_ratio:g} (predicted quality {plan.predicted_quality:.2f})", file=sys.stderr)


def _apply_plan(args: argparse.Namespace, links: _LinkState):
    """--scheduler: options the user did not set come from the plan; without one, the defaults."""
    from services.scheduler.client import request_plan
    from services.scheduler.decide.options import split_for

    errors: list[str] = []
    bandwidth_bps, rtt_s = links.for_plan()
    plan = request_plan(args.scheduler, args.device_class, bandwidth_bps=bandwidth_bps, rtt_s=rtt_s,
                        personalized_user=args.user, latency_budget_s=args.latency_budget,
                        prompt_chars=len(args.prompt), timeout=min(args.timeout, 5.0), on_error=errors.append,
                        security=args.security)
    if plan is None:
        reason = errors[0] if errors else "no answer"
        _plan_error(args, reason)
        print(f"tandem: NOTE: scheduler {args.scheduler} gave no plan ({reason}); using the default options", file=sys.stderr)
        return None
    if args.split is None:  # the plan's split fraction, also when --steps overrides its T
        args.split = plan.split if args.steps in (None, plan.steps) else split_for(args.steps, plan.split / plan.steps)
    args.steps = plan.steps if args.steps is None else args.steps
    args.codec = args.codec or plan.encoding
    args.merge_ratio = plan.merge_ratio if args.merge_ratio is None else args.merge_ratio
    args.merge_strategy = args.merge_strategy or plan.merge_strategy
    args.edge = args.edge or plan.edge_address or None
    _note_budget(args, plan)
    return plan


@dataclass
class _LinkState:
    """The measured link (services/ue_client/link.py) across CLI runs: read before the plan,
    this run's handoff recorded, written back after the image. Without an edge or a scheduler
    nothing is measured or kept; with --ue the device service measures and keeps its own link,
    and the plan request carries the service's estimate (GetLinkEstimate)."""

    path: Path | None
    book: LinkBook
    edge: str | None  # the edge the user named (None: the scheduler's plan picks one)
    override_bps: float | None  # --link-mbps
    remote: LinkEstimate | None = None  # --ue: the device service's estimate
    sent: dict | None = None  # the link the Plan request carried
    sample: LinkSample | None = None  # this run's measurement

    @classmethod
    def open(cls, args: argparse.Namespace) -> _LinkState:
        override = args.link_mbps * 1e6 if args.link_mbps is not None else None
        if args.ue:
            return cls(None, LinkBook(), args.edge, override, _device_service_link(args) if args.scheduler else None)
        if not (args.edge or args.scheduler):
            return cls(None, LinkBook(), args.edge, override)
        path = args.link_state or state_path()
        book, warning = load_book(path)
        if warning:
            print(f"tandem: WARNING: {warning}", file=sys.stderr)
        return cls(path, book, args.edge, override)

    def for_plan(self) -> tuple[float, float]:
        """(bandwidth b/s, RTT s) for the Plan request; 0 = unknown (the scheduler's own then)."""
        estimate = self.remote or (self.book.estimate(self.edge) if self.path is not None else LinkEstimate())
        source = "override" if self.override_bps else "measured" if estimate.known else "unknown"
        bandwidth = self.override_bps or estimate.bandwidth_bps
        self.sent = {"bandwidth_bps": bandwidth, "rtt_s": estimate.rtt_s, "source": source,
                     "rate_samples": estimate.rate_samples, "rtt_samples": estimate.rtt_samples,
                     "text": _describe_link(bandwidth, estimate, source)}
        return bandwidth, estimate.rtt_s

    def recorder(self, edge: str | None):
        def record(sample: LinkSample) -> None:
            self.sample = sample
            if self.path is not None and edge:
                self.book.record(edge, sample)
        return record

    def save(self) -> None:
        if self.path is None or self.sample is None:
            return
        try:
            save_book(self.book, self.path)
        except OSError as exc:
            print(f"tandem: WARNING: could not keep the measured link in {self.path} ({exc})", file=sys.stderr)

    def report(self) -> dict | None:
        if self.sent is None and self.sample is None:
            return None
        s = self.sample
        measured = None if s is None else {"handoff_bytes": s.nbytes, "transfer_s": round(s.transfer_s, 6),
                                           "rtt_s": round(s.rtt_s, 6), "rate_bps": s.rate_bps}
        return {"sent": self.sent, "measured": measured, "state": str(self.path) if self.path else None}


def _device_service_link(args: argparse.Namespace) -> LinkEstimate:
    """--ue: the device service's measured link to the edge it will use (unknown when it can't
    say: the generation itself then reports what is wrong with the service)."""
    from services.ue_client.client import get_link_estimate
    from services.ue_client.transport import EdgeError

    try:
        return get_link_estimate(args.ue, args.edge, min(args.timeout, 5.0), args.security)
    except EdgeError:
        return LinkEstimate()


def _describe_link(bandwidth_bps: float, estimate: LinkEstimate, source: str) -> str:
    if source == "override":
        rtt = f", rtt {estimate.rtt_s * 1e3:.0f} ms (measured)" if estimate.rtt_s > 0 else ""
        return f"{bandwidth_bps / 1e6:.3g} Mbit/s (--link-mbps){rtt}"
    return estimate.describe() if source == "measured" else "unknown (no measured handoffs yet): the scheduler's own"


def _report_plan(args, plan, seconds: dict, edge_steps: int, device_steps: int, handoff_bytes: int, fallback) -> dict | None:
    """Sends the measured phases for the plan (best effort); the plan as the breakdown shows it."""
    if plan is None:
        return None
    from services.scheduler.client import report

    reported = report(args.scheduler, plan.plan_id, seconds, edge_steps, device_steps, handoff_bytes, bool(fallback),
                      timeout=min(args.timeout, 5.0), security=args.security)
    return {"id": plan.plan_id, "scheduler": args.scheduler, "predicted_seconds": dict(plan.predicted_seconds),
            "frame_size": plan.frame_size, "reported": reported, "predicted_handoff_bytes": plan.predicted_handoff_bytes,
            "link": {"bandwidth_bps": plan.link_bps, "rtt_s": plan.link_rtt_s, "sources": plan.link_sources}}


class _ProgressBars:
    """One tqdm bar per phase on stderr, opened when the phase reports its first step."""

    LABELS = {"queue": "edge queue", "edge_steps": "edge steps", "transfer": "handoff bytes",
              "device_steps": "device steps", "decode": "decode"}

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


def _device_service_report(args: argparse.Namespace, codec: CodecSpec, result) -> dict:
    """The in-process report's keys for a --ue run; what the device service chose from its pack's
    defaults and does not return (sampler, unset --steps/--split) is None."""
    from PIL import Image

    with Image.open(args.out) as image:
        width, height = image.size
    steps = result.edge_steps + result.device_steps
    return {
        "out": str(args.out),
        "width": width,
        "height": height,
        "prompt": args.prompt,
        "seed": args.seed,
        "user": args.user,
        "sampler": args.sampler,
        "total_steps": steps,
        "split": args.split if args.split is not None else (None if result.fallback else result.edge_steps),
        "edge_steps": result.edge_steps,
        "device_steps": result.device_steps,
        "codec": codec.to_dict(),
        "handoff_bytes": result.handoff_bytes,
        "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
        "edge_pack": f"edge {args.edge}" if args.edge else "the device service's edge",
        "ue_pack": result.device_pack,
        "random_pack": False,
        "fallback": result.fallback or None,
        "mode": "device-service",
        "device_service": args.ue,
    }


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
        "device_steps": result.device_steps,
        "codec": codec.to_dict(),
        "handoff_bytes": result.handoff_bytes,
        "seconds": {k: round(v, 4) for k, v in result.seconds.items()},
        "edge_pack": edge_name,
        "ue_pack": ue_name,
        "random_pack": random,
        "fallback": result.fallback,
        "mode": "in-process",
        "device_service": None,
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
        f"   {s.get('transfer', 0.0):.3f} s",
        f"  device {report['ue_pack']}{' + ' + report['user'] if report['user'] else ''}: "
        f"{report['device_steps']} steps   {s.get('device_steps', 0.0):.3f} s",
        f"  decode {s.get('decode', 0.0):.3f} s   total {sum(s.values()):.3f} s",
    ]
    if report["plan"]:
        plan = report["plan"]
        lines.append(f"  plan   {plan['id'][:8]} from {plan['scheduler']} (frame of {plan['frame_size']}): "
                     f"predicted {plan['predicted_seconds']['total']:.3f} s")
    if report.get("link") and report["link"]["sent"]:
        lines.append(f"  link   {report['link']['sent']['text']}")
    if report["fallback"]:
        lines.append(f"  FALLBACK: {report['fallback']}")
    if report["random_pack"]:
        lines.append("  (tiny RANDOM packs: the image is noise; install the demo pack for real images)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
