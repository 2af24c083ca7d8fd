"""The SchedulerService gRPC servicer: message conversion, frame submission, status codes.
The decisions live in :mod:`services.scheduler.core` and :mod:`services.scheduler.frames`."""

from __future__ import annotations

import logging
import time
from typing import Sequence

import grpc

from services.scheduler.core import (
    AssignedPlan,
    LinkInput,
    Measured,
    PlanInput,
    PlanInputError,
    PlanReport,
    SchedulerCore,
    UnknownPlan,
)
from services.scheduler.edges import EdgeLoad
from services.scheduler.frames import FrameCollector, FrameConfig
from services.scheduler.metrics import SchedulerMetrics
from tandem.v1 import edge_pb2, scheduler_pb2, scheduler_pb2_grpc

log = logging.getLogger("tandem.scheduler")


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
    )


def report_from_proto(m: scheduler_pb2.ReportRequest) -> PlanReport:
    s = m.measured
    return PlanReport(m.plan_id, Measured(s.queue, s.edge_steps, s.transfer, s.device_steps, s.decode),
                      m.edge_steps, m.device_steps, m.handoff_bytes, m.fallback)


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, core: SchedulerCore, metrics: SchedulerMetrics, frames: FrameConfig = FrameConfig()):
        self.core = core
        self.metrics = metrics
        self.collector: FrameCollector[PlanInput, AssignedPlan] = FrameCollector(self._decide_frame, frames)
        metrics.set_costs(core.costs, core.ctx.edge_pack)

    def _decide_frame(self, requests: Sequence[PlanInput]) -> list[AssignedPlan]:  # on the frame thread
        began = time.perf_counter()
        plans = self.core.decide(requests)
        self.metrics.observe_frame([a.plan for a in plans], time.perf_counter() - began)
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
        try:
            assigned = await self.collector.submit(plan_input)
        except Exception as exc:  # noqa: BLE001 - the caller gets a status, the log the traceback
            log.exception("deciding a frame failed")
            await self._abort(context, "Plan", grpc.StatusCode.INTERNAL, f"deciding the frame failed: {exc}")
        self._ok("Plan")
        return plan_to_proto(assigned)

    async def Report(self, request, context):
        try:
            outcome = self.core.report(report_from_proto(request))
        except PlanInputError as exc:
            await self._abort(context, "Report", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except UnknownPlan:
            await self._abort(context, "Report", grpc.StatusCode.NOT_FOUND,
                              f"plan_id: unknown or already reported: {request.plan_id!r}")
        for phase, error in outcome.relative_errors.items():
            self.metrics.relative_error.labels(phase=phase).observe(error)
        if outcome.budget_violated:
            self.metrics.budget_violations.inc()
        self.metrics.reports.inc()
        self.metrics.set_costs(self.core.costs, self.core.ctx.edge_pack)
        self._ok("Report")
        return scheduler_pb2.ReportResponse(total_relative_error=outcome.relative_errors.get("total", 0.0),
                                            budget_violated=outcome.budget_violated)

    async def ReportEdgeLoad(self, request, context):
        load = EdgeLoad(request.address, request.queue_depth, request.running_requests, request.steps_per_second)
        try:
            live = self.core.heartbeat(load)
        except PlanInputError as exc:
            await self._abort(context, "ReportEdgeLoad", grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._ok("ReportEdgeLoad")
        return scheduler_pb2.ReportEdgeLoadResponse(live_edges=live, ttl_seconds=self.core.edges.ttl_s)
