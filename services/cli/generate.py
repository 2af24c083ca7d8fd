"""`tandem` command line: generate an image through the split pipeline.

    tandem generate "a red circle at the left on a blue background" --out x.png --user alice

Without --large/--small it uses the demo pack shipped with Tandem; if that is not installed it
falls back to tiny random packs and says so (their images are noise).

Flags are checked before torch or any model code loads (the imports at the top are torch-free),
so a mistake costs a fraction of a second and one line, never a usage block or a traceback.
They are parsed once into a frozen :class:`Options`; what a scheduler's plan adds is a new
request (``PartialRequest.with_plan``) and an edge, never a write to the options. What this
command prints is services/cli/report.py; the link it measures, services/ue_client/link.py.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from services.cli import report
from services.common.addresses import AddressError, check_address
from services.common.envargs import EnvParser
from services.ue_client.link import LinkSample, LinkState, state_path
from tandem.codec.spec import DEFAULT_ENCODING, DEFAULT_STRATEGY, ENCODINGS, STRATEGIES, CodecSpec
from tandem.link import LinkEstimate
from tandem.packs import DEMO_PACK
from tandem.phases import CoarsePhase
from tandem.request import RequestError
from tandem.resolve import PartialRequest, resolve, resolve_codec
from tandem.sampling.names import SAMPLERS
from tandem.threads import parse_threads

if TYPE_CHECKING:
    from services.common.scheduler_client import ReceivedPlan
    from services.common.security import ClientSecurity

TINY_PACK_CACHE = Path.home() / ".cache" / "tandem" / "tiny-random-v1"
MAX_TIMEOUT_S = 3600.0  # the device service's limit on an edge deadline (services/ue_client/call.py)


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
    return _build_parser()[0]


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser, and request field → the flag that sets it (so errors name what the user typed)."""
    from services.common.security import add_client_args, tandem_env

    parser = _Parser(prog="tandem", description="Split text-to-image diffusion (edge + device).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="generate one image through the split pipeline")
    gen.add_argument("--out", type=Path, default=Path("tandem.png"), help="PNG to write (default tandem.png)")
    flags = _add_request_flags(gen)
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
    return parser, flags


def _add_request_flags(gen: argparse.ArgumentParser) -> dict[str, str]:
    """The request's flags; returns request field → flag. A flag's dest is its field's name in
    tandem.resolve.PartialRequest (--size sets height and width), which carries it into the
    request by that name: a new request field needs its flag here and nothing else in the CLI.
    Unset (None) is the pack's default, or with --scheduler the plan's."""
    actions = [
        gen.add_argument("prompt", metavar="PROMPT"),
        gen.add_argument("--steps", type=int, help="total denoising steps T (default: the pack's)"),
        gen.add_argument("--split", type=int, help="steps run on the edge, k in 0..T (default T/2)"),
        gen.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the pack's)"),
        gen.add_argument("--guidance", dest="guidance_scale", metavar="GUIDANCE", type=float,
                         help="classifier-free guidance scale (default: the pack's)"),
        gen.add_argument("--seed", type=int, default=0),
        gen.add_argument("--negative-prompt", default=""),
        gen.add_argument("--size", type=int, help="image height and width in pixels (default: the pack's)"),
        gen.add_argument("--user", help="personalize the device steps with this user's LoRA"),
        gen.add_argument("--codec", dest="encoding", choices=ENCODINGS, help=f"handoff precision (default {DEFAULT_ENCODING})"),
        gen.add_argument("--merge-ratio", type=float, help="token merge ratio r in [0, 0.75] (default 0)"),
        gen.add_argument("--merge-strategy", choices=STRATEGIES, help=f"what token merging merges (default {DEFAULT_STRATEGY})"),
    ]
    flags = {action.dest: action.option_strings[0] if action.option_strings else str(action.metavar)
             for action in actions}
    size = flags.pop("size")
    return {**flags, "height": size, "width": size, "codec": flags["encoding"]}  # "codec": the wire's name


@dataclass(frozen=True)
class Options:
    """`tandem generate`'s flags, parsed and checked once (parse_options); nothing writes them."""

    request: PartialRequest  # PROMPT and the request's flags, None where unset
    out: Path
    large: Path | None
    small: Path | None
    device: str | None
    threads: int | None
    edge: str | None  # the edge the user named (with --scheduler, the plan may name one)
    require_edge: bool
    ue: str | None
    timeout: float
    scheduler: str | None
    device_class: str
    link_mbps: float | None
    link_state: Path | None
    latency_budget: float
    security: ClientSecurity  # --tls-ca/--tls-cert/--tls-key/--token, for every connection
    json: bool
    quiet: bool


def parse_options(args: argparse.Namespace) -> Options:
    """The parsed flags as frozen Options, after every check that needs no pack (CliError, RequestError)."""
    fields = PartialRequest.__dataclass_fields__
    request = PartialRequest(**{name: value for name, value in vars(args).items() if name in fields},
                             height=args.size, width=args.size)
    _check_flags(args)
    resolve_codec(request)  # the codec's flags, before anything loads
    return Options(request=request, out=args.out, large=args.large, small=args.small, device=args.device,
                   threads=args.threads, edge=args.edge, require_edge=args.require_edge, ue=args.ue,
                   timeout=args.timeout, scheduler=args.scheduler, device_class=args.device_class,
                   link_mbps=args.link_mbps, link_state=args.link_state, latency_budget=args.latency_budget,
                   security=_client_security(args), json=args.json, quiet=args.quiet)


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
    parser, flags = _build_parser()
    args = parser.parse_args(argv)
    try:
        return _generate(parse_options(args))
    except (CliError, AddressError) as exc:
        print(f"tandem: error: {exc}", file=sys.stderr)
        return 2
    except RequestError as exc:
        print(f"tandem: error: {flags.get(exc.field, exc.field)}: {exc.message}", file=sys.stderr)
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


def _check_pack_source(source: Path | None, flag: str) -> None:
    if source is None or source.expanduser().is_dir():
        return
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):  # a hub id: fetched later
        return
    raise CliError(f"{flag}: model pack {text!r} not found: no such directory")


