"""Asking the scheduler for a plan and reporting what was measured (the device side).

Both calls are best effort: a scheduler that is down, slow or refuses must never stop an image,
so they return None / False (and tell ``on_error`` why) and the caller keeps its defaults.
Every call to a scheduler goes over one channel per (address, TLS identity), kept open for the
process (services/common/channels.py): a plan then costs one round trip, not a handshake more.

A scheduler being restarted (an upgrade: about a second) is tried again, within the call's
timeout, rather than answered at once with the pack's defaults, which plan several times the
work (the soak's benign p99 was made by those). Only UNAVAILABLE is tried again: the call never
reached a scheduler, so no plan was issued twice. One that stays away through a whole timeout is
not waited for again for WAIT_AGAIN_AFTER_S: calls still try it once, and fail at once while it
is down.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from services.common.channels import SyncChannelPool
from services.common.security import ClientSecurity, call_metadata
from tandem.codec.spec import DEFAULT_ENCODING, DEFAULT_STRATEGY
from tandem.phases import CoarsePhase, Phase
from tandem.v1 import scheduler_pb2, scheduler_pb2_grpc

DEFAULT_TIMEOUT = 2.0
WAIT_AGAIN_AFTER_S = 30.0
ErrorCallback = Callable[[str], None]
_channels = SyncChannelPool()
atexit.register(_channels.close)
_away_since: dict[str, float] = {}  # address -> when a call last waited for it in vain (monotonic)


@dataclass(frozen=True)
class ReceivedPlan:
    plan_id: str
    steps: int
    split: int
    encoding: str
    merge_ratio: float
    merge_strategy: str
    edge_address: str  # "" when k = 0 or the scheduler knows no edge
    predicted_seconds: Mapping[str, float]  # by CoarsePhase: edge, transfer, device, total
    predicted_quality: float
    meets_budget: bool
    frame_size: int
    predicted_handoff_bytes: int = 0
    link_bps: float = 0.0  # the link the prediction used (0: an older scheduler did not say)
    link_rtt_s: float = 0.0
    link_sources: str = ""  # e.g. "rate: device, rtt: reports"


def request_plan(
    address: str,
    device_class: str,
    *,
    bandwidth_bps: float = 0.0,
    rtt_s: float = 0.0,
    spectral_efficiency: float = 0.0,
    personalized_user: str | None = None,
    latency_budget_s: float = 0.0,
    energy_budget_j: float = 0.0,
    prompt_chars: int | None = None,
    user_id: str = "",
    timeout: float = DEFAULT_TIMEOUT,
    on_error: ErrorCallback | None = None,
    security: ClientSecurity | None = None,
) -> ReceivedPlan | None:
    """A plan from the scheduler at ``address``, or None when it can't give one."""
    message = scheduler_pb2.PlanRequest(
        user_id=user_id,
        device_class=device_class,
        link=scheduler_pb2.LinkEstimate(bandwidth_bps=bandwidth_bps, rtt_seconds=rtt_s,
                                        spectral_efficiency=spectral_efficiency),
        personalized_user=personalized_user or "",
        latency_budget_seconds=latency_budget_s,
        energy_budget_joules=energy_budget_j,
        prompt_chars=prompt_chars,
    )
    response = _call(address, "Plan", message, timeout, on_error, security)  # not retried: each call issues a plan
    if response is None:
        return None
    p = response.predicted
    return ReceivedPlan(
        plan_id=response.plan_id,
        steps=response.steps,
        split=response.split,
        encoding=response.codec.encoding or DEFAULT_ENCODING,
        merge_ratio=round(response.codec.merge_ratio, 6),  # float32 on the wire: 0.25 stays 0.25
        merge_strategy=response.codec.merge_strategy or DEFAULT_STRATEGY,
        edge_address=response.edge_address,
        predicted_seconds={phase.value: getattr(p, phase.value) for phase in CoarsePhase},
        predicted_quality=response.predicted_quality,
        meets_budget=response.meets_budget,
        frame_size=response.frame_size,
        predicted_handoff_bytes=response.predicted_handoff_bytes,
        link_bps=response.planned_link.bandwidth_bps,
        link_rtt_s=response.planned_link.rtt_seconds,
        link_sources=f"rate: {response.rate_source}, rtt: {response.rtt_source}" if response.rate_source else "",
    )


def measured_phases(seconds: Mapping[str, float]) -> scheduler_pb2.MeasuredPhases:
    """The pipeline's phase timers, name for name (tandem.phases: the device's own prompt encoding
    is already device work there, decoding the payload transfer)."""
    return scheduler_pb2.MeasuredPhases(**{phase.value: seconds.get(phase.value, 0.0) for phase in Phase})


def report(
    address: str,
    plan_id: str,
    seconds: Mapping[str, float],
    edge_steps: int,
    device_steps: int,
    handoff_bytes: int,
    fallback: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    on_error: ErrorCallback | None = None,
    security: ClientSecurity | None = None,
) -> bool:
    """Sends what a plan measured; True when the scheduler took it."""
    message = scheduler_pb2.ReportRequest(plan_id=plan_id, measured=measured_phases(seconds), edge_steps=edge_steps,
                                          device_steps=device_steps, handoff_bytes=handoff_bytes, fallback=fallback)
    return _call(address, "Report", message, timeout, on_error, security) is not None


def waits_for(address: str) -> bool:
    """Whether a call to `address` tries again while it is unavailable (see the module's docstring)."""
    away = _away_since.get(address)
    return away is None or time.monotonic() - away >= WAIT_AGAIN_AFTER_S


def _call(address: str, method: str, message, timeout: float, on_error: ErrorCallback | None,
          security: ClientSecurity | None = None):
    deadline = time.monotonic() + timeout
    pause = 0.05
    wait = waits_for(address)
    while True:
        try:
            response = getattr(scheduler_pb2_grpc.SchedulerServiceStub(_channels.get(address, security)), method)(
                message, timeout=max(0.01, deadline - time.monotonic()), metadata=call_metadata(security))
        except grpc.RpcError as exc:
            left = deadline - time.monotonic()
            if wait and exc.code() == grpc.StatusCode.UNAVAILABLE and left > pause:
                time.sleep(pause)  # the channel reconnects by itself (backoff from 250 ms)
                pause = min(2 * pause, 0.5)
                continue
            if exc.code() == grpc.StatusCode.UNAVAILABLE and wait:
                _away_since[address] = time.monotonic()
            if on_error is not None:
                on_error(f"{exc.code().name}: {exc.details() or ''}".rstrip(": "))
            return None
        except ValueError as exc:  # e.g. an address grpc can't parse
            if on_error is not None:
                on_error(str(exc))
            return None
        _away_since.pop(address, None)
        return response
