"""The fp8 Linear module and the module swap that puts it in a model.

:class:`Fp8Linear` holds ``weight`` (float8_e4m3fn ``[out, in]``, a parameter without gradient),
``scale_weight`` (float32 buffer, or ``None`` for plain fp8) and ``bias`` (high precision). Both
fp8 tensors move with ``.to(device)`` (block swap) and keep their dtypes under ``.to(dtype)``,
``.half()``, ``.float()``: only the bias follows a dtype cast. It subclasses ``nn.Linear`` so that
code looking for Linears (LoRA) finds it, with ``in_features`` / ``out_features`` as usual.

Compute: ``y = x @ dequant(weight).T + bias`` in ``x``'s dtype (dequantized per call, layer by
layer), or, for ``fp8_fast`` on CUDA, ``torch._scaled_mm`` on fp8 operands
(:mod:`wan_quant_fp8.scaled_mm`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wan_quant_fp8.scaled_mm import fits_scaled_mm, scaled_mm_linear
from wan_quant_fp8.scheme import Fp8Scheme, is_quantized_layer
from wan_quant_fp8.tensors import FP8

_DTYPE_PROBES = (torch.float16, torch.bfloat16)


class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored as float8_e4m3fn with optional float32 scales.

    :param scale_shape: shape of ``scale_weight`` (see :mod:`wan_quant_fp8.scheme`); ``None``: plain fp8.
    :param use_scaled_mm: multiply in fp8 with ``torch._scaled_mm`` on CUDA (per-token activation
        scales, per-channel or per-tensor weight scales); otherwise, and on other devices, up-cast.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        scale_shape: tuple[int, ...] | None = None,
        use_scaled_mm: bool = False,
        bias_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = "meta",
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a high-precision weight
        self.in_features = in_features
        self.out_features = out_features
        self.use_scaled_mm = use_scaled_mm
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False
        )
        if bias:
            self.bias = nn.Parameter(
                torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)
        scale = None if scale_shape is None else torch.ones(scale_shape, dtype=torch.float32, device=device)
        self.register_buffer("scale_weight", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Fp8Scheme) -> Fp8Linear:
        """An (empty, ``meta``) fp8 replacement of ``linear``; its bias parameter is kept as is."""
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            scale_shape=scheme.scale_shape(linear.out_features, linear.in_features),
            use_scaled_mm=scheme.scaled_mm,
        )
        if linear.bias is not None:
            module.bias = linear.bias
        return module

    def reset_parameters(self) -> None:
        """Nothing to initialise: the weights come from a state dict (``load_state_dict(assign=True)``)."""

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``weight * scale_weight`` as ``dtype`` ``[out, in]`` (float32 work for float16: small scales)."""
        work = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        w = self.weight.to(work)
        scale = self.scale_weight
        if scale is None:
            return w.to(dtype)
        if scale.ndim == 3:  # block-wise [out, nb, 1]
            w = (w.view(self.out_features, scale.shape[1], -1) * scale.to(work)).view(
                self.out_features, self.in_features
            )
        else:  # [out, 1] or [1]
            w = w * scale.to(work)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., in]`` -> ``[..., out]`` in ``x``'s dtype."""
        if self.use_scaled_mm and x.is_cuda and fits_scaled_mm(x, self.weight, self.scale_weight):
            return scaled_mm_linear(x, self.weight, self.scale_weight, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        """Let device moves reach every tensor but dtype casts only the bias."""
        if self.weight.device.type == "meta":
            return super()._apply(fn, recurse)
        device = self.weight.device
        probes = [fn(torch.empty(0, dtype=d, device=device)) for d in _DTYPE_PROBES]
        if all(p.dtype == d for p, d in zip(probes, _DTYPE_PROBES)):
            return super()._apply(fn, recurse)
        target = probes[0].device
        params, buffers = dict(self._parameters), dict(self._buffers)
        weight, scale = self._parameters.pop("weight"), self._buffers.pop("scale_weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"], self._buffers["scale_weight"] = weight, scale
            self._parameters = {k: self._parameters[k] for k in params}  # original order
            self._buffers = {k: self._buffers[k] for k in buffers}
        with torch.no_grad():
            weight.data = weight.data.to(target)
        if scale is not None:
            self._buffers["scale_weight"] = scale.to(target)
        return self

    def extra_repr(self) -> str:
        scale = "none" if self.scale_weight is None else "x".join(str(n) for n in self.scale_weight.shape)
        kernel = "scaled_mm" if self.use_scaled_mm else "upcast"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            f"fp8 weight, scale={scale}, compute={kernel}"
        )


class Fp8DenseFFN(nn.Module):
    """transformers' (U)MT5 feed-forward with the same children, minus the cast of the hidden
    states to ``wo.weight``'s dtype (which would be fp8 here); computes in the input's dtype.

    Gated (``wi_0``, ``wi_1``): ``wo(dropout(act(wi_0(x)) * wi_1(x)))``; plain: ``wo(dropout(act(wi(x))))``.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        for name, child in original.named_children():
            self.add_module(name, child)
        self.gated = hasattr(original, "wi_0")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, L, d_model]`` -> ``[B, L, d_model]``."""
        if self.gated:
            h = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)  # [B, L, d_ff]
        else:
            h = self.act(self.wi(hidden_states))  # [B, L, d_ff]
        return self.wo(self.dropout(h))


def convert_linears(model: nn.Module, scheme: Fp8Scheme, *, target: str) -> nn.Module:
    """Swap the ``target`` model's quantized Linears (by name) for empty :class:`Fp8Linear` s, in place.

    The new fp8 weights and scales live on ``meta`` until ``load_state_dict(assign=True)`` fills
    them with :func:`wan_quant_fp8.tensors.quantize_state_dict`'s output. For ``t5`` the
    feed-forward blocks around fp8 Linears become :class:`Fp8DenseFFN`.
    """
    for name, module in list(model.named_modules()):
        if (
            isinstance(module, nn.Linear)
            and not isinstance(module, Fp8Linear)
            and is_quantized_layer(target, name)
        ):
            _set_child(model, name, Fp8Linear.from_linear(module, scheme))
    if target == "t5":
        for name, module in list(model.named_modules()):
            if isinstance(getattr(module, "wo", None), Fp8Linear) and not isinstance(module, Fp8DenseFFN):
                _set_child(model, name, Fp8DenseFFN(module))
    return model


def _set_child(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