def _check_flags(args: argparse.Namespace) -> None:
    """Everything but the request that can be checked without torch."""
    if args.out.suffix.lower() != ".png":
        raise CliError(f"--out: {str(args.out)!r} must end in .png")
    if not args.out.parent.exists():
        raise CliError(f"--out: directory {str(args.out.parent)!r} does not exist")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        raise CliError(f"--timeout: must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {args.timeout:g}")
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


def _generate(opts: Options) -> int:
    from tandem.threads import configure_threads

    configure_threads(opts.threads)  # before torch loads
    from services.ue_client.trust import credentials_for_edge, trusted_edges

    trusted = trusted_edges(opts.edge)  # the edge the user named, not one a plan names
    choice = default_packs() if opts.large is None and opts.small is None else None
    large = opts.large or (choice.large if choice else None)
    small = opts.small or (choice.small if choice else None)
    pack_dir = small if choice is None or not choice.random else None
    _check_request_early(opts, large if large is not None and not opts.ue else pack_dir, pack_dir)
    given = replace(opts.request, prompt=_check_prompt(opts.request.prompt or "", pack_dir))
    links = _open_links(opts)
    plan = _request_plan(opts, given, links) if opts.scheduler else None
    if plan is not None:
        given = given.with_plan(plan)
    edge = opts.edge or (plan.edge_address if plan is not None else None) or None
    codec = resolve_codec(given)
    if opts.require_edge and not edge and not opts.ue:
        raise EdgeRequired("--require-edge: the scheduler's plan names no edge for this request")
    if opts.ue:
        return _generate_on_device_service(opts, given, codec, edge, plan, links)
    if small is None or (large is None and not edge):
        raise CliError("--small alone needs an edge: --edge HOST:PORT, or a --scheduler that names one")
    from tandem.packs import PackError, load_pack
    from tandem.pipeline import HybridPipeline

    _check_device_available(opts.device)
    if choice is not None and choice.random:
        print(
            "tandem: NOTE: the trained demo pack is not installed; using tiny RANDOM packs "
            f"({TINY_PACK_CACHE}): the image will be noise",
            file=sys.stderr,
        )
    try:
        ue_pack = load_pack(small, device=opts.device)
    except PackError as exc:
        raise CliError(f"--small: {exc}" if opts.small else str(exc)) from exc
    try:  # with --edge the large pack lives on the edge server; in-process we load it here
        edge_pack = load_pack(large, device=opts.device) if large is not None and not edge else None
        pipeline = HybridPipeline(edge_pack, ue_pack) if edge_pack is not None else None
    except PackError as exc:
        raise CliError(f"--large: {exc}" if opts.large else str(exc)) from exc
    request, codec = resolve(given, (edge_pack or ue_pack).request_defaults())
    if request.user is not None and request.user not in ue_pack.users:
        known = ", ".join(ue_pack.users) or "none"
        raise RequestError("user", f"unknown user {request.user!r} for pack {ue_pack.name!r} (users: {known})")
    _warn_lora_unused(request.user, request.split, request.steps)
    progress = None if opts.quiet else report.ProgressBars()
    try:
        if pipeline is not None:
            result = pipeline.generate(request, codec, on_step=progress)
        else:
            from services.ue_client.device import generate_via_edge

            security, note = credentials_for_edge(edge, opts.security, trusted)
            if note:
                print(f"tandem: NOTE: {note}", file=sys.stderr)
            result = generate_via_edge(ue_pack, request, codec, edge, opts.timeout, on_step=progress,
                                       security=security, on_link=links.recorder(edge))
    finally:
        if progress is not None:
            progress.close()
    if result.fallback and opts.require_edge:
        raise EdgeRequired(f"--require-edge: {_explain_fallback(opts, result.fallback)}")
    _save_png(result.image, opts.out)
    edge_name = edge_pack.name if edge_pack is not None else f"edge {edge}"
    reported = _report_plan(opts, plan, result)
    breakdown = report.in_process_breakdown(request, codec, result, opts.out, edge_name, ue_pack.name,
                                            random=bool(choice and choice.random), mode="grpc" if edge else "in-process",
                                            plan=reported, link=links.report())
    _save_links(links)
    if result.fallback:
        print(f"tandem: NOTE: {_explain_fallback(opts, result.fallback)}", file=sys.stderr)
    report.show(breakdown, opts.json)
    return 0


