"""What the UNet stages train on: the earlier stages' outputs (the trained VAE and text encoder)
loaded, the bank's images encoded to latents with their prompts, and noised per the training
half of the diffusion schedule.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tools.demo_pack.data import PromptTable, render_bank, to_model_images
from tools.demo_pack.models import SCHEDULER_CONFIG
from tools.demo_pack.runs import Run

# ----------------------------------------------------------------------------- diffusion


class NoiseSchedule:
    """The training half of SCHEDULER_CONFIG: q(x_t | x_0) and timestep sampling."""

    def __init__(self, device: torch.device) -> None:
        cfg = SCHEDULER_CONFIG
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5,
                               cfg["num_train_timesteps"], dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, 0).float().to(device)
        self.num_timesteps = cfg["num_train_timesteps"]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise

    def sample_timesteps(self, n: int, generator: torch.Generator, *, low_fraction: float = 0.0,
                         low_max: int = 700) -> torch.Tensor:
        """Uniform timesteps, a `low_fraction` of them drawn from [0, low_max) instead."""
        device = self.alphas_cumprod.device
        t = torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)
        low = torch.randint(0, low_max, (n,), device=device, generator=generator)
        pick_low = torch.rand(n, device=device, generator=generator) < low_fraction
        return torch.where(pick_low, low, t)


def sample_noise(x0: torch.Tensor, generator: torch.Generator, offset: float) -> torch.Tensor:
    """Gaussian noise plus a small per-channel constant ("noise offset"), which lets the model
    move whole-image colour: plain backgrounds are all about it."""
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(
            (x0.shape[0], x0.shape[1], 1, 1), device=x0.device, generator=generator)
    return noise


def write_scheduler(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")


# ----------------------------------------------------------------------------- stage outputs


def load_vae(out: Path, device: torch.device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(out / "vae").to(device).eval().requires_grad_(False)
    return vae


def load_text(out: Path, device: torch.device):
    """The trained (frozen) text encoder and the tokenizer."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(out / "text_encoder", dtype=torch.float32)
    return encoder.to(device).eval().requires_grad_(False), tokenizer


@dataclass
class LatentBank:
    """A bank's images as scaled VAE latents, with each one's prompt: what the UNets train on."""

    latents: torch.Tensor  # fp32 [N, 4, 8, 8]
    prompt_index: torch.Tensor  # into `prompts`, [N]
    prompts: PromptTable

    def batch(self, n: int, drop_prob: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` random (latent, token ids) pairs, prompts dropped to "" with `drop_prob`."""
        idx = torch.randint(0, len(self.latents), (n,), device=self.latents.device,
                            generator=generator)
        return self.latents[idx], self.prompts.lookup(self.prompt_index[idx], drop_prob, generator)

    def noised_batch(self, n: int, args: argparse.Namespace, schedule: "NoiseSchedule",
                     generator: torch.Generator, low_fraction: float = 0.0) -> "NoisedBatch":
        """A batch, its noise and timesteps per the denoising flags, and x_t."""
        x0, ids = self.batch(n, args.prompt_dropout, generator)
        noise = sample_noise(x0, generator, args.noise_offset)
        t = schedule.sample_timesteps(n, generator, low_fraction=low_fraction)
        return NoisedBatch(ids, noise, t, schedule.add_noise(x0, noise, t))


@dataclass
class NoisedBatch:
    ids: torch.Tensor  # prompt token ids
    noise: torch.Tensor  # the target of an eps-prediction model
    t: torch.Tensor
    xt: torch.Tensor


def latent_bank(run: Run, tokenizer: Any, style: str) -> LatentBank:
    """--bank-size generator images of `style`, encoded by the trained WORK/vae."""
    vae = load_vae(run.args.out, run.device)
    bank = render_bank(run.args.bank_size, run.args.seed, style, run.device)
    prompts = PromptTable(tokenizer, run.device)
    return LatentBank(encode_latents(vae, bank.images),
                      prompts.index(bank.scenes).to(run.device), prompts)


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    """Scaled latents (posterior means) of uint8 images, fp32 [N, 4, 8, 8] on their device."""
    scale = vae.config.scaling_factor
    chunks = [
        vae.encode(to_model_images(images[i:i + batch])).latent_dist.mean * scale
        for i in range(0, len(images), batch)
    ]
    return torch.cat(chunks).float()


def require(path: Path, what: str) -> None:
    if not path.exists():
        raise SystemExit(f"{path} is missing: train {what} first")
