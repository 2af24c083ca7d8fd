"""A device that loads only what it runs (issue 18): the VAE's decoder without its encoder, the
text encoder only when a prompt is encoded, the same images as a pack loaded in full, and
--offload refused in one line where there is no CUDA GPU; with --compact-weights, fp16-stored
weights held as stored and widened layer by layer, the same images."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.packs import DEMO_PACK, PackError, load_pack
from tandem.pipeline import HybridPipeline, PhaseTimer, encode_prompt, finish_on_device
from tandem.request import GenerationRequest
from tandem.sampling.denoise import DenoiseState, initial_latent
from tandem.sampling.schedule import make_schedule

PROMPT = "a red circle at the left on a blue background"
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


def full_vae(pack):
    """The VAE as diffusers loads it whole (encoder included): the reference for the lean one."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(pack.root / pack.manifest.components.get("vae", "vae"),
                                         torch_dtype=pack.dtype).eval()


@pytest.fixture(scope="module")
def demo():
    return load_pack(DEMO_PACK / "large", device="cpu"), load_pack(DEMO_PACK / "small", device="cpu")


def test_the_device_holds_no_vae_encoder_and_no_text_encoder_until_it_encodes_a_prompt(demo):
    _, small = demo
    names = [name for name, _ in small.vae.named_parameters()]
    assert names and all(name.startswith(("decoder.", "post_quant_conv.")) for name in names)
    assert not hasattr(small.vae, "encoder") and small.vae.config.latent_channels == 4
    assert small.vae_scale_factor == 8 and small.latent_shape(64, 64) == (4, 8, 8)
    full = sum(p.numel() for p in full_vae(small).parameters())
    assert sum(p.numel() for p in small.vae.parameters()) < 0.7 * full  # the encoder was ~38% of it

    assert small.text is not None  # loaded with the pack by default: a broken one fails at startup
    fresh = load_pack(DEMO_PACK / "small", device="cpu", lazy_text=True)
    assert fresh.text is None  # nothing loaded it yet
    request = GenerationRequest(PROMPT, steps=6, split=3, guidance_scale=4.0, height=64, width=64)
    guidance = encode_prompt(demo[1], request.prompt, request.negative_prompt, request.guidance_scale)
    schedule = make_schedule(request.sampler, request.steps, fresh.sampler_config)
    state = DenoiseState(schedule=schedule, step=0, latent=initial_latent(request.seed, (4, 8, 8), schedule),
                         guidance=guidance)
    image = finish_on_device(fresh, state, request.steps, PhaseTimer())  # embeddings given: steps + decode
    assert image.shape == (64, 64, 3) and fresh.text is None
    again = encode_prompt(fresh, request.prompt, request.negative_prompt, request.guidance_scale)
    assert fresh.text is not None and torch.equal(again.cond, guidance.cond)


@pytest.mark.parametrize("split, user", [(10, "alice"), (0, "bob"), (20, None)])
def test_lean_packs_make_the_same_images_bit_for_bit_as_packs_loaded_in_full(demo, split, user):
    large, small = demo
    request = GenerationRequest(PROMPT, steps=20, split=split, seed=7, guidance_scale=4.0, height=64, width=64,
                                user=user)
    lean = HybridPipeline(large, small).generate(request).image
    whole = HybridPipeline(dataclasses.replace(large, vae=full_vae(large)),
                           dataclasses.replace(small, vae=full_vae(small))).generate(request).image
    assert lean.dtype == np.uint8 and np.array_equal(lean, whole)


def test_a_vae_file_the_lean_reader_cannot_match_loads_in_full_and_still_drops_the_encoder(tmp_path, tiny_packs):
    """An extra tensor in the file (as an older layout's key names would be) fails the strict
    decoder load; diffusers' own loader then reads it, and the encoder is dropped after."""
    pack = tmp_path / "pack"
    shutil.copytree(tiny_packs["large"], pack)
    weights = pack / "vae" / VAE_WEIGHTS
    state = load_file(weights)
    save_file({**state, "decoder.unused_by_the_model": torch.zeros(2)}, weights)
    odd = load_pack(pack, device="cpu")
    plain = load_pack(tiny_packs["large"], device="cpu")
    assert not hasattr(odd.vae, "encoder")
    assert odd.vae.state_dict().keys() == plain.vae.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(odd.vae.state_dict().values(), plain.vae.state_dict().values()))


def test_a_truncated_vae_file_is_a_pack_error_naming_it(tmp_path, tiny_packs):
    pack = tmp_path / "pack"
    shutil.copytree(tiny_packs["large"], pack)
    weights = pack / "vae" / VAE_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PackError, match=f"{VAE_WEIGHTS}: unreadable safetensors file"):
        load_pack(pack, device="cpu")


def test_offloaded_packs_take_loras_and_make_the_same_images(demo):
    """accelerate's CPU offload, run here with the CPU as the execution device (no GPU on this
    machine; --offload itself asks for CUDA): the weights leave the modules, every layer gets them
    back as it runs, a user's LoRA loads into an offloaded UNet, and the images do not change."""
    from accelerate import cpu_offload

    large, _ = demo
    offloaded = load_pack(DEMO_PACK / "small", device="cpu")
    for module in (offloaded.unet, offloaded.vae):
        cpu_offload(module, execution_device=offloaded.device)
    offloaded.offload = True
    assert {p.device.type for p in offloaded.unet.parameters()} == {"meta"}
    plain = load_pack(DEMO_PACK / "small", device="cpu")
    for user in ("alice", None, "bob"):
        request = GenerationRequest(PROMPT, steps=8, split=4, seed=3, guidance_scale=4.0, height=64, width=64,
                                    user=user)
        image = HybridPipeline(large, offloaded).generate(request).image
        assert np.array_equal(image, HybridPipeline(large, plain).generate(request).image), user
    assert {p.device.type for p in offloaded.unet.parameters()} == {"meta"}  # offloaded again after the LoRAs


