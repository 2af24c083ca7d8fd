"""Cost models: handoff bytes (formula and the real encoder), channel, energy, JSON, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from services.scheduler.decide.costs import (
    ChannelConfig,
    CostProfile,
    CostProfileError,
    DeviceClass,
    EdgeCoefficients,
    LatentShape,
    cpu_energy_j,
    device_energy_j,
    handoff_bytes,
    path_loss_db,
    sample_spectral_efficiency,
    shannon_rate_bps,
    snr_linear,
    transfer_seconds,
)


def test_nothing_is_sent_when_every_step_runs_on_the_device():
    assert handoff_bytes(LatentShape(4, 64, 64), "fp16", 0.0, 20, 0) == 0


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 7, 9), (4, 16, 16), (4, 64, 64)])
@pytest.mark.parametrize("steps,split", [(10, 5), (20, 1), (25, 25)])
def test_predicted_handoff_bytes_equal_the_real_payload(codec, ratio, shape, steps, split):
    """No fitted term: the scheduler's prediction is the encoder's byte count, for every
    encoding x merge ratio x latent shape (and T, k)."""
    torch = pytest.importorskip("torch")
    from tandem.handoff import CodecSpec, Handoff, encode_handoff
    from tandem.request import GenerationRequest
    from tandem.sampling.schedule import make_schedule
    from tandem.tiny_pack import SD_SAMPLER_CONFIG

    c, h, w = shape
    g = torch.Generator().manual_seed(0)
    schedule = make_schedule("dpmpp_2m", steps, SD_SAMPLER_CONFIG)
    clean = torch.randn(shape, generator=g)
    latent = schedule.signal[split] * clean + schedule.noise[split] * torch.randn(shape, generator=g)
    request = GenerationRequest("a prompt of any length, which no longer travels in the handoff", steps=steps,
                                split=split, sampler="dpmpp_2m", seed=12345, height=h * 8, width=w * 8)
    real = len(encode_handoff(Handoff(request, schedule, split, latent, clean), CodecSpec(codec, ratio)))
    assert handoff_bytes(LatentShape(c, h, w), codec, ratio, steps, split) == real


def test_shannon_channel_is_sane():
    cfg = ChannelConfig()
    assert path_loss_db(1.0) == pytest.approx(128.1)
    assert path_loss_db(0.1) == pytest.approx(128.1 - 37.6)
    near, far = snr_linear(0.05, cfg), snr_linear(1.5, cfg)
    assert near > far > 0
    # capped at 5.5 b/s/Hz close to the base station, positive far away
    assert shannon_rate_bps(20e6, near, cfg) == pytest.approx(5.5 * 20e6)
    assert 0 < shannon_rate_bps(10e6, far, cfg) < 5.5 * 10e6
    # 20 MHz at 200 m: tens to a hundred Mb/s
    assert 50e6 < shannon_rate_bps(20e6, snr_linear(0.2, cfg), cfg) <= 110e6 + 1
    se = sample_spectral_efficiency(np.random.default_rng(0), np.full(2000, 0.5), cfg)
    assert cfg.min_spectral_efficiency <= se.min() and se.max() <= cfg.max_spectral_efficiency
    assert 0.5 < np.median(se) <= 5.5 and se.min() < 2.0  # fading reaches deep fades


def test_transfer_and_energy_arithmetic():
    assert transfer_seconds(125_000, 1e6, 0.02) == pytest.approx(1.0 + 0.02)
    assert transfer_seconds(0, 1e6, 0.02) == 0.0
    assert device_energy_j(5.0, 2.0) == pytest.approx(10.0)
    assert cpu_energy_j(1e9, 2e9, 1e-28) == pytest.approx(1e-28 * 1e9 * 4e18)
    dev = DeviceClass(step_s=0.5, decode_s=1.0, power_w=4.0)
    assert dev.compute_seconds(10) == pytest.approx(6.0)
    assert dev.energy_j(10) == pytest.approx(24.0)
    edge = EdgeCoefficients(0.02, 0.01)
    assert edge.step_seconds(8) == pytest.approx(0.1)
    assert edge.per_request_step_seconds(8) == pytest.approx(0.0125)


def test_cost_profile_json_round_trip(tmp_path):
    profile = CostProfile()
    path = tmp_path / "costs.json"
    profile.save(path)
    back = CostProfile.load(path)
    assert back == profile
    assert back.synthetic
    with pytest.raises(CostProfileError, match="format"):
        CostProfile.from_dict({"format": "something else", "version": 1})
    bad = profile.to_dict()
    del bad["devices"]
    with pytest.raises(CostProfileError, match="malformed"):
        CostProfile.from_dict(bad)
    with pytest.raises(CostProfileError, match="no device class"):
        profile.device("toaster")
