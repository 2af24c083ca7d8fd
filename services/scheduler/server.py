"""Scheduler server process: loads the policy and the quality/cost profiles, serves
SchedulerService + health + reflection over grpc.aio, metrics on their own port, stops
gracefully on SIGTERM/SIGINT.

    python -m services.scheduler --port 50071 --metrics-port 9103 [--policy DIR] [--edge ADDR ...]

Every flag also reads an environment variable (TANDEM_SCHEDULER_<FLAG>; lists comma-separated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from services.common.channels import SERVER_KEEPALIVE_OPTIONS
from services.common.decoding import DecodeErrorInterceptor
from services.common.details import DetailsCapInterceptor
from services.common.envargs import EnvParser
from services.common.lifecycle import NO_REUSEPORT, describe, enable_reflection, run_server, set_health, until_signalled
from services.common.security import SecurityError, add_port, add_server_tls_args, env_lookup, server_tls
from services.common.tokens import add_tokens_arg, interceptors, load_tokens
from services.scheduler.decide.baselines import BASELINES, polished
from services.scheduler.decide.costs import CostProfileError
from services.scheduler.decide.options import DEFAULT_OPTIONS, OptionTable, build_option_table
from services.scheduler.decide.planner import DeciderLike, warmup
from services.scheduler.decide.policy import PolicyFormatError, SchedulerPolicy
from services.scheduler.decide.quality import QualityProfile, QualityProfileError
from services.scheduler.decide.scenario import FrameContext, ObjectiveConfig
from services.scheduler.defaults import (
    BUDGET_HEADROOM,
    BUILTIN,
    DEFAULT_POLICY,
    DEFAULT_QUALITY,
    DEMO_COSTS,
    MAX_FRAME,
    POLISH_SWEEPS,
    POLISH_VISITS,
    default_cost_profile,
    display_path,
    load_profiles,
    profile_ids,
)
from services.scheduler.live.core import MAX_PENDING_PER_USER, SchedulerCore
from services.scheduler.live.edges import MAX_EDGES, EdgeRegistry
from services.scheduler.live.frames import FrameConfig
from services.scheduler.live.guard import GuardConfig, PolicyGuard
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.ratelimit import PLAN_BURST, PLAN_RATE, RateLimiter
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.state import restore, save
from tandem.v1 import scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("tandem.scheduler")
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
MAX_RECEIVE_BYTES = 16 * 1024  # every message is a handful of numbers
STARTUP_ERRORS = (OSError, ValueError, json.JSONDecodeError, CostProfileError, QualityProfileError, PolicyFormatError)
STATE_INTERVAL_S = 10.0


_env = env_lookup("scheduler")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Variables go in as text: the flag's type= and the checks below apply to both (EnvParser).
    parser = EnvParser(prog="tandem-scheduler", description=describe(__doc__))
    parser.add_argument("--host", default=_env("host", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=_env("port", 50071))
    parser.add_argument("--metrics-port", type=int, default=_env("metrics_port", 9103), help="0 = none")
    parser.add_argument("--policy", default=_env("policy", str(DEFAULT_POLICY)),
                        help=f"trained policy directory, or a baseline: {', '.join(BASELINES)}, exact")
    parser.add_argument("--quality-profile", default=_env("quality_profile", str(DEFAULT_QUALITY)),
                        help="quality profile JSON, or 'synthetic' (also when the file does not exist)")
    parser.add_argument("--cost-profile", default=_env("cost_profile", default_cost_profile()),
                        help=f"cost profile JSON, or {BUILTIN!r} for the synthetic built-in one (default: "
                             f"{display_path(DEMO_COSTS)} when the demo pack is installed)")
    env_edges = [e for e in _env("edge", "").split(",") if e]
    parser.add_argument("--edge", action="append", default=None, metavar="HOST:PORT",
                        help="edge server used when no edge heartbeats (repeatable)")
    parser.add_argument("--edge-ttl", type=float, default=_env("edge_ttl", 5.0),
                        help="drop an edge not heard from for this many seconds (5)")
    parser.add_argument("--polish-sweeps", type=int, default=_env("polish_sweeps", POLISH_SWEEPS),
                        help=f"1-opt sweeps at most after the policy's decision ({POLISH_SWEEPS}; 0 = the policy alone)")
    parser.add_argument("--polish-visits", type=int, default=_env("polish_visits", POLISH_VISITS),
                        help=f"user visits at most for those sweeps in one frame ({POLISH_VISITS}: every sweep up "
                             "to 64 users, 1.28 sweeps at 100; a visit costs ~20-40 µs at 100 users on one core)")
    parser.add_argument("--guard-every", type=int, default=_env("guard_every", 10),
                        help="check the policy against greedy + local search on one frame in this many, in the "
                             "background, and serve that instead once the policy falls >2%% behind (10; 0 = off)")
    parser.add_argument("--guard-window", type=int, default=_env("guard_window", 10),
                        help="checked frames the guard's verdict sums over (10)")
    parser.add_argument("--frame-ms", type=float, default=_env("frame_ms", 20.0),
                        help="plan requests arriving within this window are decided together (20)")
    parser.add_argument("--max-frame", type=int, default=_env("max_frame", MAX_FRAME), help=f"largest frame ({MAX_FRAME})")
    parser.add_argument("--bandwidth-hz", type=float, default=_env("bandwidth_hz", 10e6),
                        help="downlink band the frame's users share (10e6)")
    parser.add_argument("--budget-headroom", type=float, default=_env("budget_headroom", BUDGET_HEADROOM),
                        help=f"plans aim at (1 - this) x each latency budget at most, so a prediction's noise "
                             f"does not carry them over it; lower for a user whose own reports measure more "
                             f"({BUDGET_HEADROOM}; 0: plan right up to the budget)")
    add_server_tls_args(parser, _env)
    add_tokens_arg(parser, _env)
    parser.add_argument("--edge-tokens", default=_env("edge_tokens", None), metavar="FILE",
                        help='edge credentials heartbeats must carry (the edge\'s --scheduler-token): JSON '
                             '{"token": "edge-name", ...}, none shared with --tokens; without it only --edge '
                             'addresses and edges advertising their own host may register')
    parser.add_argument("--max-edges", type=int, default=_env("max_edges", MAX_EDGES),
                        help=f"most live edges; heartbeats from more new ones are refused ({MAX_EDGES})")
    parser.add_argument("--max-pending-per-user", type=int,
                        default=_env("max_pending_per_user", MAX_PENDING_PER_USER),
                        help=f"unreported plans kept per user; beyond it the user's oldest is forgotten "
                             f"({MAX_PENDING_PER_USER})")
    parser.add_argument("--plan-rate", type=float, default=_env("plan_rate", PLAN_RATE),
                        help=f"Plan requests per second one user may make (the token's user with --tokens, else "
                             f"the request's user_id, which a caller may claim freely, else its address); beyond "
                             f"it RESOURCE_EXHAUSTED; 0 = no limit ({PLAN_RATE:g})")
    parser.add_argument("--plan-burst", type=int, default=_env("plan_burst", PLAN_BURST),
                        help=f"... and at once, after a pause ({PLAN_BURST})")
    parser.add_argument("--state-file", default=_env("state_file", None), metavar="PATH",
                        help="keep what the scheduler learns (the cost model's calibration, each user's link and "
                             "margin, edge occupancy, plans awaiting a report) in this JSON file, restored at "
                             "start: a restart forgets nothing. Written atomically; a corrupt file or one saved "
                             "with another cost profile is ignored with a warning (default: none)")
    parser.add_argument("--state-interval", type=float, default=_env("state_interval", STATE_INTERVAL_S),
                        help=f"seconds between saves of --state-file when something changed; also saved on "
                             f"shutdown ({STATE_INTERVAL_S:g})")
    args = parser.parse_args(argv)
    args.edge = args.edge if args.edge is not None else env_edges
    for flag, ok in (("--frame-ms", args.frame_ms >= 0), ("--max-frame", args.max_frame >= 1),
                     ("--edge-ttl", args.edge_ttl > 0), ("--bandwidth-hz", args.bandwidth_hz > 0),
                     ("--budget-headroom", 0 <= args.budget_headroom < 1),
                     ("--polish-sweeps", args.polish_sweeps >= 0), ("--polish-visits", args.polish_visits >= 1),
                     ("--guard-every", args.guard_every >= 0), ("--guard-window", args.guard_window >= 1),
                     ("--max-edges", args.max_edges >= 1), ("--max-pending-per-user", args.max_pending_per_user >= 1),
                     ("--plan-rate", math.isfinite(args.plan_rate) and args.plan_rate >= 0),
                     ("--plan-burst", args.plan_burst >= 1),
                     ("--state-interval", math.isfinite(args.state_interval) and args.state_interval > 0)):
        if not ok:
            parser.error(f"{flag}: out of range, got {getattr(args, flag[2:].replace('-', '_'))}")
    return args


def load_decider(args: argparse.Namespace) -> DeciderLike:
    """The policy (polished in small frames, guarded) or a baseline's name; warns when the policy
    was trained on other profiles than the service runs with."""
    if args.policy in BASELINES or args.policy == "exact":
        return args.policy
    policy = SchedulerPolicy.load(args.policy)
    warn_if_trained_elsewhere(policy.config.meta, profile_ids(args.quality_profile, args.cost_profile))
    decider = polished(policy, args.polish_sweeps, args.polish_visits) if args.polish_sweeps > 0 else policy
    return PolicyGuard(decider, GuardConfig(args.guard_every, args.guard_window)) if args.guard_every else decider


def warn_if_trained_elsewhere(meta: dict, running: tuple[str, str]) -> None:
    """A policy is only as good as the profiles it was trained on: say so when they differ (a
    general policy, trained on randomized profile families, is meant for profiles it never saw)."""
    trained = (meta.get("quality_profile_id"), meta.get("cost_profile_id"))
    if trained != running and not meta.get("families"):
        log.warning("the policy was trained on other profiles (quality %s, costs %s; running with %s, %s): "
                    "its plans may be poor; retrain it (python -m services.scheduler.learn.train) or use "
                    "--polish-sweeps/--polish-visits to refine its decisions",
                    meta.get("quality_profile", "?"), meta.get("cost_profile", "?"), *running)


def build_core(args: argparse.Namespace) -> SchedulerCore:
    """Everything the service decides with; raises one of STARTUP_ERRORS on a bad file or flag."""
    quality, costs = load_profiles(args.quality_profile, args.cost_profile)
    builtin = costs.synthetic
    frames = FrameConfig(args.frame_ms / 1000.0, args.max_frame)  # validates both
    log.info("quality profile: %s; cost profile: %s; frames %s",
             "SYNTHETIC" if quality.synthetic else args.quality_profile,
             "built-in (synthetic)" if builtin else args.cost_profile, frames)
    if not quality.has_quality:  # flat: every option scores the same, so the objective's costs decide
        log.warning("quality profile %s: none (random weights): plans by cost alone", args.quality_profile)
    return SchedulerCore(quality, costs, load_decider(args),
                         EdgeRegistry(args.edge_ttl, args.edge, max_edges=args.max_edges),
                         FrameContext(bandwidth_hz=args.bandwidth_hz),
                         max_pending_per_user=args.max_pending_per_user,
                         options=planner_options(args.policy, quality),
                         objective=ObjectiveConfig(budget_headroom=args.budget_headroom))


def planner_options(policy: str, quality: QualityProfile) -> OptionTable:
    """A baseline or the exact search chooses among every codec the quality profile prices (a
    measured loss: tandem-onboard --codecs); a policy among its own action space (fp16)."""
    if policy in BASELINES or policy == "exact":
        return build_option_table(codecs=quality.codecs)
    if len(quality.codecs) > 1:
        log.info("the quality profile prices codecs %s; the policy chooses among its own options (fp16): "
                 "--policy greedy_ls or exact chooses the codec too", ", ".join(quality.codecs))
    return DEFAULT_OPTIONS


def edge_credentials(args: argparse.Namespace) -> dict[str, str] | None:
    """--edge-tokens, checked to share no token with --tokens (a user must never pass as an edge)."""
    if not args.edge_tokens:
        return None
    edge_tokens = load_tokens(args.edge_tokens, "--edge-tokens")
    if args.tokens and set(edge_tokens) & set(load_tokens(args.tokens)):
        raise SecurityError("--edge-tokens: a token is also a user token in --tokens; give edges their own")
    return edge_tokens


async def serve(args: argparse.Namespace) -> None:
    tls = server_tls(args)  # bad files fail before anything
    edge_tokens = edge_credentials(args)
    health = HealthServicer()
    heartbeat = f"/{SERVICE_NAME}/ReportEdgeLoad"  # takes an edge credential, checked by the servicer
    server = grpc.aio.server(interceptors=[DetailsCapInterceptor(), *interceptors(args, exempt_methods=[heartbeat]),
                                           DecodeErrorInterceptor()],
                             options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES), NO_REUSEPORT,
                                      *SERVER_KEEPALIVE_OPTIONS])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    enable_reflection(
        (SERVICE_NAME, reflection.SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    core = build_core(args)
    metrics = SchedulerMetrics()
    metrics.watch_edges(lambda: len(core.edges.live()))
    metrics.watch_pending(lambda: core.pending_reports)
    if isinstance(core.decider, PolicyGuard):
        metrics.watch_guard(core.decider.status)
    if args.state_file:
        restore(core, args.state_file)
        try:  # at once: an unwritable path fails the start, not the first save minutes later
            save(core, args.state_file)
        except OSError as exc:
            raise OSError(f"--state-file: cannot write {args.state_file}: {exc.strerror or exc}") from None
    servicer = SchedulerServicer(core, metrics, FrameConfig(args.frame_ms / 1000.0, args.max_frame),
                                 edge_tokens=edge_tokens, static_edges=args.edge,
                                 plan_limit=RateLimiter(args.plan_rate, args.plan_burst))
    scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, server)
    port = add_port(server, f"{args.host}:{args.port}", tls)
    await set_health(health, SERVICE_NAME, serving=False)
    await server.start()
    await asyncio.to_thread(warmup, args.max_frame)  # so no frame pays the solver's compile
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host, registry=metrics.registry)
    await set_health(health, SERVICE_NAME, serving=True)
    print(f"scheduler ready on {args.host}:{port} (policy {args.policy}); metrics :{args.metrics_port}", flush=True)

    saver = asyncio.ensure_future(keep_saving(core, args.state_file, args.state_interval)) if args.state_file else None

    await until_signalled()
    await health.enter_graceful_shutdown()
    await server.stop(grace=5.0)  # open frames are decided and answered within the grace
    await servicer.collector.drain()
    if saver is not None:
        saver.cancel()
        await save_quietly(core, args.state_file)
    print("scheduler stopped", flush=True)


async def keep_saving(core: SchedulerCore, path: str, interval_s: float) -> None:
    """Saves the state every ``interval_s`` seconds when it changed since the last save."""
    saved = core.revision
    while True:
        await asyncio.sleep(interval_s)
        if core.revision != saved:
            saved = core.revision
            await save_quietly(core, path)


async def save_quietly(core: SchedulerCore, path: str) -> None:
    """One save, off the event loop; a failure is a warning (the service goes on, the next save may work)."""
    try:
        await asyncio.to_thread(save, core, path)
    except OSError as exc:
        log.warning("state file %s: saving failed (%s); the last good save stays", path, exc.strerror or exc)


def main(argv: list[str] | None = None) -> int:
    return run_server(serve, parse_args(argv), "tandem-scheduler", STARTUP_ERRORS)
