"""The SchedulerService gRPC servicer: message conversion, frame submission, status codes.
The decisions live in :mod:`services.scheduler.live.core` and :mod:`services.scheduler.live.frames`."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Collection, Mapping, Sequence

import grpc

from services.common.tokens import bearer_token, caller_user
from services.scheduler.edge_auth import address_host, check_edge, literal_ip, peer_ip
from services.scheduler.live.core import (
    AlreadyReported,
    AssignedPlan,
    LinkInput,
    Measured,
    NotYourPlan,
    PlanInput,
    PlanInputError,
    PlanReport,
    SchedulerCore,
    UnknownPlan,
    check_heartbeat,
)
from services.scheduler.live.edges import EdgeLoad, TooManyEdges
from services.scheduler.live.frames import FrameCollector, FrameConfig
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.ratelimit import RateLimiter
from tandem.echo import shown
from tandem.phases import CoarsePhase
from tandem.v1 import edge_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("tandem.scheduler")
RESOLVE_TIMEOUT_S = 2.0


def plan_input_from_proto(m: scheduler_pb2.PlanRequest) -> PlanInput:
    return PlanInput(
        device_class=m.device_class,
        link=LinkInput(m.link.bandwidth_bps, m.link.rtt_seconds, m.link.spectral_efficiency),
        user_id=m.user_id,
        personalized_user=m.personalized_user,
        latency_budget_s=m.latency_budget_seconds,
        energy_budget_j=m.energy_budget_joules,
        prompt_chars=m.prompt_chars if m.HasField("prompt_chars") else None,
    )


def plan_to_proto(a: AssignedPlan) -> scheduler_pb2.PlanResponse:
    p = a.plan
    return scheduler_pb2.PlanResponse(
        plan_id=a.plan_id,
        steps=p.steps,
        split=p.split,
        codec=edge_pb2.Codec(encoding=p.codec, merge_ratio=p.merge_ratio, merge_strategy=a.merge_strategy),
        edge_address=a.edge_address,
        predicted=scheduler_pb2.PhaseSeconds(edge=p.edge_seconds, transfer=p.transfer_seconds,
                                             device=p.device_seconds, total=p.latency_seconds),
        predicted_quality=p.quality,
        predicted_energy_joules=p.energy_j,
        predicted_handoff_bytes=p.handoff_bytes,
        meets_budget=p.meets_budget,
        frame_size=a.frame_size,
        budget_infeasible=a.budget_infeasible,
        infeasible_reason=a.infeasible_reason,
        planned_link=scheduler_pb2.LinkEstimate(bandwidth_bps=a.link.rate_bps, rtt_seconds=a.link.rtt_s or 0.0)
        if a.link else None,
        rate_source=a.link.rate_source if a.link else "",
        rtt_source=a.link.rtt_source if a.link else "",
    )


def report_from_proto(m: scheduler_pb2.ReportRequest) -> PlanReport:
    s = m.measured
    return PlanReport(m.plan_id, Measured(s.queue, s.edge_steps, s.transfer, s.device_steps, s.decode),
                      m.edge_steps, m.device_steps, m.handoff_bytes, m.fallback)


def owner_of(user_id: str, peer: str) -> str:
    """Whose quota a plan counts against: the token's user with tokens on (authenticated), else
    the request's user_id, else the caller's address."""
    caller = caller_user()
    if caller is not None:
        return f"user:{caller}"
    return f"id:{user_id}" if user_id else f"peer:{peer_ip(peer) or peer}"


async def resolve_host(host: str) -> list[str]:
    """The IPs a host name resolves to ([] when it does not, in time)."""
    ip = literal_ip(host)
    if ip is not None or not host:
        return [ip] if ip else []
    try:
        infos = await asyncio.wait_for(asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM),
                                       RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError):
        return []
    return [str(info[4][0]) for info in infos]


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    """``edge_tokens``: the edge credentials heartbeats must carry (None: only ``static_edges``
    and edges advertising the caller's own address may register). ``plan_limit``: Plans per
    caller (see owner_of; None: no limit)."""

    def __init__(self, core: SchedulerCore, metrics: SchedulerMetrics, frames: FrameConfig = FrameConfig(),
                 edge_tokens: Mapping[str, str] | None = None, static_edges: Collection[str] = (),
                 plan_limit: RateLimiter | None = None):
        self.core = core
        self.metrics = metrics
        self.plan_limit = plan_limit if plan_limit is not None else RateLimiter(rate=0)
        self.edge_tokens = dict(edge_tokens) if edge_tokens is not None else None
        self.static_edges = frozenset(static_edges)
        self.collector: FrameCollector[tuple[PlanInput, str], AssignedPlan] = FrameCollector(self._decide_frame, frames)
        metrics.set_costs(core.costs, core.ctx.edge_pack)

    def _decide_frame(self, requests: Sequence[tuple[PlanInput, str]]) -> list[AssignedPlan]:  # on the frame thread
        began = time.perf_counter()
        plans = self.core.decide([r for r, _ in requests], [owner for _, owner in requests])
        self.metrics.observe_frame([a.plan for a in plans], time.perf_counter() - began)
        self.metrics.infeasible_plans.inc(sum(a.budget_infeasible for a in plans))
        self.metrics.set_costs(self.core.costs, self.core.ctx.edge_pack)  # RTT probes may have moved it
        return plans

    async def _abort(self, context, method: str, code: grpc.StatusCode, message: str) -> None:
        self.metrics.requests.labels(method=method, code=code.name).inc()  # counted before the status leaves
        await context.abort(code, message)

    def _ok(self, method: str) -> None:
        self.metrics.requests.labels(method=method, code="OK").inc()

    async def Plan(self, request, context):
        plan_input = plan_input_from_proto(request)
        try:
            self.core.user_spec(plan_input)  # here, so one bad request never fails its frame
        except PlanInputError as exc:
            await self._abort(context, "Plan", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        owner = owner_of(plan_input.user_id, context.peer())  # its fields checked: a bounded key
        wait = self.plan_limit.take(owner)
        if wait > 0:
            limit = self.plan_limit
            await self._abort(context, "Plan", grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"rate limit: {shown(owner)} asked for more than {limit.rate:g} plans/s (burst "
                              f"{limit.burst}; the per-user limit, --plan-rate/--plan-burst); retry in {wait:.2f} s")
        try:
            assigned = await self.collector.submit((plan_input, owner))
        except Exception as exc:  # noqa: BLE001 - the caller gets a status, the log the traceback
            log.exception("deciding a frame failed")
            await self._abort(context, "Plan", grpc.StatusCode.INTERNAL, f"deciding the frame failed: {exc}")
        self._ok("Plan")
        return plan_to_proto(assigned)

    async def Report(self, request, context):
        try:
            caller = caller_user()
            outcome = self.core.report(report_from_proto(request), f"user:{caller}" if caller is not None else None)
        except PlanInputError as exc:
            await self._abort(context, "Report", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AlreadyReported:
            await self._abort(context, "Report", grpc.StatusCode.FAILED_PRECONDITION,
                              f"plan_id: already reported: {shown(request.plan_id)} (a plan counts once)")
        except NotYourPlan:
            await self._abort(context, "Report", grpc.StatusCode.PERMISSION_DENIED,
                              f"plan_id: {shown(request.plan_id)} is another user's plan")
        except UnknownPlan:
            await self._abort(context, "Report", grpc.StatusCode.NOT_FOUND,
                              f"plan_id: unknown or forgotten: {shown(request.plan_id)}")
        for phase, error in outcome.relative_errors.items():
            self.metrics.relative_error.labels(phase=phase).observe(error)
        if outcome.budget_violated:
            self.metrics.budget_violations.inc()
        self.metrics.reports.inc()
        self.metrics.set_costs(self.core.costs, self.core.ctx.edge_pack)
        self._ok("Report")
        return scheduler_pb2.ReportResponse(total_relative_error=outcome.relative_errors.get(CoarsePhase.TOTAL, 0.0),
                                            budget_violated=outcome.budget_violated)

    async def ReportEdgeLoad(self, request, context):
        load = EdgeLoad(request.address, request.queue_depth, request.running_requests, request.steps_per_second,
                        request.leaving, request.interval_iterations, request.interval_steps,
                        request.interval_busy_seconds)
        try:
            check_heartbeat(load)
        except PlanInputError as exc:
            await self._abort(context, "ReportEdgeLoad", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        needs_host = self.edge_tokens is None and load.address not in self.static_edges
        denial = check_edge(load.address, self.edge_tokens, bearer_token(context.invocation_metadata()),
                            self.static_edges, peer_ip(context.peer()),
                            await resolve_host(address_host(load.address)) if needs_host else ())
        if denial is not None:
            await self._abort(context, "ReportEdgeLoad", grpc.StatusCode[denial.code], denial.message)
        try:
            live = self.core.heartbeat(load)
        except TooManyEdges as exc:
            await self._abort(context, "ReportEdgeLoad", grpc.StatusCode.RESOURCE_EXHAUSTED, f"address: {exc}")
        if load.leaving:
            log.info("edge %s is leaving (draining): no new plans go to it", shown(load.address))
        self._ok("ReportEdgeLoad")
        return scheduler_pb2.ReportEdgeLoadResponse(live_edges=live, ttl_seconds=self.core.edges.ttl_s)
