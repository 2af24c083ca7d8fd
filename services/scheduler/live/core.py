"""The scheduler service's state, without the network: validates plan requests, decides a frame
(planner + edge routing), remembers issued plans, and turns measured reports into calibration
and prediction errors. The gRPC servicer only converts messages to and from these dataclasses.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

from services.scheduler.decide import checks
from services.scheduler.decide.calibration import MAX_RTT_S, RobustCalibrator, UserLinks, UserMargins
from services.scheduler.decide.costs import CostProfile, PhaseObservation
from services.scheduler.decide.isolation import best_effort_plan, split_infeasible
from services.scheduler.decide.options import DEFAULT_OPTIONS, OptionTable
from services.scheduler.decide.planner import DeciderLike, Plan, plan_frame
from services.scheduler.decide.quality import BASE_USER, PERSONALIZED_USER, QualityProfile
from services.scheduler.decide.routing import StepModel
from services.scheduler.decide.scenario import FrameContext, ObjectiveConfig, UserSpec
from services.scheduler.edge_auth import MAX_ADDRESS_CHARS
from services.scheduler.live.edges import EdgeLoad, EdgeRegistry
from services.scheduler.live.occupancy import EdgeOccupancy, EdgeSpan
from services.scheduler.live.pending import PendingPlans
from tandem.codec.spec import DEFAULT_STRATEGY
from tandem.echo import shown
from tandem.link import LinkEstimate
from tandem.lru import Lru
from tandem.phases import COARSE_PHASES, PHASES, CoarsePhase
from tandem.request import MAX_PROMPT_CHARS, MAX_STEPS  # a request's limits: a plan's prompt, a report's steps

MAX_RECORDS = 10_000  # plans awaiting a report, all users together
MAX_PENDING_PER_USER = 512  # beyond it a user's own oldest unreported plan is forgotten
MAX_ID_CHARS = 128  # user_id, device_class, plan_id
# Physical bounds of what a device may claim or measure: beyond them a value is a bug or an attack.
MAX_BANDWIDTH_BPS = 1e12
MAX_SPECTRAL_EFFICIENCY = 100.0  # b/s/Hz; real links stay under ~30
MAX_BUDGET_S = 86_400.0
MAX_BUDGET_J = 1e7
MAX_PHASE_S = 3600.0
MAX_HANDOFF_BYTES = 1 << 30
MAX_STEPS_PER_SECOND = 1e6
# An edge report's calibration waits until every plan issued before its edge steps ended has been
# reported (only then is the batch it ran in known, see occupancy.py), or this long after them.
SETTLE_S = 30.0
MAX_HELD = 1024  # edge observations waiting to settle; beyond it the oldest settles as it is
# A device that knows nothing of its link yet (no bandwidth, no spectral efficiency) and has no
# reports of its own is planned at this rate (the CLI's old default estimate).
PRIOR_BANDWIDTH_BPS = 100e6


class PlanInputError(ValueError):
    """A bad request field; ``field`` names it as the wire spells it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownPlan(KeyError):
    """A report for a plan id this scheduler did not issue, or forgot (too old)."""


class AlreadyReported(KeyError):
    """A second report for one plan: it counts once."""


class NotYourPlan(PermissionError):
    """With tokens on, a report for another user's plan."""


@dataclass(frozen=True)
class LinkInput:
    bandwidth_bps: float = 0.0  # 0: unknown
    rtt_s: float = 0.0  # 0: unknown
    spectral_efficiency: float = 0.0  # used when bandwidth_bps is 0


@dataclass(frozen=True, slots=True)
class PlannedLink:
    """The link a plan was predicted for, and where each figure came from: "device" (the plan
    request's estimate), "reports" (the user's own reports) or "profile" (the scheduler's prior
    rate, or its calibrated cost profile's round trip)."""

    rate_bps: float
    rtt_s: float | None  # None: the cost profile's (its value when the frame is decided)
    rate_source: str
    rtt_source: str
    # A bit rate (measured, typed, reported or the prior) is the device's own link; only a
    # spectral efficiency is a share of the band the frame's users split.
    own_link: bool = True


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


