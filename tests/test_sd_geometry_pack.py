"""The SD-geometry systems pack: Stable Diffusion 1.5's latent geometry (512 px, 4×64×64, /8) with
tiny random UNets, so handoffs have SD's real byte sizes."""

from __future__ import annotations

import pytest

from tandem.codec.spec import CodecSpec, handoff_tensor_bytes
from tandem.packs import check_pair, load_pack
from tandem.pipeline import HybridPipeline
from tandem.request import GenerationRequest
from tandem.tiny_pack import build_sd_geometry_pair


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    large, small = build_sd_geometry_pair(tmp_path_factory.mktemp("sd"))
    edge, device = load_pack(large, device="cpu"), load_pack(small, device="cpu")
    check_pair(edge, device)
    return HybridPipeline(edge, device)


def test_it_has_stable_diffusions_geometry_and_says_what_it_is(sd_pipeline):
    edge = sd_pipeline.edge
    assert edge.default_image_size == 512 and edge.latent_shape(512, 512) == (4, 64, 64)
    assert edge.manifest.random and edge.name.startswith("sd-geometry-random")


# Two tensors (x_k and x̂0) of 4×kept values (+ 4 fp32 scales each for int8) + the merge plan's
# 4-bit code per src token (3,072 src tokens in 64×64).
@pytest.mark.parametrize("encoding,ratio,nbytes", [("fp16", 0.0, 2 * 4 * 4096 * 2),
                                                   ("fp16", 0.5, 2 * 4 * 2048 * 2 + 1536),
                                                   ("int8", 0.75, 2 * (16 + 4 * 1024) + 1536)])
def test_handoffs_have_sd_byte_sizes(sd_pipeline, encoding, ratio, nbytes):
    spec = CodecSpec(encoding, ratio)
    result = sd_pipeline.generate(GenerationRequest("a cat", steps=2, split=1, height=512, width=512,
                                                    guidance_scale=3.0), spec)
    tensors = handoff_tensor_bytes(4, 64, 64, spec)
    assert tensors == nbytes
    assert tensors < result.handoff_bytes < tensors + 1500  # + the header
    assert result.image.shape == (512, 512, 3)
