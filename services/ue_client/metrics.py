"""Prometheus metrics of the device (UE) service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import BYTES_BUCKETS, LATENCY_BUCKETS


class DeviceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_ue_requests_total", "Device generations by gRPC status", ["code"], registry=r)
        self.fallbacks = Counter("tandem_ue_fallbacks_total", "Generations the device finished alone after an edge failure",
                                 registry=r)
        self.phase_seconds = Histogram("tandem_ue_phase_seconds", "Time per phase", ["phase"], buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.request_seconds = Histogram("tandem_ue_request_seconds", "Whole generation on the device service",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.handoff_bytes = Histogram("tandem_ue_handoff_bytes", "Handoff payload received", buckets=BYTES_BUCKETS, registry=r)
        self.steps = Counter("tandem_ue_steps_total", "Denoising steps run on the device", registry=r)
        self.waiting = Gauge("tandem_ue_waiting_requests", "gRPC generations waiting for the device's turn", registry=r)
        # Cooperative cancellation's cost: ≤ 1 per cancelled call (the step in flight).
        self.steps_after_cancel = Counter("tandem_ue_steps_after_cancel_total",
                                          "Device steps that finished after their call was cancelled", registry=r)
        # The OpenAI-compatible HTTP listener (--http-port): every answer by route and status; route
        # is the matched path (or "unmatched"), so a scan of random paths adds no series.
        self.http_requests = Counter("tandem_ue_http_requests_total", "HTTP requests by route and status",
                                     ["route", "status"], registry=r)
        self.http_seconds = Histogram("tandem_ue_http_request_seconds", "HTTP request latency (a stream: to its end)",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_in_flight = Gauge("tandem_ue_http_in_flight", "HTTP requests being answered", registry=r)
        self.http_images = Counter("tandem_ue_http_images_total", "Images asked over HTTP, by outcome",
                                   ["outcome"], registry=r)
        self.http_previews = Counter("tandem_ue_http_previews_total", "Streamed preview images decoded", registry=r)
