"""Resolving plugin names once, at set-up, into the objects the stages and loaders are handed.

The models never look plugins up: they take an attention callable and a ``Quantizer`` object.
This module turns the user's names into those objects (through a
:class:`~wan_kernel.plugins.PluginManager`) and checks each quantizer against the model it is for.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from wan_kernel.errors import InputError
from wan_kernel.models.quantization import QuantizerTargetError, check_quantizer
from wan_kernel.plugins import resolve


def resolve_plugin(concern: str, name: str, *, manager=None) -> Any:
    """The implementation registered for ``concern`` under ``name`` (``wan_kernel.plugins.resolve``)."""
    return resolve(concern, name, manager=manager)


def resolve_quantizer(quant: Any, *, target: str, manager=None) -> Any:
    """The quantizer for ``target`` (``"dit"`` or ``"t5"``) from a plugin name or a ``Quantizer``;
    ``None`` stays ``None``.

    :raises PluginError: an unknown or unavailable name.
    :raises QuantizerTargetError: the quantizer does not handle ``target``.
    """
    if isinstance(quant, str):
        quant = resolve_plugin("quantization", quant, manager=manager)
    return check_quantizer(quant, target=target)


@attrs.frozen
class GenerationPlugins:
    """The plugin objects one generation run uses, resolved once."""

    attention: Any
    cfg_schedule: Any
    quantizer: Any = None
    t5_quantizer: Any = None
    offloader: Any = None


def resolve_generation_plugins(config, *, device: torch.device, manager=None) -> GenerationPlugins:
    """Resolve the attention, CFG schedule, quantizers and offload a
    :class:`~wan_kernel.pipelines.config.GenerateConfig` names, checking each fits this run."""
    cfg = config
    attention = resolve_plugin("attention", cfg.attn, manager=manager)
    cfg_schedule = resolve_plugin("cfg_schedule", cfg.cfg_skip_mode, manager=manager)
    quantizer = resolve_quantizer(cfg.quant, target="dit", manager=manager)
    t5_quantizer = resolve_quantizer(cfg.t5_quant, target="t5", manager=manager)
    offload = cfg.offload or ("blockswap" if cfg.blocks_to_swap else None)
    if offload and device.type != "cuda":
        raise InputError(
            f"--offload {offload} / --blocks_to_swap moves DiT blocks between CPU and GPU memory; "
            f"it needs a CUDA device, and this run is on {device}"
        )
    if offload and not cfg.blocks_to_swap:
        raise InputError(
            f"--offload {offload} needs --blocks_to_swap N (how many blocks to keep off the GPU)"
        )
    return GenerationPlugins(
        attention=attention,
        cfg_schedule=cfg_schedule,
        quantizer=quantizer,
        t5_quantizer=t5_quantizer,
        offloader=resolve_plugin("offload", offload, manager=manager) if offload else None,
    )


__all__ = [
    "GenerationPlugins",
    "QuantizerTargetError",
    "resolve_generation_plugins",
    "resolve_plugin",
    "resolve_quantizer",
]
