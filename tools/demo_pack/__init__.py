"""Training of the demo model pack (VAE, text encoder + large UNet, small UNet, users' LoRAs,
evaluator) and its assembly into `tandem/demo_pack`. See scripts/train_demo_pack.sh."""
