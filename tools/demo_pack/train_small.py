"""Stage: the SMALL UNet, distilled from the large one (text encoder frozen), filled style.

    python -m tools.demo_pack.train_small --out WORK [--steps N] [--max-minutes M] [--tiny]

Loss = MSE to the large UNet's noise prediction (same noisy latent, timestep and prompt, no
guidance) + `--denoise-weight` × the plain denoising MSE. Prompts are dropped to "" as in the
large model's training, so the small one also learns the unconditional branch CFG needs. Half
the timesteps come from the low-noise range the small model runs in. Saves WORK/small_unet (EMA).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from tools.demo_pack.graphs import EpsModel, captured_for_inference, eps_sample_args, graphed_for_training
from tools.demo_pack.latents import NoiseSchedule, latent_bank, load_text, require
from tools.demo_pack.models import small_unet_config
from tools.demo_pack.runs import Run, add_common_args, add_denoising_args, autocast, resolve_args
from tools.demo_pack.trainer import Trainer, trainable

STAGE = "small"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, steps=8000, batch_size=256, lr=3e-4)
    add_denoising_args(parser, low_fraction=0.5)
    parser.add_argument("--denoise-weight", type=float, default=0.5)
    return parser


def main(argv: list[str] | None = None) -> bool:
    """Trains (or resumes); True once all steps are done and WORK/small_unet is written."""
    from diffusers import UNet2DConditionModel

    args = resolve_args(build_parser().parse_args(argv))
    require(args.out / "unet" / "config.json", "the large UNet (train_text_unet)")
    run = Run(args, STAGE)
    text_encoder, tokenizer = load_text(args.out, run.device)
    teacher = UNet2DConditionModel.from_pretrained(args.out / "unet")
    teacher = teacher.to(run.device).eval().requires_grad_(False)
    unet = UNet2DConditionModel(**small_unet_config(text_encoder.config.hidden_size, args.tiny))
    unet = unet.to(run.device).train()
    trainer = Trainer(run, trainable(unet), ema_decay=args.ema_decay, weight_decay=0.01)
    run.log.event(event="model", small_unet_params=sum(p.numel() for p in unet.parameters()),
                  large_unet_params=sum(p.numel() for p in teacher.parameters()))

    data = latent_bank(run, tokenizer, "filled")
    schedule = NoiseSchedule(run.device)
    generator = run.generator(trainer.step)
    sample_args = eps_sample_args(args.batch_size, text_encoder.config.hidden_size, run.device)
    student = graphed_for_training(EpsModel(unet, run.device), sample_args, run)
    teacher_eps = captured_for_inference(EpsModel(teacher, run.device).eval(), sample_args, run)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = data.noised_batch(args.batch_size, args, schedule, generator, args.low_fraction)
        with torch.no_grad():
            with autocast(run.device):
                context = text_encoder(batch.ids).last_hidden_state.float()
            target = teacher_eps(batch.xt, batch.t, context)
        pred = student(batch.xt, batch.t, context)
        distill = F.mse_loss(pred, target)
        denoise = F.mse_loss(pred, batch.noise)
        return distill + args.denoise_weight * denoise, {"distill": distill, "denoise": denoise}

    finished = trainer.train(loss_fn)
    if finished:
        trainer.use_ema_weights()
        unet.save_pretrained(args.out / "small_unet", safe_serialization=True)
        run.log.event(event="export", path=str(args.out / "small_unet"))
    return finished


if __name__ == "__main__":
    main()
