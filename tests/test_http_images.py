"""The device service's OpenAI-compatible images endpoint (--http-port), driven by the real `openai`
package against running edge + device processes: images of the asked size, n images batched on
the edge, streamed previews, every error as the matching openai exception, cancellation when the
client leaves (measured), the same image as the CLI's, and 1,000 fuzzed bodies and headers.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from service_procs import ROOT, device_service, edge_server, free_port, metric_value, rss_bytes, scheduler_service

from services.cli import generate as cli
from services.ue_client.openai_api import ApiError, check_previews, images_call, parse_json
from services.ue_client.previews import preview_steps

PROMPT = "a red circle at the left on a blue background"  # the demo vocabulary: the CLI warns of nothing
# The tests on the module's edge + device share one worker under pytest-xdist (scripts/test.sh's
# --dist loadgroup), so the pair starts once.
on_the_stack = pytest.mark.xdist_group("http_images_stack")
TOKENS = {"tok-alice": "alice", "tok-bob": "bob"}
FAST = {"steps": 4, "split": 2}


# --- the body mapping alone (no processes) -------------------------------------------------------
def test_a_body_maps_onto_a_partial_request():
    call = images_call({"model": "small", "prompt": "a cat", "n": 2, "size": "48x32", "steps": 6, "split": 3,
                        "seed": 7, "guidance_scale": 2.5, "sampler": "ddim", "codec": "fp32", "merge_ratio": 0.25,
                        "lora": "alice", "user": "end-user-9", "stream": True, "partial_images": 2,
                        "latency_budget": 1.5, "quality": "auto", "response_format": "b64_json"}, "small")
    p = call.partial
    assert (p.width, p.height, p.steps, p.split, p.seed, p.sampler, p.encoding) == (48, 32, 6, 3, 7, "ddim", "fp32")
    assert (p.guidance_scale, p.merge_ratio, p.user) == (2.5, 0.25, "alice")  # lora → the request's user
    assert (call.n, call.stream, call.partial_images, call.identity, call.latency_budget) == (2, True, 2, "end-user-9", 1.5)
    assert [call.image(i).seed for i in range(2)] == [7, 8]
    # null is unset (as OpenAI reads it); "auto" size is the pack's; partial_images without stream: none
    call = images_call({"prompt": "a cat", "n": None, "size": "auto", "partial_images": 3}, "small")
    assert (call.n, call.partial.height, call.partial_images, call.model) == (1, None, 0, "small")


@pytest.mark.parametrize("body, param, status", [
    ([], None, 400), ({"prompt": 5}, "prompt", 400), ({}, "prompt", 400),
    ({"prompt": "x", "n": True}, "n", 400), ({"prompt": "x", "n": 0}, "n", 400), ({"prompt": "x", "n": 5}, "n", 400),
    ({"prompt": "x", "size": "64"}, "size", 400), ({"prompt": "x", "size": "0x64"}, "size", 400),
    ({"prompt": "x", "response_format": "url"}, "response_format", 400),
    ({"prompt": "x", "stream": "yes"}, "stream", 400), ({"prompt": "x", "partial_images": 4}, "partial_images", 400),
    ({"prompt": "x", "steps": 2.5}, "steps", 400), ({"prompt": "x", "latency_budget": -1}, "latency_budget", 400),
    ({"prompt": "x", "style_preset": "anime"}, "style_preset", 400), ({"prompt": "x", "model": "dall-e-2"}, "model", 404),
    ({"prompt": "x", "seed": 2**63 - 1, "n": 2}, "seed", 400), ({"prompt": "x", "background": "transparent"}, "background", 400),
    ({"prompt": "\ud800"}, "prompt", 400), ({"prompt": "x", "\udfff": 1}, "body", 400),
])
def test_bad_bodies_are_named(body, param, status):
    with pytest.raises(ApiError) as caught:
        images_call(body, "small")
    error = caught.value.body()["error"]
    assert caught.value.status == status and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_bodies_that_are_not_json_are_400():
    for raw in (b"{", b"\xff\xfe", b"[" * 100_000, b'{"n": ' + b"1" * 5000 + b"}"):
        with pytest.raises(ApiError) as caught:
            parse_json(raw)
        assert caught.value.status == 400


def test_previews_are_evenly_spaced_over_the_steps_the_device_holds():
    assert preview_steps(2, 10, 20) == (10, 15)  # the handoff at k = 10, then halfway; 20 is the image
    assert preview_steps(3, 10, 20) == (10, 13, 17)
    assert preview_steps(3, 0, 4) == (1, 2, 3)  # all on the device: step 0 is noise, not a preview
    assert preview_steps(3, 3, 4) == (3,)  # fewer steps than previews: what there is
    assert preview_steps(0, 2, 8) == ()
    call = images_call({"prompt": "x", "stream": True, "partial_images": 3}, "small")
    check_previews(call, 8, 4)
    with pytest.raises(ApiError, match="partial_images: at most 2 for 4 steps with 2 on the edge"):
        check_previews(call, 4, 2)


# --- against running services --------------------------------------------------------------------
class Stack:
    def __init__(self, edge, ue, http_port: int):
        self.edge, self.ue, self.http_port = edge, ue, http_port
        self.base = f"http://127.0.0.1:{http_port}"

    def client(self, token: str = "tok-alice", **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=token, max_retries=0, **options)

    def metric(self, name: str, labels: str = "", default: float | None = 0.0, of=None) -> float:
        return metric_value((of or self.ue).metrics(), name, labels, default)


@pytest.fixture(scope="module")
def stack(tiny_packs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    http_port = free_port()
    with edge_server(tiny_packs["large"], tmp) as edge, \
            device_service(tiny_packs["small"], tmp, "--edge", edge.address, "--tokens", str(tokens),
                           "--http-port", str(http_port), "--http-max-images-per-user", "3") as ue:
        yield Stack(edge, ue, http_port)


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


@on_the_stack
def test_generate_returns_pngs_of_the_requested_size(stack):
    result = stack.client().images.generate(model="small", prompt=PROMPT, size="48x32", extra_body=FAST)
    (image,) = [_png(d.b64_json) for d in result.data]
    assert image.format == "PNG" and image.size == (48, 32) and image.mode == "RGB"
    (made,) = result.model_extra["tandem"]
    assert made["edge_steps"] == 2 and made["device_steps"] == 2 and made["fallback"] is None
    models = stack.client().models.list()
    assert [m.id for m in models.data] == ["small", "tandem"]
    with urllib.request.urlopen(f"{stack.base}/health", timeout=10) as response:  # no token: health is exempt
        assert json.load(response) == {"status": "SERVING"}


@on_the_stack
def test_n_images_are_different_and_batched_on_the_edge(stack):
    def batches_of_two() -> float:
        text = stack.edge.metrics()
        return metric_value(text, "tandem_edge_batch_size_bucket", 'le="2.5"') - \
            metric_value(text, "tandem_edge_batch_size_bucket", 'le="1.5"')

    before = batches_of_two()
    result = stack.client().images.generate(prompt=PROMPT, n=2, size="32x32", extra_body={"steps": 6, "split": 4,
                                                                                         "seed": 3})
    first, second = (_png(d.b64_json) for d in result.data)
    assert first.size == second.size == (32, 32) and first.tobytes() != second.tobytes()
    assert [made["seed"] for made in result.model_extra["tandem"]] == [3, 4]
    assert batches_of_two() > before  # the two edge rounds shared UNet calls


@on_the_stack
def test_streaming_yields_the_previews_then_the_image(stack):
    fields = {"steps": 8, "split": 4, "seed": 5}
    events = list(stack.client().images.generate(prompt=PROMPT, size="32x32", stream=True, partial_images=2,
                                                 extra_body=fields))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(_png(e.b64_json).size == (32, 32) for e in events)
    assert events[-1].model_extra["tandem"]["previews"]["steps"] == [4, 6]
    # previews read the trajectory without changing it: the same image as without them
    plain = stack.client().images.generate(prompt=PROMPT, size="32x32", extra_body=fields)
    assert base64.b64decode(events[-1].b64_json) == base64.b64decode(plain.data[0].b64_json)
    # partial_images=0: the completed image alone
    events = list(stack.client().images.generate(prompt=PROMPT, size="32x32", stream=True, extra_body=FAST))
    assert [e.type for e in events] == ["image_generation.completed"]


@on_the_stack
def test_the_http_image_is_the_clis(stack, tmp_path, capsys):
    out = tmp_path / "cli.png"
    argv = ["generate", PROMPT, "--ue", stack.ue.address, "--token", "tok-alice", "--steps", "6", "--split", "3",
            "--seed", "11", "--size", "32", "--guidance", "2.5", "--codec", "fp32", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    result = stack.client().images.generate(prompt=PROMPT, size="32x32", extra_body={
        "steps": 6, "split": 3, "seed": 11, "guidance_scale": 2.5, "codec": "fp32"})
    assert base64.b64decode(result.data[0].b64_json) == out.read_bytes()


@pytest.mark.parametrize("flags, body", [
    (["--steps", "6", "--split", "9"], {"steps": 6, "split": 9}),
    (["--steps", "0"], {"steps": 0}),
    (["--guidance", "0.5"], {"guidance_scale": 0.5}),
    (["--merge-ratio", "2"], {"merge_ratio": 2.0}),
    (["--seed", "-1"], {"seed": -1}),
    (["--size", "4"], {"size": "4x4"}),
    (["--latency-budget", "-1"], {"latency_budget": -1}),
])
@on_the_stack
def test_bad_values_get_the_clis_message(stack, flags, body, capsys, tmp_path):
    assert cli.main(["generate", PROMPT, "--ue", stack.ue.address, "--out", str(tmp_path / "x.png"), *flags]) == 2
    cli_says = capsys.readouterr().err.strip().removeprefix("tandem: error: ")
    with pytest.raises(openai.BadRequestError) as caught:
        stack.client().images.generate(prompt=PROMPT, extra_body=body)
    http_says = caught.value.body["message"]
    assert http_says.split(": ", 1)[1] == cli_says.split(": ", 1)[1], (http_says, cli_says)
    assert caught.value.body["param"] == http_says.split(": ", 1)[0]


@on_the_stack
def test_errors_raise_the_matching_openai_exception(stack):
    client = stack.client()
    cases = [
        (openai.BadRequestError, 400, "size", dict(size="256x256")),  # past the edge's served sides (8..64)
        (openai.BadRequestError, 400, "response_format", dict(response_format="url")),
        (openai.BadRequestError, 400, "lora", dict(extra_body={"lora": "alice"})),  # the tiny pack has no LoRAs
        (openai.NotFoundError, 404, "model", dict(model="dall-e-3")),
        (openai.BadRequestError, 400, "latency_budget", dict(extra_body={"latency_budget": 2.0})),  # no --scheduler
    ]
    for kind, status, param, options in cases:
        with pytest.raises(kind) as caught:
            client.images.generate(prompt=PROMPT, **options)
        assert caught.value.status_code == status and caught.value.body["param"] == param
    with pytest.raises(openai.AuthenticationError):
        stack.client("tok-mallory").images.generate(prompt=PROMPT, extra_body=FAST)
    with pytest.raises(openai.PermissionDeniedError, match="the token is 'alice'"):
        client.images.generate(prompt=PROMPT, user="bob", extra_body=FAST)
    with pytest.raises(openai.APIStatusError) as caught:
        client.images.generate(prompt="a " * 40_000)  # 80 kB: refused before it is read
    assert caught.value.status_code == 413
    # 429: the caller's quota (3 images in flight here) while 2 of theirs are being made
    slow = threading.Thread(target=lambda: client.images.generate(prompt=PROMPT, n=2, size="32x32",
                                                                  extra_body={"steps": 150, "split": 0}))
    slow.start()
    try:
        _wait(lambda: stack.metric("tandem_ue_http_in_flight") >= 1)
        time.sleep(0.3)  # past its checks: its 2 images hold the quota while their 150 steps run
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(prompt=PROMPT, n=2, extra_body=FAST)
        assert caught.value.body["code"] == "quota_exceeded"
        stack.client("tok-bob").images.generate(prompt=PROMPT, extra_body=FAST)  # another caller still may
    finally:
        slow.join()
    text = stack.ue.metrics()
    for status in ("400", "401", "403", "404", "413", "429"):
        assert metric_value(text, "tandem_ue_http_requests_total", f'route="/v1/images/generations",status="{status}"') >= 1


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@on_the_stack
def test_a_client_that_leaves_mid_stream_stops_the_work(stack):
    """Measured as on the gRPC path: the image is counted cancelled, at most one device step runs
    after the cancel, no device step is counted as an image's, and nothing is left in flight."""
    steps, cancelled, after = (stack.metric(n, lb) for n, lb in (
        ("tandem_ue_steps_total", ""), ("tandem_ue_http_images_total", 'outcome="cancelled"'),
        ("tandem_ue_steps_after_cancel_total", "")))
    stream = stack.client().images.generate(prompt=PROMPT, size="32x32", stream=True, partial_images=3,
                                            extra_body={"steps": 200, "split": 2})
    first = next(iter(stream))
    assert first.type == "image_generation.partial_image"
    began = time.monotonic()
    stream.close()
    _wait(lambda: stack.metric("tandem_ue_http_images_total", 'outcome="cancelled"') == cancelled + 1)
    stopped_s = time.monotonic() - began
    assert stack.metric("tandem_ue_steps_after_cancel_total") - after <= 1
    assert stack.metric("tandem_ue_steps_total") == steps  # the 198 device steps never all ran
    _wait(lambda: stack.metric("tandem_ue_http_in_flight") == 0)
    assert stopped_s < 10
    # the device is free: the next image is made at once
    stack.client().images.generate(prompt=PROMPT, size="32x32", extra_body=FAST)


