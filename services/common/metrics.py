"""Prometheus pieces every service shares: histogram buckets and how a finished call is counted.
Each service keeps its own metrics class and registry (services/*/metrics.py)."""

from __future__ import annotations

import time

# Diffusion latencies run from milliseconds (one step of a tiny model) to minutes (a queue).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)


def record_call(metrics, code_name: str, began: float) -> bool:
    """Counts one finished call by status and observes its latency (`metrics.requests` labelled by
    code, `metrics.request_seconds`). Servicers call it *before* `context.abort`, because grpc.aio
    sends an abort's status before the handler's `finally` runs (a client could otherwise read
    metrics that miss its own call). Returns True: "recorded"."""
    metrics.requests.labels(code=code_name).inc()
    metrics.request_seconds.observe(time.perf_counter() - began)
    return True
