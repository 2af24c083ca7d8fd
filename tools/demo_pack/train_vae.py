"""Stage: the VAE (diffusers AutoencoderKL, 64×64×3 ↔ 4×8×8) on generator images of all styles.

    python -m tools.demo_pack.train_vae --out WORK [--steps N] [--max-minutes M] [--tiny]

Loss: L1 + L2 reconstruction + a small KL (keeps the latent space smooth, so the decoder
tolerates the imperfect latents diffusion produces). When done, `scaling_factor` = 1/std of the
latents is written into the config and the model saved to WORK/vae.
"""

from __future__ import annotations

import argparse

import torch

from tools.demo_pack.data import render_bank, to_model_images
from tools.demo_pack.graphs import graphed_for_training
from tools.demo_pack.latents import encode_latents
from tools.demo_pack.models import LATENT_CHANNELS, LATENT_SIZE, vae_config
from tools.demo_pack.runs import Run, add_common_args, autocast, resolve_args
from tools.demo_pack.trainer import Trainer, trainable

STAGE = "vae"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, steps=8000, batch_size=128, lr=3e-4)
    parser.add_argument("--kl-weight", type=float, default=1e-4,
                        help="weight of the mean per-latent KL against the mean pixel losses")
    return parser


class VaeForward(torch.nn.Module):
    """Encode, sample the posterior with the given noise, decode: one module so that it can be
    captured as a CUDA graph. Returns (reconstruction, posterior mean, posterior log-variance)."""

    def __init__(self, vae: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.vae = vae
        self.device = device

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with autocast(self.device):
            posterior = self.vae.encode(x).latent_dist
            recon = self.vae.decode(posterior.mean + posterior.std * eps).sample
        return recon.float(), posterior.mean.float(), posterior.logvar.float()


def main(argv: list[str] | None = None) -> bool:
    """Trains (or resumes); True once all steps are done and WORK/vae is written."""
    from diffusers import AutoencoderKL

    args = resolve_args(build_parser().parse_args(argv))
    run = Run(args, STAGE)
    vae = AutoencoderKL(**vae_config(args.tiny)).to(run.device).train()
    trainer = Trainer(run, trainable(vae))
    run.log.event(event="model", params=sum(p.numel() for p in vae.parameters()))
    bank = render_bank(args.bank_size, args.seed, None, run.device)
    generator = run.generator(trainer.step)
    latent_shape = (args.batch_size, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
    forward = graphed_for_training(VaeForward(vae, run.device), (
        torch.zeros((args.batch_size, 3, 64, 64), device=run.device),
        torch.zeros(latent_shape, device=run.device)), run)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = torch.randint(0, len(bank), (args.batch_size,), device=run.device,
                            generator=generator)
        x = to_model_images(bank.images[idx])
        eps = torch.randn(latent_shape, device=run.device, generator=generator)
        recon, mean, logvar = forward(x, eps)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        l1 = (recon - x).abs().mean()
        l2 = (recon - x).square().mean()
        return l1 + l2 + args.kl_weight * kl, {"l1": l1, "l2": l2, "kl": kl}

    finished = trainer.train(loss_fn)
    if finished:
        export(vae, bank.images, run)
    return finished


@torch.no_grad()
def export(vae, images: torch.Tensor, run: Run) -> None:
    """Sets scaling_factor from a latent sample, reports reconstruction error, saves WORK/vae."""
    vae.eval()
    sample = images[: min(len(images), 4096)]
    latents = encode_latents(vae, sample, batch=512) / vae.config.scaling_factor
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    recon = torch.cat([vae.decode(latents[i:i + 512]).sample for i in range(0, len(latents), 512)])
    error = (recon.clamp(-1, 1) - to_model_images(sample)).abs().mean() * 127.5
    vae.save_pretrained(run.args.out / "vae", safe_serialization=True)
    run.log.event(event="export", path=str(run.args.out / "vae"), scaling_factor=scaling_factor,
                  latent_mean=float(latents.mean()), recon_mae_0_255=round(float(error), 3))


if __name__ == "__main__":
    main()
