"""The Wan2.1 VAE's configuration and fixed facts: latent statistics, channels and strides.

Importing this module does not import torch (the CLI and the pipelines' option checks use it).
"""

from __future__ import annotations

import attrs

# Per-channel statistics of the real VAE's latents (official ``WanVAE.mean`` / ``WanVAE.std``).
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

LATENT_CHANNELS = len(LATENT_MEAN)
TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8


@attrs.frozen
class VAEConfig:
    """Shape of a Wan VAE. The real Wan2.1 VAE is the default; only ``dim`` differs in test models."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return tuple(reversed(self.temporal_downsample))


VAE_CONFIGS: dict[str, VAEConfig] = {"wan2.1": VAEConfig()}
