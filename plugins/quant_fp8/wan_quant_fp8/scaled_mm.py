"""fp8 x fp8 matmuls through ``torch._scaled_mm`` (the ``fp8_fast`` compute path).

``y = (x_q * s_x) @ (w_q * s_w).T + bias`` with

- ``x_q`` float8_e4m3fn ``[M, K]``, ``s_x`` ``[M, 1]``: dynamic per-token activation scales
  (``amax / 448`` of each row of ``x``, computed every call);
- ``w_q`` float8_e4m3fn ``[N, K]``, ``s_w``: the stored weight scale, per output channel
  ``[N, 1]`` or per tensor ``[1]`` (block scales are not a ``_scaled_mm`` layout: such layers
  up-cast instead, see :func:`fits_scaled_mm`).

Two kernels, chosen per device: row-wise scaling (``scale_a [M, 1]``, ``scale_b [1, N]``, bfloat16
out) where ``_scaled_mm`` supports it (compute capability 9.0+, and the CPU), else tensor-wise
unit scales with both scale vectors applied to the bfloat16 product (compute capability 8.9).
``_scaled_mm`` needs ``K`` and ``N`` divisible by 16.
"""

from __future__ import annotations

import torch

from wan_quant_fp8.scheme import FP8_MAX, SCALE_FLOOR

FP8 = torch.float8_e4m3fn
MIN_CAPABILITY = (8, 9)
ROWWISE_CAPABILITY = (9, 0)


def scaled_mm_unavailable_reason() -> str:
    """Why ``fp8_fast`` cannot run here (empty string when it can)."""
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn; install torch>=2.4"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm; install torch>=2.4"
    if not torch.cuda.is_available():
        return (
            "needs a CUDA GPU with compute capability 8.9+ (RTX 40xx, L4, L40, H100); this machine has none"
        )
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name()
        return (
            f"needs a GPU with compute capability 8.9+ for fp8 matmuls; {name} has "
            f"{capability[0]}.{capability[1]} (use fp8_scaled instead)"
        )
    return ""


def fits_scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> bool:
    """Whether ``_scaled_mm`` can compute this layer: float input, ``K``/``N`` multiples of 16,
    and a per-channel ``[N, 1]`` / per-tensor weight scale (or none)."""
    n, k = weight.shape
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k % 16 or n % 16:
        return False
    return scale is None or scale.numel() == 1 or tuple(scale.shape) == (n, 1)


def rowwise_supported(device: torch.device) -> bool:
    """Whether ``_scaled_mm`` takes row-wise scales on ``device`` (CPU, or CUDA 9.0+)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= ROWWISE_CAPABILITY
    return device.type == "cpu"


def quantize_per_token(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x2`` ``[M, K]`` -> ``(x_q`` float8_e4m3fn ``[M, K]``, ``scale`` float32 ``[M, 1])``."""
    amax = x2.abs().amax(dim=1, keepdim=True).float()  # [M, 1]
    scale = (amax / FP8_MAX).clamp(min=SCALE_FLOOR)  # [M, 1]
    work = x2 if x2.dtype == torch.bfloat16 else x2.float()  # bf16 holds the range; fp16 may not
    xq = (work / scale.to(work.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # [M, K]
    return xq, scale


def scaled_mm_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    rowwise: bool | None = None,
) -> torch.Tensor:
    """``x`` ``[..., K]`` through the fp8 weight ``[N, K]`` -> ``[..., N]`` in ``x``'s dtype.

    :param rowwise: force the row-wise (``True``) or tensor-wise (``False``) kernel; ``None``:
        row-wise where :func:`rowwise_supported`.
    """
    n, k = weight.shape
    lead = x.shape[:-1]
    xq, sx = quantize_per_token(x.reshape(-1, k))  # [M, K], [M, 1]
    if scale is None:
        sw = torch.ones(1, n, dtype=torch.float32, device=x.device)
    else:
        sw = scale.to(device=x.device, dtype=torch.float32).reshape(1, -1).expand(1, n).contiguous()  # [1, N]
    if rowwise is None:
        rowwise = rowwise_supported(x.device)
    if rowwise:
        y = torch._scaled_mm(xq, weight.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)  # [M, N]
    else:
        one = torch.ones((), dtype=torch.float32, device=x.device)
        y = torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # [M, N]
        y = _first(y) * (sx * sw).to(torch.bfloat16)  # [M, N]
    y = _first(y)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, n)


def _first(y):
    """``_scaled_mm``'s product (some torch versions returned ``(out, amax)``)."""
    return y[0] if isinstance(y, tuple) else y