@dataclass(frozen=True, slots=True)
class AssignedPlan:
    plan_id: str
    plan: Plan
    edge_address: str  # "" when k = 0 or no edge is known
    merge_strategy: str
    frame_size: int
    infeasible_reason: str = ""  # non-empty: no plan meets the budget; this one was planned alone
    link: PlannedLink | None = None  # rtt_s filled in: the link the prediction used

    @property
    def budget_infeasible(self) -> bool:
        return bool(self.infeasible_reason)


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
    relative_errors: dict[str, float]  # CoarsePhase -> |measured - predicted| / predicted (as planned only)
    budget_violated: bool
    measured_total: float


@dataclass(frozen=True, slots=True)
class _Record:
    user: UserSpec
    assigned: AssignedPlan
    rate_bps: float
    owner: str  # whose quota of pending plans it counts against
    on_edge_until: float  # the core's clock when its edge round is predicted over (k = 0: when planned)


@dataclass(frozen=True, slots=True)
class _Held:
    """An edge observation whose batch is known once the plans that could share its span report."""

    observation: PhaseObservation
    span: EdgeSpan


@dataclass
class SchedulerCore:
    quality: QualityProfile
    costs: CostProfile
    decider: DeciderLike
    edges: EdgeRegistry = field(default_factory=EdgeRegistry)
    ctx: FrameContext = FrameContext()
    merge_strategy: str = DEFAULT_STRATEGY  # the planner does not choose it: the measured best
    max_records: int = MAX_RECORDS
    max_pending_per_user: int = MAX_PENDING_PER_USER
    prior_bandwidth_bps: float = PRIOR_BANDWIDTH_BPS
    # What the planner chooses from. A policy brings its own table (its action space); a baseline
    # or the exact search is given every codec the quality profile prices (server.planner_options).
    options: OptionTable = DEFAULT_OPTIONS
    objective: ObjectiveConfig = ObjectiveConfig()  # its budget_headroom: --budget-headroom
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time  # what the state file's times are in (the clock's restart with the process)

    def __post_init__(self) -> None:
        self._pending: PendingPlans[_Record] = PendingPlans(self.max_records, self.max_pending_per_user)
        self._reported: Lru[str, bool] = Lru(self.max_records)  # recently reported ids: a repeat is refused
        self._calibrator = RobustCalibrator(self.costs)
        self._links = UserLinks()  # each user's own rate and round trip, from its own reports
        self._margins = UserMargins()  # how much slower than predicted each user's plans ran
        self._occupancy = EdgeOccupancy()  # the spans reports measured on each edge
        self._issued: dict[str, float] = {}  # plan id -> issue time, the last SETTLE_S, oldest first
        self._held: deque[_Held] = deque()
        self._lock = threading.Lock()  # frames are decided on a worker thread, reports on the loop
        self._revision = 0  # counts the changes to what export_state gives

    # --- plans ------------------------------------------------------------------------------
    def user_spec(self, request: PlanInput, owner: str | None = None) -> UserSpec:
        """The planner's view of a request; raises PlanInputError naming the bad field.
        ``owner``: whose reports calibrated the link (default: its user_id), see :meth:`link_for`."""
        return self._spec(request, owner)[0]

    def _spec(self, request: PlanInput, owner: str | None) -> tuple[UserSpec, PlannedLink]:
        for field_name, text in (("user_id", request.user_id), ("device_class", request.device_class)):
            _require(len(text) <= MAX_ID_CHARS, field_name, f"longer than {MAX_ID_CHARS} characters ({len(text)})")
        if request.device_class not in self.costs.devices:
            known = ", ".join(self.costs.devices)
            raise PlanInputError("device_class", f"unknown device class {shown(request.device_class)} (known: {known})")
        link = request.link
        for link_field, number, most in (("bandwidth_bps", link.bandwidth_bps, MAX_BANDWIDTH_BPS),
                                         ("rtt_seconds", link.rtt_s, MAX_RTT_S),
                                         ("spectral_efficiency", link.spectral_efficiency, MAX_SPECTRAL_EFFICIENCY)):
            _require_range(number, f"link.{link_field}", most)
        name = request.personalized_user
        _require(not name or (name.isidentifier() and len(name) <= 64), "personalized_user", f"invalid user name {shown(name)}")
        for field_name, budget, most in (("latency_budget_seconds", request.latency_budget_s, MAX_BUDGET_S),
                                         ("energy_budget_joules", request.energy_budget_j, MAX_BUDGET_J)):
            _require_range(budget, field_name, most, "(0: none)")
        if request.prompt_chars is not None:
            _require(0 <= request.prompt_chars <= MAX_PROMPT_CHARS, "prompt_chars",
                     f"must be in 0..{MAX_PROMPT_CHARS}, got {request.prompt_chars}")
        planned = self.link_for(request, owner)
        with self._lock:  # reports update the margins on another thread
            margin = self._margins.margin(owner if owner is not None else request.user_id)
        return UserSpec(
            user_id=request.user_id,
            device_class=request.device_class,
            spectral_efficiency=planned.rate_bps / self.ctx.bandwidth_hz,
            personalized=bool(name),
            profile_user=self._profile_user(name),
            latency_budget_s=request.latency_budget_s or math.inf,
            energy_budget_j=request.energy_budget_j or math.inf,
            rtt_s=planned.rtt_s,  # a user's own RTT shapes its own plan, nobody else's
            own_link=planned.own_link,
            budget_margin=margin,  # the user's own under-prediction: only its own target moves
        ), planned

    def link_for(self, request: PlanInput, owner: str | None = None) -> PlannedLink:
        """The rate and round trip a request is planned with, each from the source that measures
        what the cost model means by it. The rate: the device's estimate when the request gives
        one (it times the handoff's bytes themselves, or its user typed it: --link-mbps), else the
        owner's own reports, else the prior. The round trip (the model's fixed cost of an edge
        round): the owner's own reports when it has them, which see all the round costs before
        the first step (connecting, the network, the edge's admission and prompt encoding; on
        loopback through a delaying proxy 59-63 ms where the device's call-to-first-event RTT
        read 21-31 ms), else the device's RTT, else the calibrated profile's. Reports count
        from two on, and only the owner's own: no other user's measurement moves this plan."""
        link = request.link
        with self._lock:  # reports update the map on another thread
            own = self._links.get(owner if owner is not None else request.user_id)
        if link.bandwidth_bps > 0 or link.spectral_efficiency > 0:
            rate = link.bandwidth_bps or link.spectral_efficiency * self.ctx.bandwidth_hz
            rate_source = "device"
        else:
            rate, rate_source = ((own.bandwidth_bps, "reports") if own.bandwidth_bps > 0
                                 else (self.prior_bandwidth_bps, "profile"))
        rtt: float | None
        if own.rtt_s > 0:
            rtt, rtt_source = own.rtt_s, "reports"
        else:
            rtt, rtt_source = (link.rtt_s, "device") if link.rtt_s > 0 else (None, "profile")
        own_link = not (rate_source == "device" and link.bandwidth_bps <= 0)
        return PlannedLink(rate, rtt, rate_source, rtt_source, own_link)

    def _profile_user(self, name: str) -> str:
        """The quality profile's entry for a user: its own if measured, else the generic
        personalized one (synthetic profiles have only that), else the base model's."""
        users = self.quality.users(self.ctx.pair)
        if not name:
            return BASE_USER
        return name if name in users else PERSONALIZED_USER if PERSONALIZED_USER in users else BASE_USER

    def decide(self, requests: Sequence[PlanInput], owners: Sequence[str] | None = None) -> list[AssignedPlan]:
        """One frame: every request must have passed :meth:`user_spec`. ``owners``: whose quota of
        pending plans each counts against (default: its user_id). A request whose budget no plan
        meets even alone is planned alone, best effort, so it never moves the others' plans."""
        owners = list(owners) if owners is not None else [r.user_id for r in requests]
        now = self.clock()
        with self._lock:
            others = self._on_edges(now, set(owners))
        # One snapshot for the whole frame; its steps share each edge with the plans still on it.
        base = self.costs
        costs = base.with_edge_load(others / max(1, len(self.edges.live())), self.ctx.edge_pack)
        specs = [self._spec(r, owner) for r, owner in zip(requests, owners)]
        users, links = [u for u, _ in specs], [link for _, link in specs]
        reasons = split_infeasible(users, self.quality, costs, self.ctx, self.options)
        # In a canonical order: the frame's plans must not depend on which request arrived first.
        joint = sorted((i for i in range(len(users)) if i not in reasons), key=lambda i: _canonical(users[i]))
        plans = dict(zip(joint, plan_frame([users[i] for i in joint], self.quality, costs, self.decider, ctx=self.ctx,
                                          options=self.options, objective=self.objective)))
        for i in reasons:
            plans[i] = best_effort_plan(users[i], self.quality, costs, self.ctx, self.options)
        # Each to the edge where its k steps finish first (the edges' own loads and measured speeds
        # price them: the frame's model without the other frames' plans, which those loads count),
        # in the canonical order too, each seeing the frame's plans routed before it.
        remote = sorted((i for i in range(len(users)) if plans[i].split > 0), key=lambda i: _canonical(users[i]))
        model = StepModel.of(base, self.ctx.edge_pack)
        routed = self.edges.route([plans[i].split for i in remote], model)
        addresses = dict(zip(remote, routed))
        speeds = self.edges.speeds(model)
        for i, address in addresses.items():
            plans[i] = at_edge_speed(plans[i], speeds.get(address, 1.0), users[i].latency_budget_s)
        out = []
        with self._lock:
            for i, (link, user, owner) in enumerate(zip(links, users, owners)):
                address = addresses.get(i, "")
                used = replace(link, rtt_s=costs.rtt_s if link.rtt_s is None else link.rtt_s)
                assigned = AssignedPlan(uuid.uuid4().hex, plans[i], address, self.merge_strategy,
                                        1 if i in reasons else len(joint), reasons.get(i, ""), used)
                on_edge_until = now + plans[i].edge_seconds + plans[i].transfer_seconds  # k = 0: now
                self._pending.add(assigned.plan_id, owner, _Record(user, assigned, link.rate_bps, owner, on_edge_until))
                self._issued[assigned.plan_id] = now
                out.append(assigned)
            while len(self._issued) > self.max_records:
                del self._issued[next(iter(self._issued))]
            self._revision += 1
        return out

    def _on_edges(self, now: float, frame_owners: set[str]) -> float:
        """How many other users' plans of earlier frames a new plan's edge steps will share: each
        plan predicted on an edge now (planned there, not reported, its edge round not over) for
        the share of its round still to come, since it leaves the batch when done (one planned
        just now: 1; one about to finish: about 0). Each user counts once, at most 1: a flood of
        one user's plans is one more request on the edge. The frame's own users are left out: the
        frame models their batch, and a user's earlier unreported plan is more often abandoned
        than running beside its new one. Under the lock."""
        others: dict[str, float] = {}
        for plan_id, issued_at in self._issued.items():
            record = self._pending.get(plan_id)
            if record is None or record.owner in frame_owners or record.on_edge_until <= now:
                continue
            left = (record.on_edge_until - now) / (record.on_edge_until - issued_at)
            others[record.owner] = max(others.get(record.owner, 0.0), min(left, 1.0))
        return sum(others.values())

    # --- edges ------------------------------------------------------------------------------
    def heartbeat(self, load: EdgeLoad) -> int:
        """Registers an edge's load and measured work (a leaving one: drops it from routing at
        once); returns how many edges are live."""
        check_heartbeat(load)
        self.edges.heartbeat(load)  # TooManyEdges for a new edge beyond the cap
        return len(self.edges.live())

    # --- reports ----------------------------------------------------------------------------
    def report(self, report: PlanReport, owner: str | None = None) -> ReportOutcome:
        """Calibrates the cost models from what the device measured; the plan is then forgotten.
        ``owner``: when given (tokens on), only the plan's own user may report it; once."""
        check_report(report)
        m = report.measured
        with self._lock:
            record = self._pending.get(report.plan_id)
            if record is None:
                raise AlreadyReported(report.plan_id) if report.plan_id in self._reported else UnknownPlan(report.plan_id)
            if owner is not None and record.owner != owner:
                raise NotYourPlan(report.plan_id)
            self._pending.pop(report.plan_id)
            self._reported.put(report.plan_id, True)
            self._revision += 1
        plan = record.assigned.plan
        edge_steps, device_steps = report.edge_steps, report.device_steps
        if edge_steps == 0 and device_steps == 0:
            edge_steps, device_steps = plan.split, plan.steps - plan.split
        as_planned = not report.fallback and (edge_steps, device_steps) == (plan.split, plan.steps - plan.split)
        measured = measured_phases(m, edge_steps, plan.edge_seconds / plan.split if plan.split else 0.0)
        edge_compute, round_overhead = measured[CoarsePhase.EDGE], measured[CoarsePhase.TRANSFER] - m.transfer
        errors: dict[str, float] = {}
        if as_planned:
            predicted = {CoarsePhase.EDGE: plan.edge_seconds, CoarsePhase.TRANSFER: plan.transfer_seconds,
                         CoarsePhase.DEVICE: plan.device_seconds, CoarsePhase.TOTAL: plan.latency_seconds}
            errors = {p: abs(measured[p] - predicted[p]) / predicted[p] for p in COARSE_PHASES if predicted[p] > 0}
        now = self.clock()
        observations = self._observations(record, report, edge_steps, device_steps, edge_compute, round_overhead)
        with self._lock:
            self._issued.pop(report.plan_id, None)
            edge = [o for o in observations if o.phase == "edge"]
            if edge:  # placed back from now by the phases after the edge steps
                end = now - (m.transfer + m.device_steps + m.decode)
                span = EdgeSpan(self._edge_key(record), end - edge_compute, end, record.owner)
                self._occupancy.add(span)
                self._held.append(_Held(edge[0], span))
            observations = [o for o in observations if o.phase != "edge"] + self._settled(now)
        self._calibrate(observations)
        if edge_steps > 0 and not report.fallback and report.handoff_bytes > 0:
            with self._lock:
                self._links.observe(record.owner, report.handoff_bytes, m.transfer,
                                    round_overhead if m.queue > 0 else None)
        if as_planned and plan.latency_seconds > 0 and m.total > 0:
            with self._lock:
                self._margins.observe(record.owner, m.total, plan.latency_seconds)
        return ReportOutcome(errors, m.total > record.user.latency_budget_s, m.total)

    def _observations(self, record: _Record, report: PlanReport, edge_steps: int, device_steps: int,
                      edge_compute: float, round_overhead: float) -> list[PhaseObservation]:
        m, device = report.measured, record.user.device_class
        obs = []
        if edge_steps > 0 and not report.fallback and m.edge_steps > 0:
            obs.append(PhaseObservation("edge", edge_compute, steps=edge_steps, pack=self.ctx.edge_pack))
        if report.handoff_bytes > 0 and not report.fallback and m.transfer > 0:
            obs.append(PhaseObservation("transfer", m.transfer + round_overhead, nbytes=report.handoff_bytes,
                                        rate_bps=record.rate_bps))
        if device_steps > 0 and m.device_steps > 0:
            obs.append(PhaseObservation("device", m.device_steps, steps=device_steps, device_class=device))
        if m.decode > 0:
            obs.append(PhaseObservation("decode", m.decode, device_class=device))
        return obs

    def _edge_key(self, record: _Record) -> str:
        """The edge a plan's steps ran on: its plan's, else (a k = 0 plan run on the edge anyway,
        an override) the only edge this scheduler knows, live or configured, else "" (one
        unknown edge). A configured edge that never heartbeats counts: its plans carry its
        address, and an override beside them shared their batch."""
        return record.assigned.edge_address or self.edges.sole_address()

    def _settled(self, now: float) -> list[PhaseObservation]:
        """Held edge observations whose span nobody still pending could share, each at the batch
        its span ran in (the oldest first; a blocked one blocks the later ones). Under the lock."""
        while self._issued and next(iter(self._issued.values())) < now - SETTLE_S:
            del self._issued[next(iter(self._issued))]
        out = []
        while self._held:
            held = self._held[0]
            if len(self._held) <= MAX_HELD and now < held.span.end + SETTLE_S and self._shared_by_pending(held.span):
                break
            self._held.popleft()
            out.append(replace(held.observation, batch=self._occupancy.batch(held.span)))
        return out

    def _shared_by_pending(self, span: EdgeSpan) -> bool:
        """A plan issued before ``span`` ended is still unreported: its steps may have shared it."""
        for plan_id, issued_at in self._issued.items():
            if issued_at >= span.end:
                return False
            if self._pending.get(plan_id) is not None:
                return True
        return False

    def _calibrate(self, observations: list[PhaseObservation]) -> None:
        with self._lock:  # a frame reads self.costs once; swapping the reference is enough for it
            self.costs = self._calibrator.update(observations)

    @property
    def pending_reports(self) -> int:
        return len(self._pending)

    @property
    def prior_costs(self) -> CostProfile:
        """The cost profile as loaded, before any calibration (what the state file is tied to)."""
        return self._calibrator.prior

    def margin_of(self, user: str) -> float:
        """A user's own margin (calibration.UserMargins), by its owner key ("id:alice", "user:alice")."""
        with self._lock:
            return self._margins.margin(user)

    def link_of(self, user: str) -> LinkEstimate:
        """A user's own link estimate from its reports, by its owner key."""
        with self._lock:
            return self._links.get(user)

    # --- kept across restarts (services/scheduler/state.py) ----------------------------------
    @property
    def revision(self) -> int:
        """Changes so far to what :meth:`export_state` gives (a saver skips an unchanged state)."""
        return self._revision

    def export_state(self) -> dict[str, Any]:
        """What this scheduler has learned, as plain JSON: the calibration of the shared cost model,
        each user's own link and margin (keyed by owner, never merged), the edge spans reports
        measured, the plans awaiting a report (so a report after a restart still counts, once), the
        edge observations waiting for their batch and the edges live by heartbeat (a restart within
        their TTL routes to them before they beat again). Times are wall-clock seconds (the core's
        clock starts anew with the process)."""
        with self._lock:  # copies (of immutable records: references) under the lock, JSON after it
            offset = self.wall() - self.clock()
            calibration, links, margins = self._calibrator.export(), self._links.export(), self._margins.export()
            spans, pending, held = self._occupancy.spans(), self._pending.items(), list(self._held)
            issued, reported = list(self._issued.items()), [plan_id for plan_id, _ in self._reported.items()]
        edges = self.edges.export(self.wall())
        return {
            "calibration": calibration,
            "links": links,
            "margins": margins,
            "occupancy": [_span_json(span, offset) for span in spans],
            "pending": [_record_json(plan_id, record, offset) for plan_id, _, record in pending],
            "issued": [[plan_id, at + offset] for plan_id, at in issued],
            "held": [{"observation": _plain(h.observation), "span": _span_json(h.span, offset)} for h in held],
            "reported": reported,
            "edges": edges,
        }

    def restore_state(self, data: Any) -> None:
        """Takes back what :meth:`export_state` gave (of a core with the same cost profile), within
        this core's bounds (each LRU and table keeps its size: the most recent kept). Raises
        ValueError naming what is wrong; then nothing changed."""
        checks.require_keys(data, {"calibration", "links", "margins", "occupancy", "pending", "issued", "held", "reported",
                                   "edges"}, "state")
        offset = self.clock() - self.wall()  # wall-clock seconds -> this process's clock
        old = self._calibrator
        calibrator = RobustCalibrator.restored(old.prior, data["calibration"], old.window, old.outlier_factor,
                                               old.max_rtt_s)
        links, margins = UserLinks.restored(data["links"]), UserMargins.restored(data["margins"])
        occupancy = EdgeOccupancy()
        for i, entry in enumerate(checks.as_list(data["occupancy"], "occupancy")):
            occupancy.add(_span_from(entry, f"occupancy[{i}]", offset))
        pending: PendingPlans[_Record] = PendingPlans(self.max_records, self.max_pending_per_user)
        for i, entry in enumerate(checks.as_list(data["pending"], "pending")):
            plan_id, record = _record_from(entry, f"pending[{i}]", offset)
            if pending.get(plan_id) is not None:
                raise ValueError(f"pending[{i}].plan_id: {plan_id!r:.40} twice")
            pending.add(plan_id, record.owner, record)
        issued: dict[str, float] = {}
        for i, entry in enumerate(checks.as_list(data["issued"], "issued")):
            if not isinstance(entry, list) or len(entry) != 2:
                raise ValueError(f"issued[{i}]: expected [plan id, time]")
            at = checks.number(entry[1], f"issued[{i}][1]") + offset
            if issued and at < next(reversed(issued.values())):
                raise ValueError(f"issued[{i}]: out of order (plans are listed as issued)")
            issued[checks.text(entry[0], f"issued[{i}][0]", MAX_ID_CHARS)] = at
        while len(issued) > self.max_records:
            del issued[next(iter(issued))]
        kept = {span: span for span in occupancy.spans()}  # a held span is the very one occupancy holds
        held: deque[_Held] = deque()
        for i, entry in enumerate(checks.as_list(data["held"], "held")):
            checks.require_keys(entry, {"observation", "span"}, f"held[{i}]")
            observation = checks.typed(PhaseObservation, entry["observation"], f"held[{i}].observation",
                                       choices={"phase": ("edge", "transfer", "device", "decode")})
            span = _span_from(entry["span"], f"held[{i}].span", offset)
            held.append(_Held(observation, kept.get(span, span)))
        while len(held) > MAX_HELD:
            held.popleft()
        reported: Lru[str, bool] = Lru(self.max_records)
        for i, plan_id in enumerate(checks.as_list(data["reported"], "reported")):
            reported.put(checks.text(plan_id, f"reported[{i}]", MAX_ID_CHARS), True)
        edges = []
        for i, entry in enumerate(checks.as_list(data["edges"], "edges")):
            where = f"edges[{i}]"
            checks.require_keys(entry, {"address", "queue_depth", "running_requests", "steps_per_second", "seen_at"},
                                where)
            load = EdgeLoad(checks.text(entry["address"], f"{where}.address", MAX_ADDRESS_CHARS),
                            checks.count(entry["queue_depth"], f"{where}.queue_depth"),
                            checks.count(entry["running_requests"], f"{where}.running_requests"),
                            checks.number(entry["steps_per_second"], f"{where}.steps_per_second", 0.0,
                                          MAX_STEPS_PER_SECOND))
            try:
                check_heartbeat(load)
            except PlanInputError as exc:
                raise ValueError(f"{where}: {exc}") from None
            edges.append((load, checks.number(entry["seen_at"], f"{where}.seen_at")))
        with self._lock:
            self._calibrator, self.costs = calibrator, calibrator.profile()
            self._links, self._margins, self._occupancy = links, margins, occupancy
            self._pending, self._issued, self._held, self._reported = pending, issued, held, reported
            self._revision += 1
        self.edges.restore(edges, self.wall())


