"""The one vocabulary of a request's phases: the pipeline's timers, progress events, the JSON
report, the wire's MeasuredPhases and the scheduler's calibration all use these names.

    queue         waiting for a slot on the edge
    edge_steps    steps [0, k) on the edge's large model (its prompt encoding included)
    transfer      the handoff on the wire, and its decoding into tensors (both grow with bytes)
    device_steps  steps [k, T) on the device's model, its own prompt encoding included
    decode        the VAE decode of the final latent

Whatever the device computes (its text encoding too) is device work, never transfer: the
scheduler calibrates the link model from `transfer` alone.
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
