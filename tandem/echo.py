"""Caller values quoted in error messages, cut to a safe size.

An error message that echoes what the caller sent whole (a 10,000-character sampler name, say)
becomes a gRPC status whose details exceed the 8 KiB metadata limit: the caller then gets
RESOURCE_EXHAUSTED ("received metadata size exceeds soft limit") instead of the error naming the
field. Every message that quotes a value quotes it through :func:`shown`; a server's last resort
(services/common/details.py) cuts whole details with :func:`capped`.
"""

from __future__ import annotations

from typing import Any

ECHO_CHARS = 80  # of a quoted value's repr
# Of a status's details, in UTF-8 bytes. gRPC percent-encodes each byte outside printable ASCII
# (3 bytes on the wire), so 1 KiB of details is at most 3 KiB of grpc-message: far below 8 KiB.
MAX_DETAILS_BYTES = 1024


def shown(value: Any, limit: int = ECHO_CHARS) -> str:
    """``repr(value)``, cut after ``limit`` characters and marked ``…(N chars)`` (N: the value's
    own length for a string or bytes, else its repr's)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's int-to-str digit limit
        return f"<{type(value).__name__} of {value.bit_length()} bits>" if isinstance(value, int) \
            else f"<unprintable {type(value).__name__}>"
    if len(text) <= limit:
        return text
    size = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[:limit]}…({size} chars)"


def capped(details: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``details`` when its UTF-8 form fits in ``limit`` bytes; else its start (whole characters),
    marked as cut."""
    data = details.encode("utf-8", "replace")
    if len(data) <= limit:
        return details
    mark = f"…(cut: {len(details)} chars)"
    return data[:max(0, limit - len(mark.encode()))].decode("utf-8", "ignore") + mark
