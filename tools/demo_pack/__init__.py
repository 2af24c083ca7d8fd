"""Training of the demo model pack (VAE, text encoder + large UNet, small UNet, users' LoRAs,
evaluator) and its assembly into `tandem/demo_pack`. See scripts/train_demo_pack.sh.

The stages (`train_*.py`) share: `runs` (flags, device, deadline, log: a stage's `Run`), `trainer`
(the optimisation loop, EMA, resumable checkpoints), `data` (the rendered image bank, the prompt
table), `latents` (the earlier stages' VAE and text encoder, latent banks, the noise schedule),
`graphs` (CUDA graphs) and `models` (the architectures)."""
