"""Model packs: local diffusers layouts, pairing rules, users' LoRAs, clear failures."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from types import SimpleNamespace

import pytest
import torch

from tandem.packs import PackError, PackMismatchError, check_pair, load_pack
from tandem.pipeline import run_steps, start
from tandem.request import GenerationRequest, RequestError
from tandem.tiny_pack import SD_SAMPLER_CONFIG, build_tiny_pack


def test_tiny_pack_properties(large_pack):
    assert large_pack.latent_channels == 4
    assert large_pack.vae_scale_factor == 4
    assert large_pack.latent_shape(32, 32) == (4, 8, 8)
    assert large_pack.default_image_size == 32
    assert large_pack.device.type == "cpu" and large_pack.dtype == torch.float32
    with pytest.raises(RequestError, match="height: image size 30x32 must be a multiple of 4"):
        large_pack.latent_shape(30, 32)


def test_shared_components_pair_up(large_pack, small_pack):
    check_pair(large_pack, small_pack)
    params = lambda pack: sum(p.numel() for p in pack.unet.parameters())  # noqa: E731
    assert params(small_pack) * 3 < params(large_pack)


def test_mismatched_noise_process_is_refused_by_name(large_pack):
    other = dataclasses.replace(large_pack, name="other", sampler_config=dict(SD_SAMPLER_CONFIG, beta_schedule="linear"))
    with pytest.raises(PackMismatchError, match="beta_schedule differs"):
        check_pair(large_pack, other)
    other = dataclasses.replace(large_pack, sampler_config=dict(SD_SAMPLER_CONFIG, prediction_type="v_prediction"))
    with pytest.raises(PackMismatchError, match="prediction_type"):
        check_pair(large_pack, other)


def test_mismatched_latent_space_is_refused_by_name(large_pack):
    vae = SimpleNamespace(config=SimpleNamespace(**{**large_pack.vae.config, "latent_channels": 16}))
    with pytest.raises(PackMismatchError, match="latent channels differs \\(4 vs 16\\)"):
        check_pair(large_pack, dataclasses.replace(large_pack, vae=vae))
    vae = SimpleNamespace(config=SimpleNamespace(**{**large_pack.vae.config, "scaling_factor": 0.13025}))
    with pytest.raises(PackMismatchError, match="scaling_factor"):
        check_pair(large_pack, dataclasses.replace(large_pack, vae=vae))


def test_stable_diffusion_layout_loads_and_pairs(tmp_path, tiny_packs, large_pack):
    """A directory saved by diffusers' StableDiffusionPipeline (model_index.json, PNDM sampler
    config as SD 1.5 and BK-SDM ship it) loads through the same path and pairs by noise process."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    scheduler = PNDMScheduler.from_config({**SD_SAMPLER_CONFIG, "skip_prk_steps": True})
    pipe = StableDiffusionPipeline(
        unet=large_pack.unet,
        vae=large_pack.vae,
        text_encoder=large_pack.text_encoder,
        tokenizer=large_pack.tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd")
    assert (tmp_path / "sd" / "model_index.json").is_file()
    sd = load_pack(tmp_path / "sd", device="cpu")
    assert sd.name == "sd" and sd.sampler_config["_class_name"] == "PNDMScheduler"
    check_pair(sd, large_pack)


def test_missing_component_is_named(tmp_path, tiny_packs):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_packs["large"], broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(PackError, match="component 'vae' missing"):
        load_pack(broken, device="cpu")


def test_unknown_local_path_is_named():
    with pytest.raises(PackError, match="'./no/such/pack' not found"):
        load_pack("./no/such/pack", device="cpu")


def test_hub_id_offline_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    began = time.monotonic()
    with pytest.raises(PackError, match="could not fetch model pack 'tandem-test/no-such-pack'.*offline"):
        load_pack("tandem-test/no-such-pack", device="cpu")
    assert time.monotonic() - began < 30  # bounded: no hang (a generous bound, not a speed target)


def test_bad_manifest_version_is_refused(tmp_path, tiny_packs):
    pack = tmp_path / "pack"
    shutil.copytree(tiny_packs["large"], pack)
    manifest = json.loads((pack / "tandem_pack.json").read_text())
    (pack / "tandem_pack.json").write_text(json.dumps({**manifest, "format_version": 9}))
    with pytest.raises(PackError, match="format_version 9 is not supported"):
        load_pack(pack, device="cpu")


def _write_lora(pack_dir, user: str, seed: int) -> None:
    """A random LoRA on the small UNet, saved in diffusers' LoRA format, listed in the manifest."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(pack_dir / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    out = pack_dir / "loras" / user
    out.mkdir(parents=True, exist_ok=True)
    save_file({f"unet.{k}": v.contiguous() for k, v in state.items()}, out / "pytorch_lora_weights.safetensors")
    manifest = json.loads((pack_dir / "tandem_pack.json").read_text())
    manifest.setdefault("users", {})[user] = f"loras/{user}/pytorch_lora_weights.safetensors"
    (pack_dir / "tandem_pack.json").write_text(json.dumps(manifest))


def test_user_lora_changes_the_output_and_switches_off_cleanly(tmp_path):
    root = tmp_path / "packs"
    build_tiny_pack(root / "large", seed=1)
    small = build_tiny_pack(root / "small", seed=2, unet_channels=(16, 32), shared_from="../large")
    _write_lora(small, "alice", seed=3)
    _write_lora(small, "bob", seed=4)
    pack = load_pack(small, device="cpu")
    assert pack.users == ["alice", "bob"]
    request = GenerationRequest("a red circle at the left on a blue background", steps=3, split=0, height=32, width=32)

    def final_latent(user):
        pack.use_user(user)
        state = start(pack, request)
        run_steps(pack, state, 3)
        return state.latent

    base = final_latent(None)
    alice = final_latent("alice")
    bob = final_latent("bob")
    assert not torch.allclose(base, alice) and not torch.allclose(alice, bob)
    assert torch.equal(final_latent(None), base)
    assert torch.equal(final_latent("alice"), alice)
    with pytest.raises(PackError, match="unknown user 'carol'.*alice, bob"):
        pack.use_user("carol")