@on_the_stack
def test_a_client_that_leaves_during_the_edge_round_frees_the_edge_slot(stack):
    cancelled = stack.metric("tandem_edge_requests_total", 'code="CANCELLED"', of=stack.edge)
    with pytest.raises(openai.APITimeoutError):
        stack.client(timeout=0.5).images.generate(prompt=PROMPT, size="32x32", extra_body={"steps": 200, "split": 200})
    _wait(lambda: stack.metric("tandem_edge_requests_total", 'code="CANCELLED"', of=stack.edge) == cancelled + 1)
    _wait(lambda: stack.metric("tandem_edge_running_requests", of=stack.edge) == 0
          and stack.metric("tandem_edge_queue_depth", of=stack.edge) == 0)
    _wait(lambda: stack.metric("tandem_ue_http_in_flight") == 0)


# --- fuzz: 1,000 bodies and headers, each a 4xx in OpenAI's shape ------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
# Each is refused whatever else the body holds, so no fuzzed body ever costs an image.
_POISON = st.sampled_from([
    ("n", -1), ("n", 0), ("n", 10**30), ("n", "2"), ("size", "99999x99999"), ("size", "0x0"), ("size", "64x64x64"),
    ("size", 64), ("steps", "abc"), ("steps", -3), ("steps", 10**400), ("split", 10**6), ("seed", -1),
    ("guidance_scale", 1e308), ("guidance_scale", "nan"), ("merge_ratio", 99.0), ("codec", "x" * 100_00),
    ("sampler", "🙂" * 500), ("prompt", "x" * 5000), ("prompt", ""), ("prompt", ["a"]), ("response_format", "url"),
    ("partial_images", -1), ("partial_images", 99), ("model", "dall-e-3"), ("model", 7), ("latency_budget", -5),
    ("lora", "not a name"), ("user", "u" * 300), ("stream", "true"), ("unknown_" + "z" * 200, 1),
    ("output_compression", 50), ("background", "transparent"), ("prompt", "\ud800"), ("\udfff", 1),
    ("user", "a\udc00"),
])
_RAW = st.sampled_from([
    b"", b"{", b"null", b"[]", b'"prompt"', b"NaN", b'{"prompt": NaN, "n": -Infinity}', b"[" * 50_000,
    b'{"n": ' + b"9" * 5000 + b"}", b"\xff\xfe\x00", b'{"prompt": "a", "n": 1e999999}', b"x" * 70_000,
])
_HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=300)


