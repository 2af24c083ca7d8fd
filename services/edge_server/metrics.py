"""Prometheus metrics of the edge server (own registry; served on their own port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.common.metrics import BYTES_BUCKETS, LATENCY_BUCKETS

# Batch sizes are integers: bucket edges sit half-way between them, so Prometheus' linear
# interpolation inside a bucket lands on the size itself (edges at 1, 2, ... put a constant
# batch of 1 in [0, 1] and report a p50 of 0.5-0.6). The empty le=0.5 bucket starts the range.
BATCH_BUCKETS = (0.5, 1.5, 2.5, 3.5, 4.5, 6.5, 8.5, 12.5, 16.5, 24.5, 32.5, 48.5, 64.5)


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("tandem_edge_requests_total", "Generate calls by final gRPC status", ["code"], registry=r)
        self.request_seconds = Histogram("tandem_edge_request_seconds", "Generate call latency", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("tandem_edge_queue_seconds", "Time from arrival to a batch slot", buckets=LATENCY_BUCKETS, registry=r)
        self.edge_seconds = Histogram("tandem_edge_phase_seconds", "Edge phase (steps [0, k) and handoff encoding)", buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("tandem_edge_iteration_seconds", "One batched UNet iteration", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("tandem_edge_batch_size", "Requests per UNet call", buckets=BATCH_BUCKETS, registry=r)
        self.steps = Counter("tandem_edge_steps_total", "Denoising steps run (per request; rate = steps/s)", registry=r)
        self.handoff_bytes = Histogram("tandem_edge_handoff_bytes", "Handoff payload size", buckets=BYTES_BUCKETS, registry=r)
        self.queue_depth = Gauge("tandem_edge_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("tandem_edge_running_requests", "Requests in the running batch", registry=r)
        self.gpu_memory = Gauge("tandem_edge_gpu_memory_bytes", "CUDA memory allocated by the model server", registry=r)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.step_seconds.observe(seconds)
        self.steps.inc(size)
        self._sample_gpu_memory()

    def _sample_gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.gpu_memory.set(torch.cuda.memory_allocated())

