"""True-size pack pairs: the published architectures of Stable Diffusion-family models with seeded
random weights, built offline (no hub), so that time, memory and bytes are the real ones even
though the images are noise.

    sd15: the large pack is Stable Diffusion 1.5 (UNet 859.5 M parameters, VAE 83.7 M, CLIP
          ViT-L/14 text encoder 123.1 M, 77 tokens); the small one BK-SDM-Small's UNet (482.3 M:
          SD 1.5's with one block pair less per stage and no mid-block) sharing the large pack's
          VAE, text encoder, tokenizer and sampler, as BK-SDM does.

The configurations are those of the published diffusers configs (unet/config.json of
runwayml/stable-diffusion-v1-5 and nota-ai/bk-sdm-small, vae/, text_encoder/); the published
parameter counts are checked against what these configs build (tests/test_true_size.py).
A build writes fp16 safetensors into `OUT.partial/`, records every file's size in the manifests,
and renames the folder to OUT only once complete: a cached pack is whole or absent.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.packs import MANIFEST_NAME, PackError, verify_pack_files
from tandem.tiny_pack import SD_SAMPLER_CONFIG

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
# BK-SDM-Small: one resnet + attention pair less per down and up stage, no mid-block.
BK_SDM_SMALL_UNET: dict[str, Any] = {**SD15_UNET, "layers_per_block": 1, "mid_block_type": None}
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
CLIP_VIT_L14_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


@dataclass(frozen=True)
class Component:
    """One model of a pair: what builds it and its published parameter count."""

    name: str  # the pack directory it goes in
    kind: str  # "unet", "vae" or "text_encoder"
    config: dict[str, Any]
    published_parameters: int
    published_as: str


@dataclass(frozen=True)
class PairSpec:
    name: str
    large: tuple[Component, ...]  # the large pack's models (the small pack shares its VAE and text)
    small_unet: Component
    default_steps: int = 25
    default_guidance: float = 7.5
    image_size: int = 512


PAIRS: dict[str, PairSpec] = {
    "sd15": PairSpec(
        name="sd15",
        large=(
            Component("unet", "unet", SD15_UNET, 859_520_964, "Stable Diffusion 1.5 UNet"),
            Component("vae", "vae", SD_VAE, 83_653_863, "Stable Diffusion VAE (AutoencoderKL)"),
            Component("text_encoder", "text_encoder", CLIP_VIT_L14_TEXT, 123_060_480, "CLIP ViT-L/14 text encoder"),
        ),
        small_unet=Component("unet", "unet", BK_SDM_SMALL_UNET, 482_346_884, "BK-SDM-Small UNet"),
    ),
}


def _model(kind: str, config: dict[str, Any]):
    if kind == "unet":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)
    if kind == "vae":
        from diffusers import AutoencoderKL

        return AutoencoderKL(**config)
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**config))


def count_parameters(component: Component) -> int:
    """The component's parameter count, from its architecture alone (no memory for weights)."""
    from accelerate import init_empty_weights

    from tandem.packs import quiet_loading

    quiet_loading()
    with init_empty_weights():
        return sum(p.numel() for p in _model(component.kind, component.config).parameters())


@dataclass(frozen=True)
class ParameterRow:
    pack: str
    component: Component
    parameters: int

    @property
    def deviation(self) -> float:
        return self.parameters / self.component.published_parameters - 1


def parameter_table(spec: PairSpec) -> list[ParameterRow]:
    rows = [ParameterRow("large", c, count_parameters(c)) for c in spec.large]
    return rows + [ParameterRow("small", spec.small_unet, count_parameters(spec.small_unet))]


def build_memory_bytes(spec: PairSpec) -> int:
    """Peak memory of a build: the largest model in fp32, plus its fp16 copy being written."""
    largest = max(c.published_parameters for c in (*spec.large, spec.small_unet))
    return largest * (4 + 2)


def _save_fp16(component: Component, out: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    model = _model(component.kind, component.config).eval().half()
    model.save_pretrained(out / component.name, safe_serialization=True)
    del model


def _record_files(root: Path, manifest: dict[str, Any]) -> None:
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    manifest["files"] = files
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def build_pair(name: str, out: Path, seed: int = 0, progress: Callable[[str], None] = print) -> tuple[Path, Path]:
    """Writes OUT/large and OUT/small for the pair `name` (fp16 safetensors, seeded random
    weights); OUT appears only once both are complete."""
    from tandem.clip_vocab import write_clip_tokenizer
    from tandem.packs import quiet_loading

    quiet_loading()
    spec = PAIRS[name]
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    large, small = partial / "large", partial / "small"
    large.mkdir(parents=True)
    small.mkdir()
    for i, component in enumerate(spec.large):
        progress(f"building {spec.name} large/{component.name} ({component.published_as}, fp16)")
        _save_fp16(component, large, seed + i)
    tokenizer = write_clip_tokenizer(large / "tokenizer")
    progress(f"tokenizer: {tokenizer}")
    (large / "scheduler").mkdir()
    (large / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SAMPLER_CONFIG, indent=2))
    progress(f"building {spec.name} small/unet ({spec.small_unet.published_as}, fp16)")
    _save_fp16(spec.small_unet, small, seed + len(spec.large))
    common = {"format_version": 1, "random": True, "default_sampler": "dpmpp_2m",
              "default_steps": spec.default_steps, "default_guidance": spec.default_guidance,
              "image_size": spec.image_size, "seed": seed, "tokenizer": tokenizer}
    _record_files(large, {**common, "name": f"{spec.name}-random-large", "role": "large",
                          "architecture": ", ".join(c.published_as for c in spec.large)})
    _record_files(small, {**common, "name": f"{spec.name}-random-small", "role": "small",
                          "architecture": spec.small_unet.published_as,
                          "components": {c: f"../large/{c}" for c in ("vae", "text_encoder", "tokenizer", "scheduler")}})
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out / "large", out / "small"


def cached_pair(out: Path) -> str | None:
    """None when OUT holds a complete pair; otherwise why not (for a rebuild or a refusal)."""
    for role in ("large", "small"):
        try:
            verify_pack_files(out / role)
        except PackError as exc:
            return str(exc)
    return None
