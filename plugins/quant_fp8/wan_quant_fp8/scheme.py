"""What each fp8 mode stores, and which layers it quantizes. Does not import torch.

Stored layout (one quantized ``nn.Linear`` named ``P``, weight ``[out, in]``)::

    P.weight        float8_e4m3fn [out, in]
    P.scale_weight  float32, one of
                    [out, in / 64, 1]   block-wise: one scale per 64 inputs of a row ("block")
                    [out, 1]            per output channel                         ("channel")
                    absent              plain fp8, no scale                         ("none")
    P.bias          high precision (the model's compute dtype), never quantized

    dequantized weight = P.weight.float() * P.scale_weight   (block: on the [out, in/64, 64] view)
    scale = max(amax / 448, SCALE_FLOOR)  over the block / row / tensor

These are the names and shapes musubi-tuner's ``fp8_optimization_utils`` writes for its
``--fp8_scaled`` checkpoints (block ``[out, blocks, 1]``, channel ``[out, 1]``, tensor ``[1]``),
so such files load; per-tensor ``[1]`` / scalar scales (musubi's tensor mode), ComfyUI's
``scaled_fp8`` files (scalar ``scale_weight``, ``scale_input``,
a ``scaled_fp8`` marker tensor) and musubi's two-level files (``scale_weight_tensor``) are read
too and converted to the layout above (exactly where the scales broadcast, see
:func:`wan_quant_fp8.tensors.adapt_prequantized`).
"""

from __future__ import annotations

import re

import attrs

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value."""
SCALE_FLOOR = 1e-12
"""Smallest scale: an all-zero block quantizes to zeros instead of dividing by zero."""
BLOCK_SIZE = 64
"""Inputs per scale in block-wise mode (musubi-tuner's default)."""

SCALINGS = ("none", "block", "channel")

SCALE_KEY = "scale_weight"
SCALE_TENSOR_KEY = "scale_weight_tensor"
"""musubi-tuner's second-level (per-tensor) factor of block scales; folded into ``scale_weight``."""

METADATA_FORMAT = "wan_quant"
"""safetensors metadata key :func:`wan_quant_fp8.checkpoint.save_quantized` writes (value: the mode)."""
METADATA_VERSION = "wan_quant_version"


@attrs.frozen
class Fp8Scheme:
    """One mode's storage and compute choices.

    :param mode: the registered name (``fp8``, ``fp8_scaled``, ``fp8_fast``, ``fp8_t5``).
    :param scaling: ``none`` (plain cast, values clamp to +-448), ``block`` (64 inputs per scale
        where ``in % 64 == 0``, else per output channel) or ``channel`` (per output channel).
    :param scaled_mm: compute with ``torch._scaled_mm`` (fp8 x fp8) on CUDA instead of up-casting.
    """

    mode: str
    scaling: str = attrs.field(validator=attrs.validators.in_(SCALINGS))
    block_size: int = BLOCK_SIZE
    scaled_mm: bool = False

    def layout(self, out_features: int, in_features: int) -> str:
        """``none``, ``block`` or ``channel`` for a weight ``[out, in]``.

        Block-wise needs ``in % block_size == 0``; other widths get one scale per output channel.
        (Per-tensor scales are only read, from other tools' files, and widened on load.)
        """
        if self.scaling == "none":
            return "none"
        if self.scaling == "block" and in_features % self.block_size == 0:
            return "block"
        return "channel"

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...] | None:
        """Shape of ``scale_weight`` for a weight ``[out, in]`` (``None``: no scale stored)."""
        layout = self.layout(out_features, in_features)
        if layout == "block":
            return (out_features, in_features // self.block_size, 1)
        if layout == "channel":
            return (out_features, 1)
        return None


SCHEMES: dict[str, Fp8Scheme] = {
    "fp8": Fp8Scheme("fp8", "none"),
    "fp8_scaled": Fp8Scheme("fp8_scaled", "block"),
    "fp8_fast": Fp8Scheme("fp8_fast", "channel", scaled_mm=True),
    "fp8_t5": Fp8Scheme("fp8_t5", "block"),
}
"""The registered modes. ``fp8_fast`` keeps per-output-channel scales: the row-wise layout
``torch._scaled_mm`` takes for its second operand."""

_TARGET_LAYERS: dict[str, re.Pattern[str]] = {
    # the DiT's big Linears (official Wan2.1 names); embeddings, time MLPs, head, img_emb,
    # norms and modulation stay in high precision
    "dit": re.compile(
        r"^blocks\.\d+\.(?:self_attn\.(?:q|k|v|o)|cross_attn\.(?:q|k|v|o|k_img|v_img)|ffn\.(?:0|2))$"
    ),
    # transformers' (U)MT5 encoder: attention projections and the feed-forward; embeddings,
    # relative-position tables and norms stay in high precision
    "t5": re.compile(
        r"^encoder\.block\.\d+\.layer\."
        r"(?:0\.SelfAttention\.(?:q|k|v|o)|1\.DenseReluDense\.(?:wi|wi_0|wi_1|wo))$"
    ),
}
TARGETS = tuple(_TARGET_LAYERS)


def is_quantized_layer(target: str, name: str) -> bool:
    """Whether the module ``name`` (e.g. ``blocks.3.ffn.0``) of a ``target`` model is stored in fp8."""
    return _TARGET_LAYERS[target].match(name) is not None
