"""The loaders' quantization seam: turn ``quant=`` (a plugin name or a Quantizer) into a quantizer
checked to handle the model being loaded. Used by ``load_dit`` and ``load_t5``."""

from __future__ import annotations

from typing import Any

from wan_kernel.errors import InputError, PluginError

TARGETS = {
    "dit": ("DiT", "fp8", "fp8, fp8_scaled or fp8_fast for the DiT"),
    "t5": ("T5 text encoder", "fp8_t5", "fp8_t5 for the text encoder"),
}
"""target -> (what it is called in messages, an example name, which quantizers to use instead)."""


class QuantizerTargetError(PluginError, InputError):
    """The selected quantizer does not handle this model (e.g. ``fp8_t5`` given for the DiT)."""


def resolve_quantizer(quant: Any, *, target: str, manager=None) -> Any:
    """The quantizer for ``target`` ("dit" or "t5"); ``None`` stays ``None``."""
    if quant is None:
        return None
    label, example, hint = TARGETS[target]
    if isinstance(quant, str):
        from wan_kernel.plugins import resolve

        quant = resolve("quantization", quant, manager=manager)
    if not (
        callable(getattr(quant, "convert_for_runtime", None))
        and callable(getattr(quant, "quantize_state_dict", None))
    ):
        raise InputError(
            f"quant must be a quantization plugin name (e.g. {example!r}) or a Quantizer, got {quant!r}"
        )
    handles = tuple(getattr(quant, "supported_targets", ("dit",)))
    if target not in handles:
        names = ", ".join(TARGETS[t][0] if t in TARGETS else t for t in handles)
        raise QuantizerTargetError(
            f"quantization {getattr(quant, 'name', quant)!r} does not support the {label} "
            f"(it handles the {names}, not the {label}; use {hint})"
        )
    return quant
