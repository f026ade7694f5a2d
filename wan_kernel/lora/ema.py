"""``wan lora ema``: the seed trainer's post-hoc EMA over LoRA checkpoints of one run
(musubi-tuner ``lora_post_hoc_ema.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.lora.formats import check_finite_lora, parse_lora, save_lora_file
from wan_kernel.models.weights import describe_keys, load_state_dict, read_safetensors_metadata

__all__ = ["ema_betas", "ema_loras", "sigma_rel_to_gamma"]

Log = Callable[[str], None] | None


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Karras et al. 2024 (EDM2), Algorithm 2: the largest real root of
    ``g^3 + 7g^2 + (16 - t)g + 12 - t`` with ``t = sigma_rel^-2``."""
    import numpy as np

    if not 0 < sigma_rel < 12**-0.5:
        raise InputError(f"--sigma_rel must be between 0 and {12**-0.5:.4f}, got {sigma_rel}")
    t = sigma_rel**-2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots[np.isreal(roots) & (roots.real >= 0)].real.max())


def ema_betas(
    count: int, *, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None
) -> list[float]:
    """The decay used when folding in checkpoint 2, 3, ... (musubi-tuner's ``lora_post_hoc_ema.py``).

    ``sigma_rel``: the power-function EMA, ``beta_t = (1 - 1/t) ** (gamma + 1)`` for t = 1, 2, ...;
    otherwise ``beta`` interpolated linearly to ``beta2`` over the checkpoints after the first.
    """
    steps = count - 1
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1 - 1 / t) ** (gamma + 1) for t in range(1, steps + 1)]
    end = beta if beta2 is None else beta2
    return [beta + (end - beta) * (i / (steps - 1)) if steps > 1 else beta for i in range(steps)]


def ema_loras(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    beta: float = 0.95,
    beta2: float | None = None,
    sigma_rel: float | None = None,
    sort: bool = True,
    overwrite: bool = False,
    log: Log = None,
) -> Path:
    """Average a series of LoRA checkpoints of one run with the seed's post-hoc EMA.

    As musubi-tuner's ``lora_post_hoc_ema.py``: the files sorted by modification time (unless
    ``sort`` is false); the oldest initialises the average (float32); each later file ``x`` gives
    ``avg = beta * avg + (1 - beta) * x``; ``.alpha`` tensors must agree and are not averaged;
    non-float tensors are kept from the first file; tensors are stored back in their dtypes; the
    metadata is the newest file's, with the hashes recomputed.
    """
    files = [Path(p).expanduser() for p in paths]
    if len(files) < 2:
        raise InputError("post-hoc EMA needs at least two LoRA checkpoints")
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{f}: file not found")
    if sort:
        files.sort(key=lambda f: f.stat().st_mtime)
    betas = ema_betas(len(files), beta=beta, beta2=beta2, sigma_rel=sigma_rel)
    first = load_state_dict(files[0], what="LoRA")
    parse_lora(first, path=files[0])  # a LoRA, not some other weights file
    check_finite_lora(first, files[0])
    dtypes = {k: v.dtype for k, v in first.items()}
    avg = {k: v.float() if v.is_floating_point() else v.clone() for k, v in first.items()}
    for f, b in zip(files[1:], betas):
        if log is not None:
            log(f"{f.name}: beta {b:.4f}")
        sd = load_state_dict(f, what="LoRA")
        parse_lora(sd, path=f)
        check_finite_lora(sd, f)
        if sd.keys() != avg.keys():
            missing, extra = avg.keys() - sd.keys(), sd.keys() - avg.keys()
            raise WeightsError(
                f"{f}: its tensors differ from {files[0].name}'s (missing {describe_keys(missing, 3)}; "
                f"extra {describe_keys(extra, 3)}); EMA averages checkpoints of one training run"
            )
        for key, value in sd.items():
            if key.endswith(".alpha"):
                if not torch.allclose(avg[key].float(), value.float()):
                    raise WeightsError(
                        f"{f}: {key} is {value.item()}, not {avg[key].item()} as in the other files"
                    )
                continue
            if not value.is_floating_point():
                continue
            avg[key] = avg[key] * b + value.float() * (1 - b)
    out = {k: v.to(dtypes[k]) for k, v in avg.items()}
    metadata = read_safetensors_metadata(files[-1]) if files[-1].suffix == ".safetensors" else {}
    return save_lora_file(output, out, metadata, overwrite=overwrite)