def test_offload_without_a_cuda_gpu_is_one_clear_error(tiny_packs):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: offload is allowed here")
    with pytest.raises(PackError, match="--offload needs a CUDA GPU .*the device is cpu"):
        load_pack(tiny_packs["small"], device="cpu", offload=True)
    with pytest.raises(PackError, match="--offload needs a CUDA GPU .*this machine has no CUDA GPU"):
        load_pack(tiny_packs["small"], device="cuda", offload=True)


def test_the_device_service_refuses_offload_without_cuda_in_one_line(tiny_packs):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: offload is allowed here")
    import os
    import subprocess
    import sys

    from service_procs import ROOT, free_port

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "services.ue_client", "--pack", str(tiny_packs["small"]),
                             "--device", "cpu", "--offload", "--port", str(free_port()), "--metrics-port", "0"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "tandem-ue: error" in line]
    assert len(lines) == 1 and "--offload needs a CUDA GPU" in lines[0] and "the device is cpu" in lines[0], output


def test_compact_weights_hold_the_stored_fp16_and_make_the_same_images_bit_for_bit(demo):
    """--compact-weights: the demo pack's files are fp16 and a CPU computes in fp32, so the
    weights stay fp16 in memory (every value came from fp16: widening is exact) and each layer is
    widened only while it runs. Users' LoRAs load into the compact UNet and compute in fp32."""
    large, plain = demo
    compact = load_pack(DEMO_PACK / "small", device="cpu", compact=True)
    assert compact.compact == {"unet": torch.float16, "vae": torch.float16, "text_encoder": torch.float16}

    def held(module):  # the base weights' bytes (the shared fixture may hold users' LoRAs already)
        return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if "lora_" not in n)

    for name in ("unet", "vae", "text_encoder"):
        small, whole = held(getattr(compact, name)), held(getattr(plain, name))
        assert 0.45 * whole < small < 0.55 * whole, name  # norms, biases and conv_in stay fp32
    assert all(p.dtype == torch.float32 for n, p in compact.unet.named_parameters() if "norm" in n or "conv_in" in n)
    for split, user in ((10, "alice"), (0, "bob"), (20, None), (14, None), (6, "alice")):
        request = GenerationRequest(PROMPT, steps=20, split=split, seed=5, guidance_scale=4.0, height=64, width=64,
                                    user=user)
        image = HybridPipeline(large, compact).generate(request).image
        assert np.array_equal(image, HybridPipeline(large, plain).generate(request).image), (split, user)
    lora = [p.dtype for n, p in compact.unet.named_parameters() if "lora_" in n]
    assert lora and set(lora) == {torch.float32}
    assert held(compact.unet) < 0.55 * held(plain.unet)  # the adapters did not widen the base weights


def test_compact_weights_leave_weights_stored_as_wide_as_they_compute_alone(tiny_packs):
    # the tiny packs are saved in fp32: narrowing them would lose bits, so nothing is compacted
    pack = load_pack(tiny_packs["small"], device="cpu", compact=True)
    assert pack.compact == {}
    assert {p.dtype for p in pack.unet.parameters()} == {torch.float32}


def test_compact_weights_and_offload_are_one_clear_error(tiny_packs):
    with pytest.raises(PackError, match="--offload and --compact-weights do not combine"):
        load_pack(tiny_packs["small"], device="cuda" if torch.cuda.is_available() else "cpu", offload=True,
                  compact=True)


def test_the_device_service_takes_compact_weights_from_its_flag_or_environment(monkeypatch):
    from services.ue_client.server import parse_args

    assert parse_args(["--compact-weights"]).compact_weights is True
    assert parse_args([]).compact_weights is False
    monkeypatch.setenv("TANDEM_UE_COMPACT_WEIGHTS", "1")
    assert parse_args([]).compact_weights is True
    assert parse_args(["--transient-text"]).transient_text is True and parse_args([]).transient_text is False
    monkeypatch.setenv("TANDEM_UE_TRANSIENT_TEXT", "yes")
    assert parse_args([]).transient_text is True


def test_a_device_service_with_compact_weights_makes_the_users_images(demo, tmp_path, capsys):
    """--compact-weights through the service: it loads the demo pack compact, warms every user's
    LoRA into it at startup, and makes a user's image on the device as an in-process device does
    (the service runs other CPU thread counts: equal up to float rounding, as in test_device_service)."""
    import json

    from PIL import Image
    from service_procs import device_service

    from services.cli import generate as cli

    large, plain = demo
    with device_service(DEMO_PACK / "small", tmp_path, "--compact-weights", "--transient-text") as ue:
        out = tmp_path / "x.png"
        assert cli.main(["generate", PROMPT, "--out", str(out), "--ue", ue.address, "--user", "alice", "--steps", "8",
                         "--split", "0", "--seed", "4", "--guidance", "4", "--json", "--quiet"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["mode"] == "device-service" and report["device_steps"] == 8
        # the flag reached load_pack: the service says which components it holds compact
        assert "weights held compact: unet, vae, text_encoder, text encoder held only while it encodes" in ue.log()
    request = GenerationRequest(PROMPT, steps=8, split=0, seed=4, guidance_scale=4.0, height=64, width=64,
                                user="alice")
    expected = HybridPipeline(large, plain).generate(request).image
    assert np.abs(np.asarray(Image.open(out)).astype(int) - expected.astype(int)).max() <= 1
