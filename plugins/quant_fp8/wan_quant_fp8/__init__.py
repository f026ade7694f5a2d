"""fp8 weight quantization for wan (entry point ``quant_fp8``, distribution ``wan-quant-fp8``).

Modes (the names users type; the seed trainer's ``--fp8``, ``--fp8_scaled``, ``--fp8_fast``,
``--fp8_t5`` map to them):

- ``fp8``: the DiT's big Linears stored as float8_e4m3fn without scales (values clamp to
  +-448), up-cast layer by layer at compute time. Reads high-precision files and files already
  stored as float8_e4m3fn.
- ``fp8_scaled``: float8_e4m3fn with float32 scales, one per 64 inputs of each row (per output
  channel where ``in % 64 != 0``); ``amax / 448`` with a floor. Reads high-precision files and
  pre-quantized ones (this plugin's, musubi-tuner's ``--fp8_scaled``, ComfyUI ``scaled_fp8``).
- ``fp8_fast``: ``fp8_scaled`` with per-output-channel scales and fp8 x fp8 matmuls through
  ``torch._scaled_mm`` (per-token dynamic activation scales); CUDA compute capability 8.9+.
- ``fp8_t5``: the umT5 encoder's Linears in fp8 (block scales as ``fp8_scaled``); embeddings,
  relative-position tables and norms stay in high precision.

Kept in high precision in the DiT: ``patch_embedding``, ``text_embedding``, ``time_embedding``,
``time_projection``, ``head``, ``img_emb``, norms, ``modulation`` and every bias. Stored layout:
:mod:`wan_quant_fp8.scheme`.

LoRA: the kernel merges LoRAs into the high-precision weights before this plugin quantizes them
(``load_dit(..., quant=..., state_dict_transform=wan_kernel.lora.LoraMerge(specs))``); merging into
fp8 weights would add a second rounding to every merged layer.

This module does not import torch; the work lives in submodules imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from wan_kernel import hookimpl
from wan_kernel.errors import InputError
from wan_kernel.interfaces import Availability, Quantizer
from wan_kernel.machine import gpu_driver_present
from wan_quant_fp8.scheme import SCHEMES, TARGETS, Fp8Scheme

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

__all__ = [
    "Fp8FastQuantizer",
    "Fp8Quantizer",
    "Fp8ScaledQuantizer",
    "Fp8T5Quantizer",
    "quantize_model",
    "read_quantization_tag",
    "save_quantized",
]

_LAZY = {
    "save_quantized": "wan_quant_fp8.checkpoint",
    "quantize_model": "wan_quant_fp8.checkpoint",
    "read_quantization_tag": "wan_quant_fp8.checkpoint",
    "Fp8Linear": "wan_quant_fp8.linear",
}


def __getattr__(name: str) -> Any:
    """Torch-backed helpers, imported on first use (``from wan_quant_fp8 import save_quantized``)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wan_quant_fp8' has no attribute {name!r}")


def _fp8_dtype_reason() -> str:
    # judged from the installed distribution: `wan plugins` must not import torch
    from wan_kernel.machine import installed_torch_version

    version = installed_torch_version()
    if version is None:
        return "torch is not installed"
    if version < (2, 1):
        return f"torch {version[0]}.{version[1]} has no float8_e4m3fn; install torch>=2.4"
    return ""


class _Fp8Base(Quantizer):
    """Shared behaviour: one :class:`~wan_quant_fp8.scheme.Fp8Scheme` per registered mode."""

    install_hint = "pip install 'torch>=2.4'"

    @property
    def scheme(self) -> Fp8Scheme:
        return SCHEMES[self.name]

    def availability(self) -> Availability:
        reason = _fp8_dtype_reason()
        return Availability.no(reason) if reason else Availability.yes()

    def _check_target(self, target: str) -> None:
        if target not in TARGETS:
            raise InputError(f"unknown quantization target {target!r}; known: {', '.join(TARGETS)}")
        if target not in self.supported_targets:
            raise InputError(
                f"quantization {self.name!r} handles the {', '.join(self.supported_targets)}, "
                f"not the {target}"
                + (
                    "; use fp8_t5 for the text encoder"
                    if target == "t5"
                    else "; use fp8, fp8_scaled or fp8_fast for the DiT"
                )
            )

    def convert_for_runtime(self, model: nn.Module, *, target: str) -> nn.Module:
        """Swap the quantized Linears for empty fp8 ones (:func:`wan_quant_fp8.linear.convert_linears`)."""
        self._check_target(target)
        from wan_quant_fp8.linear import convert_linears

        return convert_linears(model, self.scheme, target=target)

    def quantize_state_dict(
        self, state_dict: dict[str, torch.Tensor], *, target: str, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The stored tensors (see :func:`wan_quant_fp8.tensors.quantize_state_dict`)."""
        self._check_target(target)
        from wan_quant_fp8.tensors import quantize_state_dict

        return quantize_state_dict(state_dict, self.scheme, target=target, device=device)


class Fp8Quantizer(_Fp8Base):
    name = "fp8"
    description = "DiT Linears as float8_e4m3fn without scales, up-cast per layer (any device)"
    supported_targets: ClassVar[tuple[str, ...]] = ("dit",)


class Fp8ScaledQuantizer(_Fp8Base):
    name = "fp8_scaled"
    description = "DiT Linears as float8_e4m3fn with block-wise (64) scales, up-cast per layer (any device)"
    supported_targets: ClassVar[tuple[str, ...]] = ("dit",)


class Fp8FastQuantizer(_Fp8Base):
    name = "fp8_fast"
    description = "fp8_scaled with per-channel scales and fp8 matmuls via torch._scaled_mm (CUDA sm89+)"
    supported_targets: ClassVar[tuple[str, ...]] = ("dit",)
    install_hint = "needs a CUDA GPU with compute capability 8.9+ and torch>=2.4 built with CUDA"

    def availability(self) -> Availability:
        reason = _fp8_dtype_reason()
        if not reason and not gpu_driver_present():  # decided without importing torch
            reason = "needs a CUDA GPU with compute capability 8.9+ (RTX 40xx, L4, L40, H100); this machine has none"
        if not reason:
            from wan_quant_fp8.scaled_mm import scaled_mm_unavailable_reason

            reason = scaled_mm_unavailable_reason()
        return Availability.no(reason) if reason else Availability.yes()


class Fp8T5Quantizer(_Fp8Base):
    name = "fp8_t5"
    description = (
        "umT5 encoder Linears as float8_e4m3fn with block-wise scales; norms, embeddings high precision"
    )
    supported_targets: ClassVar[tuple[str, ...]] = ("t5",)


@hookimpl
def wan_register_quantization(register):
    for cls in (Fp8Quantizer, Fp8ScaledQuantizer, Fp8FastQuantizer, Fp8T5Quantizer):
        register(cls())
