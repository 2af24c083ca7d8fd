"""The prompts onboarding measures quality on: the pack's own (a `prompts.txt` next to its manifest,
one per line) or a built-in generic list."""

from __future__ import annotations

from pathlib import Path

PROMPTS_FILE = "prompts.txt"
GENERIC_PROMPTS: tuple[str, ...] = (
    "a photo of a cat sitting on a wooden table",
    "a red sports car on a mountain road at sunset",
    "a bowl of fresh fruit on a kitchen counter",
    "a lighthouse on a rocky coast under a cloudy sky",
    "a portrait of an old man with a grey beard",
    "a city street at night with neon signs",
    "a field of sunflowers under a blue sky",
    "a snowy forest with tall pine trees",
    "a cup of coffee next to an open book",
    "a sailing boat on a calm lake",
    "a colourful parrot on a tree branch",
    "a modern living room with large windows",
    "a plate of pasta with tomato sauce",
    "a dog running on a sandy beach",
    "a mountain village in the alps",
    "an astronaut floating above the earth",
)


def load_prompts(pack_root: Path, n: int) -> list[str]:
    """`n` prompts (cycled when the list is shorter)."""
    own = pack_root / PROMPTS_FILE
    prompts = [line.strip() for line in own.read_text().splitlines() if line.strip()] if own.is_file() else []
    prompts = prompts or list(GENERIC_PROMPTS)
    return [prompts[i % len(prompts)] for i in range(n)]
