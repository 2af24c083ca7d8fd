"""How a noisy latent is token-merged (torch-free, so the scheduler can name the default).

"latent" merges x_k itself; "denoised" merges the clean prediction x̂0 and the noise apart and
rebuilds x_k on the device (see tandem/handoff.py). The default is the measured winner: merging
x_k keeps the evaluator's accuracy at every split and ratio (0.985 vs 0.805 all-four at k = T/4,
r = 0.5, 200 prompts; BENCHMARKS.md, section 1).
"""

STRATEGIES: tuple[str, ...] = ("latent", "denoised")
DEFAULT_STRATEGY = "latent"
