"""The discrete decision for one user: an option = (total steps T, split k, merge ratio r, codec).

An :class:`OptionTable` is the ordered list of options the scheduler chooses from; its order is
the action space of the RL policy, so it travels with a saved policy and is checked on load.
k = 0 runs everything on the device (nothing is sent, the merge ratio is irrelevant and fixed at
0); k = T runs every step on the edge and the device only decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tandem.codec.spec import DEFAULT_ENCODING, MAX_MERGE_RATIO
from tandem.codec.spec import ENCODINGS as CODECS
from tandem.request import split_for  # the library's, so a plan's split and a request's agree


@dataclass(frozen=True)
class Option:
    steps: int  # T
    split: int  # k: steps [0, k) on the edge, [k, T) on the device
    merge_ratio: float  # r
    codec: str = DEFAULT_ENCODING

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 <= self.split <= self.steps:
            raise ValueError(f"split must be in 0..{self.steps}, got {self.split}")
        if not 0.0 <= self.merge_ratio <= MAX_MERGE_RATIO:
            raise ValueError(f"merge_ratio must be in 0..{MAX_MERGE_RATIO}, got {self.merge_ratio}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")

    @property
    def split_fraction(self) -> float:
        return self.split / self.steps

    @property
    def uses_edge(self) -> bool:
        return self.split > 0

    @property
    def device_steps(self) -> int:
        return self.steps - self.split

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "split": self.split, "merge_ratio": self.merge_ratio, "codec": self.codec}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Option":
        return cls(int(d["steps"]), int(d["split"]), float(d["merge_ratio"]), str(d.get("codec", DEFAULT_ENCODING)))


@dataclass(frozen=True)
class OptionTable:
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError("an option table needs at least one option")
        if len(set(self.options)) != len(self.options):
            raise ValueError("option table has duplicate options")

    def __len__(self) -> int:
        return len(self.options)

    def __getitem__(self, i: int) -> Option:
        return self.options[i]

    def __iter__(self):
        return iter(self.options)

    def index(self, option: Option) -> int:
        return self.options.index(option)

    def to_list(self) -> list[dict[str, Any]]:
        return [o.to_dict() for o in self.options]

    @classmethod
    def from_list(cls, items: Sequence[dict[str, Any]]) -> "OptionTable":
        return cls(tuple(Option.from_dict(d) for d in items))


def build_option_table(
    steps: Sequence[int] = (10, 15, 20, 25),
    split_fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    merge_ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75),
    codecs: Sequence[str] = (DEFAULT_ENCODING,),
) -> OptionTable:
    """All combinations, deduplicated (k = 0 sends nothing, so only r = 0 and the first codec)."""
    seen: dict[Option, None] = {}
    for t in steps:
        for f in split_fractions:
            k = split_for(t, f)
            if k == 0:
                seen.setdefault(Option(t, 0, 0.0, codecs[0]))
                continue
            for codec in codecs:
                for r in merge_ratios:
                    seen.setdefault(Option(t, k, float(r), codec))
    return OptionTable(tuple(seen))


DEFAULT_OPTIONS = build_option_table()
