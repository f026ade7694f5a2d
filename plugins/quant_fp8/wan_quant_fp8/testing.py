"""Helpers the plugin's tests and ``benchmarks/quant.py`` share: random DiT weights and measures.

Random weights instead of the official init: the official init zeroes the head (the output
would be zero) and the biases; here every tensor is drawn, and with ``spread_rows`` the rows of
each quantized Linear have a few outlier rows (4x louder) and the q/k projections are drawn small
(std 0.002: their outputs are RMS-normalised, so the model does not care, but most of those
values lie below float8_e4m3fn's smallest normal 2^-6 where a plain fp8 cast is coarse): the case
where scales beat a plain fp8 cast.
"""

from __future__ import annotations

import torch
from torch import nn

from wan_kernel.testing import randomize_weights
from wan_quant_fp8.scheme import is_quantized_layer


def randomize_(
    model: nn.Module, seed: int = 0, *, spread_rows: bool = True, device: str | torch.device = "cpu"
) -> nn.Module:
    """Draw every parameter in place (``wan_kernel.testing.randomize_weights``: weights
    ``N(0, 1/fan_in)``, biases ``0.05 N``, norm scales ``1 + 0.1 N``, modulation ``0.1 N``); with
    ``spread_rows``, the attention q/k weights ``0.002 N`` and rows 0-3 of every quantized DiT
    Linear x4 (outliers). The numbers are drawn
    on ``device`` (the same seed gives other numbers on another device) and copied in."""
    g = torch.Generator(device=device).manual_seed(seed)
    randomize_weights(model, generator=g)
    with torch.no_grad():
        if spread_rows:
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear) and is_quantized_layer("dit", name):
                    if name.rsplit(".", 1)[-1] in ("q", "k"):
                        module.weight.copy_(
                            0.002 * torch.randn(module.weight.shape, generator=g, device=device)
                        )
                    module.weight[0:4] *= 4.0
    return model


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def state_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (meta tensors count by shape and dtype)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
