"""Checks of plain JSON read back (the scheduler's state file, services/scheduler/state.py): each
raises ValueError naming where in the document the value is wrong, so a bad file is refused whole
with one line that says why. Pure."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tandem.link import is_number


def require_keys(entry: Any, keys: set[str], where: str) -> dict[str, Any]:
    """``entry``: an object with exactly ``keys``."""
    if not isinstance(entry, dict) or set(entry) != keys:
        got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{where}: expected an object with {sorted(keys)}, got {got}")
    return entry


def as_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def count(value: Any, where: str) -> int:
    """A whole number >= 0."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where}: expected a whole number >= 0, got {value!r:.40}")
    return value


def number(value: Any, where: str, low: float = -math.inf, high: float = math.inf, positive: bool = False,
           infinite: bool = False) -> float:
    """A number in [low, high] (> 0 when ``positive``), finite unless ``infinite`` (then +inf too)."""
    ok = is_number(value) and not math.isnan(value) and (math.isfinite(value) or (infinite and value > 0))
    if not ok or not (low <= value <= high or (infinite and value == math.inf)) or (positive and not value > 0):
        raise ValueError(f"{where}: expected a number in [{low:g}, {high:g}]{' above 0' if positive else ''}, "
                         f"got {value!r:.40}")
    return float(value)


def numbers(value: Any, where: str, low: float, high: float, positive: bool = False) -> list[float]:
    """A list of finite numbers in [low, high] (> 0 when ``positive``)."""
    return [number(x, f"{where}[{i}]", low, high, positive) for i, x in enumerate(as_list(value, where))]


def text(value: Any, where: str, most: int = 1024, empty: bool = True) -> str:
    """A string of at most ``most`` characters (non-empty unless ``empty``)."""
    if not isinstance(value, str) or len(value) > most or (not empty and not value):
        raise ValueError(f"{where}: expected a{'' if empty else ' non-empty'} string of at most {most} characters")
    return value


def flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r:.40}")
    return value


def typed(cls: Any, data: Any, where: str, infinite: tuple[str, ...] = (), choices: dict[str, tuple] | None = None) -> Any:
    """A dataclass ``cls`` from the object :func:`dataclasses.asdict` made of one whose fields are
    plain (str, int, float, bool, each maybe None), every value checked against its field's type:
    ints whole and >= 0, floats finite (``infinite``: +inf too), ``choices``: the values a field may
    take. ValueError naming the field otherwise (its own checks' too)."""
    choices = choices or {}
    fields = dataclasses.fields(cls)
    require_keys(data, {f.name for f in fields}, where)
    values: dict[str, Any] = {}
    for f in fields:
        value, at, kind = data[f.name], f"{where}.{f.name}", str(f.type)
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if f.name in choices:
            if value not in choices[f.name]:
                raise ValueError(f"{at}: expected one of {list(choices[f.name])}, got {value!r:.40}")
        elif optional and value is None:
            pass
        elif kind == "float":
            value = number(value, at, infinite=f.name in infinite)
        elif kind == "int":
            value = count(value, at)
        elif kind == "bool":
            value = flag(value, at)
        elif kind == "str":
            value = text(value, at)
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: no check for {kind}")
        values[f.name] = value
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{where}: {exc}") from None
