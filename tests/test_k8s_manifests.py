"""deploy/k8s/ checked offline, as a reviewer would check it.

Every document (deploy/k8s/**/*.yaml, multi-document files) validates against the Kubernetes
schemas kubernetes-validate bundles, strictly (an unknown or misspelt field is an error). Then the
facts the manifests share with the code, read from the code rather than written twice: the
autoscaler's metric is the gauge the edge's registry exports and prometheus-adapter's rule selects
it; every probe asks the health service its server registers, on a port its container opens; each
TANDEM_* variable is a flag of its server; the edge's grace period outlasts its drain; the edge
holds one GPU; the device service opens the HTTP port docker-compose.yml publishes.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests are for (the preStop `sleep` action is on by default since
# 1.30, native gRPC probes since 1.24) and the newest the pinned kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
# Deployment -> (its server module, the prefix of the variables its flags read)
SERVERS = {
    "tandem-edge": ("services.edge_server.server", "TANDEM_EDGE_"),
    "tandem-scheduler": ("services.scheduler.server", "TANDEM_SCHEDULER_"),
    "tandem-ue": ("services.ue_client.server", "TANDEM_UE_"),
}
# After the drain the edge closes its server within 1 s (server.py: stop(grace=min(5, left) + 1));
# the grace period keeps that and room for the engine to stop.
EDGE_CLOSE_MARGIN_S = 5
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
INSTALL_DEV = "scripts/bootstrap.sh dev, or .venv/bin/pip install -e '.[dev]'"


def _load_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(K8S.rglob("*.yaml")):
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if document is not None:
                documents.append((f"{path.relative_to(ROOT)}[{index}]", document))
    return documents


DOCUMENTS = _load_documents()


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in DOCUMENTS if document["kind"] == kind]


def _named(kind: str, name: str) -> dict[str, Any]:
    (document,) = [d for d in _of_kind(kind) if d["metadata"]["name"] == name]
    return document


def _container(deployment: str) -> dict[str, Any]:
    (container,) = _named("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return container


def _container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def _server_args(deployment: str, monkeypatch: pytest.MonkeyPatch):
    """The server's own parse of its container's variables (no flags: the image's entrypoint)."""
    module_name, prefix = SERVERS[deployment]
    module = importlib.import_module(module_name)
    for variable in list(os.environ):
        if variable.startswith(prefix):
            monkeypatch.delenv(variable)
    for variable in _container(deployment)["env"]:
        if variable["name"].startswith(prefix):
            monkeypatch.setenv(variable["name"], variable["value"])
    return module, module.parse_args([])


def _quantity(text: str | int | float) -> float:
    """A plain or milli- Kubernetes quantity ("8", "500m", 2) as a number."""
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.fixture(scope="module")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:  # a dev dependency: missing, it is an error, never a skip
        pytest.fail(f"kubernetes-validate is not installed; it is a dev dependency ({INSTALL_DEV})", pytrace=False)
    return kubernetes_validate


def _edge_queue_depth() -> str:
    """The name under which the edge's registry exports its queue-depth gauge."""
    from services.edge_server.metrics import EdgeMetrics

    metrics = EdgeMetrics()
    (family,) = metrics.queue_depth.collect()
    assert family.type == "gauge"
    (sample,) = family.samples
    assert sample.labels == {}, "the adapter rule groups by the pod label Prometheus adds, not by the edge's own"
    exported = {s.name for f in metrics.registry.collect() for s in f.samples}
    assert sample.name in exported
    return sample.name


# --- the schemas -----------------------------------------------------------------------------

def test_the_manifests_hold_what_the_deployment_needs():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in DOCUMENTS}
    for needed in [("Namespace", "tandem"), ("Deployment", "tandem-edge"), ("Deployment", "tandem-scheduler"),
                   ("Deployment", "tandem-ue"), ("Service", "edge"), ("Service", "scheduler"), ("Service", "ue"),
                   ("HorizontalPodAutoscaler", "tandem-edge"), ("PodDisruptionBudget", "tandem-edge"),
                   ("ConfigMap", "tandem-prometheus-adapter")]:
        assert needed in kinds, needed
    for where, document in DOCUMENTS:
        if document["kind"] not in ("Namespace", "ConfigMap"):  # the adapter's rules live beside the adapter
            assert document["metadata"].get("namespace") == "tandem", where


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_document_validates_strictly_against_the_kubernetes_schemas(kubernetes_validate, version):
    failures = []
    for where, document in DOCUMENTS:
        try:
            checked = kubernetes_validate.validate(document, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError,
                kubernetes_validate.InvalidSchemaError) as exc:
            path = "/".join(map(str, getattr(exc, "absolute_path", ())))
            failures.append(f"{where} {document['kind']}/{document['metadata']['name']} at {path or '-'}: "
                            f"{getattr(exc, 'message', exc)}")
        else:
            assert checked == version.rsplit(".", 1)[0]  # these schemas, not an older version's
    assert not failures, "\n".join(failures)


