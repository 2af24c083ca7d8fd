"""Architectures of the demo pack's models (and the tiny variants the smoke tests train).

Sizes (full): VAE ~3.9M params, large UNet ~7.0M (fp16 ~14 MB), small UNet ~1.74M (< 1/4 of
the large one), text encoder ~0.62M.
"""

from __future__ import annotations

from typing import Any

# The diffusion schedule both UNets are trained with and that ships as `scheduler/`.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

LATENT_CHANNELS = 4
LATENT_SIZE = 8  # 64 px images, VAE downsamples ×8


def vae_config(tiny: bool) -> dict[str, Any]:
    # Four encoder blocks = three downsamplings: 64×64 → 8×8.
    channels = (8, 8, 16, 16) if tiny else (32, 64, 128, 128)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": list(channels),
        "layers_per_block": 1,
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 8 if tiny else 32,
        "sample_size": 64,
    }


def text_encoder_config(
    vocab_size: int, bos: int, eos: int, pad: int, tiny: bool
) -> dict[str, Any]:
    hidden = 32 if tiny else 128
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": 1 if tiny else 3,
        "num_attention_heads": 2 if tiny else 4,
        "max_position_embeddings": 16,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    }


def _unet_config(
    channels: tuple[int, ...], attention: tuple[bool, ...], cross_dim: int, groups: int
) -> dict[str, Any]:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "block_out_channels": list(channels),
        "layers_per_block": 1,
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": cross_dim,
        "attention_head_dim": 8,
        "norm_num_groups": groups,
    }


def large_unet_config(cross_dim: int, tiny: bool) -> dict[str, Any]:
    # Cross-attention at every level (8×8, 4×4, 2×2): binding colour and position to the text
    # needs it at full latent resolution, and at 64 tokens it is cheap.
    if tiny:
        return _unet_config((16, 32, 32), (True, True, True), cross_dim, 8)
    return _unet_config((64, 128, 128), (True, True, True), cross_dim, 32)


def small_unet_config(cross_dim: int, tiny: bool) -> dict[str, Any]:
    if tiny:
        return _unet_config((8, 16, 16), (False, True, True), cross_dim, 8)
    return _unet_config((32, 64, 64), (False, True, True), cross_dim, 32)