@st.composite
def _requests(draw):
    if draw(st.booleans()):
        body = draw(st.dictionaries(st.sampled_from(["prompt", "n", "size", "steps", "seed", "stream", "user",
                                                     "partial_images", "model", "extra"]), _json, max_size=5))
        key, value = draw(_POISON)
        body[key] = value
        raw = json.dumps(body).encode()
    else:
        raw = draw(_RAW)
    kind = draw(st.integers(0, 9))  # mostly a good token, so that the bodies are what is refused
    auth = None if kind == 0 else "Bearer " + draw(_HEADER_VALUE) if kind == 1 else \
        "Bearer tok-bob" if kind == 2 else "Bearer tok-alice"
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"]))}
    if auth is not None:
        headers["Authorization"] = auth
    for name in draw(st.lists(st.sampled_from(["X-Stainless-Lang", "OpenAI-Organization", "Accept", "User-Agent",
                                               "X-Junk"]), max_size=3, unique=True)):
        headers[name] = draw(_HEADER_VALUE)
    return raw, headers


class _Connection:
    """One keep-alive connection, opened again when the server closed it (a 413 before the body)."""

    def __init__(self, port: int):
        self.port, self.conn = port, http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, raw: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                self.conn.request("POST", "/v1/images/generations", body=raw, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.conn.close()
                return response.status, data
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")


@pytest.mark.slow  # 1,000 requests: about 45 s on 2 busy cores
@on_the_stack
def test_fuzzed_bodies_and_headers_are_4xx_in_openais_shape(stack):
    connection = _Connection(stack.http_port)
    answered: dict[int, int] = {}
    for _ in range(20):  # warm: the RSS baseline after the first answers' allocations
        connection.post(b"{}", {"Authorization": "Bearer tok-alice"})
    before = rss_bytes(stack.ue.proc)
    images_before = stack.metric("tandem_ue_http_images_total", 'outcome="completed"')

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_requests())
    def answered_in_shape(request):
        raw, headers = request
        status, data = connection.post(raw, headers)
        answered[status] = answered.get(status, 0) + 1
        assert 400 <= status < 500, (status, data[:300], raw[:200], headers)
        error = json.loads(data)["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
        assert len(data) < 4096  # echoed values are capped

    answered_in_shape()
    assert sum(answered.values()) >= 1000 and set(answered) <= {400, 401, 403, 404, 413}, answered
    assert stack.metric("tandem_ue_http_images_total", 'outcome="completed"') == images_before  # no fuzz made an image
    grown = rss_bytes(stack.ue.proc) - before
    print(f"fuzz: statuses {dict(sorted(answered.items()))}, device RSS {grown / 2**20:+.1f} MiB")
    assert grown < 64 * 2**20, "RSS grew past 64 MiB over 1,000 refused requests"
    with urllib.request.urlopen(f"{stack.base}/health", timeout=10) as response:
        assert json.load(response) == {"status": "SERVING"}
    _wait(lambda: stack.metric("tandem_ue_http_in_flight") == 0, 10)  # the last answer's bookkeeping, after its bytes


# --- 503 while the pack loads and while draining; 429 when the edge refuses for load ---------------
@pytest.mark.slow  # three service starts and a pack load held on purpose: ~19 s on 2 idle cores
def test_loading_busy_edge_plan_and_draining(tiny_packs, tmp_path):
    """One device whose pack loads slowly: 503 (pack_loading) and health NOT_SERVING until it is
    up; an edge that takes one stream per caller: n=2 is a 429 (edge_busy); a latency_budget is
    planned by the device's --scheduler (and a budget it refuses is a 400 naming the field); at
    SIGTERM a new request is a 503 (draining) while the one in flight finishes, then the process
    ends cleanly."""
    port, http_port = free_port(), free_port()
    with edge_server(tiny_packs["large"], tmp_path, "--max-streams-per-user", "1") as edge, \
            scheduler_service(tmp_path) as scheduler:
        slow = ("import time, tandem.packs as p; load = p.load_pack; "
                "p.load_pack = lambda *a, **k: (time.sleep(4), load(*a, **k))[1]; "
                "import services.ue_client.server as s; s.load_pack = p.load_pack; "
                f"raise SystemExit(s.main(['--pack', {str(tiny_packs['small'])!r}, '--device', 'cpu', "
                f"'--port', '{port}', '--metrics-port', '0', '--http-port', '{http_port}', "
                f"'--edge', '{edge.address}', '--scheduler', '{scheduler.address}']))")
        proc = subprocess.Popen([sys.executable, "-c", slow], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="any", max_retries=0)
        try:
            seen_loading = False
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5):
                        break  # SERVING
                except urllib.error.HTTPError as exc:
                    assert exc.code == 503 and json.load(exc) == {"status": "NOT_SERVING"}
                    if not seen_loading:
                        with pytest.raises(openai.InternalServerError) as caught:
                            client.images.generate(prompt=PROMPT)
                        assert caught.value.status_code == 503 and caught.value.body["code"] == "pack_loading"
                        seen_loading = True
                except (urllib.error.URLError, ConnectionError):
                    pass  # not listening yet
                time.sleep(0.1)
            assert seen_loading

            with pytest.raises(openai.RateLimitError) as caught:
                client.images.generate(prompt=PROMPT, n=2, size="32x32", extra_body={"steps": 8, "split": 6})
            assert caught.value.body["code"] == "edge_busy"

            planned = client.images.generate(prompt=PROMPT, size="32x32", extra_body={"latency_budget": 30.0})
            (made,) = planned.model_extra["tandem"]
            assert made["plan"]["id"] and made["plan"]["meets_budget"] and made["steps"] >= 1
            with pytest.raises(openai.BadRequestError) as caught:
                client.images.generate(prompt=PROMPT, extra_body={"latency_budget": 1e9})
            assert caught.value.body["param"] == "latency_budget"

            finished: dict = {}
            long = threading.Thread(target=lambda: finished.update(r=client.images.generate(
                prompt=PROMPT, size="32x32", extra_body={"steps": 120, "split": 0})))
            long.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(openai.InternalServerError) as caught:
                client.images.generate(prompt=PROMPT, extra_body=FAST)
            assert caught.value.status_code == 503 and caught.value.body["code"] == "draining"
            long.join(60)
            assert len(finished["r"].data) == 1  # the one in flight finished
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            output = proc.communicate()[0]
    assert "device service stopped" in output, output[-2000:]


def test_approximate_previews_are_fitted_to_the_packs_vae(small_pack):
    """The first preview is the VAE's own (and the first fit's data); later ones are the linear
    map, the size of the image, and close to the VAE's picture of the same x̂0."""
    import numpy as np

    from services.ue_client.previews import ApproxDecoder, VaeDecoder
    from tandem.pipeline import decode, run_steps, start
    from tandem.request import GenerationRequest

    state = start(small_pack, GenerationRequest(PROMPT, steps=6, split=0, height=32, width=48, guidance_scale=3.0))
    run_steps(small_pack, state, 3)
    approx, vae = ApproxDecoder(small_pack), VaeDecoder(small_pack)
    assert np.array_equal(approx(state), vae(state)) and approx.weights() is not None  # nothing learned yet
    run_steps(small_pack, state, 6)
    final = decode(small_pack, state.latent)
    approx.learn(state.latent, final)
    approx.learn(state.latent, final)
    preview = approx(state)
    assert preview.shape == final.shape == (32, 48, 3) and preview.dtype == np.uint8
    # a linear fit of the VAE: the mean colour of the image within a few levels
    assert np.abs(preview.astype(float).mean(axis=(0, 1)) - final.astype(float).mean(axis=(0, 1))).max() < 8
