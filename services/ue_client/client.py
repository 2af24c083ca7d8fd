"""Calling a running device service (the CLI's --ue mode, or any app), over one channel per
(address, TLS identity) kept for the process (services/common/channels.py)."""

from __future__ import annotations

import atexit
import math

import grpc

from services.common.channels import SyncChannelPool
from services.common.security import ClientSecurity, call_metadata
from services.ue_client.call import MAX_EDGE_TIMEOUT
from services.ue_client.device import DEFAULT_TIMEOUT
from services.ue_client.transport import EdgeError, EventCallback
from tandem.link import LinkEstimate
from tandem.v1 import device_pb2, device_pb2_grpc, edge_pb2

_channels = SyncChannelPool([("grpc.max_receive_message_length", 32 * 1024 * 1024)])  # a result's PNG
atexit.register(_channels.close)


def generate_on_device_service(
    address: str,
    request: edge_pb2.GenerateRequest,
    edge_address: str | None,
    timeout: float,
    on_event: EventCallback | None = None,
    security: ClientSecurity | None = None,
) -> device_pb2.DeviceResult:
    """Runs a generation on the device service at `address`; raises EdgeError (named status)."""
    message = device_pb2.DeviceServiceGenerateRequest(
        request=request, edge_address=edge_address or "", edge_timeout_seconds=timeout
    )
    stub = device_pb2_grpc.DeviceServiceStub(_channels.get(address, security))
    call = stub.Generate(message, timeout=device_deadline(timeout), metadata=call_metadata(security))
    try:
        for response in call:
            if response.WhichOneof("event") == "progress" and on_event is not None:
                on_event(response.progress.phase, response.progress.done, response.progress.total)
            elif response.WhichOneof("event") == "result":
                return response.result
    except grpc.RpcError as exc:
        raise EdgeError(exc.code().name, exc.details() or "") from exc
    finally:
        call.cancel()  # left early (a result, an error, or on_event raised): nothing more is read
    raise EdgeError("DATA_LOSS", "device service ended the stream without a result")


def device_deadline(edge_timeout: float) -> float:
    """The call's own deadline: the edge's plus time for the late steps and decode. A timeout the
    device service will refuse (not in 0..MAX_EDGE_TIMEOUT) still gets a finite deadline, so that
    the refusal (INVALID_ARGUMENT naming edge_timeout_seconds) is what the caller sees, never an
    instant DEADLINE_EXCEEDED from an infinite or NaN deadline."""
    usable = math.isfinite(edge_timeout) and 0 < edge_timeout <= MAX_EDGE_TIMEOUT
    return 2 * (edge_timeout if usable else DEFAULT_TIMEOUT) + 60


def get_link_estimate(address: str, edge_address: str | None, timeout: float,
                      security: ClientSecurity | None = None) -> LinkEstimate:
    """The device service's measured link to `edge_address` (None: its default edge); raises
    EdgeError (named status)."""
    try:
        r = device_pb2_grpc.DeviceServiceStub(_channels.get(address, security)).GetLinkEstimate(
            device_pb2.GetLinkEstimateRequest(edge_address=edge_address or ""), timeout=timeout,
            metadata=call_metadata(security))
    except grpc.RpcError as exc:
        raise EdgeError(exc.code().name, exc.details() or "") from exc
    return LinkEstimate(r.bandwidth_bps, r.rtt_seconds, r.rate_samples, r.rtt_samples)
