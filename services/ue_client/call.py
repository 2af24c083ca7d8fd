"""One DeviceService.Generate call, validated: every bad field raises RequestError naming it.

The edge comes from the service's own configuration (its --edge list), never from the caller: a
caller that could choose it would turn the device into an open relay that sends the service's
edge credentials to any address and trusts whatever comes back. A configured edge given by name
(``edge:50051``, the compose service of a scaled edge) also stands for each address that name
resolves to now, at its port: the scheduler plans to each replica by its own address.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass

from services.common.wire import request_from_proto
from services.ue_client.device import DEFAULT_TIMEOUT
from tandem.echo import shown
from tandem.handoff import CodecSpec
from tandem.packs import ModelPack
from tandem.request import GenerationRequest, RequestError
from tandem.v1 import device_pb2

MAX_EDGE_TIMEOUT = 3600.0


@dataclass(frozen=True)
class DeviceCall:
    request: GenerationRequest
    codec: CodecSpec
    edge: str | None  # None: every step on the device
    edge_timeout: float


def parse_call(message: device_pb2.DeviceServiceGenerateRequest, pack: ModelPack,
               edges: tuple[str, ...]) -> DeviceCall:
    """`edges`: the service's configured edges; the first is the default."""
    request, codec = request_from_proto(message.request, pack)
    if request.user is not None and request.user not in pack.users:
        known = ", ".join(pack.users) or "none"
        raise RequestError("user", f"unknown user {shown(request.user)} (users: {known})")
    timeout = message.edge_timeout_seconds
    if not (math.isfinite(timeout) and 0.0 <= timeout <= MAX_EDGE_TIMEOUT):
        raise RequestError("edge_timeout_seconds",
                           f"must be in 0..{MAX_EDGE_TIMEOUT:g} seconds (0: the default), got {shown(timeout)}")
    return DeviceCall(request, codec, choose_edge(message.edge_address, edges), timeout or DEFAULT_TIMEOUT)


def choose_edge(requested: str, edges: tuple[str, ...],
                resolve: Callable[[str], set[str]] | None = None) -> str | None:
    if not requested:
        return edges[0] if edges else None
    if requested not in edges and not _a_replica_of(requested, edges, resolve or _addresses):
        raise RequestError("edge_address", f"{shown(requested)} is not an edge this device service is configured "
                                           "with (its --edge flags); leave it empty for the default edge")
    return requested


def _a_replica_of(requested: str, edges: tuple[str, ...], resolve: Callable[[str], set[str]]) -> bool:
    """``requested`` is IP:PORT and a configured NAME:PORT resolves to that IP now."""
    host, _, port = requested.rpartition(":")
    if not _is_ip(host.strip("[]")):
        return False
    names = {edge.rpartition(":")[0] for edge in edges if edge.rpartition(":")[2] == port}
    return any(host.strip("[]") in resolve(name) for name in names if name and not _is_ip(name.strip("[]")))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _addresses(name: str) -> set[str]:
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):  # unresolvable now: no replica of it
        return set()
