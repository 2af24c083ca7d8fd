"""TLS, mTLS and per-user tokens: certificates from scripts/dev_certs.sh, real edge servers on
127.0.0.1, and the token decision as a pure function."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
from pathlib import Path

import grpc
import pytest
from service_procs import ROOT, edge_server, scheduler_service

from services.cli import generate as cli
from services.common.security import ClientSecurity, SecurityError, client_security, read_pem, server_tls
from services.common.tokens import bearer_token, check_access, claimed_users, load_tokens
from services.scheduler.client import request_plan
from services.ue_client.transport import EdgeError, fetch_handoff, get_capabilities
from tandem.handoff import CodecSpec
from tandem.request import GenerationRequest
from tandem.v1 import edge_pb2, scheduler_pb2

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
    with pytest.raises(EdgeError) as info:  # alice's token cannot act as bob (his LoRA, his account)
        handoff(tls_edge.address, security(certs, token="tok-alice"), user="bob")
    assert info.value.code == "PERMISSION_DENIED"
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
        assert request_plan(scheduler.address, "phone", bandwidth_bps=1e8, personalized_user="bob",
                            on_error=errors.append, security=ClientSecurity(token="tok-alice")) is None
        assert errors[-1].startswith("PERMISSION_DENIED")
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
