"""Calling a running device service (the CLI's --ue mode, or any app), over one channel per
(address, TLS identity) kept for the process (services/common/channels.py)."""

from __future__ import annotations

import atexit

import grpc

from services.common.channels import SyncChannelPool
from services.common.security import ClientSecurity, call_metadata
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
    # The device's own deadline: the edge's plus time for the late steps and decode.
    call = stub.Generate(message, timeout=2 * timeout + 60, metadata=call_metadata(security))
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
