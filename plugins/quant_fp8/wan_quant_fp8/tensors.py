"""fp8 tensors: quantize, dequantize, convert other tools' scale layouts, and the state-dict pass.

Layout and names: see :mod:`wan_quant_fp8.scheme`. Every function here works on any device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from wan_kernel.errors import WeightsError
from wan_kernel.models.weights import dequantize_fp8_weight, fold_fp8_scales, fp8_weight_scale
from wan_quant_fp8.scheme import (
    FP8_MAX,
    SCALE_FLOOR,
    SCALE_KEY,
    SCALE_TENSOR_KEY,
    Fp8Scheme,
    is_quantized_layer,
)

FP8 = torch.float8_e4m3fn
_OTHER_FP8 = tuple(
    getattr(torch, n) for n in ("float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)
)


def quantize_weight(
    weight: torch.Tensor, scheme: Fp8Scheme, *, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize a Linear weight ``[out, in]`` to float8_e4m3fn with ``scheme``'s scales.

    :returns: ``(q, scale)``: ``q`` float8_e4m3fn ``[out, in]``; ``scale`` float32 of
        ``scheme.scale_shape(out, in)`` (``None`` for plain fp8, whose values clamp to +-448).
    :raises WeightsError: the weight is not 2-D or holds NaN / inf.
    """
    if weight.ndim != 2:
        raise WeightsError(f"{name}: a Linear weight is 2-D [out, in], got shape {list(weight.shape)}")
    out_features, in_features = weight.shape
    w = weight.float()
    layout = scheme.layout(out_features, in_features)
    if layout == "none":
        if not bool(torch.isfinite(w).all()):
            raise WeightsError(f"{name}: the weight holds NaN or inf values; the file is damaged")
        return w.clamp(-FP8_MAX, FP8_MAX).to(FP8), None
    if layout == "block":
        grouped = w.view(out_features, in_features // scheme.block_size, scheme.block_size)  # [out, nb, 64]
        amax = grouped.abs().amax(dim=2, keepdim=True)  # [out, nb, 1]
    else:
        grouped = w  # [out, in]
        amax = grouped.abs().amax(dim=1, keepdim=True)  # [out, 1]
    if not bool(torch.isfinite(amax).all()):
        raise WeightsError(f"{name}: the weight holds NaN or inf values; the file is damaged")
    scale = (amax / FP8_MAX).clamp(min=SCALE_FLOOR)
    q = (grouped / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(out_features, in_features)
    return q, scale


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor | None, *, dtype: torch.dtype = torch.float32, name: str = "weight"
) -> torch.Tensor:
    """``q * scale`` as ``dtype`` (computed in float32): the kernel's
    :func:`~wan_kernel.models.weights.dequantize_fp8_weight`, which reads every scale layout
    (``None``, ``[1]``/scalar, ``[out]``, ``[out, 1]``, block-wise ``[out, nb, 1]`` / ``[out, nb]``)."""
    return dequantize_fp8_weight(q, scale, dtype=dtype, name=name)


def adapt_prequantized(
    q: torch.Tensor, scale: torch.Tensor | None, scheme: Fp8Scheme, *, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bring a stored float8_e4m3fn weight and its scale into ``scheme``'s layout.

    Exact (the fp8 values are kept) when the stored scale is already in that layout, absent
    (scale 1), per-tensor, or per-channel widened to blocks. Otherwise (e.g. block scales under
    ``fp8_fast``'s per-channel layout, or another block size) the weight is dequantized and
    quantized again, which adds one more rounding.
    """
    out_features, in_features = q.shape
    want = scheme.scale_shape(out_features, in_features)
    if want is None:  # plain fp8: only unit scales can be dropped without changing the values
        if scale is not None and not bool((scale == 1).all()):
            raise WeightsError(
                f"{name}: this is a scaled-fp8 checkpoint (it stores {SCALE_KEY}); load it with "
                "quant='fp8_scaled' (or fp8_fast), or without quant to run it dequantized"
            )
        return q, None
    if scale is None:
        return q, torch.ones(want, dtype=torch.float32, device=q.device)
    s = scale.to(device=q.device, dtype=torch.float32)
    if tuple(s.shape) == want:
        return q, s
    if s.numel() == 1:  # per tensor: the same scale everywhere
        return q, s.reshape([1] * len(want)).expand(want).contiguous()
    if s.numel() == out_features:  # per channel: the same scale in every block of a row
        return q, s.reshape(out_features, *([1] * (len(want) - 1))).expand(want).contiguous()
    return quantize_weight(dequantize_weight(q, s), scheme, name=name)


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8 or t.dtype in _OTHER_FP8


def quantize_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    scheme: Fp8Scheme,
    *,
    target: str,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """The stored tensors of a ``target`` model under ``scheme`` (see :mod:`wan_quant_fp8.scheme`).

    For every quantized layer ``P`` (by name, :func:`is_quantized_layer`):

    - high-precision ``P.weight`` (fp32/bf16/fp16, or float8_e5m2): quantized on ``device``;
    - float8_e4m3fn ``P.weight`` with or without ``P.scale_weight``: kept as stored, its scale
      brought into the scheme's layout (:func:`adapt_prequantized`);
    - ``P.bias`` unchanged.

    Other tensors stay as they are, except weights with a scale outside the quantized layers,
    which are dequantized to float32 (:func:`wan_kernel.models.weights.fold_fp8_scales`). ComfyUI's ``scale_input`` and ``scaled_fp8`` marker, and
    musubi's ``scale_weight_tensor`` (folded in) are dropped. The input mapping is not modified.
    """
    device = torch.device(device)
    work = device if device.type != "meta" else torch.device("cpu")
    out: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    layer_prefixes = {
        key[: -len(".weight")]
        for key in state_dict
        if key.endswith(".weight") and is_quantized_layer(target, key[: -len(".weight")])
    }
    for prefix in sorted(layer_prefixes):
        wkey = f"{prefix}.weight"
        weight = state_dict[wkey]
        scale = fp8_weight_scale(state_dict, prefix)
        consumed.update({wkey, f"{prefix}.{SCALE_KEY}", f"{prefix}.{SCALE_TENSOR_KEY}"})
        if weight.dtype == FP8:
            q, s = adapt_prequantized(weight.to(work), scale, scheme, name=wkey)
        else:
            hp = dequantize_weight(weight.to(work), scale) if scale is not None else weight.to(work)
            q, s = quantize_weight(hp, scheme, name=wkey)
        out[wkey] = q
        if s is not None:
            out[f"{prefix}.{SCALE_KEY}"] = s
    # the rest, scales of layers kept in high precision folded in (float32), as the kernel's
    # loader does without quantization
    rest = {key: value for key, value in state_dict.items() if key not in consumed}
    out.update(fold_fp8_scales(rest, {}, torch.float32))
    return out
