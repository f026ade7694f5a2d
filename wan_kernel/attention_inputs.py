"""Input checks and dtype handling shared by attention backends whose kernels need CUDA.

Backend plugins (ours and third parties') call these before handing tensors to a library kernel,
so that every backend rejects bad input with the same clear message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from wan_kernel.errors import InputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch


def check_attention_inputs(
    q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", *, backend: str, device_type: str | None = "cuda"
) -> None:
    """Shapes ``[B, L, H, D]`` that agree, floating point, on ``device_type``; else ``InputError``.

    ``device_type=None`` accepts any device.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise InputError(
            f"{backend} attention takes q, k, v shaped [batch, length, heads, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise InputError(
            f"{backend} attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must share "
            "batch, heads and head_dim, and k and v must have the same shape"
        )
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise InputError(
            f"{backend} attention takes floating-point tensors, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    devices = {t.device for t in (q, k, v)}
    if len(devices) != 1 or (device_type is not None and next(iter(devices)).type != device_type):
        where = ", ".join(sorted(str(d) for d in devices))
        raise InputError(
            f"{backend} attention runs on {device_type.upper() if device_type else 'one device'} tensors "
            f"only, got tensors on {where}; move the model to a GPU, or use the sdpa attention backend, "
            "which runs on any device"
        )


def half_precision(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor"):
    """``q``, ``k``, ``v`` in a half-precision kernel dtype: ``q``'s if fp16/bf16, else bf16."""
    import torch

    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return q.to(dtype), k.to(dtype), v.to(dtype)


def key_lengths(k_lens: "torch.Tensor | Sequence[int] | None", batch: int, k_len: int) -> list[int] | None:
    """``k_lens`` as a list of ints checked to lie in ``1..k_len``; ``None`` when no key is masked."""
    if k_lens is None:
        return None
    import torch

    k_lens = torch.as_tensor(k_lens)
    if k_lens.dim() != 1 or k_lens.shape[0] != batch or k_lens.is_floating_point():
        raise InputError(
            f"k_lens must be an integer tensor of {batch} key lengths (one per sample), "
            f"got {k_lens.dtype} of shape {tuple(k_lens.shape)}"
        )
    lengths = [int(n) for n in k_lens.tolist()]
    if any(not 1 <= n <= k_len for n in lengths):
        raise InputError(f"k_lens must lie between 1 and the key length {k_len}, got {lengths}")
    if all(n == k_len for n in lengths):
        return None
    return lengths
