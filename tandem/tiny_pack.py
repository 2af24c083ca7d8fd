"""Tiny random packs in diffusers layout, built offline in seconds: for tests, and for trying the
pipeline before a trained pack exists. Their images are noise; the manifest says so (demo=False,
random=True), and the CLI tells the user.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tandem.packs import MANIFEST_NAME

# The sampler config of Stable Diffusion 1.x (its scheduler_config.json), which the demo packs use too.
SD_SAMPLER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def build_tiny_pack(
    out_dir: str | Path,
    *,
    seed: int = 0,
    unet_channels: tuple[int, ...] = (32, 64),
    text_dim: int = 32,
    image_size: int = 32,
    role: str = "any",
    name: str | None = None,
    sampler_config: dict | None = None,
    shared_from: str | None = None,
    vae_channels: tuple[int, ...] = (16, 32, 32),
    attention_levels: int | None = None,
) -> Path:
    """Writes a random pack; with `shared_from` (a relative path to another tiny pack) only the
    UNet is new and the other components are referenced, as the demo's small pack does.
    The VAE downsamples by 2^(len(vae_channels) - 1); the UNet attends (cross-attention) in its
    `attention_levels` lowest-resolution blocks (default: all but the first)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tandem.demo.tokenizer import build_tokenizer
    from tandem.packs import quiet_loading

    quiet_loading()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    manifest: dict = {
        "format_version": 1,
        "name": name or out.name,
        "role": role,
        "random": True,
        "default_sampler": "dpmpp_2m",
        "default_steps": 8,
        "default_guidance": 3.0,
        "image_size": image_size,
    }
    if shared_from is None:
        tokenizer = build_tokenizer(out / "tokenizer")
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        CLIPTextModel(text_config).save_pretrained(out / "text_encoder")
        vae = AutoencoderKL(
            block_out_channels=vae_channels,
            down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
            latent_channels=4,
            norm_num_groups=8,
            sample_size=image_size,
        )
        vae.save_pretrained(out / "vae")  # type: ignore[attr-defined]  # ModelMixin method, not in the stub
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sampler_config or SD_SAMPLER_CONFIG))
    else:
        manifest["components"] = {c: f"{shared_from}/{c}" for c in ("vae", "text_encoder", "tokenizer", "scheduler")}
    levels = len(unet_channels) - 1 if attention_levels is None else attention_levels
    plain = len(unet_channels) - levels
    unet = UNet2DConditionModel(
        sample_size=image_size // 2 ** (len(vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels + ("UpBlock2D",) * plain,
        cross_attention_dim=text_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.save_pretrained(out / "unet")  # type: ignore[attr-defined]  # ModelMixin method, not in the stub
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return out


def build_sd_geometry_pair(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """A large/small pair with Stable Diffusion 1.5's latent geometry (512 px images, 4×64×64
    latents, a /8 VAE) but tiny random UNets: handoffs have SD's real byte sizes while a step
    stays cheap. For systems measurement only (bytes, links, batching): its images are noise, so
    its quality is measured as fidelity, never accuracy. Named "sd-geometry-random-*"."""
    out = Path(out_dir)
    common: dict[str, Any] = dict(image_size=512, vae_channels=(8, 8, 8, 8), text_dim=32, attention_levels=1)
    large = build_tiny_pack(out / "large", seed=seed + 1, unet_channels=(16, 32, 64), role="large",
                            name="sd-geometry-random-large", **common)
    small = build_tiny_pack(out / "small", seed=seed + 2, unet_channels=(8, 16, 32), role="small",
                            name="sd-geometry-random-small", shared_from="../large", **common)
    return large, small
