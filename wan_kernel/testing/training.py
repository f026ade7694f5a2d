"""Tiny training fixtures: a random DiT file and cache files in the seed's layout (tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from wan_kernel.models.dit import WanDiT
from wan_kernel.models.dit_config import DiTConfig

TINY_TEXT_DIM = 32


def tiny_dit_config(model_type: str = "t2v", *, layers: int = 2) -> DiTConfig:
    """2 blocks of width 32, 2 heads; in_dim 16 (t2v) or 36 (i2v/flf2v); text width 32."""
    return DiTConfig(
        model_type=model_type,
        dim=32,
        ffn_dim=64,
        num_heads=2,
        num_layers=layers,
        in_dim=16 if model_type == "t2v" else 36,
        out_dim=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
    )


def write_tiny_dit(
    path: Path, model_type: str = "t2v", *, seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32
) -> DiTConfig:
    """Write a random tiny DiT (official key layout) to ``path``; the head is random too, so the
    output depends on the input (the official init zeroes it)."""
    from wan_kernel.testing.attention import reference_attention

    config = tiny_dit_config(model_type, layers=layers)
    torch.manual_seed(seed)
    model = WanDiT(config, attention=reference_attention)
    torch.nn.init.normal_(model.head.head.weight, std=0.05)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    for k in sd:
        if k.endswith("modulation"):
            sd[k] = sd[k].float()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return config


def write_tiny_caches(
    directory: Path,
    count: int,
    *,
    latent_size: tuple[int, int, int] = (1, 4, 4),
    text_dim: int = TINY_TEXT_DIM,
    text_len: int = 5,
    image: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    prefix: str = "item",
) -> list[Path]:
    """Write ``count`` latent + text cache pairs the way ``wan run cache`` names them.

    ``latent_size`` is ``(F, H, W)`` of the latents (pixels: ``H*8 x W*8``); ``image`` ``"i2v"`` or
    ``"flf2v"`` adds ``latents_image`` and ``clip`` tensors. Returns the latent files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    f, h, w = latent_size
    dname = str(dtype).removeprefix("torch.")
    out = []
    for i in range(count):
        base = f"{prefix}{i:03d}"
        tensors = {f"latents_{f}x{h}x{w}_{dname}": torch.randn(16, f, h, w, generator=g).to(dtype)}
        if image is not None:
            tensors[f"latents_image_{f}x{h}x{w}_{dname}"] = torch.randn(20, f, h, w, generator=g).to(dtype)
            shape = (257, 1280) if image == "i2v" else (2, 257, 1280)
            tensors[f"clip_{dname}"] = torch.randn(*shape, generator=g).to(torch.float16)
        meta = {"architecture": "wan", "width": str(w * 8), "height": str(h * 8), "format_version": "1.0.1"}
        name = (
            f"{base}_{w * 8:04d}x{h * 8:04d}_wan.safetensors"
            if f == 1
            else f"{base}_00000-{(f - 1) * 4 + 1:03d}_{w * 8:04d}x{h * 8:04d}_wan.safetensors"
        )
        save_file(tensors, str(directory / name), metadata=meta)
        text = {f"varlen_t5_{dname}": torch.randn(text_len + i % 3, text_dim, generator=g).to(dtype)}
        save_file(
            text,
            str(directory / f"{base}_wan_te.safetensors"),
            metadata={"architecture": "wan", "caption1": f"caption {i}", "format_version": "1.0.1"},
        )
        out.append(directory / name)
    return out
