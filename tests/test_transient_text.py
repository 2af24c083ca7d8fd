"""A pack that holds its text encoder only while it encodes (load_pack(transient_text=True), the
device's --transient-text): the same images, and no text encoder held between encodings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tandem.packs import load_pack
from tandem.pipeline import HybridPipeline
from tandem.request import GenerationRequest
from tandem.tiny_pack import build_tiny_pack


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_pack(tmp_path_factory.mktemp("transient") / "pack")


def test_the_same_image_and_no_text_encoder_held_between_requests(tiny):
    held, transient = load_pack(tiny, device="cpu"), load_pack(tiny, device="cpu", transient_text=True)
    assert held.text is not None and transient.text is None  # checked at load, then let go
    request = GenerationRequest("a cat", steps=3, split=0, height=32, width=32, seed=4)
    images = [HybridPipeline(p, p).generate(request).image for p in (held, transient)]
    np.testing.assert_array_equal(*images)
    assert held.text is not None and transient.text is None


def test_concurrent_encodings_share_one_load_and_the_last_one_lets_it_go(tiny):
    pack = load_pack(tiny, device="cpu", transient_text=True, lazy_text=True)
    inside, release = threading.Barrier(2), threading.Event()
    seen = []

    def encode():
        with pack.encoding_text() as text:
            inside.wait(10)
            seen.append(text)
            release.wait(10)

    threads = [threading.Thread(target=encode) for _ in range(2)]
    for t in threads:
        t.start()
    while len(seen) < 2:
        threading.Event().wait(0.01)
    assert seen[0] is seen[1] and pack.text is seen[0]  # one load for both
    release.set()
    for t in threads:
        t.join(10)
    assert pack.text is None
