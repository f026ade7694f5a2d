"""The loaders' quantization seam: what a ``quant=`` argument must be.

Loaders take a resolved ``Quantizer`` object (see ``wan_kernel.interfaces.Quantizer``), never a
plugin name: names are resolved once, at set-up, by
``wan_kernel.pipelines.plugin_setup.resolve_quantizer``, which runs the same check. Used by
``load_dit`` and ``load_t5``.
"""

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


def check_quantizer(quant: Any, *, target: str) -> Any:
    """``quant`` itself when it is ``None`` or a ``Quantizer`` that handles ``target`` (``"dit"``, ``"t5"``).

    :raises InputError: ``quant`` is not a ``Quantizer`` (a name: resolve it first).
    :raises QuantizerTargetError: it does not handle ``target`` (its ``supported_targets``).
    """
    if quant is None:
        return None
    label, example, hint = TARGETS[target]
    if not (
        callable(getattr(quant, "convert_for_runtime", None))
        and callable(getattr(quant, "quantize_state_dict", None))
    ):
        resolve = ""
        if isinstance(quant, str):
            resolve = (
                "; resolve a quantization plugin's name first with "
                f"wan_kernel.pipelines.plugin_setup.resolve_quantizer({quant!r}, target={target!r})"
            )
        raise InputError(f"quant must be a Quantizer (e.g. the {example!r} plugin's), got {quant!r}{resolve}")
    handles = tuple(getattr(quant, "supported_targets", ("dit",)))
    if target not in handles:
        names = ", ".join(TARGETS[t][0] if t in TARGETS else t for t in handles)
        raise QuantizerTargetError(
            f"quantization {getattr(quant, 'name', quant)!r} does not support the {label} "
            f"(it handles the {names}, not the {label}; use {hint})"
        )
    return quant
