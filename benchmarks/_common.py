"""What the benchmark scripts share: the video size argument, a random DiT, and the timing loop.

Imported by the scripts as ``from _common import ...`` (they run as ``python benchmarks/<name>.py``,
which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import torch

from wan_kernel.models.dit import WanDiT
from wan_kernel.models.dit_config import DiTConfig
from wan_kernel.models.dit_loading import _set_dtypes


def latent_grid(size: str, flag: str = "--size") -> tuple[int, int, int]:
    """``WxHxF`` in pixels/frames -> the latent grid ``(F, H, W)``; exits with a message naming ``flag``."""
    try:
        w, h, f = (int(v) for v in size.lower().split("x"))
    except ValueError:
        sys.exit(f"{flag}: expected WxHxF such as 832x480x81, got {size!r}")
    if w % 16 or h % 16 or (f - 1) % 4:
        sys.exit(f"{flag} {size}: W and H must be multiples of 16 and F of the form 4k+1")
    return (f - 1) // 4 + 1, h // 8, w // 8


@torch.no_grad()
def random_dit(cfg: DiTConfig, device: torch.device, dtype: torch.dtype, seed: int) -> WanDiT:
    """A DiT on ``device`` in ``dtype`` (modulation float32, as ``load_dit`` keeps it), SDPA attention,
    non-trivial random weights (the official init zeroes the head and biases), drawn on ``device``.

    Allocated in ``dtype`` directly (14B in bf16: 28 GB, not 56 first). Eval mode, frozen.
    """
    from wan_attention_sdpa import SdpaAttention

    with torch.device("meta"):
        model = WanDiT(cfg, attention=SdpaAttention())
    _set_dtypes(model, dtype)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
        if p.ndim == 1 and name.endswith("weight"):
            noise = 1 + 0.1 * noise
        elif name.endswith("bias") or "modulation" in name or "emb_pos" in name:
            noise = 0.1 * noise
        else:
            noise = noise / (p[0].numel() if p.ndim > 1 else p.numel()) ** 0.5
        p.copy_(noise.to(p.dtype))
        del noise
    return model.eval().requires_grad_(False)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], runs: int, warmup: int, device: torch.device) -> tuple[list[float], Any]:
    """Seconds of each of ``runs`` calls of ``fn()`` after ``warmup`` untimed ones (the device
    synchronized around each), and the last call's result."""
    out = None
    times = []
    for i in range(warmup + runs):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, out
