"""The scheduler service's state, without the network: validates plan requests, decides a frame
(planner + edge routing), remembers issued plans, and turns measured reports into calibration
and prediction errors. The gRPC servicer only converts messages to and from these dataclasses.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from services.scheduler.costs import CostProfile, PhaseObservation, calibrate
from services.scheduler.edges import EdgeLoad, EdgeRegistry
from services.scheduler.planner import DeciderLike, Plan, plan_frame
from services.scheduler.quality import BASE_USER, PERSONALIZED_USER, QualityProfile
from services.scheduler.scenario import FrameContext, UserSpec
from tandem.codec.spec import DEFAULT_STRATEGY

MAX_PROMPT_CHARS = 1000
MAX_RECORDS = 10_000  # plans awaiting a report; the oldest are forgotten first
PHASES = ("edge", "transfer", "device", "total")


class PlanInputError(ValueError):
    """A bad request field; ``field`` names it as the wire spells it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownPlan(KeyError):
    """A report for a plan id this scheduler did not issue, or forgot (already reported, too old)."""


@dataclass(frozen=True)
class LinkInput:
    bandwidth_bps: float = 0.0  # 0: unknown
    rtt_s: float = 0.0  # 0: unknown
    spectral_efficiency: float = 0.0  # used when bandwidth_bps is 0


@dataclass(frozen=True)
class PlanInput:
    """One plan request as the device sends it (budgets of 0 mean none)."""

    device_class: str
    link: LinkInput
    user_id: str = ""
    personalized_user: str = ""
    latency_budget_s: float = 0.0
    energy_budget_j: float = 0.0
    prompt_chars: int | None = None


@dataclass(frozen=True)
class AssignedPlan:
    plan_id: str
    plan: Plan
    edge_address: str  # "" when k = 0 or no edge is known
    merge_strategy: str
    frame_size: int


@dataclass(frozen=True)
class Measured:
    """Seconds per phase as the device's timers split them."""

    queue: float = 0.0
    edge_steps: float = 0.0
    transfer: float = 0.0  # on the wire + handoff decoding
    device_steps: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.queue + self.edge_steps + self.transfer + self.device_steps + self.decode


@dataclass(frozen=True)
class PlanReport:
    plan_id: str
    measured: Measured
    edge_steps: int = 0  # 0 and 0: as planned
    device_steps: int = 0
    handoff_bytes: int = 0
    fallback: bool = False


@dataclass(frozen=True)
class ReportOutcome:
    relative_errors: dict[str, float]  # phase -> |measured - predicted| / predicted (as planned only)
    budget_violated: bool
    measured_total: float


@dataclass(frozen=True)
class _Record:
    request: PlanInput
    user: UserSpec
    assigned: AssignedPlan
    rate_bps: float
    edge_batch: int  # edge users of its frame on its edge (the batch the planner assumed)


