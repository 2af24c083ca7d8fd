"""Sampler names, torch-free (the CLI validates flags and the scheduler names plans without torch)."""

SAMPLERS: tuple[str, ...] = ("ddim", "euler", "dpmpp_2m")
