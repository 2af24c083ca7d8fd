"""Downlink channel for simulation (MEC conventions): 3GPP TR 36.814 path loss, log-normal
shadowing, Rayleigh fading, thermal noise, Shannon rate capped at a practical spectral efficiency."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

NOISE_DBM_PER_HZ = -174.0


@dataclass(frozen=True)
class ChannelConfig:
    bandwidth_hz: float = 10e6  # the band the edge's users share
    tx_power_dbm: float = 43.0  # base station
    noise_figure_db: float = 7.0
    shadowing_db: float = 8.0  # std of log-normal shadowing
    rayleigh: bool = True
    max_spectral_efficiency: float = 5.5  # b/s/Hz
    min_spectral_efficiency: float = 0.05  # outage floor (retransmissions, MCS 0)


def path_loss_db(distance_km: float | np.ndarray) -> float | np.ndarray:
    return 128.1 + 37.6 * np.log10(np.maximum(distance_km, 1e-3))


def noise_dbm(bandwidth_hz: float, noise_figure_db: float) -> float:
    return NOISE_DBM_PER_HZ + 10.0 * math.log10(bandwidth_hz) + noise_figure_db


def snr_linear(distance_km, cfg: ChannelConfig = ChannelConfig(), shadow_db=0.0, fading_gain=1.0):
    """Received SNR (linear) over the whole band."""
    rx_dbm = cfg.tx_power_dbm - path_loss_db(distance_km) + shadow_db
    return fading_gain * 10.0 ** ((rx_dbm - noise_dbm(cfg.bandwidth_hz, cfg.noise_figure_db)) / 10.0)


def spectral_efficiency(snr, cfg: ChannelConfig = ChannelConfig()):
    """log2(1 + SNR) clipped to [min, max] b/s/Hz."""
    return np.clip(np.log2(1.0 + np.asarray(snr, dtype=float)), cfg.min_spectral_efficiency, cfg.max_spectral_efficiency)


def shannon_rate_bps(bandwidth_hz: float, snr, cfg: ChannelConfig = ChannelConfig()):
    """Rate in bit/s of a band of ``bandwidth_hz`` at ``snr`` (capped spectral efficiency)."""
    return bandwidth_hz * spectral_efficiency(snr, cfg)


def sample_spectral_efficiency(rng: np.random.Generator, distance_km, cfg: ChannelConfig = ChannelConfig()):
    """One draw of shadowing and Rayleigh fading (|h|^2 ~ Exp(1)) per distance."""
    d = np.asarray(distance_km, dtype=float)
    shadow = rng.normal(0.0, cfg.shadowing_db, d.shape) if cfg.shadowing_db > 0 else 0.0
    fading = rng.exponential(1.0, d.shape) if cfg.rayleigh else 1.0
    return spectral_efficiency(snr_linear(d, cfg, shadow, fading), cfg)
