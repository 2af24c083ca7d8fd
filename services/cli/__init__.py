"""The commands: `tandem generate` (generate.py), the healthcheck, and the topology launcher."""
