"""Prometheus metrics of the scheduler service (own registry; served on their own port)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.scheduler.decide.costs import CostProfile
from services.scheduler.decide.planner import Plan
from services.scheduler.live.guard import GuardStatus

# A frame is decided in milliseconds (policy + closed form), tens of ms when cvxpy re-solves.
DECISION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FRAME_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ERROR_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 100.0)


def split_bucket(plan: Plan) -> str:
    """k/T to the nearest quarter: a bounded label even for odd T."""
    return f"{round(4 * plan.split / plan.steps) / 4:g}"


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_scheduler_requests_total", "Calls by method and final gRPC status",
                                ["method", "code"], registry=r)
        self.decision_seconds = Histogram("tandem_scheduler_decision_seconds", "Deciding one frame (plan + route)",
                                          buckets=DECISION_BUCKETS, registry=r)
        self.frame_size = Histogram("tandem_scheduler_frame_size", "Plan requests decided together",
                                    buckets=FRAME_BUCKETS, registry=r)
        self.plans = Counter("tandem_scheduler_plans_total", "Plans issued by choice",
                             ["steps", "split_fraction", "merge_ratio"], registry=r)
        self.relative_error = Histogram("tandem_scheduler_latency_relative_error",
                                        "|measured - predicted| / predicted seconds, per phase, for plans run as planned",
                                        ["phase"], buckets=ERROR_BUCKETS, registry=r)
        self.budget_violations = Counter("tandem_scheduler_budget_violations_total",
                                         "Reports whose measured total exceeded the latency budget", registry=r)
        self.reports = Counter("tandem_scheduler_reports_total", "Reports accepted (each recalibrates the cost models)",
                               registry=r)
        self.edges_live = Gauge("tandem_scheduler_edges_live", "Edge servers heard from within the TTL", registry=r)
        # The calibrated cost model, so its drift is visible next to the prediction error.
        self.device_step_seconds = Gauge("tandem_scheduler_device_step_seconds", "Calibrated device step time",
                                         ["device_class"], registry=r)
        self.device_decode_seconds = Gauge("tandem_scheduler_device_decode_seconds", "Calibrated VAE decode time",
                                           ["device_class"], registry=r)
        self.edge_step_seconds = Gauge("tandem_scheduler_edge_step_seconds",
                                       "Calibrated edge step time: fixed per batch, and per request", ["term"], registry=r)
        self.rtt_seconds = Gauge("tandem_scheduler_rtt_seconds", "Calibrated round-trip time", registry=r)
        self.pending_plans = Gauge("tandem_scheduler_pending_plans", "Plans issued and not yet reported", registry=r)
        self.infeasible_plans = Counter("tandem_scheduler_infeasible_plans_total",
                                        "Requests no plan could serve within budget (planned alone, best effort)",
                                        registry=r)

    def watch_guard(self, status: Callable[[], GuardStatus]) -> None:
        """The policy guard's verdict (services/scheduler/live/guard.py), read at scrape time."""
        r = self.registry
        Gauge("tandem_scheduler_guard_fallback", "1 once the policy fell behind greedy + local search and "
              "the service serves that instead (until restart)", registry=r).set_function(lambda: float(status().fallback))
        Gauge("tandem_scheduler_guard_checked_frames", "Live frames checked against greedy + local search",
              registry=r).set_function(lambda: status().checked)
        Gauge("tandem_scheduler_guard_ratio", "Policy objective / greedy + local search's over the guard's window "
              "(NaN before the first check)", registry=r).set_function(lambda: status().ratio)

    def watch_edges(self, count: Callable[[], int]) -> None:
        self.edges_live.set_function(count)  # evaluated at scrape time: expiry needs no timer

    def watch_pending(self, count: Callable[[], int]) -> None:
        self.pending_plans.set_function(count)

    def observe_frame(self, plans: list[Plan], seconds: float) -> None:
        self.decision_seconds.observe(seconds)
        self.frame_size.observe(len(plans))
        for plan in plans:
            self.plans.labels(steps=str(plan.steps), split_fraction=split_bucket(plan),
                              merge_ratio=f"{plan.merge_ratio:g}").inc()

    def set_costs(self, costs: CostProfile, edge_pack: str | None = None) -> None:
        for name, device in costs.devices.items():
            self.device_step_seconds.labels(device_class=name).set(device.step_s)
            self.device_decode_seconds.labels(device_class=name).set(device.decode_s)
        edge = costs.edge_coefficients(edge_pack)
        self.edge_step_seconds.labels(term="fixed").set(edge.a_s)
        self.edge_step_seconds.labels(term="per_request").set(edge.b_s)
        self.rtt_seconds.set(costs.rtt_s)