def _generate_on_device_service(opts: Options, given: PartialRequest, codec: CodecSpec, edge: str | None,
                                plan: ReceivedPlan | None, links: LinkState) -> int:
    """--ue: the device service holds the packs; what is still unset takes its pack's defaults."""
    from services.common.wire import partial_to_proto
    from services.ue_client.client import generate_on_device_service
    from services.ue_client.transport import EdgeError

    assert opts.ue is not None
    progress = None if opts.quiet else report.ProgressBars()
    try:
        result = generate_on_device_service(opts.ue, partial_to_proto(given), edge, opts.timeout, progress, opts.security)
    except EdgeError as exc:
        if exc.code == "INVALID_ARGUMENT":
            field, _, message_text = exc.message.partition(": ")
            raise RequestError(field, message_text) from exc
        raise CliError(f"device service {opts.ue}: {exc}") from exc
    finally:
        if progress is not None:
            progress.close()
    if result.fallback and opts.require_edge:
        raise EdgeRequired(f"--require-edge: {_explain_fallback(opts, result.fallback)}")
    opts.out.write_bytes(result.png)
    if given.user and result.device_steps == 0:
        _warn_lora_unused(given.user, result.edge_steps, result.edge_steps)
    reported = _report_plan(opts, plan, result)
    if result.link_rtt_seconds > 0:
        links.record(LinkSample(result.handoff_bytes, result.link_transfer_seconds, result.link_rtt_seconds))
    breakdown = report.device_service_breakdown(given, codec, result, opts.out, edge, opts.ue, reported, links.report())
    if result.fallback:
        print(f"tandem: NOTE: {_explain_fallback(opts, result.fallback)}", file=sys.stderr)
    report.show(breakdown, opts.json)
    return 0


def _client_security(args: argparse.Namespace) -> ClientSecurity:
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


def _check_request_early(opts: Options, edge_dir: Path | None, device_dir: Path | None) -> None:
    """The request against the packs' manifests (cheap JSON), so that --split 30 or --user carol
    fails before the models load, not after. A split a scheduler's plan may still change (no
    --steps) is checked after the plan."""
    from tandem.packs import PackError, PackManifest

    dirs = [Path(d).expanduser() for d in (edge_dir, device_dir) if d is not None]
    if not dirs or not all(d.is_dir() for d in dirs):
        return  # a hub id: its manifest comes with it
    try:
        manifest, device = PackManifest.read(dirs[0]), PackManifest.read(dirs[-1])
    except PackError as exc:
        raise CliError(str(exc)) from exc
    given = opts.request
    if opts.scheduler and given.steps is None:
        given = replace(given, split=None)
    resolve(given, manifest.request_defaults())
    if given.user is not None and not opts.ue and given.user not in device.users:
        known = ", ".join(sorted(device.users)) or "none"
        raise RequestError("user", f"unknown user {given.user!r} for pack {device.name!r} (users: {known})")


def _warn_lora_unused(user: str | None, split: int | None, steps: int | None) -> None:
    if user and split is not None and steps is not None and split >= steps:
        print(f"tandem: NOTE: --user {user} has no effect with --split {split} of {steps} steps: the user's LoRA "
              "runs only in the device steps (give --split below --steps)", file=sys.stderr)


_TLS_SIGNS = ("ssl", "tls", "handshake", "socket closed", "wrong_version", "certificate")


def _explain_fallback(opts: Options, fallback: str) -> str:
    """The fallback reason, plus what it most likely means when it is a misconfiguration."""
    low = fallback.lower()
    if "unauthenticated" in low or "permission_denied" in low:
        hint = ("the edge refused the token (--token / TANDEM_TOKEN)" if opts.security.token
                else "the edge requires a token: give --token")
    elif any(sign in low for sign in _TLS_SIGNS) and "stream removed" not in low:  # not an edge gone mid-stream
        hint = ("TLS handshake with the edge failed: does it serve TLS with a certificate signed by --tls-ca?"
                if opts.security.tls else "the edge may require TLS: this client connected in plaintext (give --tls-ca)")
    else:
        return fallback
    return f"{fallback} [{hint}]"


