"""The demo world's prompt grammar (exact: the evaluator, training and quality checks rely on it).

`a {color} {shape} at the {position} on a {background} background`, background never the shape's
colour. Personal styles are not part of the prompt: they live in each user's personalized model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
# "filled" is what the shared (large) model draws; the others are the demo users' personal styles.
STYLES: tuple[str, ...] = ("filled", "hollow", "striped")
USER_STYLES: dict[str, str] = {"alice": "hollow", "bob": "striped"}

_PROMPT_RE = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) at the (?P<position>\w+) on a (?P<background>\w+) background$"
)


@dataclass(frozen=True)
class Scene:
    """What one demo image shows."""

    color: str
    shape: str
    position: str
    background: str
    style: str = "filled"

    def __post_init__(self) -> None:
        for value, allowed, name in (
            (self.color, COLORS, "color"),
            (self.shape, SHAPES, "shape"),
            (self.position, POSITIONS, "position"),
            (self.background, COLORS, "background"),
            (self.style, STYLES, "style"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        if self.color == self.background:
            raise ValueError(f"background must differ from the shape's color (both {self.color!r})")

    @property
    def prompt(self) -> str:
        return f"a {self.color} {self.shape} at the {self.position} on a {self.background} background"


def parse_prompt(prompt: str) -> Scene:
    """The scene a grammar prompt asks for; ValueError naming what does not fit the grammar."""
    match = _PROMPT_RE.match(prompt.strip().lower())
    if match is None:
        raise ValueError(
            f"prompt {prompt!r} does not follow 'a {{color}} {{shape}} at the {{position}} on a "
            "{background} background'"
        )
    return Scene(**match.groupdict())


def vocabulary() -> list[str]:
    """Every word the grammar can produce, in a fixed order."""
    words = ["a", "at", "the", "on", "background", *COLORS, *SHAPES, *POSITIONS]
    return list(dict.fromkeys(words))
