"""``wan lora resize``: a LoRA at a lower rank, by an SVD of each module's delta."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from wan_kernel.errors import InputError
from wan_kernel.lora.adapters import LoraModule
from wan_kernel.lora.convert import modules_by_path, write_layout
from wan_kernel.lora.formats import (
    read_lora,
    resolve_layout,
)

__all__ = ["resize_lora"]


def resize_lora(
    input: str | os.PathLike,
    output: str | os.PathLike,
    rank: int,
    *,
    target: str | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> tuple[Path, dict[str, float]]:
    """Reduce every module to at most ``rank`` by an SVD of its delta; report the kept energy per module.

    ``dW = U S V^T`` (float32); ``up = U_r sqrt(S_r)``, ``down = sqrt(S_r) V_r^T``, alpha = r (scale 1).
    kept energy = ``sum(S_r^2) / sum(S^2)`` (1.0: the new delta is exact). LoHa and LoKr modules
    become plain LoRAs; DoRA magnitudes, bias and full deltas are kept as they are.

    :returns: the path and the kept energy of each module.
    """
    if rank < 1:
        raise InputError(f"--rank must be at least 1, got {rank}")
    lora = read_lora(input)
    modules, _ = modules_by_path(lora, strict=strict, what="resize")
    layout = (
        resolve_layout(target)
        if target
        else (lora.layout if lora.layout in ("kohya", "comfyui", "diffusers") else "kohya")
    )
    out: dict[str, LoraModule] = {}
    energy: dict[str, float] = {}
    for path, module in modules.items():
        product = module.product()
        if product is None:
            out[path] = module
            continue
        delta = product.flatten(1) * module.scale  # [out, in * k]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        total = float(s.pow(2).sum())
        energy[path] = float(s[:r].pow(2).sum()) / total if total > 0 else 1.0
        root = s[:r].sqrt()
        up = u[:, :r] * root  # [out, r]
        down = root[:, None] * vh[:r]  # [r, in * k]
        t = module.tensors
        store = dtype or (t["down"].dtype if "down" in t else torch.float32)
        if "down" in t and t["down"].dim() > 2:  # a conv LoRA keeps its kernel dims
            down = down.reshape(r, *t["down"].shape[1:])
            up = up.reshape(up.shape[0], r, *([1] * (t["down"].dim() - 2)))
        tensors = {"down": down.to(store), "up": up.to(store)}
        for role in ("diff", "diff_b", "dora_scale", "magnitude"):
            if role in t:
                tensors[role] = t[role]
        if "bias" in t:
            tensors["diff_b"] = module.bias_delta()
        out[path] = LoraModule(name=path, tensors=tensors, alpha=float(r))
    metadata = dict(lora.metadata)
    if "ss_network_dim" in metadata:
        metadata["ss_network_dim"] = str(rank)
        metadata["ss_network_alpha"] = str(rank)
    written, _ = write_layout(out, output, layout, metadata=metadata, overwrite=overwrite)
    return written, energy
