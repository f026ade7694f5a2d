"""LoRA tensor names: which module a key belongs to, what role it plays, and the module's official path.

A LoRA key is ``<module name><suffix>``. The suffix says the tensor's role (``lora_down``/
``lora_A``, ``lora_up``/``lora_B``, ``alpha``, LoHa ``hada_*``, LoKr ``lokr_*``, DoRA
``dora_scale``/``lora_magnitude_vector``, full deltas ``diff``/``diff_b``); the module name is
mapped to the DiT's official module path (``blocks.0.self_attn.q``) without a model, from the
tables of :mod:`wan_kernel.models.dit_keys`:

- underscored names (kohya/musubi ``lora_unet_blocks_0_self_attn_q``, Wan-Fun ``lora_unet__``,
  SimpleTuner/ai-toolkit ``lycoris_``): the part after the prefix is looked up among the official
  and diffusers module paths with ``.`` replaced by ``_``, so ``self_attn`` is never split;
- dotted names with the prefixes peers write (``diffusion_model.``, ``model.diffusion_model.``,
  ``transformer.``, ``base_model.model.``, ``pipe.dit.``, ``dit.``): official or diffusers module
  paths (``attn1.to_q`` -> ``self_attn.q``).
"""

from __future__ import annotations

import re

from wan_kernel.models.dit_keys import IN_BLOCK_MODULES, TOP_LEVEL_MODULES

__all__ = [
    "KOHYA_PREFIX",
    "ROLES",
    "kohya_name",
    "official_path",
    "split_key",
]

KOHYA_PREFIX = "lora_unet_"
UNDERSCORED_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_", "lora_transformer_")
DOTTED_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
    "pipe.dit.",
    "dit.",
)

# suffix -> role. Matched longest first, so ".lora_A.default.weight" wins over ".weight" forms.
_SUFFIX_ROLES: dict[str, str] = {
    # low-rank pair: down [r, in, *k], up [out, r, *1]
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_A.default.weight": "down",
    ".lora_B.default.weight": "up",
    ".lora_A": "down",  # ComfyUI accepts these without ".weight"
    ".lora_B": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    "_lora.down.weight": "down",
    "_lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".lora_B.bias": "bias",
    ".lora_B.default.bias": "bias",
    ".lora_up.bias": "bias",
    ".alpha": "alpha",
    # DoRA: LyCORIS/ComfyUI magnitude, PEFT magnitude vector
    ".dora_scale": "dora_scale",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector.default": "magnitude",
    ".lora_magnitude_vector.default.weight": "magnitude",
    # full deltas (ComfyUI / diffusers' diff_b)
    ".diff": "diff",
    ".diff_b": "diff_b",
    # LoHa
    ".hada_w1_a": "hada_w1_a",
    ".hada_w1_b": "hada_w1_b",
    ".hada_w2_a": "hada_w2_a",
    ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1",
    ".hada_t2": "hada_t2",
    # LoKr
    ".lokr_w1": "lokr_w1",
    ".lokr_w1_a": "lokr_w1_a",
    ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2",
    ".lokr_w2_a": "lokr_w2_a",
    ".lokr_w2_b": "lokr_w2_b",
    ".lokr_t2": "lokr_t2",
}
_SUFFIXES = sorted(_SUFFIX_ROLES, key=len, reverse=True)
ROLES = frozenset(_SUFFIX_ROLES.values())

NETWORK_KEYS = ("lokr_factor",)
"""Keys a trainer stores for the whole network (musubi's LoKr ``factor``), not for a module."""


def split_key(key: str) -> tuple[str, str] | None:
    """``(module name, role)`` of a LoRA tensor name, or ``None`` when the suffix is unknown."""
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], _SUFFIX_ROLES[suffix]
    return None


def _flat(path: str) -> str:
    return path.replace(".", "_")


# "self_attn_q" -> "self_attn.q" (official and diffusers spellings), and the same outside blocks
_IN_BLOCK_FLAT: dict[str, str] = {}
_TOP_FLAT: dict[str, str] = {}
for _official, _diffusers in IN_BLOCK_MODULES.items():
    _IN_BLOCK_FLAT[_flat(_official)] = _official
    _IN_BLOCK_FLAT.setdefault(_flat(_diffusers), _official)
for _official, _diffusers in TOP_LEVEL_MODULES.items():
    _TOP_FLAT[_flat(_official)] = _official
    _TOP_FLAT.setdefault(_flat(_diffusers), _official)
_IN_BLOCK_DIFFUSERS = {v: k for k, v in IN_BLOCK_MODULES.items()}
_TOP_DIFFUSERS = {v: k for k, v in TOP_LEVEL_MODULES.items()}
_FLAT_BLOCK_RE = re.compile(r"^blocks_(\d+)_(.+)$")
_DOTTED_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def official_path(name: str) -> str | None:
    """The official DiT module path a LoRA module name refers to, or ``None`` if it names none.

    ``lora_unet_blocks_0_self_attn_q``, ``diffusion_model.blocks.0.self_attn.q``,
    ``transformer.blocks.0.attn1.to_q`` and ``base_model.model.blocks.0.self_attn.q`` all give
    ``blocks.0.self_attn.q``.
    """
    for prefix in UNDERSCORED_PREFIXES:
        if name.startswith(prefix):
            flat = _flat(name[len(prefix) :])
            m = _FLAT_BLOCK_RE.match(flat)
            if m:
                inner = _IN_BLOCK_FLAT.get(m.group(2))
                return None if inner is None else f"blocks.{m.group(1)}.{inner}"
            return _TOP_FLAT.get(flat)
    stripped = True
    while stripped:
        stripped = False
        for prefix in DOTTED_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    name = name.replace(".default.", ".")  # PEFT adapter name inside the path (DiffSynth)
    m = _DOTTED_BLOCK_RE.match(name)
    if m:
        inner = m.group(2)
        if inner in IN_BLOCK_MODULES:
            return name
        inner = _IN_BLOCK_DIFFUSERS.get(inner)
        return None if inner is None else f"blocks.{m.group(1)}.{inner}"
    if name in TOP_LEVEL_MODULES:
        return name
    return _TOP_DIFFUSERS.get(name)


def kohya_name(official: str) -> str:
    """``blocks.0.self_attn.q`` -> ``lora_unet_blocks_0_self_attn_q`` (musubi-tuner's module name)."""
    return KOHYA_PREFIX + _flat(official)
