"""A service's warm-up (tandem.pipeline.warm_up) runs one request's work and changes nothing a
later request sees: the same image, the same user state, the text encoder let go when transient."""

from __future__ import annotations

import numpy as np

from tandem.packs import load_pack
from tandem.pipeline import HybridPipeline, warm_up
from tandem.request import GenerationRequest


def _image(large, small) -> np.ndarray:
    request = GenerationRequest("a green square at the top on a black background", steps=6, split=3, seed=11,
                                guidance_scale=large.manifest.default_guidance,
                                height=large.default_image_size, width=large.default_image_size)
    return HybridPipeline(large, small).generate(request).image


def test_warm_up_leaves_every_later_image_unchanged(tiny_packs):
    cold = _image(load_pack(tiny_packs["large"], device="cpu"), load_pack(tiny_packs["small"], device="cpu"))
    large, small = load_pack(tiny_packs["large"], device="cpu"), load_pack(tiny_packs["small"], device="cpu")
    warm_up(small)
    warm_up(large)
    assert np.array_equal(_image(large, small), cold)


def test_warm_up_lets_a_transient_text_encoder_go(tiny_packs):
    small = load_pack(tiny_packs["small"], device="cpu", transient_text=True)
    warm_up(small)
    assert small.transient_text and small.text is None


def test_the_device_service_warms_up_unless_told_not_to(monkeypatch):
    from services.ue_client.server import parse_args

    assert parse_args([]).warm_up is True and parse_args(["--no-warm-up"]).warm_up is False
    monkeypatch.setenv("TANDEM_UE_WARM_UP", "0")
    assert parse_args([]).warm_up is False
