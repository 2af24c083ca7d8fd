"""TLS, mTLS and per-user tokens: certificates from scripts/dev_certs.sh, real edge servers, device
services and schedulers on 127.0.0.1, and the token decision as a pure function. The device service
runs the whole matrix: plaintext, TLS and mTLS, each with no token, a wrong token and the right one."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_procs import ROOT, device_service, edge_server, scheduler_service

from services.cli import generate as cli
from services.common.scheduler_client import request_plan
from services.common.security import ClientSecurity, SecurityError, client_security, read_pem, server_tls
from services.common.tokens import bearer_token, check_access, claimed_users, load_tokens
from services.ue_client.client import generate_on_device_service, get_link_estimate
from services.ue_client.transport import EdgeError, fetch_handoff, get_capabilities
from tandem.echo import MAX_DETAILS_BYTES
from tandem.handoff import CodecSpec
from tandem.request import GenerationRequest
from tandem.v1 import device_pb2, edge_pb2, scheduler_pb2

PROMPT = "a red circle at the left on a blue background"
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(ROOT / "scripts" / "dev_certs.sh"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    return path


def security(certs: Path, client_cert: bool = False, token: str | None = None) -> ClientSecurity:
    pem = lambda name: (certs / name).read_bytes()  # noqa: E731
    return ClientSecurity(ca=pem("ca.pem"), cert=pem("client.pem") if client_cert else None,
                          key=pem("client.key") if client_cert else None, token=token)


def req(**kw) -> GenerationRequest:
    base = dict(prompt=PROMPT, steps=4, split=2, sampler="ddim", guidance_scale=3.0, seed=1, height=32, width=32)
    return GenerationRequest(**{**base, **kw})


def capabilities(address: str, sec: ClientSecurity | None):
    return asyncio.run(get_capabilities(address, timeout=10, security=sec))


def handoff(address: str, sec: ClientSecurity | None, **kw):
    return asyncio.run(fetch_handoff(address, req(**kw), CodecSpec(), timeout=60, security=sec))


# --- the token decision, no gRPC -------------------------------------------------------------

def test_check_access_decisions():
    assert check_access(TOKENS, None, []).code == grpc.StatusCode.UNAUTHENTICATED
    assert check_access(TOKENS, "tok-eve", []).code == grpc.StatusCode.UNAUTHENTICATED
    denial = check_access(TOKENS, "tok-alice", ["bob"])
    assert denial.code == grpc.StatusCode.PERMISSION_DENIED and "'bob'" in denial.message
    assert check_access(TOKENS, "tok-alice", ["alice", "alice"]) is None
    assert check_access(TOKENS, "tok-bob", []) is None  # a request naming nobody acts as no one else


def test_bearer_token_and_claimed_users():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1"), ("authorization", "Basic abc")]) is None
    assert bearer_token(None) is None and bearer_token([("authorization", "Bearer ")]) is None
    assert claimed_users(edge_pb2.GenerateRequest(user="bob")) == ["bob"]
    assert claimed_users(edge_pb2.GenerateRequest()) == []
    assert claimed_users(scheduler_pb2.PlanRequest(user_id="a", personalized_user="b")) == ["b", "a"]
    assert claimed_users(scheduler_pb2.ReportEdgeLoadRequest(address="x")) == []
    # the device service's request acts as the user of the edge request it carries
    assert claimed_users(device_pb2.DeviceServiceGenerateRequest(request=edge_pb2.GenerateRequest(user="bob"))) == ["bob"]
    assert claimed_users(device_pb2.DeviceServiceGenerateRequest(request=edge_pb2.GenerateRequest())) == []


def test_bad_token_files_and_pems_name_the_flag(tmp_path):
    bad = tmp_path / "bad.json"
    for text in ("not json", "[]", "{}", '{"t": 3}'):
        bad.write_text(text)
        with pytest.raises(SecurityError, match="^--tokens: "):
            load_tokens(bad)
    with pytest.raises(SecurityError, match="^--tokens: cannot read"):
        load_tokens(tmp_path / "missing.json")
    (tmp_path / "empty.pem").write_text("")
    with pytest.raises(SecurityError, match="^--tls-ca: .* is not a PEM certificate"):
        read_pem(tmp_path / "empty.pem", "--tls-ca", "CERTIFICATE")


def test_flag_combinations_and_env(monkeypatch, certs):
    args = argparse.Namespace(tls_ca=None, tls_cert=str(certs / "client.pem"), tls_key=None, token=None)
    with pytest.raises(SecurityError, match="--tls-cert and --tls-key go together"):
        client_security(args)
    args.tls_key = str(certs / "client.key")
    with pytest.raises(SecurityError, match="--tls-cert needs --tls-ca"):
        client_security(args)
    with pytest.raises(SecurityError, match="--tls-client-ca needs"):
        server_tls(argparse.Namespace(tls_cert=None, tls_key=None, tls_client_ca=str(certs / "ca.pem")))
    from services.edge_server.server import parse_args

    monkeypatch.setenv("TANDEM_EDGE_TLS_CERT", "c.pem")
    monkeypatch.setenv("TANDEM_EDGE_TOKENS", "t.json")
    monkeypatch.setenv("TANDEM_EDGE_SCHEDULER_TOKEN", "s")
    parsed = parse_args([])
    assert (parsed.tls_cert, parsed.tokens, parsed.scheduler_token) == ("c.pem", "t.json", "s")
    from services.ue_client.server import parse_args as device_args

    for name, value in (("TLS_CERT", "d.pem"), ("TLS_KEY", "d.key"), ("TLS_CLIENT_CA", "ca.pem"), ("TOKENS", "u.json")):
        monkeypatch.setenv(f"TANDEM_UE_{name}", value)
    parsed = device_args([])
    assert (parsed.tls_cert, parsed.tls_key, parsed.tls_client_ca, parsed.tokens) == ("d.pem", "d.key", "ca.pem", "u.json")


# --- real servers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_edge(tiny_packs, certs, tokens_file, tmp_path_factory):
    """TLS + tokens."""
    with edge_server(tiny_packs["large"], tmp_path_factory.mktemp("tls-edge"),
                     "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                     "--tokens", str(tokens_file),
                     credentials=security(certs).credentials()) as service:
        yield service


def test_tls_client_works_and_plaintext_client_fails(tls_edge, certs):
    assert capabilities(tls_edge.address, security(certs, token="tok-alice")).max_steps > 0
    with pytest.raises(EdgeError) as info:
        capabilities(tls_edge.address, ClientSecurity(token="tok-alice"))
    assert info.value.code == "UNAVAILABLE"


def test_tokens_on_the_edge(tls_edge, certs):
    for token in (None, "tok-eve"):
        with pytest.raises(EdgeError) as info:
            handoff(tls_edge.address, security(certs, token=token))
        assert info.value.code == "UNAUTHENTICATED"
    for user in ("bob", "b" * 10_000):  # alice's token cannot act as bob (his LoRA, his account)
        with pytest.raises(EdgeError) as info:
            handoff(tls_edge.address, security(certs, token="tok-alice"), user=user)
        assert info.value.code == "PERMISSION_DENIED"  # a hostile name comes back cut, under gRPC's limit
        assert info.value.message.startswith("user: ") and len(info.value.message.encode()) <= MAX_DETAILS_BYTES
    assert len(handoff(tls_edge.address, security(certs, token="tok-alice"), user="alice").payload) > 0
    assert len(handoff(tls_edge.address, security(certs, token="tok-bob")).payload) > 0


def test_cli_edge_over_tls_with_token(tls_edge, certs, tiny_packs, tmp_path, capsys):
    out = tmp_path / "tls.png"
    argv = ["generate", PROMPT, "--out", str(out), "--steps", "4", "--split", "2", "--json", "--quiet",
            "--small", str(tiny_packs["small"]), "--device", "cpu", "--edge", tls_edge.address,
            "--tls-ca", str(certs / "ca.pem"), "--token", "tok-alice"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fallback"] is None and report["edge_steps"] == 2 and out.is_file()


def test_cli_bad_cert_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TANDEM_TLS_CA", str(tmp_path / "nope.pem"))
    assert cli.main(["generate", PROMPT, "--out", str(tmp_path / "x.png"), "--edge", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tandem: error: --tls-ca: cannot read") and "\n" not in err


def test_mtls_requires_a_client_certificate(tiny_packs, certs, tmp_path):
    with edge_server(tiny_packs["large"], tmp_path,
                     "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                     "--tls-client-ca", str(certs / "ca.pem"),
                     credentials=security(certs, client_cert=True).credentials()) as edge:
        with pytest.raises(EdgeError) as info:
            capabilities(edge.address, security(certs))
        assert info.value.code == "UNAVAILABLE"
        assert capabilities(edge.address, security(certs, client_cert=True)).max_steps > 0
        assert len(handoff(edge.address, security(certs, client_cert=True)).payload) > 0


def test_scheduler_tokens(tmp_path, tokens_file):
    with scheduler_service(tmp_path, "--tokens", str(tokens_file), "--policy", "greedy_ls") as scheduler:
        errors: list[str] = []
        assert request_plan(scheduler.address, "phone", bandwidth_bps=1e8, on_error=errors.append) is None
        assert errors[-1].startswith("UNAUTHENTICATED")
        for user in ("bob", "b" * 10_000):
            assert request_plan(scheduler.address, "phone", bandwidth_bps=1e8, personalized_user=user,
                                on_error=errors.append, security=ClientSecurity(token="tok-alice")) is None
            assert errors[-1].startswith("PERMISSION_DENIED") and len(errors[-1]) < MAX_DETAILS_BYTES
        plan = request_plan(scheduler.address, "phone", bandwidth_bps=1e8, personalized_user="alice",
                            on_error=errors.append, security=ClientSecurity(token="tok-alice"))
        assert plan is not None and plan.steps > 0


@pytest.mark.parametrize("value,on_by_default,off_by_default", [
    (None, True, False), ("0", False, False), ("false", False, False), ("No", False, False),
    ("1", True, True), ("TRUE", True, True), ("yes", True, True), ("maybe", True, False), ("", True, False)])
def test_an_env_flag_flips_its_default_only_when_the_variable_says_so(value, on_by_default, off_by_default):
    from services.common.security import env_flag

    env = (lambda name, default: default) if value is None else (lambda name, default: value)
    assert env_flag(env, "x", True) is on_by_default
    assert env_flag(env, "x", False) is off_by_default


# --- the device service: the TLS / token matrix ------------------------------------------------

TRANSPORTS = ("plaintext", "tls", "mtls")


def transport_security(certs: Path, transport: str, token: str | None = None) -> ClientSecurity:
    """What a client of a `transport` server needs (plus `token`)."""
    if transport == "plaintext":
        return ClientSecurity(token=token)
    return security(certs, client_cert=transport == "mtls", token=token)


@pytest.fixture(scope="module", params=TRANSPORTS)
def guarded_device(request, tiny_packs, certs, tokens_file, tmp_path_factory):
    """A device service with --tokens, served plaintext, TLS or mTLS (no edge: every step on it)."""
    transport = request.param
    flags = () if transport == "plaintext" else (
        "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
        *(("--tls-client-ca", str(certs / "ca.pem")) if transport == "mtls" else ()))
    credentials = None if transport == "plaintext" else transport_security(certs, transport).credentials()
    with device_service(tiny_packs["small"], tmp_path_factory.mktemp(f"ue-{transport}"), *flags,
                        "--tokens", str(tokens_file), credentials=credentials) as ue:
        yield transport, ue


def device_generate(address: str, sec: ClientSecurity, **fields) -> device_pb2.DeviceResult:
    message = edge_pb2.GenerateRequest(prompt=PROMPT, steps=2, split=0, **fields)
    return generate_on_device_service(address, message, None, timeout=30, security=sec)


@pytest.mark.parametrize("token, code", [(None, "UNAUTHENTICATED"), ("tok-eve", "UNAUTHENTICATED"), ("tok-bob", None)])
def test_device_service_tokens(guarded_device, certs, token, code):
    """No token and a wrong token are UNAUTHENTICATED on both methods; the right one is served."""
    transport, ue = guarded_device
    sec = transport_security(certs, transport, token)
    if code is None:
        result = device_generate(ue.address, sec)
        assert result.device_steps == 2 and result.png
        assert get_link_estimate(ue.address, None, timeout=10, security=sec).rate_samples == 0
        return
    with pytest.raises(EdgeError) as info:
        device_generate(ue.address, sec)
    assert (info.value.code, info.value.message) == (code, "unknown token" if token else
                                                     "missing 'authorization: Bearer TOKEN' metadata")
    with pytest.raises(EdgeError) as info:
        get_link_estimate(ue.address, None, timeout=10, security=sec)
    assert info.value.code == code


def test_device_service_acting_as_another_user_is_denied(guarded_device, certs):
    """alice's token cannot run bob's LoRA (the user of the edge request the call carries); a
    hostile 10,000-character user name comes back cut, not as RESOURCE_EXHAUSTED."""
    transport, ue = guarded_device
    for user in ("bob", "b" * 10_000):
        with pytest.raises(EdgeError) as info:
            device_generate(ue.address, transport_security(certs, transport, "tok-alice"), user=user)
        assert info.value.code == "PERMISSION_DENIED" and info.value.message.startswith("user: the token is 'alice''s")
        assert len(info.value.message.encode()) <= MAX_DETAILS_BYTES


def test_device_service_refuses_the_wrong_transport(guarded_device, certs):
    """Plaintext to a TLS service, TLS to a plaintext one, no client certificate to an mTLS one."""
    transport, ue = guarded_device
    wrong = {"plaintext": security(certs, token="tok-bob"), "tls": ClientSecurity(token="tok-bob"),
             "mtls": security(certs, token="tok-bob")}[transport]
    with pytest.raises(EdgeError) as info:
        get_link_estimate(ue.address, None, timeout=10, security=wrong)
    assert info.value.code == "UNAVAILABLE"


def test_device_service_health_and_reflection_need_no_token(guarded_device, certs):
    transport, ue = guarded_device
    sec = transport_security(certs, transport)
    channel = grpc.secure_channel(ue.address, sec.credentials()) if sec.tls else grpc.insecure_channel(ue.address)
    with channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = [s.name for reply in replies for s in reply.list_services_response.service]
        assert "tandem.v1.DeviceService" in names


def test_cli_reaches_the_device_service_with_its_tls_and_token(guarded_device, certs, tmp_path, capsys):
    """`tandem generate --ue` sends --token and uses --tls-ca/--tls-cert/--tls-key (the options it
    has for the edge and the scheduler) to the device service."""
    transport, ue = guarded_device
    tls = [] if transport == "plaintext" else ["--tls-ca", str(certs / "ca.pem"), *(
        ["--tls-cert", str(certs / "client.pem"), "--tls-key", str(certs / "client.key")] if transport == "mtls" else [])]
    out = tmp_path / "ue.png"
    argv = ["generate", PROMPT, "--out", str(out), "--steps", "2", "--split", "0", "--json", "--quiet",
            "--ue", ue.address, *tls]
    assert cli.main([*argv, "--token", "tok-alice"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "device-service" and report["device_steps"] == 2 and out.is_file()
    assert cli.main(argv) == 2  # no token
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tandem: error: device service {ue.address}: UNAUTHENTICATED") and "\n" not in err
