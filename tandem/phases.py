"""The one vocabulary of a request's phases: the pipeline's timers, progress events, the JSON
report, the wire's MeasuredPhases and the scheduler's calibration all use these names.

    queue         waiting for a slot on the edge
    edge_steps    steps [0, k) on the edge's large model (its prompt encoding included)
    transfer      the handoff on the wire, and its decoding into tensors (both grow with bytes)
    device_steps  steps [k, T) on the device's model, its own prompt encoding included
    decode        the VAE decode of the final latent

Whatever the device computes (its text encoding too) is device work, never transfer: the
scheduler calibrates the link model from `transfer` alone.

The planner works in four coarser phases (`CoarsePhase`): a plan's predicted latencies (the
wire's PredictedPhases) and the scheduler's measured-against-predicted errors use these names.

    edge          edge_steps, and the part of queue that is the first edge step
    transfer      transfer, and the rest of queue (connection, admission, waiting): a fixed
                  cost of every edge round, which the link model carries in its RTT
    device        device_steps + decode
    total         the whole request

(services/scheduler/live/core.py `measured_phases` makes that split of queue.)
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    QUEUE = "queue"
    EDGE_STEPS = "edge_steps"
    TRANSFER = "transfer"
    DEVICE_STEPS = "device_steps"
    DECODE = "decode"


PHASES: tuple[Phase, ...] = tuple(Phase)


class CoarsePhase(StrEnum):
    EDGE = "edge"
    TRANSFER = "transfer"
    DEVICE = "device"
    TOTAL = "total"


COARSE_PHASES: tuple[CoarsePhase, ...] = tuple(CoarsePhase)
# The fine phases each coarse one sums, queue aside (split between edge and transfer, above).
FINE_PHASES: dict[CoarsePhase, tuple[Phase, ...]] = {
    CoarsePhase.EDGE: (Phase.EDGE_STEPS,),
    CoarsePhase.TRANSFER: (Phase.TRANSFER,),
    CoarsePhase.DEVICE: (Phase.DEVICE_STEPS, Phase.DECODE),
}
