"""Stage: decode latents to pixels with the VAE."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def decode_latents(
    vae, latents: Sequence[torch.Tensor], *, device: torch.device, trim_tail_frames: int = 0
) -> list[torch.Tensor]:
    """VAE decode of latents ``[16, T, h, w]`` -> videos ``[3, F, H, W]`` in [-1, 1] (float32, CPU).

    :param trim_tail_frames: frames dropped from the end of each video.
    """
    videos = []
    for latent in latents:
        video = vae.decode(latent[None].to(device))[0].float().cpu()
        if trim_tail_frames:
            video = video[:, :-trim_tail_frames]
        videos.append(video)
    return videos


__all__ = ["decode_latents"]