def _span_json(span: EdgeSpan, offset: float) -> dict[str, Any]:
    return {"edge": span.edge, "start": span.start + offset, "end": span.end + offset, "owner": span.owner}


def _span_from(entry: Any, where: str, offset: float) -> EdgeSpan:
    span = checks.typed(EdgeSpan, entry, where)
    if not span.end >= span.start:
        raise ValueError(f"{where}: ends before it starts")
    return replace(span, start=span.start + offset, end=span.end + offset)


_RECORD_KEYS = {"plan_id", "owner", "user", "plan", "edge_address", "merge_strategy", "frame_size", "infeasible_reason",
                "link", "rate_bps", "on_edge_until"}


def _plain(instance: Any) -> dict[str, Any]:
    """A dataclass of plain fields as a dict (dataclasses.asdict deep-copies: slower, not needed)."""
    return {f.name: getattr(instance, f.name) for f in fields(instance)}


def _record_json(plan_id: str, record: _Record, offset: float) -> dict[str, Any]:
    a = record.assigned
    return {"plan_id": plan_id, "owner": record.owner, "user": _plain(record.user), "plan": _plain(a.plan),
            "edge_address": a.edge_address, "merge_strategy": a.merge_strategy, "frame_size": a.frame_size,
            "infeasible_reason": a.infeasible_reason, "link": _plain(a.link) if a.link is not None else None,
            "rate_bps": record.rate_bps, "on_edge_until": record.on_edge_until + offset}


