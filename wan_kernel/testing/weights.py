"""Random weights for tests and the demo: every tensor drawn, nothing left at the official init.

The official init zeroes the DiT's head and the biases (an untrained model would predict nothing);
tests that compare two implementations or two layouts need every weight to count.
"""

from __future__ import annotations

import torch
from torch import nn


def randomize_weights(
    module: nn.Module,
    seed: int = 0,
    *,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Draw every floating-point parameter of ``module`` in place and return it.

    Norm scales (1-D ``weight``) ``1 + 0.1 N``, other vectors (biases) ``0.05 N``, ``modulation``
    tables ``0.1 N``, matrices and kernels ``N / sqrt(fan_in)`` (``fan_in`` = elements per output row).

    :param seed: seeds a new generator on ``device`` (unless ``generator`` is given).
    :param generator: draw from this generator instead (its device is used).
    :param device: where the numbers are drawn (the same seed gives other numbers on another device);
        they are copied into the parameters wherever those live.
    """
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if not param.is_floating_point():
                continue
            draw = torch.randn(param.shape, generator=generator, device=generator.device, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "modulation":
                value = 0.1 * draw
            elif param.ndim == 1:
                value = 1.0 + 0.1 * draw if leaf == "weight" else 0.05 * draw
            else:
                value = draw / param[0].numel() ** 0.5
            param.copy_(value.to(param.dtype))
    return module
