"""Stage: a user's LoRA on the small UNet, trained on that user's style (alice: hollow, bob:
striped) with the same prompts.

    python -m tools.demo_pack.train_lora --user alice --out WORK [--steps N] [--max-minutes M]

The LoRA only runs the late denoising steps, so most timesteps are drawn from t < 700. Saves
WORK/loras/USER/pytorch_lora_weights.safetensors in diffusers' LoRA format, loadable with
`UNet2DConditionModel.load_lora_adapter(dir, weight_name="pytorch_lora_weights.safetensors",
prefix="unet", adapter_name=USER)`; the export checks that load reproduces the trained model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from tandem.demo.grammar import USER_STYLES
from tandem.demo.tokenizer import MAX_LENGTH
from tools.demo_pack.graphs import EpsModel, eps_sample_args, graphed_for_training
from tools.demo_pack.latents import NoiseSchedule, latent_bank, load_text, require
from tools.demo_pack.runs import Run, add_common_args, add_denoising_args, autocast, resolve_args
from tools.demo_pack.trainer import Trainer, trainable

STAGE = "lora"
WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Attention, feed-forward and the resnets' convs: the styles are spatial textures, so the
# convolutions matter as much as the attention.
TARGET_MODULES = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--user", required=True, choices=sorted(USER_STYLES))
    add_common_args(parser, steps=5000, batch_size=256, lr=5e-4)
    parser.add_argument("--rank", type=int, default=16)
    add_denoising_args(parser, low_fraction=0.85, ema=False)
    return parser


def load_small_unet(out: Path, device: torch.device):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "small_unet")
    return unet.to(device).requires_grad_(False)


def main(argv: list[str] | None = None) -> bool:
    """Trains (or resumes); True once all steps are done and the LoRA file is written."""
    from peft import LoraConfig

    args = resolve_args(build_parser().parse_args(argv))
    require(args.out / "small_unet" / "config.json", "the small UNet (train_small)")
    run = Run(args, f"{STAGE}_{args.user}")
    text_encoder, tokenizer = load_text(args.out, run.device)
    unet = load_small_unet(args.out, run.device)
    # lora_alpha == rank: scale 1, which is also what a loader assumes from the weights alone.
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGET_MODULES),
                     adapter_name=args.user)
    unet.train()
    params = trainable(unet)
    trainer = Trainer(run, params)
    run.log.event(event="model", lora_params=sum(p.numel() for p in params.values()),
                  style=USER_STYLES[args.user])

    data = latent_bank(run, tokenizer, USER_STYLES[args.user])
    schedule = NoiseSchedule(run.device)
    generator = run.generator(trainer.step)
    eps_model = graphed_for_training(EpsModel(unet, run.device), eps_sample_args(
        args.batch_size, text_encoder.config.hidden_size, run.device), run)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = data.noised_batch(args.batch_size, args, schedule, generator, args.low_fraction)
        with torch.no_grad(), autocast(run.device):
            context = text_encoder(batch.ids).last_hidden_state.float()
        return F.mse_loss(eps_model(batch.xt, batch.t, context), batch.noise), {}

    finished = trainer.train(loss_fn)
    if finished:
        unet.eval()
        out_dir = args.out / "loras" / args.user
        save_lora(unet, args.user, out_dir)
        check = check_lora(unet, args.user, out_dir, args.out, text_encoder.config.hidden_size)
        run.log.event(event="export", path=str(out_dir / WEIGHT_NAME), **check)
    return finished


def save_lora(unet, adapter_name: str, out_dir: Path) -> None:
    """The adapter in diffusers' LoRA format ("unet."-prefixed keys, safetensors)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    state = convert_state_dict_to_diffusers(state)
    # convert_state_dict_to_diffusers renames only the attention layers' keys (lora.down/up) and
    # leaves the others in PEFT's lora_A/lora_B; load_lora_adapter picks one format from the
    # first key, so a mixed file silently loses layers. Every key gets the diffusers names.
    state = {
        "unet." + k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."):
            v.detach().cpu().contiguous()
        for k, v in state.items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, out_dir / WEIGHT_NAME, metadata={"format": "pt"})


@torch.no_grad()
def check_lora(trained, adapter_name: str, lora_dir: Path, out: Path,
               cross_dim: int) -> dict[str, float]:
    """Loads the saved file into a fresh small UNet: it must reproduce the trained adapter."""
    device = next(trained.parameters()).device
    fresh = load_small_unet(out, device).eval()
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn((2, 4, 8, 8), device=device, generator=gen)
    context = torch.randn((2, MAX_LENGTH, cross_dim), device=device, generator=gen)
    t = torch.tensor([100, 500], device=device)
    base = fresh(x, t, context).sample
    fresh.load_lora_adapter(lora_dir, weight_name=WEIGHT_NAME, prefix="unet",
                            adapter_name=adapter_name)
    loaded = fresh(x, t, context).sample
    reference = trained(x, t, context).sample
    return {
        "lora_reload_max_diff": float((loaded - reference).abs().max()),
        "lora_change_vs_base": float((loaded - base).abs().mean()),
    }


if __name__ == "__main__":
    main()