@dataclass
class SchedulerCore:
    quality: QualityProfile
    costs: CostProfile
    decider: DeciderLike
    edges: EdgeRegistry = field(default_factory=EdgeRegistry)
    ctx: FrameContext = FrameContext()
    merge_strategy: str = DEFAULT_STRATEGY  # the planner does not choose it: the measured best
    calibration_alpha: float = 0.3
    max_records: int = MAX_RECORDS

    def __post_init__(self) -> None:
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._lock = threading.Lock()  # frames are decided on a worker thread, reports on the loop

    # --- plans ------------------------------------------------------------------------------
    def user_spec(self, request: PlanInput) -> UserSpec:
        """The planner's view of a request; raises PlanInputError naming the bad field."""
        if request.device_class not in self.costs.devices:
            known = ", ".join(self.costs.devices)
            raise PlanInputError("device_class", f"unknown device class {request.device_class!r} (known: {known})")
        link = request.link
        for name, value in (("bandwidth_bps", link.bandwidth_bps), ("rtt_seconds", link.rtt_s),
                            ("spectral_efficiency", link.spectral_efficiency)):
            _require(math.isfinite(value) and value >= 0, f"link.{name}", f"must be a finite number >= 0, got {value!r}")
        _require(link.bandwidth_bps > 0 or link.spectral_efficiency > 0, "link",
                 "give bandwidth_bps or spectral_efficiency")
        name = request.personalized_user
        _require(not name or (name.isidentifier() and len(name) <= 64), "personalized_user", f"invalid user name {name!r}")
        for field_name, value in (("latency_budget_seconds", request.latency_budget_s),
                                  ("energy_budget_joules", request.energy_budget_j)):
            _require(not math.isnan(value) and value >= 0, field_name, f"must be >= 0 (0: none), got {value!r}")
        if request.prompt_chars is not None:
            _require(0 <= request.prompt_chars <= MAX_PROMPT_CHARS, "prompt_chars",
                     f"must be in 0..{MAX_PROMPT_CHARS}, got {request.prompt_chars}")
        return UserSpec(
            user_id=request.user_id,
            device_class=request.device_class,
            spectral_efficiency=self._rate_bps(link) / self.ctx.bandwidth_hz,
            personalized=bool(name),
            profile_user=self._profile_user(name),
            latency_budget_s=request.latency_budget_s or math.inf,
            energy_budget_j=request.energy_budget_j or math.inf,
        )

    def _rate_bps(self, link: LinkInput) -> float:
        return link.bandwidth_bps if link.bandwidth_bps > 0 else link.spectral_efficiency * self.ctx.bandwidth_hz

    def _profile_user(self, name: str) -> str:
        """The quality profile's entry for a user: its own if measured, else the generic
        personalized one (synthetic profiles have only that), else the base model's."""
        users = self.quality.users(self.ctx.pair)
        if not name:
            return BASE_USER
        return name if name in users else PERSONALIZED_USER if PERSONALIZED_USER in users else BASE_USER

    def decide(self, requests: Sequence[PlanInput]) -> list[AssignedPlan]:
        """One frame: every request must have passed :meth:`user_spec`."""
        rtts = [PhaseObservation("transfer", r.link.rtt_s, nbytes=0, rate_bps=1.0) for r in requests if r.link.rtt_s > 0]
        if rtts:  # an RTT probe is a transfer of zero bytes: it moves the RTT estimate
            self._calibrate(rtts)
        users = [self.user_spec(r) for r in requests]
        plans = plan_frame(users, self.quality, self.costs, self.decider, ctx=self.ctx)
        remote = [i for i, p in enumerate(plans) if p.split > 0]
        addresses = dict(zip(remote, self.edges.route(len(remote))))
        per_edge: dict[str, int] = {}
        for address in addresses.values():
            per_edge[address] = per_edge.get(address, 0) + 1
        out = []
        with self._lock:
            for i, (request, user, plan) in enumerate(zip(requests, users, plans)):
                address = addresses.get(i, "")
                assigned = AssignedPlan(uuid.uuid4().hex, plan, address, self.merge_strategy, len(requests))
                self._records[assigned.plan_id] = _Record(request, user, assigned, self._rate_bps(request.link),
                                                          per_edge.get(address, 1) if address else len(remote))
                out.append(assigned)
            while len(self._records) > self.max_records:
                self._records.popitem(last=False)
        return out

    # --- edges ------------------------------------------------------------------------------
    def heartbeat(self, load: EdgeLoad) -> int:
        """Registers an edge's load; returns how many edges are live."""
        host, _, port = load.address.rpartition(":")
        _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, "address",
                 f"must be HOST:PORT, got {load.address!r}")
        _require(math.isfinite(load.steps_per_second) and load.steps_per_second >= 0, "steps_per_second",
                 f"must be a finite number >= 0, got {load.steps_per_second!r}")
        self.edges.heartbeat(load)
        return len(self.edges.live())

    # --- reports ----------------------------------------------------------------------------
    def report(self, report: PlanReport) -> ReportOutcome:
        """Calibrates the cost models from what the device measured; the plan is then forgotten."""
        m = report.measured
        for name in ("queue", "edge_steps", "transfer", "device_steps", "decode"):
            value = getattr(m, name)
            _require(math.isfinite(value) and value >= 0, f"measured.{name}", f"must be a finite number >= 0, got {value!r}")
        with self._lock:
            record = self._records.pop(report.plan_id, None)
        if record is None:
            raise UnknownPlan(report.plan_id)
        plan = record.assigned.plan
        edge_steps, device_steps = report.edge_steps, report.device_steps
        if edge_steps == 0 and device_steps == 0:
            edge_steps, device_steps = plan.split, plan.steps - plan.split
        as_planned = not report.fallback and (edge_steps, device_steps) == (plan.split, plan.steps - plan.split)
        measured = measured_phases(m, edge_steps, plan.edge_seconds / plan.split if plan.split else 0.0)
        edge_compute, round_overhead = measured["edge"], measured["transfer"] - m.transfer
        errors = {}
        if as_planned:
            predicted = {"edge": plan.edge_seconds, "transfer": plan.transfer_seconds,
                         "device": plan.device_seconds, "total": plan.latency_seconds}
            errors = {p: abs(measured[p] - predicted[p]) / predicted[p] for p in PHASES if predicted[p] > 0}
        self._calibrate(self._observations(record, report, edge_steps, device_steps, edge_compute, round_overhead))
        return ReportOutcome(errors, m.total > record.user.latency_budget_s, m.total)

    def _observations(self, record: _Record, report: PlanReport, edge_steps: int, device_steps: int,
                      edge_compute: float, round_overhead: float) -> list[PhaseObservation]:
        m, device = report.measured, record.user.device_class
        obs = []
        if edge_steps > 0 and not report.fallback and m.edge_steps > 0:
            obs.append(PhaseObservation("edge", edge_compute, steps=edge_steps, batch=max(1, record.edge_batch),
                                        pack=self.ctx.edge_pack))
        if report.handoff_bytes > 0 and not report.fallback and m.transfer > 0:
            obs.append(PhaseObservation("transfer", m.transfer + round_overhead, nbytes=report.handoff_bytes,
                                        rate_bps=record.rate_bps))
        if device_steps > 0 and m.device_steps > 0:
            obs.append(PhaseObservation("device", m.device_steps, steps=device_steps, device_class=device))
        if m.decode > 0:
            obs.append(PhaseObservation("decode", m.decode, device_class=device))
        return obs

    def _calibrate(self, observations: list[PhaseObservation]) -> None:
        with self._lock:  # a frame reads self.costs once; swapping the reference is enough for it
            self.costs = calibrate(self.costs, observations, self.calibration_alpha)

    @property
    def pending_reports(self) -> int:
        return len(self._records)


def measured_phases(m: Measured, edge_steps: int, planned_step_s: float = 0.0) -> dict[str, float]:
    """The device's timers as the planner's phases: edge (the k steps), transfer (+ the round's
    fixed cost), device (late steps + decode), total.

    The device's edge timer starts at the first progress event, after step 1: ``queue`` holds the
    connection, the edge's admission (text encoding, noise), step 1 and any wait; ``edge_steps``
    holds steps 2..k. The k steps run at the rate of steps 2..k (``planned_step_s`` when k = 1);
    the rest of ``queue`` is a fixed cost of every edge round, which the cost model carries in
    the RTT (its only per-round term), so it counts as transfer.
    """
    if edge_steps <= 0:
        edge, overhead = m.queue + m.edge_steps, 0.0
    else:
        step = m.edge_steps / (edge_steps - 1) if edge_steps >= 2 and m.edge_steps > 0 else planned_step_s
        first = min(step, m.queue)
        edge, overhead = m.edge_steps + first, m.queue - first
    return {"edge": edge, "transfer": m.transfer + overhead, "device": m.device_steps + m.decode, "total": m.total}


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise PlanInputError(field, message)
