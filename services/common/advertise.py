"""The address an edge server advertises to the scheduler, with ``auto`` for "this host's own IP".

Every replica of a scaled edge (``docker compose up --scale edge=N``) runs with the same
settings, so a fixed ``--advertise edge:50051`` would make them one name to the scheduler: one
load report, plans to whichever replica DNS hands out. ``auto:PORT`` is each replica's own
address instead: the IPv4 address its host name resolves to (a container's IP on its network,
from the ``/etc/hosts`` the engine writes), which is also the address its heartbeats come from,
the one the scheduler accepts without edge credentials (services/scheduler/edge_auth.py).
Anything else is returned as given.

    python -m services.common.advertise auto:50051     # prints e.g. 172.18.0.3:50051
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable

AUTO = "auto"


class AdvertiseError(ValueError):
    """``auto`` with no address to put in its place."""


def _host_addresses(hostname: str) -> list[str]:
    return socket.gethostbyname_ex(hostname)[2]


def own_address(hostname: str | None = None,
                resolve: Callable[[str], list[str]] = _host_addresses) -> str:
    """The first IPv4 address, not a loopback one, that this host's name resolves to."""
    name = hostname if hostname is not None else socket.gethostname()
    try:
        found = resolve(name)
    except OSError as exc:
        raise AdvertiseError(f"auto: this host's name {name!r} does not resolve ({exc}); "
                             "advertise HOST:PORT instead") from None
    for ip in found:
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            continue
        if not address.is_loopback and not address.is_unspecified:
            return str(address)
    raise AdvertiseError(f"auto: this host's name {name!r} resolves to no address other hosts reach "
                         f"({', '.join(found) or 'none'}); advertise HOST:PORT instead")


def resolve_advertise(value: str, hostname: str | None = None,
                      resolve: Callable[[str], list[str]] = _host_addresses) -> str:
    """``auto:PORT`` → ``OWN_IP:PORT``; any other value unchanged."""
    host, sep, port = value.rpartition(":")
    if not sep or host != AUTO:
        if value == AUTO:
            raise AdvertiseError("auto needs a port: auto:PORT (e.g. auto:50051)")
        return value
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise AdvertiseError(f"{value}: the port must be 1..65535")
    return f"{own_address(hostname, resolve)}:{int(port)}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m services.common.advertise auto:PORT|HOST:PORT", file=sys.stderr)
        return 2
    try:
        print(resolve_advertise(args[0]))
    except AdvertiseError as exc:
        print(f"advertise: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
