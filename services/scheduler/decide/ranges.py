"""The physical range of each number in a profile, declared beside its dataclass field, and the one
check that walks them: a hand-edited or corrupt profile (NaN, inf, negative seconds) is refused in
one line naming its key, instead of silently poisoning every plan made with it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

Loaded = TypeVar("Loaded")

RANGE = "range"  # the dataclass field metadata key


@dataclass(frozen=True)
class Range:
    low: float
    high: float = math.inf
    above: bool = False  # strictly above low (a step always takes time)
    below: bool = False  # strictly below high

    def admits(self, x: Any, integer: bool) -> bool:
        """``x`` is a number (an integer where ``integer``; never a bool or a string), finite and in range."""
        if not _is_number(x, integer):
            return False
        finite = integer or math.isfinite(x)  # (isfinite() overflows on a huge int)
        return finite and (x > self.low if self.above else x >= self.low) and (x < self.high if self.below else x <= self.high)

    def describe(self, integer: bool) -> str:
        """What a value must be: "finite and >= 0", "in [0, 1)", "an integer >= 1"."""
        bounded = math.isfinite(self.high)
        span = (f"in {'(' if self.above else '['}{self.low:g}, {self.high:g}{')' if self.below else ']'}" if bounded
                else f"{'>' if self.above else '>='} {self.low:g}")
        return f"an integer {span}" if integer else span if bounded else f"finite and {span}"


def ranged(low: float, high: float = math.inf, *, above: bool = False, below: bool = False, **kwargs: Any) -> Any:
    """A dataclass field whose number (or each number of a mapping) must be finite and in range;
    a field annotated ``int`` must also hold an integer."""
    return field(metadata={RANGE: Range(low, high, above, below)}, **kwargs)


def check(obj: Any, path: str, error: type[ValueError]) -> None:
    """Raises ``error("<path>.<key> = <value>: must be ...")`` for the first number of dataclass
    ``obj`` outside its field's range. Walks into fields holding a dataclass or a mapping of them."""
    for name, rng, integer in _fields(obj.__class__):
        value = getattr(obj, name)
        if rng is not None:
            for sub, x in value.items() if isinstance(value, Mapping) else ((None, value),):
                if not rng.admits(x, integer):
                    raise error(f"{_key(path, name, sub)} = {x!r}: must be {rng.describe(integer)}")
        elif is_dataclass(value):
            check(value, _key(path, name), error)
        elif isinstance(value, Mapping):
            for sub, item in value.items():
                if is_dataclass(item):
                    check(item, _key(path, name, sub), error)


@cache
def _fields(cls: Any) -> tuple[tuple[str, Range | None, bool], ...]:
    """(name, range or None, annotated int) of each field of a dataclass."""
    return tuple((f.name, f.metadata.get(RANGE), f.type in ("int", int)) for f in fields(cls))


def _is_number(x: Any, integer: bool) -> bool:
    return not isinstance(x, bool) and isinstance(x, numbers.Integral if integer else numbers.Real)


def _key(*parts: Any) -> str:
    """The dotted key path, as the profile's JSON nests it ("edge.large.a_s")."""
    return ".".join(str(p) for p in parts if p not in ("", None))


def load_json(path: str | Path, from_dict: Callable[[Any], Loaded], error: type[ValueError]) -> Loaded:
    """A profile file through ``from_dict``; unreadable JSON or a bad value raises ``error``, one
    line naming the file."""
    try:
        return from_dict(json.loads(Path(path).read_text()))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not JSON: {exc}") from None
    except error as exc:
        raise error(f"{path}: {exc}") from None
