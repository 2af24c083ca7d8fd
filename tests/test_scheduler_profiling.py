"""The profiling command on tiny random packs: a loadable profile with the measured entries, and
handoff bytes that agree with the real encoder. No timing thresholds (a shared machine)."""

from __future__ import annotations

import json

import pytest

from services.scheduler.decide.costs import CostProfile
from services.scheduler.learn.profiling import main
from tandem.stats import fit_linear


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two OpenMP threads on two cores shared with other jobs run a step up to ~70x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def profiled(tiny_packs, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "tiny.json"
    code = main(["--large", str(tiny_packs["large"]), "--small", str(tiny_packs["small"]), "--device-class", "tiny-cpu",
                 "--out", str(out), "--device", "cpu", "--repeats", "1", "--warmup", "0", "--batches", "1,2", "--rtt",
                 "--threads", "1"])
    assert code == 0
    return out


def test_profile_loads_with_the_measured_entries_first(profiled):
    profile = CostProfile.load(profiled)
    assert not profile.synthetic
    assert next(iter(profile.devices)) == "tiny-cpu"
    assert {"phone", "laptop-gpu", "cpu"} <= set(profile.devices)  # the base profile's classes survive
    device = profile.device("tiny-cpu")
    assert device.step_s > 0 and device.decode_s > 0 and device.power_w > 0
    measured = json.loads(profiled.read_text())["measured"]
    edge = profile.edge_coefficients()  # the first edge pack: what the scheduler uses by default
    assert edge == profile.edge_coefficients(measured["edge"]["pack"])
    assert edge.a_s >= 0 and edge.b_s > 0 and profile.rtt_s > 0
    assert set(measured["edge"]["step_seconds"]) == {"1", "2"}
    assert measured["handoff"]["max_error_bytes"] == 0 and measured["handoff"]["payloads"] > 0
    assert measured["edge"]["traced"]  # timed as the edge server runs its UNet on a CPU
    # the round's fixed cost: the gRPC round trip, the edge's admission and its coalescing window
    assert measured["round_trip_s"] > 0 and measured["admission_s"] > 0 and measured["coalesce_s"] == 0.010
    assert profile.rtt_s == pytest.approx(measured["round_trip_s"] + measured["admission_s"] + 0.010)
    assert measured["rtt_s"] == profile.rtt_s


def test_the_edge_is_timed_eager_when_the_edge_runs_so(large_pack, monkeypatch):
    from services.scheduler.learn.profiling import measure_edge
    from tandem.traced import TRACED_ATTRIBUTE

    monkeypatch.delattr(large_pack.unet, TRACED_ATTRIBUTE, raising=False)
    eager = measure_edge(large_pack, (1, 2), repeats=1, warmup=0, log=lambda _: None, trace_unet=False)
    assert not eager.traced and not hasattr(large_pack.unet, TRACED_ATTRIBUTE)
    traced = measure_edge(large_pack, (1, 2), repeats=1, warmup=0, log=lambda _: None, trace_unet=True)
    assert traced.traced and getattr(large_pack.unet, TRACED_ATTRIBUTE).traced_shapes == 1


@pytest.mark.parametrize("codec, ratio, steps, split", [("fp16", 0.0, 20, 10), ("int8", 0.25, 12, 3),
                                                        ("fp32", 0.5, 25, 20)])
def test_profile_handoff_bytes_match_a_real_handoff(profiled, large_pack, codec, ratio, steps, split):
    from tandem.handoff import CodecSpec, encode_handoff
    from tandem.pipeline import make_handoff, run_steps, start
    from tandem.request import GenerationRequest

    size = large_pack.default_image_size
    request = GenerationRequest("a blue square at the top on a red background", steps=steps, split=split,
                                guidance_scale=large_pack.manifest.default_guidance, seed=5, height=size, width=size)
    state = start(large_pack, request)
    run_steps(large_pack, state, split)
    real = len(encode_handoff(make_handoff(state, request), CodecSpec(codec, ratio)))
    predicted = CostProfile.load(profiled).handoff_bytes(steps, split, codec, ratio)
    assert predicted == real


def test_linear_fit_recovers_a_line():
    a, b, r2 = fit_linear([1, 2, 4, 8], [0.5 + 0.25 * n for n in (1, 2, 4, 8)])
    assert a == pytest.approx(0.5) and b == pytest.approx(0.25) and r2 == pytest.approx(1.0)


def test_a_missing_pack_is_one_line(tmp_path, capsys):
    code = main(["--large", str(tmp_path / "nope"), "--small", str(tmp_path / "nope"), "--device-class", "x",
                 "--out", str(tmp_path / "p.json"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("profiling: error:")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("flag, value", [("--edge-coalesce-ms", "-1"), ("--edge-coalesce-ms", "nan"), ("--repeats", "0")])
def test_a_bad_flag_is_one_line_naming_it(flag, value, capsys):
    from services.scheduler.learn.profiling import parse_args

    with pytest.raises(SystemExit) as exited:
        parse_args(["--large", "l", "--small", "s", "--device-class", "c", "--out", "o.json", flag, value])
    assert exited.value.code == 2
    assert f"{flag}: out of range" in capsys.readouterr().err
