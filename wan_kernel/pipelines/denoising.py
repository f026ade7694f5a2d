"""Stage: one request's denoising loop (initial noise, classifier-free guidance, the sampler).

Noise is drawn as the official code does: ``torch.randn(16, F_lat, H/8, W/8)`` with a
``torch.Generator`` on the compute device seeded with the seed (``cpu_noise=True`` draws on the
CPU instead, as ComfyUI does).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import attrs
import torch

from wan_kernel.models.vae import LATENT_CHANNELS, SPATIAL_STRIDE
from wan_kernel.pipelines.conditioning import ImageConditioning
from wan_kernel.pipelines.config import Request


@attrs.frozen
class Denoised:
    """One request's denoised latent and how the loop ran."""

    latent: torch.Tensor
    """``[16, T, h, w]`` on the CPU."""
    model_calls: int
    cfg_pattern: str
    """One letter per step: ``A`` guidance applied (two DiT calls), ``S`` skipped (one call)."""


def initial_noise(
    shape: tuple[int, ...], seed: int, *, device: torch.device, cpu_noise: bool = False
) -> tuple[torch.Tensor, torch.Generator]:
    """Gaussian noise of ``shape`` (float32, on ``device``) and the seeded generator that drew it.

    :param cpu_noise: draw on the CPU (ComfyUI-compatible) instead of on ``device``.
    """
    noise_device = torch.device("cpu") if cpu_noise else device
    generator = torch.Generator(device=noise_device).manual_seed(seed)
    noise = torch.randn(*shape, dtype=torch.float32, generator=generator, device=noise_device)
    return noise.to(device), generator


def progress_bar(total: int, desc: str):
    """A tqdm bar on stderr with ETA over ``total`` steps."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)


def denoise_request(
    dit: Callable,
    request: Request,
    *,
    context: torch.Tensor,
    negative_context: torch.Tensor,
    conditioning: ImageConditioning | None = None,
    solver: str,
    cfg_schedule: Any,
    cfg_apply_ratio: float | None = None,
    device: torch.device,
    cpu_noise: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> Denoised:
    """Run the DiT loop for one request.

    :param dit: the DiT (``dit(x, t, context, *, clip_fea=None, y=None)``).
    :param request: sizes, steps, shift, guidance scale and seed.
    :param context: T5 embedding of the prompt ``[L, text_dim]``.
    :param negative_context: T5 embedding of the negative prompt ``[L', text_dim]``.
    :param conditioning: the image conditioning (i2v/flf2v) or ``None``.
    :param solver: a sampler solver name (``unipc``, ``dpm++``, ``euler``).
    :param cfg_schedule: a resolved CFG schedule implementation.
    :param cfg_apply_ratio: fraction of steps with guidance (``None``: all).
    :param progress: show a progress bar over the steps.
    :param log: receives one line describing the request.
    """
    from wan_kernel.sampling import denoise
    from wan_kernel.sampling.guidance import make_cfg_velocity

    cond = conditioning
    if cond is not None:
        lat_h, lat_w, lat_f = cond.lat_h, cond.lat_w, cond.latent_frames
    else:
        lat_h, lat_w = request.height // SPATIAL_STRIDE, request.width // SPATIAL_STRIDE
        lat_f = request.latent_frames
    noise, generator = initial_noise(
        (LATENT_CHANNELS, lat_f, lat_h, lat_w), request.seed, device=device, cpu_noise=cpu_noise
    )
    if log is not None:
        r = request
        log(
            f"[{r.index + 1}] seed {r.seed}: {r.width}x{r.height} (WxH) {r.frames} frame(s), "
            f"{r.steps} steps, shift {r.flow_shift}, guidance {r.guidance_scale}"
            + (f" (image conditioned: {lat_w * SPATIAL_STRIDE}x{lat_h * SPATIAL_STRIDE})" if cond else "")
        )
    extra: dict[str, Any] = {}
    if cond is not None:
        extra = {"y": cond.y[None].to(device), "clip_fea": cond.clip_fea.to(device)}
    velocity = make_cfg_velocity(
        dit,
        {"context": [context.to(device)], **extra},
        {"context": [negative_context.to(device)], **extra},
        request.guidance_scale,
        cfg_schedule,
        request.steps,
        apply_ratio=1.0 if cfg_apply_ratio is None else cfg_apply_ratio,
    )
    bar = progress_bar(request.steps, f"[{request.index + 1}] denoising") if progress else None
    try:
        with torch.no_grad():
            latent = denoise(
                velocity,
                noise[None],
                solver=solver,
                steps=request.steps,
                shift=request.flow_shift,
                generator=generator,
                callback=(lambda i, n, t, x: bar.update(1)) if bar is not None else None,
            )[0]
    finally:
        if bar is not None:
            bar.close()
    pattern = "".join("A" if a else "S" for a in velocity.applied)
    return Denoised(latent.cpu(), velocity.forwards, pattern)


__all__ = ["Denoised", "denoise_request", "initial_noise", "progress_bar"]