def _record_from(entry: Any, where: str, offset: float) -> tuple[str, _Record]:
    checks.require_keys(entry, _RECORD_KEYS, where)
    plan_id = checks.text(entry["plan_id"], f"{where}.plan_id", MAX_ID_CHARS, empty=False)
    user = checks.typed(UserSpec, entry["user"], f"{where}.user", infinite=("latency_budget_s", "energy_budget_j"))
    plan = checks.typed(Plan, entry["plan"], f"{where}.plan")
    link = None if entry["link"] is None else checks.typed(PlannedLink, entry["link"], f"{where}.link")
    assigned = AssignedPlan(plan_id, plan, checks.text(entry["edge_address"], f"{where}.edge_address", MAX_ADDRESS_CHARS),
                            checks.text(entry["merge_strategy"], f"{where}.merge_strategy"),
                            checks.count(entry["frame_size"], f"{where}.frame_size"),
                            checks.text(entry["infeasible_reason"], f"{where}.infeasible_reason"), link)
    rate = checks.number(entry["rate_bps"], f"{where}.rate_bps", 0.0, MAX_BANDWIDTH_BPS)
    owner = checks.text(entry["owner"], f"{where}.owner", 2 * MAX_ID_CHARS, empty=False)
    return plan_id, _Record(user, assigned, rate, owner, checks.number(entry["on_edge_until"], f"{where}.on_edge_until") + offset)


