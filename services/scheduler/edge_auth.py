"""Who may register an edge server (a heartbeat decides where other users' requests go).

With ``--edge-tokens FILE`` a heartbeat must carry an *edge* credential (the edge's
``--scheduler-token``); user tokens never register an edge. Without it, only the configured
``--edge`` addresses are accepted, or an edge advertising its own host: the caller's address
must be one the advertised host resolves to. Pure decision (no gRPC: the servicer maps the
status name, resolves names and reads the peer).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from tandem.echo import shown

MAX_ADDRESS_CHARS = 255  # a DNS name (253) + ":" + a port would not fit any longer


@dataclass(frozen=True)
class EdgeDenial:
    code: Literal["UNAUTHENTICATED", "PERMISSION_DENIED"]  # a grpc.StatusCode name
    message: str


def _is_edge_token(edge_tokens: Mapping[str, str], token: str) -> bool:
    """Compared in constant time, like user tokens, so timing does not leak a credential."""
    found = False
    for known in edge_tokens:
        found |= hmac.compare_digest(known.encode(), token.encode())
    return found


def peer_ip(peer: str) -> str | None:
    """The IP of a gRPC peer string ("ipv4:1.2.3.4:5", "ipv6:[::1]:5"); None for unix sockets."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return _normal(rest.rpartition(":")[0])
    if kind == "ipv6":
        return _normal(rest.rpartition(":")[0].strip("[]"))
    return None


def _normal(ip: str) -> str | None:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:1.2.3.4 is 1.2.3.4
    return str(mapped or address)


def address_host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


def literal_ip(host: str) -> str | None:
    return _normal(host)


def check_edge(address: str, edge_tokens: Mapping[str, str] | None, token: str | None, static: Collection[str],
               caller_ip: str | None, host_ips: Iterable[str]) -> EdgeDenial | None:
    """None when this heartbeat may register ``address``; ``host_ips``: what its host resolves to."""
    if edge_tokens is not None:
        if token is None:
            return EdgeDenial("UNAUTHENTICATED",
                              "ReportEdgeLoad needs an edge credential ('authorization: Bearer' with a token "
                              "of the scheduler's --edge-tokens; the edge's --scheduler-token)")
        if not _is_edge_token(edge_tokens, token):
            return EdgeDenial("PERMISSION_DENIED", "not an edge credential (see --edge-tokens)")
        return None
    if address in static:
        return None
    if caller_ip is not None and caller_ip in {_normal(ip) for ip in host_ips}:
        return None
    return EdgeDenial("PERMISSION_DENIED",
                      f"address: {shown(address_host(address))} is not the caller's own address ({caller_ip or 'unknown'}); "
                      "list the edge with the scheduler's --edge, or give it an edge credential (--edge-tokens)")
