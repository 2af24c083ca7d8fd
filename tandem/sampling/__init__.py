"""Sampling math: noise schedules, vectorized sampler steps, batched classifier-free guidance.

Nothing here knows about gRPC, processes or which machine runs a step.
"""
