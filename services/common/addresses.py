"""A server address as the user typed it, checked before any connection is tried: gRPC would
take "127.0.0.1" as port 443 and fail much later, as if the server were down."""

from __future__ import annotations


class AddressError(ValueError):
    """A malformed address; the message names the flag (or argument) that gave it."""


def check_address(text: str, flag: str) -> str:
    """HOST:PORT (or [IPv6]:PORT, or unix:PATH); AddressError naming ``flag`` otherwise."""
    if text.startswith("unix:"):
        return text
    host, sep, port = text.rpartition(":")
    bad_host = not host or (":" in host and not (host.startswith("[") and host.endswith("]")))
    if not sep or bad_host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise AddressError(f"{flag}: {text!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    return text
