"""Pack-agnostic image quality: fidelity of an image to a reference image of the same seed, in
pixel space (no downloaded model). SSIM is the profile's score (in [0, 1] after clipping: 1 is
identical); PSNR is reported beside it."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """SSIM of two uint8 RGB images [H, W, 3], clipped to [0, 1]."""
    value = structural_similarity(reference, image, channel_axis=-1, data_range=255)
    return float(min(1.0, max(0.0, value)))


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    if np.array_equal(image, reference):
        return float("inf")
    return float(peak_signal_noise_ratio(reference, image, data_range=255))
