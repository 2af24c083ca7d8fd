"""Stage: the LARGE UNet and the text encoder, trained jointly on filled-style images.

    python -m tools.demo_pack.train_text_unet --out WORK [--steps N] [--max-minutes M] [--tiny]

Epsilon prediction on latents of the frozen WORK/vae (× scaling_factor) under the shipped noise
schedule; 10% of prompts dropped to "" for classifier-free guidance; EMA of both models'
weights is what gets saved (WORK/unet, WORK/text_encoder), beside WORK/tokenizer and
WORK/scheduler.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tandem.demo.tokenizer import build_tokenizer
from tools.demo_pack.graphs import EpsModel, eps_sample_args, graphed_for_training
from tools.demo_pack.latents import NoiseSchedule, latent_bank, require, write_scheduler
from tools.demo_pack.models import large_unet_config, text_encoder_config
from tools.demo_pack.runs import Run, add_common_args, add_denoising_args, autocast, resolve_args
from tools.demo_pack.trainer import Trainer, trainable

STAGE = "text_unet"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, steps=15000, batch_size=256, lr=2e-4)
    add_denoising_args(parser)
    return parser


def main(argv: list[str] | None = None) -> bool:
    """Trains (or resumes); True once all steps are done and the outputs are written."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    args = resolve_args(build_parser().parse_args(argv))
    require(args.out / "vae" / "config.json", "the VAE (train_vae)")
    run = Run(args, STAGE)
    tokenizer = build_tokenizer(args.out / "tokenizer")
    text_config = CLIPTextConfig(**text_encoder_config(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
        args.tiny))
    text_encoder = CLIPTextModel(text_config).to(run.device).train()
    unet = UNet2DConditionModel(**large_unet_config(text_config.hidden_size, args.tiny))
    unet = unet.to(run.device).train()
    params = {**trainable(unet, "unet."), **trainable(text_encoder, "text_encoder.")}
    trainer = Trainer(run, params, ema_decay=args.ema_decay, weight_decay=0.01)
    run.log.event(event="model", unet_params=sum(p.numel() for p in unet.parameters()),
                  text_encoder_params=sum(p.numel() for p in text_encoder.parameters()))

    data = latent_bank(run, tokenizer, "filled")
    schedule = NoiseSchedule(run.device)
    generator = run.generator(trainer.step)
    eps_model = graphed_for_training(EpsModel(unet, run.device), eps_sample_args(
        args.batch_size, text_config.hidden_size, run.device, context_grad=True), run)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = data.noised_batch(args.batch_size, args, schedule, generator)
        with autocast(run.device):
            context = text_encoder(batch.ids).last_hidden_state.float()
        return F.mse_loss(eps_model(batch.xt, batch.t, context), batch.noise), {}

    finished = trainer.train(loss_fn)
    if finished:
        trainer.use_ema_weights()
        text_encoder.save_pretrained(args.out / "text_encoder")
        write_scheduler(args.out / "scheduler")
        # Last: WORK/unet existing means the stage is complete.
        unet.save_pretrained(args.out / "unet", safe_serialization=True)
        run.log.event(event="export", paths=[str(args.out / p) for p in
                                             ("unet", "text_encoder", "tokenizer", "scheduler")])
    return finished


if __name__ == "__main__":
    main()