def check_heartbeat(load: EdgeLoad) -> None:
    _require(len(load.address) <= MAX_ADDRESS_CHARS, "address",
             f"longer than {MAX_ADDRESS_CHARS} characters ({len(load.address)})")
    host, _, port = load.address.rpartition(":")
    _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, "address",
             f"must be HOST:PORT, got {shown(load.address)}")
    _require_range(load.steps_per_second, "steps_per_second", MAX_STEPS_PER_SECOND)
    _require_range(load.interval_busy_s, "interval_busy_seconds", MAX_PHASE_S)
    for name, count in (("interval_iterations", load.interval_iterations), ("interval_steps", load.interval_steps)):
        _require(0 <= count < 1 << 32, name, f"must be in 0..{(1 << 32) - 1}, got {count}")
    _require(load.interval_steps >= load.interval_iterations, "interval_steps",
             f"fewer request-steps ({load.interval_steps}) than iterations ({load.interval_iterations}): "
             "an iteration advances one request at least")


def check_report(report: PlanReport) -> None:
    """Every measured number finite, >= 0 and physically possible; raises PlanInputError."""
    _require(len(report.plan_id) <= MAX_ID_CHARS, "plan_id", f"longer than {MAX_ID_CHARS} characters")
    for phase in PHASES:  # Measured's fields
        _require_range(getattr(report.measured, phase), f"measured.{phase}", MAX_PHASE_S)
    for name, value, most in (("edge_steps", report.edge_steps, MAX_STEPS),
                              ("device_steps", report.device_steps, MAX_STEPS),
                              ("handoff_bytes", report.handoff_bytes, MAX_HANDOFF_BYTES)):
        _require(0 <= value <= most, name, f"must be in 0..{most}, got {value}")