def test_strict_validation_rejects_a_misspelt_field(kubernetes_validate):
    """The check above would pass vacuously if strict mode let unknown fields through."""
    deployment = copy.deepcopy(_named("Deployment", "tandem-edge"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# --- autoscaling on the queue depth ----------------------------------------------------------

def test_the_autoscaler_scales_the_edge_on_the_queue_depth_gauge_it_exports(monkeypatch):
    queue_depth = _edge_queue_depth()
    hpa = _named("HorizontalPodAutoscaler", "tandem-edge")
    deployment = _named("Deployment", "tandem-edge")
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tandem-edge"}
    assert "replicas" not in deployment["spec"], "the autoscaler owns the count: `kubectl apply` would reset it"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == queue_depth
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    _, args = _server_args("tandem-edge", monkeypatch)
    assert 0 < _quantity(target["averageValue"]) < args.max_queue, "scale before the queue refuses requests"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    behavior = hpa["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300, "GPU pods are slow to start: scale down slowly"
    # the gauge reaches Prometheus: the pod's scrape annotation names the metrics port the edge opens
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert int(template["metadata"]["annotations"]["prometheus.io/port"]) == args.metrics_port
    assert args.metrics_port in _container_ports(_container("tandem-edge")).values()


def test_the_adapter_rule_serves_the_gauge_under_the_autoscalers_name():
    queue_depth = _edge_queue_depth()
    (metric,) = _named("HorizontalPodAutoscaler", "tandem-edge")["spec"]["metrics"]
    wanted = metric["pods"]["metric"]["name"]
    config_map = _named("ConfigMap", "tandem-prometheus-adapter")
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    (rule,) = [r for r in config["rules"] if r["name"]["as"] == wanted]
    series = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", rule["seriesQuery"])
    assert series is not None, rule["seriesQuery"]
    assert series.group(1) == queue_depth
    assert {'namespace!=""', 'pod!=""'} <= {m.strip() for m in series.group(2).split(",")}
    assert re.search(rule["name"]["matches"], queue_depth)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    # the chart mounts this ConfigMap when told its name, as the docs tell it
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f"rules.existing={config_map['metadata']['name']}" in docs
    assert f"-n {config_map['metadata']['namespace']}" in docs


def test_the_disruption_budget_covers_the_edge_pods_and_never_blocks_a_drain():
    pdb = _named("PodDisruptionBudget", "tandem-edge")
    labels = _named("Deployment", "tandem-edge")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "minAvailable" not in pdb["spec"] and pdb["spec"]["maxUnavailable"] >= 1  # one replica may still move


# --- the containers --------------------------------------------------------------------------

@pytest.mark.parametrize("deployment", sorted(SERVERS))
def test_every_tandem_variable_is_a_flag_of_its_server(deployment, monkeypatch):
    _, prefix = SERVERS[deployment]
    _, args = _server_args(deployment, monkeypatch)
    for variable in _container(deployment)["env"]:
        name = variable["name"]
        if not name.startswith("TANDEM_"):
            continue
        assert name.startswith(prefix), f"{deployment}: {name} is read by another service"
        dest = name.removeprefix(prefix).lower()
        assert hasattr(args, dest), f"{deployment}: {name} is no flag of the server (a typo is ignored silently)"
        value = getattr(args, dest)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value == float(variable["value"]), name


@pytest.mark.parametrize("deployment", sorted(SERVERS))
def test_probes_ask_the_registered_health_service_on_an_open_grpc_port(deployment, monkeypatch):
    module, args = _server_args(deployment, monkeypatch)
    # the status set once the server is ready is the one of SERVICE_NAME (and of "", the server)
    assert "set_health(health, SERVICE_NAME, serving=True)" in inspect.getsource(module)
    container = _container(deployment)
    ports = _container_ports(container)
    assert ports["grpc"] == args.port
    for name in PROBES:
        probe = container[name]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (deployment, name)
        assert probe["grpc"]["port"] in ports.values(), (deployment, name)
        assert probe["grpc"]["port"] == args.port, (deployment, name)
        assert probe["grpc"]["service"] == module.SERVICE_NAME, (deployment, name)


def test_the_edge_startup_probe_waits_as_long_as_compose_does_for_the_pack():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    start_period = compose["services"]["edge"]["healthcheck"]["start_period"]
    seconds = int(re.search(r"(\d+)s\}?$", start_period).group(1))
    probe = _container("tandem-edge")["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= seconds


def test_the_edge_grace_period_outlasts_its_drain(monkeypatch):
    _, args = _server_args("tandem-edge", monkeypatch)
    pod = _named("Deployment", "tandem-edge")["spec"]["template"]["spec"]
    pre_stop = _container("tandem-edge").get("lifecycle", {}).get("preStop", {})
    sleep = pre_stop.get("sleep", {}).get("seconds", 0)  # the grace period counts from the preStop hook
    assert pod["terminationGracePeriodSeconds"] >= sleep + args.drain_seconds + EDGE_CLOSE_MARGIN_S, (
        f"SIGKILL before the drain ends: {pod['terminationGracePeriodSeconds']} s for a {sleep} s preStop sleep, "
        f"a {args.drain_seconds} s drain and {EDGE_CLOSE_MARGIN_S} s to close")


@pytest.mark.parametrize("deployment", sorted(SERVERS))
def test_resources_request_cpu_and_memory_and_the_edge_one_gpu(deployment):
    resources = _container(deployment)["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]), deployment
    assert "memory" in resources["limits"], deployment
    gpus = {where: resources[where].get("nvidia.com/gpu") for where in ("requests", "limits")}
    if deployment == "tandem-edge":
        assert gpus == {"requests": 1, "limits": 1}  # an extended resource: request == limit, whole GPUs
        tolerations = _named("Deployment", deployment)["spec"]["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert gpus == {"requests": None, "limits": None}, deployment


def test_services_target_ports_their_pods_open():
    for service in _of_kind("Service"):
        (deployment,) = [d for d in _of_kind("Deployment")
                         if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        ports = _container_ports(_container(deployment["metadata"]["name"]))
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (service["metadata"]["name"], port)
            assert port["port"] == ports[port["targetPort"]], (service["metadata"]["name"], port)


def test_the_device_service_opens_the_http_port_compose_publishes(monkeypatch):
    _, args = _server_args("tandem-ue", monkeypatch)
    compose_ue = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["ue"]
    compose_port = int(compose_ue["environment"]["TANDEM_UE_HTTP_PORT"])
    assert args.http_port == compose_port
    assert any(published.rsplit(":", 1)[1] == str(compose_port) for published in compose_ue["ports"])
    assert _container_ports(_container("tandem-ue"))["http"] == args.http_port
    assert {"name": "http", "port": args.http_port, "targetPort": "http"} in _named("Service", "ue")["spec"]["ports"]
