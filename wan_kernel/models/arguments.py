"""Argument checks shared by the public loaders (``load_dit``, ``load_vae``, ``load_t5``,
``load_clip_vision``): one place that turns a wrong argument into an :class:`InputError` that
says what was given and what is accepted, instead of a bare ``TypeError`` deep inside torch.
"""

from __future__ import annotations

from typing import Iterable

import torch

from wan_kernel.errors import InputError

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}
"""The spellings ``dtype=`` accepts as text (case-insensitive, an optional ``torch.`` prefix)."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_dtype(
    dtype: object, *, allowed: Iterable[torch.dtype], what: str = "the model", hint: str = ""
) -> torch.dtype | None:
    """``dtype`` (a ``torch.dtype``, a name such as ``"bf16"`` / ``"float32"`` / ``"torch.half"``, or
    ``None``) as a ``torch.dtype`` from ``allowed``; ``None`` stays ``None``.

    :raises InputError: an unknown name, another type, or a dtype ``what`` cannot compute in.
    """
    if dtype is None:
        return None
    allowed = tuple(allowed)
    names = ", ".join(_dtype_name(d) for d in allowed)
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in DTYPE_NAMES:
            raise InputError(f"unknown dtype {dtype!r} for {what}; use one of {names}")
        dtype = DTYPE_NAMES[key]
    if not isinstance(dtype, torch.dtype):
        raise InputError(
            f"dtype for {what} must be a torch.dtype or its name (e.g. 'bfloat16'), "
            f"got {type(dtype).__name__} "
            f"{dtype!r:.60}"
        )
    if dtype not in allowed:
        raise InputError(
            f"{what} runs in {names}, not dtype {_dtype_name(dtype)}" + (f" ({hint})" if hint else "")
        )
    return dtype


def check_num_heads(num_heads: object, *, what: str = "the model") -> int | None:
    """``num_heads`` checked to be ``None`` or a positive ``int`` (``True`` and ``2.0`` are refused).

    :raises InputError: naming the value and its type.
    """
    if num_heads is None:
        return None
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise InputError(
            f"num_heads for {what} must be a positive int, got {type(num_heads).__name__} {num_heads!r:.40}"
        )
    if num_heads <= 0:
        raise InputError(f"num_heads for {what} must be positive, got {num_heads}")
    return num_heads


def check_device(device: object) -> torch.device:
    """``device`` (``"cpu"``, ``"cuda:0"``, a ``torch.device``) as a ``torch.device``.

    :raises InputError: not a device name, or a CUDA device on a machine without one.
    """
    if isinstance(device, torch.device):
        resolved = device
    elif isinstance(device, str):
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise InputError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    else:
        raise InputError(f"device must be a str or torch.device, got {type(device).__name__} {device!r:.40}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: this machine has no CUDA GPU (or torch has no CUDA); use 'cpu'")
    return resolved