def measured_phases(m: Measured, edge_steps: int, planned_step_s: float = 0.0) -> dict[str, float]:
    """The device's timers as the planner's phases (keyed by CoarsePhase): edge (the k steps),
    transfer (+ the round's fixed cost), device (late steps + decode), total.

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
    return {CoarsePhase.EDGE: edge, CoarsePhase.TRANSFER: m.transfer + overhead,
            CoarsePhase.DEVICE: m.device_steps + m.decode, CoarsePhase.TOTAL: m.total}


def at_edge_speed(plan: Plan, scale: float, budget_s: float | None) -> Plan:
    """The plan as predicted on the edge it was routed to: its edge steps at that edge's measured
    speed (``scale``: the edge's seconds over the profile's; 1 = as profiled), so a plan sent to a
    slower edge predicts its slower steps and says when they put it over the user's budget."""
    if scale == 1.0 or plan.edge_seconds <= 0:
        return plan
    edge = plan.edge_seconds * scale
    latency = plan.latency_seconds + edge - plan.edge_seconds
    meets = plan.meets_budget and (budget_s is None or scale < 1.0 or latency <= budget_s)
    return replace(plan, edge_seconds=edge, latency_seconds=latency, meets_budget=meets)


def _canonical(user: UserSpec) -> tuple:
    return (user.device_class, user.spectral_efficiency, user.latency_budget_s, user.energy_budget_j,
            user.profile_user, user.personalized, user.rtt_s or 0.0, user.own_link, user.budget_margin, user.user_id)


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise PlanInputError(field, message)


def _require_range(value: float, field: str, most: float, note: str = "") -> None:
    _require(math.isfinite(value) and 0 <= value <= most, field,
             f"must be a finite number in [0, {most:g}]{' ' + note if note else ''}, got {shown(value)}")
