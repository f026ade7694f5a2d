"""The flow-matching training objective (rectified flow, as the Wan2.1 release and the seed trainer).

For clean latents ``x0``, noise ``eps ~ N(0, I)`` and a noise level ``t`` in ``[0, 1]`` per sample
(drawn by the timestep-sampling plugin)::

    x_t    = (1 - t) * x0 + t * eps          (noisy_latents)
    target = eps - x0                         (velocity_target: d x_t / d t)
    loss   = mean( w(t) * (model(x_t, T(t)) - target)^2 )   over every element of the batch

with ``w(t)`` the weighting scheme's loss weight (``sigma_sqrt``, ``cosmap``; 1 otherwise).

**The model's timestep input** is ``T(t) = 1000 * t`` (:func:`model_timesteps`), a float in
``[0, 1000]``: exactly what the official inference (and ``wan run generate``) feeds the DiT at
noise level ``sigma = t``, so the network is trained on the same time embedding it sees when
sampling. The seed trainer feeds ``1000 * t + 1`` in its continuous modes (an off-by-one left from
the discrete ``1..1000`` schedule) and ``1000 * sigma`` in ``sigma`` mode; we use one rule for all.
"""

from __future__ import annotations

from typing import Any

import torch

from wan_kernel.interfaces import TimestepSamplingConfig

NUM_TRAIN_TIMESTEPS = 1000


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, 1, ...]`` broadcastable against ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(1 - t) x0 + t noise`` in float32; ``x0``/``noise`` ``[B, C, F, H, W]``, ``t`` ``[B]``."""
    t = _per_sample(t.float(), x0)
    return (1.0 - t) * x0.float() + t * noise.float()


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``noise - x0`` in float32: the velocity the DiT predicts."""
    return noise.float() - x0.float()


def model_timesteps(t: torch.Tensor) -> torch.Tensor:
    """The DiT's timestep input ``1000 * t`` (float32 ``[B]``); see the module docstring."""
    return t.float() * NUM_TRAIN_TIMESTEPS


def loss_weights(sampler: Any, t: torch.Tensor, config: TimestepSamplingConfig) -> torch.Tensor:
    """Per-sample loss weights ``[B]`` (float32) from the resolved timestep-sampling plugin object
    (``TimestepSampler.loss_weights``: the weighting scheme's weights unless the sampler says otherwise)."""
    return sampler.loss_weights(t, config=config).float()


def flow_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean(w * (pred - target)^2)`` over all elements, in float32 (``weights`` ``[B]`` or None)."""
    err = (pred.float() - target.float()) ** 2
    if weights is not None:
        err = err * _per_sample(weights.float(), err)
    return err.mean()
