"""Fields as a hostile caller sends them (issue 29, item 5), against real servers: a 10,000-character
value in every string field of every request gets the field's own status naming it, with details
under the cap (an echo of the whole value once made the details exceed gRPC's 8 KiB metadata limit:
RESOURCE_EXHAUSTED "received metadata size exceeds soft limit" instead of INVALID_ARGUMENT), and
an out-of-range edge_timeout_seconds is INVALID_ARGUMENT naming it, never a fallback. The cap itself
(tandem.echo, services/common/details.py) is tested in process."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from service_procs import device_service, edge_server, scheduler_service

from services.cli import generate as cli
from services.common.decoding import DecodeErrorInterceptor
from services.common.details import DetailsCapInterceptor
from services.common.tokens import TokenInterceptor
from services.ue_client.call import MAX_EDGE_TIMEOUT
from services.ue_client.client import device_deadline, generate_on_device_service
from services.ue_client.transport import EdgeError
from tandem.echo import MAX_DETAILS_BYTES, capped, shown
from tandem.v1 import device_pb2, device_pb2_grpc, edge_pb2, edge_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

PROMPT = "a red circle at the left on a blue background"
# The emoji: 4 UTF-8 bytes, 12 on the wire when echoed (3,000 of them: under the scheduler's 16 KiB
# message limit, past which RESOURCE_EXHAUSTED "message larger than max" is the right answer).
LONG = {"ascii": "x" * 10_000, "emoji": "\U0001f600" * 3_000}
# Each string field of edge_pb2.GenerateRequest (and its Codec), and the name its error starts with.
EDGE_FIELDS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "sampler": "sampler", "user": "user",
    "codec.encoding": "codec", "codec.merge_strategy": "merge_strategy", "codec.merge_window": "merge_window",
}


def generate_request(field: str = "", value: str = "") -> edge_pb2.GenerateRequest:
    request = edge_pb2.GenerateRequest(prompt=PROMPT, steps=2, split=1)
    if field.startswith("codec."):
        setattr(request.codec, field.split(".", 1)[1], value)
    elif field:
        setattr(request, field, value)
    return request


def assert_named(error: grpc.RpcError, code: grpc.StatusCode, field: str) -> None:
    details = error.details() or ""
    assert (error.code(), details[:len(field) + 2]) == (code, f"{field}: "), (error.code(), details[:200])
    assert len(details.encode()) <= MAX_DETAILS_BYTES


@pytest.fixture(scope="module")
def servers(tiny_packs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with edge_server(tiny_packs["large"], tmp) as edge, device_service(tiny_packs["small"], tmp) as ue, \
            scheduler_service(tmp, "--policy", "greedy_ls") as scheduler:
        yield {"edge": edge, "ue": ue, "scheduler": scheduler}


# --- the edge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LONG)
@pytest.mark.parametrize("field", EDGE_FIELDS)
def test_a_long_value_in_an_edge_field_is_invalid_argument_naming_it(servers, field, kind):
    with grpc.insecure_channel(servers["edge"].address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(edge_pb2_grpc.EdgeServiceStub(channel).Generate(generate_request(field, LONG[kind]), timeout=30))
    assert_named(info.value, grpc.StatusCode.INVALID_ARGUMENT, EDGE_FIELDS[field])


# --- the device service ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LONG)
@pytest.mark.parametrize("field", [*EDGE_FIELDS, "edge_address"])
def test_a_long_value_in_a_device_field_is_invalid_argument_naming_it(servers, field, kind):
    if field == "edge_address":
        message = device_pb2.DeviceServiceGenerateRequest(request=generate_request(), edge_address=LONG[kind])
    else:
        message = device_pb2.DeviceServiceGenerateRequest(request=generate_request(field, LONG[kind]))
    with grpc.insecure_channel(servers["ue"].address) as channel:
        stub = device_pb2_grpc.DeviceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(message, timeout=30))
        assert_named(info.value, grpc.StatusCode.INVALID_ARGUMENT, EDGE_FIELDS.get(field, field))
        with pytest.raises(grpc.RpcError) as info:
            stub.GetLinkEstimate(device_pb2.GetLinkEstimateRequest(edge_address=LONG[kind]), timeout=30)
        assert_named(info.value, grpc.StatusCode.INVALID_ARGUMENT, "edge_address")


FLOAT32_MAX = 3.4028234663852886e38


@pytest.mark.parametrize("timeout", [math.inf, 3e38, FLOAT32_MAX, MAX_EDGE_TIMEOUT * 1.01, math.nan, -1.0])
def test_an_out_of_range_edge_timeout_is_invalid_argument_never_a_fallback(servers, timeout):
    message = device_pb2.DeviceServiceGenerateRequest(request=generate_request(), edge_timeout_seconds=timeout)
    with grpc.insecure_channel(servers["ue"].address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(device_pb2_grpc.DeviceServiceStub(channel).Generate(message, timeout=30))
    assert_named(info.value, grpc.StatusCode.INVALID_ARGUMENT, "edge_timeout_seconds")
    # The client library the CLI uses: the device's refusal, not an instant DEADLINE_EXCEEDED from
    # a deadline of 2 * inf + 60 seconds.
    with pytest.raises(EdgeError) as refused:
        generate_on_device_service(servers["ue"].address, generate_request(), None, timeout)
    assert refused.value.code == "INVALID_ARGUMENT" and refused.value.message.startswith("edge_timeout_seconds: ")


@pytest.mark.parametrize("timeout", ["inf", "3e38", "nan", "3601", "0", "-1"])
@pytest.mark.parametrize("mode", ["--ue", "--edge"])
def test_the_cli_refuses_an_unusable_timeout_before_any_call(timeout, mode, tmp_path, capsys):
    """Before: --timeout inf or 3e38 was DEADLINE_EXCEEDED through a device service, and in process
    a silent fallback ("edge failed (DEADLINE_EXCEEDED ...)"); nothing is called now."""
    argv = ["generate", PROMPT, "--out", str(tmp_path / "x.png"), "--quiet", mode, "127.0.0.1:1",
            f"--timeout={timeout}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tandem: error: --timeout: must be in (0, 3600] seconds") and "\n" not in err
    assert cli.MAX_TIMEOUT_S == MAX_EDGE_TIMEOUT


def test_the_device_deadline_is_finite_for_every_timeout():
    assert device_deadline(30.0) == 120.0
    assert device_deadline(0.0) == device_deadline(math.inf) == device_deadline(math.nan) == device_deadline(-1.0) \
        == 2 * 120.0 + 60  # 0: the device's default edge deadline (120 s), not a 60 s call


# --- the scheduler -----------------------------------------------------------------------------

SCHEDULER_FIELDS = ["user_id", "device_class", "personalized_user"]


@pytest.mark.parametrize("kind", LONG)
@pytest.mark.parametrize("field", [*SCHEDULER_FIELDS, "plan_id", "address"])
def test_a_long_value_in_a_scheduler_field_is_invalid_argument_naming_it(servers, field, kind):
    with grpc.insecure_channel(servers["scheduler"].address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            if field == "plan_id":
                stub.Report(scheduler_pb2.ReportRequest(plan_id=LONG[kind]), timeout=30)
            elif field == "address":
                stub.ReportEdgeLoad(scheduler_pb2.ReportEdgeLoadRequest(address=LONG[kind]), timeout=30)
            else:
                fields = {"device_class": "phone", field: LONG[kind]}
                stub.Plan(scheduler_pb2.PlanRequest(**fields), timeout=30)
    assert_named(info.value, grpc.StatusCode.INVALID_ARGUMENT, field)


def test_the_servers_keep_serving(servers):
    """After every hostile field above (module order), all three still answer health."""
    for server in servers.values():
        with grpc.insecure_channel(server.address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING


# --- the cap, in process -----------------------------------------------------------------------

def test_shown_quotes_a_value_cut_with_its_length():
    assert shown("sampler") == "'sampler'" and shown(3.5) == "3.5" and shown(None) == "None"
    long = shown("x" * 10_000)
    assert long.startswith("'xxx") and long.endswith("…(10000 chars)") and len(long) < 100
    assert shown(10 ** 5000).startswith("<int of ")  # past Python's int-to-str digit limit: no ValueError
    assert shown([1] * 1000).endswith(f"…({len(repr([1] * 1000))} chars)")


def test_capped_cuts_utf8_bytes_at_a_character():
    assert capped("short") == "short"
    for text in ("x" * 5000, "\U0001f600" * 5000, "é" * 5000):
        cut = capped(text)
        assert len(cut.encode()) <= MAX_DETAILS_BYTES and cut.endswith("…(cut: 5000 chars)")
        assert text.startswith(cut[:-len("…(cut: 5000 chars)")])


class _Hostile(health_pb2_grpc.HealthServicer):
    """Check aborts with (or raises) a message holding the service name whole: any future message
    that forgets to quote through shown()."""

    async def Check(self, request, context):
        if request.service.startswith("raise:"):
            raise ValueError(f"no such thing as {request.service}")
        await context.abort(grpc.StatusCode.NOT_FOUND, f"service: unknown {request.service}")


async def _serve_and_call(servicer, requests, metadata=None, tokens=None):
    interceptors = [DetailsCapInterceptor(), *([TokenInterceptor(tokens)] if tokens else []), DecodeErrorInterceptor()]
    server = grpc.aio.server(interceptors=interceptors)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for request in requests:
                try:
                    results.append(await stub.Check(request, timeout=10, metadata=metadata))
                except grpc.aio.AioRpcError as exc:
                    results.append(exc)
    finally:
        await server.stop(None)
    return results


def test_every_abort_and_escaped_exception_is_cut_under_the_limit():
    long = "y" * 20_000
    requests = [health_pb2.HealthCheckRequest(service=long), health_pb2.HealthCheckRequest(service="raise:" + long),
                health_pb2.HealthCheckRequest(service="short")]
    cut, escaped, short = asyncio.run(_serve_and_call(_Hostile(), requests))
    assert cut.code() == grpc.StatusCode.NOT_FOUND and cut.details().startswith("service: unknown yyy")
    assert len(cut.details().encode()) <= MAX_DETAILS_BYTES
    assert cut.details().endswith(f"…(cut: {len('service: unknown ') + len(long)} chars)")
    assert escaped.code() == grpc.StatusCode.UNKNOWN and escaped.details().startswith("Unexpected <class 'ValueError'>")
    assert len(escaped.details().encode()) <= MAX_DETAILS_BYTES
    assert short.details() == "service: unknown short"  # short details pass unchanged


def test_a_token_denial_quotes_the_claimed_user_cut():
    """The token check runs before any field is validated: the user it quotes is the caller's raw
    value (a device request's user is inside its edge request)."""

    class Servicer(device_pb2_grpc.DeviceServiceServicer):
        async def GetLinkEstimate(self, request, context):
            return device_pb2.GetLinkEstimateResponse()

    async def call():
        server = grpc.aio.server(interceptors=[DetailsCapInterceptor(), TokenInterceptor({"tok": "alice"})])
        device_pb2_grpc.add_DeviceServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                message = device_pb2.DeviceServiceGenerateRequest(request=edge_pb2.GenerateRequest(user="b" * 10_000))
                try:
                    async for _ in device_pb2_grpc.DeviceServiceStub(channel).Generate(
                            message, timeout=10, metadata=(("authorization", "Bearer tok"),)):
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc
        finally:
            await server.stop(None)

    error = asyncio.run(call())
    assert error is not None and error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details().startswith("user: the token is 'alice''s, not 'bbb") and len(error.details()) < 200


def test_health_watch_streams_through_the_interceptors():
    """grpc's health Watch writes with context.write (a coroutine, no generator): the interceptors
    keep it one (DecodeErrorInterceptor turned it into UNKNOWN "'async for' requires ... got coroutine")."""

    async def watch():
        health = HealthServicer()
        server = grpc.aio.server(interceptors=[DetailsCapInterceptor(), TokenInterceptor({"t": "u"}),
                                               DecodeErrorInterceptor()])
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                async for response in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                                                timeout=10):
                    return response.status
        finally:
            await server.stop(None)

    assert asyncio.run(watch()) == health_pb2.HealthCheckResponse.SERVING