# Scheduler request fields → the flags that set them, for its INVALID_ARGUMENT answers.
_PLAN_FLAGS = {"device_class": "--device-class", "latency_budget_seconds": "--latency-budget",
               "personalized_user": "--user", "link": "--link-mbps", "link.bandwidth_bps": "--link-mbps"}


def _plan_error(opts: Options, reason: str) -> None:
    """A scheduler answer that is the user's misconfiguration, not an outage: one line, exit 2."""
    code, _, detail = reason.partition(": ")
    if code == "INVALID_ARGUMENT":
        field, _, message = detail.partition(": ")
        flag = _PLAN_FLAGS.get(field)
        raise CliError(f"{flag}: {message}" if flag else f"--scheduler {opts.scheduler} refused the request: {detail}")
    if code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        what = "refused the token (--token)" if opts.security.token else "requires a token: give --token"
        raise CliError(f"--scheduler {opts.scheduler} {what} ({reason})")


def _note_budget(opts: Options, plan: ReceivedPlan) -> None:
    """An unmeetable --latency-budget: say so, and what the best-effort plan gave up for speed."""
    if not opts.latency_budget or (plan.meets_budget and not getattr(plan, "budget_infeasible", False)):
        return
    why = getattr(plan, "infeasible_reason", "") or f"predicted {plan.predicted_seconds[CoarsePhase.TOTAL]:.2f} s at best"
    print(f"tandem: NOTE: --latency-budget {opts.latency_budget:g} s cannot be met ({why}); the plan traded quality "
          f"for speed: {plan.steps} steps, {plan.split} on the edge, codec {plan.encoding}, merge ratio "
          f"{plan.merge_ratio:g} (predicted quality {plan.predicted_quality:.2f})", file=sys.stderr)


def _request_plan(opts: Options, given: PartialRequest, links: LinkState) -> ReceivedPlan | None:
    """--scheduler: a plan for the options the user did not set; None (said on stderr): the defaults."""
    from services.common.scheduler_client import request_plan

    assert opts.scheduler is not None
    errors: list[str] = []
    bandwidth_bps, rtt_s = links.for_plan()
    plan = request_plan(opts.scheduler, opts.device_class, bandwidth_bps=bandwidth_bps, rtt_s=rtt_s,
                        personalized_user=given.user, latency_budget_s=opts.latency_budget,
                        prompt_chars=len(given.prompt or ""), timeout=min(opts.timeout, 5.0), on_error=errors.append,
                        security=opts.security)
    if plan is None:
        reason = errors[0] if errors else "no answer"
        _plan_error(opts, reason)
        print(f"tandem: NOTE: scheduler {opts.scheduler} gave no plan ({reason}); using the default options", file=sys.stderr)
        return None
    _note_budget(opts, plan)
    return plan


def _report_plan(opts: Options, plan: ReceivedPlan | None, result) -> dict | None:
    """What ``result`` measured, back to the scheduler that planned it; the plan for the breakdown."""
    if plan is None or opts.scheduler is None:
        return None
    return report.report_plan(plan, opts.scheduler, result, opts.timeout, opts.security)


def _open_links(opts: Options) -> LinkState:
    """The link this run plans with and measures: kept across runs when this command talks to an
    edge itself (--edge, or a --scheduler's), the device service's own with --ue."""
    override = opts.link_mbps * 1e6 if opts.link_mbps is not None else None
    if opts.ue:
        return LinkState.unkept(opts.edge, override, _device_service_link(opts) if opts.scheduler else None)
    if not (opts.edge or opts.scheduler):
        return LinkState.unkept(opts.edge, override)
    links, warning = LinkState.kept(opts.link_state or state_path(), opts.edge, override)
    if warning:
        print(f"tandem: WARNING: {warning}", file=sys.stderr)
    return links


def _save_links(links: LinkState) -> None:
    try:
        links.save()
    except OSError as exc:
        print(f"tandem: WARNING: could not keep the measured link in {links.path} ({exc})", file=sys.stderr)


def _device_service_link(opts: Options) -> LinkEstimate:
    """--ue: the device service's measured link to the edge it will use (unknown when it can't
    say: the generation itself then reports what is wrong with the service)."""
    from services.ue_client.client import get_link_estimate
    from services.ue_client.transport import EdgeError

    assert opts.ue is not None
    try:
        return get_link_estimate(opts.ue, opts.edge, min(opts.timeout, 5.0), opts.security)
    except EdgeError:
        return LinkEstimate()


def _save_png(image, out: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(out)


if __name__ == "__main__":
    sys.exit(main())
