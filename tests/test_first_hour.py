"""Issue 15, the first hour of a new user: each surprise they met, as the user meets it (the CLI as a
subprocess, servers as processes). Slow paths run once; flag errors never load a model."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from service_procs import ROOT, device_service, edge_server, free_port, metric_value, scheduler_service

from services.ue_client.transport import fetch_handoff
from tandem.codec.spec import CodecSpec
from tandem.request import GenerationRequest
from tandem.threads import configure_threads, default_threads

PROMPT = "a red circle at the left on a blue background"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def tandem(*args: str, env: dict | None = None, python_flags: tuple[str, ...] = (), timeout: float = 300):
    return subprocess.run([sys.executable, *python_flags, "-m", "services.cli.generate", *args], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_error_line(result, code: int = 2) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr + result.stdout
    assert len(lines) == 1 and lines[0].startswith("tandem: error: "), result.stderr
    return lines[0]


def imported(importtime_stderr: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in importtime_stderr.splitlines() if line.startswith("import time:")}


# --- item 5: flags are checked before torch loads, each mistake one line ---------------------------

def test_help_imports_no_torch():
    result = tandem("generate", "--help", python_flags=("-X", "importtime"))
    assert result.returncode == 0 and "--require-edge" in result.stdout and "--threads" in result.stdout
    modules = imported(result.stderr)
    assert "tandem.request" in modules and "torch" not in modules and "diffusers" not in modules


@pytest.mark.parametrize("args,expected", [
    (["--sampler", "heun"], "--sampler: invalid choice: 'heun'"),
    (["--codec", "fp8"], "--codec: invalid choice: 'fp8'"),
    (["--steps", "many"], "--steps: invalid int value: 'many'"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--large", "tandem/demo_pack/large"], "--large needs --small too"),
    (["--large", "/no/such/pack", "--small", "tandem/demo_pack/small"], "--large: model pack '/no/such/pack' not found"),
    (["--split", "30"], "--split: must be in 0..steps (20), got 30"),
    (["--user", "carol"], "--user: unknown user 'carol'"),
    (["--merge-ratio", "0.9"], "--merge-ratio: must be in 0..0.75"),
    (["--edge", "127.0.0.1"], "--edge: '127.0.0.1' is not HOST:PORT"),
    (["--ue", "localhost:99999"], "--ue: 'localhost:99999' is not HOST:PORT"),
    (["--threads", "0"], "--threads: must be a positive integer"),
    (["--require-edge"], "--require-edge needs --edge, --ue or --scheduler"),
])
def test_bad_flag_is_one_line_before_torch(tmp_path, args, expected):
    result = tandem("generate", PROMPT, "--out", str(tmp_path / "x.png"), *args, python_flags=("-X", "importtime"))
    modules = imported(result.stderr)
    result.stderr = "\n".join(x for x in result.stderr.splitlines() if not x.startswith("import time:"))
    line = one_error_line(result)
    assert expected in line and "usage:" not in result.stderr
    assert "torch" not in modules, "the flag was checked only after torch loaded"


def test_cuda_without_cuda_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_error_line(tandem("generate", PROMPT, "--out", str(tmp_path / "x.png"), "--device", "cuda"))
    assert "--device cuda: CUDA is not available here" in line


# --- item 1: no silent wrong answers -------------------------------------------------------------

def test_an_is_accepted_and_draws_what_it_says(tmp_path):
    from tandem.demo.evaluator import Evaluator
    from tandem.demo.grammar import parse_prompt

    out = tmp_path / "orange.png"
    result = tandem("generate", "an orange circle at the center on a black background", "--out", str(out),
                    "--quiet", "--json", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr  # "an" is a word the demo pack accepts
    assert json.loads(result.stdout)["prompt"] == "a orange circle at the center on a black background"
    prediction = Evaluator.load(ROOT / "tandem" / "demo_pack" / "evaluator").predict(np.array(Image.open(out))[None])[0]
    assert prediction.matches(parse_prompt("a orange circle at the center on a black background")), prediction


def test_every_client_gets_the_packs_aliases():
    """The edge and the device service encode prompts themselves: "an" is "a" there too."""
    from tandem.packs import load_pack
    from tandem.pipeline import encode_prompt

    pack = load_pack(ROOT / "tandem" / "demo_pack" / "large", device="cpu")
    an, a = (encode_prompt(pack, f"{article} orange circle at the center on a black background", "", 4.0)
             for article in ("An", "a"))
    assert (an.cond == a.cond).all() and not (an.cond == encode_prompt(pack, "orange", "", 4.0).cond).all()


def test_unknown_words_warn_once_and_lora_without_device_steps_is_said(tmp_path):
    result = tandem("generate", "a photo of a gray cat, a gray one", "--out", str(tmp_path / "cat.png"), "--quiet",
                    "--steps", "2", "--split", "2", "--user", "alice")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1
    assert "'photo', 'of', 'gray', 'cat', 'one'" in warnings[0]  # each unknown word once, in order
    assert "Its words: a, at, the, on, background, red" in warnings[0] and "triangle" in warnings[0]
    assert "--user alice has no effect with --split 2 of 2 steps" in result.stderr


def test_packs_without_a_vocabulary_get_no_warning(tmp_path, tiny_packs):
    result = tandem("generate", "an astronaut riding a horse", "--out", str(tmp_path / "x.png"), "--quiet",
                    "--json", "--steps", "2", "--large", str(tiny_packs["large"]), "--small", str(tiny_packs["small"]))
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr and json.loads(result.stdout)["prompt"] == "an astronaut riding a horse"


def test_unmeetable_budget_unknown_device_class_and_refused_token(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-alice": "alice"}))
    with scheduler_service(tmp_path, "--tokens", str(tokens)) as scheduler:
        base = ("generate", PROMPT, "--out", str(tmp_path / "b.png"), "--quiet", "--scheduler", scheduler.address,
                "--token", "tok-alice")
        line = one_error_line(tandem(*base, "--device-class", "toaster"))
        assert line.startswith("tandem: error: --device-class: ") and "toaster" in line
        line = one_error_line(tandem(*base, "--device-class", "cpu-demo", "--token", "tok-eve"))
        assert line.startswith(f"tandem: error: --scheduler {scheduler.address} refused the token (--token) (UNAUTHENTICATED")
        result = tandem(*base, "--device-class", "cpu-demo", "--latency-budget", "0.001", "--json")
    assert result.returncode == 0, result.stderr
    note = [line for line in result.stderr.splitlines() if "--latency-budget" in line]
    assert len(note) == 1 and "cannot be met" in note[0] and "traded quality for speed" in note[0]
    plan = json.loads(result.stdout)
    assert f"{plan['total_steps']} steps, {plan['split']} on the edge" in note[0]


# --- item 4: failures that used to exit 0 --------------------------------------------------------

@pytest.mark.slow
def test_require_edge_fails_instead_of_falling_back(tmp_path, tiny_packs):
    dead = f"127.0.0.1:{free_port()}"
    args = ("generate", PROMPT, "--out", str(tmp_path / "x.png"), "--quiet", "--steps", "2", "--timeout", "5",
            "--small", str(tiny_packs["small"]), "--edge", dead)
    fallback = tandem(*args)
    assert fallback.returncode == 0 and "FALLBACK" in fallback.stdout  # an edge that fails: finish here
    line = one_error_line(tandem(*args, "--require-edge"), code=3)
    assert line.startswith("tandem: error: --require-edge: edge failed") and dead in line


@pytest.mark.slow
def test_tls_and_token_misconfigurations_say_so(tmp_path, tiny_packs):
    certs = tmp_path / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "dev_certs.sh"), str(certs)], check=True, capture_output=True)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-alice": "alice"}))
    credentials = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with edge_server(tiny_packs["large"], tmp_path, "--tls-cert", str(certs / "server.pem"), "--tls-key",
                     str(certs / "server.key"), "--tokens", str(tokens), credentials=credentials) as edge:
        args = ("generate", PROMPT, "--out", str(tmp_path / "x.png"), "--quiet", "--steps", "2", "--timeout", "20",
                "--small", str(tiny_packs["small"]), "--edge", edge.address)
        plaintext = tandem(*args, "--token", "tok-alice")
        wrong_token = tandem(*args, "--tls-ca", str(certs / "ca.pem"), "--token", "tok-eve")
    assert plaintext.returncode == 0 and "the edge may require TLS" in plaintext.stderr
    assert wrong_token.returncode == 0 and "UNAUTHENTICATED" in wrong_token.stderr
    assert "the edge refused the token (--token" in wrong_token.stderr


# --- item 2: ports -------------------------------------------------------------------------------

@pytest.mark.slow
def test_busy_ports_are_one_line_each_and_reflection_v1_and_batch_buckets(tmp_path, tiny_packs):
    from grpc_reflection.v1alpha import reflection_pb2

    with edge_server(tiny_packs["large"], tmp_path) as edge:
        port = edge.address.rsplit(":", 1)[1]
        command = [sys.executable, "-m", "services.edge_server", "--pack", str(tiny_packs["large"]), "--device", "cpu"]
        second = subprocess.run([*command, "--port", port, "--metrics-port", "0"], cwd=ROOT, env=ENV,
                                capture_output=True, text=True, timeout=120)
        metrics_taken = subprocess.run([*command, "--port", str(free_port()), "--metrics-port", str(edge.metrics_port)],
                                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
        with grpc.insecure_channel(edge.address) as channel:
            names = {}
            for version in ("v1", "v1alpha"):
                call = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                             request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                             response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
                reply = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)))
                names[version] = {s.name for s in reply.list_services_response.service}
        request = GenerationRequest(prompt=PROMPT, steps=3, split=2, sampler="ddim", guidance_scale=3.0, height=32, width=32)
        asyncio.run(fetch_handoff(edge.address, request, CodecSpec(), timeout=60))
        text = edge.metrics()
    for result, flag, taken in ((second, "--port", port), (metrics_taken, "--metrics-port", str(edge.metrics_port))):
        output = (result.stdout + result.stderr).strip().splitlines()
        assert result.returncode == 2, output
        assert output[-1] == f"tandem-edge: error: {flag}: port {taken} on 127.0.0.1 is already in use (another server?)"
        assert "Traceback" not in result.stdout + result.stderr
    assert names["v1"] == names["v1alpha"] >= {"tandem.v1.EdgeService", "grpc.reflection.v1.ServerReflection"}
    # Prometheus' histogram_quantile on the batch sizes of lone requests: 1, not 0.56.
    buckets = sorted((float(le), metric_value(text, "tandem_edge_batch_size_bucket", f'le="{le}"'))
                     for le in ("0.5", "1.5", "2.5"))
    assert buckets[0][1] == 0 and buckets[1][1] == buckets[2][1] > 0
    (low, _), (high, count) = buckets[0], buckets[1]
    assert low + (high - low) * (0.5 * count) / count == 1.0


def test_topology_with_busy_port_is_one_line_and_never_up(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        others = [arg for flag in ("--edge-metrics-port", "--ue-port", "--ue-metrics-port")  # free: not the defaults,
                  for arg in (flag, str(free_port()))]  # which another topology on this host may hold
        result = subprocess.run([sys.executable, "-m", "services.cli.topology", "--no-scheduler", "--edge-port", str(port),
                                 *others, "--log-dir", str(tmp_path / "logs")], cwd=ROOT, env=ENV, capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"tandem topology: error: already in use on 127.0.0.1: edge gRPC port {port} "
                                     "(stop what runs there, or use --free-ports)")
    assert "up" not in result.stdout and not (tmp_path / "logs" / "edge.log").exists()  # nothing was started


def test_healthcheck_rejects_an_address_without_port():
    result = subprocess.run([sys.executable, "-m", "services.cli.healthcheck", "127.0.0.1"], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout.strip() == "error: address: '127.0.0.1' is not HOST:PORT (e.g. 127.0.0.1:50051)"


# --- item 3: `tandem` is not on PATH until the virtualenv is activated ------------------------------

def test_topology_names_a_tandem_command_that_runs():
    code = "from services.cli.topology import _tandem_command; print(_tandem_command())"
    bin_dir = str(Path(sys.executable).parent)
    without = ":".join(p for p in os.environ.get("PATH", "").split(":") if p and Path(p).resolve() != Path(bin_dir).resolve())
    shown = {}
    for name, path in (("inactive", without), ("activated", f"{bin_dir}:{without}")):
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(ENV, PATH=path), capture_output=True,
                                text=True, timeout=60)
        shown[name] = result.stdout.strip()
    if not (Path(bin_dir) / "tandem").exists():
        pytest.skip("no tandem launcher beside this interpreter (project not installed)")
    assert shown["activated"] == "tandem"
    launcher = shown["inactive"]
    assert launcher != "tandem" and (ROOT / launcher).resolve() == (Path(bin_dir) / "tandem").resolve()


# --- item 6: rough edges -------------------------------------------------------------------------

@pytest.mark.slow
def test_device_service_report_has_the_in_process_keys(tmp_path, tiny_packs):
    common = ("generate", PROMPT, "--quiet", "--json", "--steps", "2", "--seed", "4", "--sampler", "ddim")
    local = tandem(*common, "--out", str(tmp_path / "a.png"), "--large", str(tiny_packs["large"]),
                   "--small", str(tiny_packs["small"]))
    with device_service(tiny_packs["small"], tmp_path) as service:
        remote = tandem(*common, "--out", str(tmp_path / "b.png"), "--ue", service.address)
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    local_report, remote_report = json.loads(local.stdout), json.loads(remote.stdout)
    assert set(remote_report) == set(local_report)
    for key in ("prompt", "seed", "sampler", "codec", "width", "height", "total_steps"):
        assert remote_report[key] == local_report[key], key
    assert remote_report["mode"] == "device-service" and remote_report["device_service"] == service.address


@pytest.mark.parametrize("module", ["services.edge_server", "services.ue_client", "services.scheduler"])
def test_server_help_descriptions_are_whole_sentences(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
    description = " ".join(result.stdout.split("\n\n")[1].split())
    assert result.returncode == 0 and description.endswith(".")


def test_bootstrap_hides_pip_location_warnings_but_not_pip_failures(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "bootstrap.sh", tmp_path / "scripts" / "bootstrap.sh")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text("#!/bin/sh\n[ \"$1\" = -c ] && case \"$2\" in *torch*) exit 1;; esac\nexit 0\n")
    pip = bin_dir / "pip"
    (bin_dir / "python").chmod(0o755)

    def bootstrap(pip_status: int):
        pip.write_text("#!/bin/sh\necho \"WARNING: Location '/x' is ignored: it is either a non-existing path\" >&2\n"
                       f"echo 'ERROR: something pip says' >&2\nexit {pip_status}\n")
        pip.chmod(0o755)
        for stamp in tmp_path.glob(".venv/.tandem-*"):
            stamp.unlink()
        return subprocess.run(["bash", str(tmp_path / "scripts" / "bootstrap.sh")], capture_output=True, text=True,
                              timeout=60)

    ok, failed = bootstrap(0), bootstrap(1)
    assert ok.returncode == 0 and "WARNING: Location" not in ok.stderr and "ERROR: something pip says" in ok.stderr
    assert failed.returncode != 0 and "WARNING: Location" not in failed.stderr


def test_demo_script_takes_a_prompt():
    """demo.sh's first argument, when not a flag, is the prompt (checked through bash -x: the
    command it would exec, without starting the topology)."""
    script = (ROOT / "scripts" / "demo.sh").read_text().replace("scripts/bootstrap.sh all", ":").replace(
        "exec .venv/bin/python", "echo")
    for args, prompt in ((["a green square at the top on a black background", "--user", "bob"],
                          "a green square at the top on a black background"), (["--user", "bob"], PROMPT)):
        result = subprocess.run(["bash", "-c", script, "demo.sh", *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stderr
        assert f"--then generate {prompt} --out out/demo.png --device-class cpu-demo --user bob" in result.stdout


# --- item 7: threads -----------------------------------------------------------------------------

def test_thread_count_is_set_before_torch_and_overridable(monkeypatch):
    code = "from tandem.threads import configure_threads; n = configure_threads(); import torch, os; " \
           "print(n, torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    other = "2" if default_threads() != 2 else "1"  # not the default, and no more than the cores
    chosen = subprocess.run([sys.executable, "-c", code], env=dict(env, TANDEM_THREADS=other), capture_output=True,
                            text=True, timeout=120)
    assert default.stdout.split() == [str(default_threads()), str(default_threads()), "PASSIVE"]
    assert chosen.stdout.split() == [other, other, "PASSIVE"]
    monkeypatch.setenv("TANDEM_THREADS", "lots")
    with pytest.raises(ValueError, match="TANDEM_THREADS: must be a positive integer, got 'lots'"):
        configure_threads()
    bad = subprocess.run([sys.executable, "-m", "services.scheduler", "--help"], cwd=ROOT,
                         env=dict(ENV, TANDEM_THREADS="0"), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "tandem-scheduler: error: TANDEM_THREADS: must be a positive integer, got '0'"


def test_a_metrics_port_taken_while_the_server_starts_is_one_line_naming_it():
    """The port was free at the check and taken before the metrics server bound it (here: the check
    is skipped and the port held): still one line naming the flag, exit 2, for a server whose own
    startup errors include OSError (the scheduler)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        code = ("import services.common.lifecycle as life; life.check_port_free = lambda *a: None; "
                "import services.scheduler.server as s; "
                f"raise SystemExit(s.main(['--port', '0', '--metrics-port', '{taken}']))")
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"tandem-scheduler: error: --metrics-port: port {taken} on 127.0.0.1 is already in use" in done.stdout


def test_an_edge_gone_mid_stream_is_not_explained_as_tls():
    """A killed edge's "Stream removed (Socket closed)" is a fallback, not a TLS misconfiguration;
    a plaintext client refused by a TLS edge still gets the hint."""
    from services.cli.generate import _explain_fallback, build_parser, parse_options

    opts = parse_options(build_parser().parse_args(["generate", "a red circle"]))
    gone = "edge failed (UNAVAILABLE: Stream removed (Socket closed)); finished locally on the device"
    assert _explain_fallback(opts, gone) == gone
    refused = "edge failed (UNAVAILABLE: failed to connect to all addresses; Socket closed); finished locally"
    assert "the edge may require TLS" in _explain_fallback(opts, refused)
