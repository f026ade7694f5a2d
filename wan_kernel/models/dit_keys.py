"""Tensor-name layouts of Wan2.1 DiT checkpoints, and conversion to and from the official one.

Layouts:

- ``official``: the Wan2.1 release (``blocks.0.self_attn.q.weight``, ``head.modulation``, ...);
  the model's own parameter names.
- ``comfyui``: the official names behind a ``model.diffusion_model.`` (or ``diffusion_model.``)
  prefix, as in ComfyUI's repackaged files. Files without a prefix are plain ``official``.
- ``diffusers``: ``WanTransformer3DModel`` (``blocks.0.attn1.to_q.weight``,
  ``condition_embedder.*``, ``scale_shift_table``, ``proj_out``). ``scale_shift_table`` has the
  same shape and chunk order (shift, scale, gate, ...) as ``modulation``; the official ``norm3``
  (the affine norm before cross-attention) is diffusers' ``norm2``. Fused projections
  (``to_qkv``, ``to_kv``, ``to_added_kv``) are split on the way in.

Only names change: tensors are passed through (splitting a fused projection takes views).
Modules are mapped by prefix, so extra per-module tensors (e.g. ``.scale_weight`` of scaled-fp8
files) follow their module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TypeVar

from wan_kernel.errors import InputError

T = TypeVar("T")

LAYOUTS = ("official", "comfyui", "diffusers")
COMFYUI_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# official module path -> diffusers module path (outside the blocks)
_TOP_LEVEL: dict[str, str] = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed",
    "patch_embedding": "patch_embedding",
}

# official module path -> diffusers module path, inside ``blocks.N.``
_IN_BLOCK: dict[str, str] = {
    "modulation": "scale_shift_table",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
for _official, _diffusers in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    for _name, _target in (
        ("q", "to_q"),
        ("k", "to_k"),
        ("v", "to_v"),
        ("o", "to_out.0"),
        ("norm_q", "norm_q"),
        ("norm_k", "norm_k"),
    ):
        _IN_BLOCK[f"{_official}.{_name}"] = f"{_diffusers}.{_target}"
_IN_BLOCK.update(
    {
        "cross_attn.k_img": "attn2.add_k_proj",
        "cross_attn.v_img": "attn2.add_v_proj",
        "cross_attn.norm_k_img": "attn2.norm_added_k",
    }
)

TOP_LEVEL_MODULES: Mapping[str, str] = MappingProxyType(_TOP_LEVEL)
"""Official module path (outside the blocks) -> its diffusers path."""
IN_BLOCK_MODULES: Mapping[str, str] = MappingProxyType(_IN_BLOCK)
"""Official module path inside ``blocks.N.`` -> its diffusers path (same block index)."""

_TOP_LEVEL_BACK = {v: k for k, v in _TOP_LEVEL.items()}
_IN_BLOCK_BACK = {v: k for k, v in _IN_BLOCK.items()}

# diffusers fused projections: fused module -> the official modules it stacks (along dim 0)
_FUSED = {
    "attn1.to_qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "attn2.to_kv": ("cross_attn.k", "cross_attn.v"),
    "attn2.to_added_kv": ("cross_attn.k_img", "cross_attn.v_img"),
}
_DIFFUSERS_IGNORED = ("norm_added_q",)  # diffusers itself ignores these on load

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _map_module(path: str, table: Mapping[str, str]) -> str | None:
    """``table``'s image of the longest key that is a dotted prefix of ``path`` (suffix kept)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        head = ".".join(parts[:end])
        if head in table:
            return ".".join([table[head], *parts[end:]])
    return None


def _rename(key: str, top: Mapping[str, str], block: Mapping[str, str]) -> str:
    m = _BLOCK_RE.match(key)
    if m:
        mapped = _map_module(m.group(2), block)
        return key if mapped is None else f"blocks.{m.group(1)}.{mapped}"
    mapped = _map_module(key, top)
    return key if mapped is None else mapped


def official_to_diffusers_key(key: str) -> str:
    """One official tensor name in diffusers' ``WanTransformer3DModel`` naming (unknown: unchanged)."""
    return _rename(key, _TOP_LEVEL, _IN_BLOCK)


def diffusers_to_official_key(key: str) -> str:
    """One diffusers tensor name in the official naming (unknown: unchanged)."""
    return _rename(key, _TOP_LEVEL_BACK, _IN_BLOCK_BACK)


def detect_layout(keys: Iterable[str]) -> str | None:
    """``official``, ``comfyui`` or ``diffusers`` for a DiT's tensor names; ``None`` if none fits."""
    keys = list(keys)
    if any(k.startswith(COMFYUI_PREFIXES) for k in keys):
        stripped = [strip_comfyui_prefix(k) for k in keys]
        return "comfyui" if detect_layout(stripped) == "official" else None
    names = set(keys)
    if any(".attn1." in k for k in keys[:5000]) or "condition_embedder.time_proj.weight" in names:
        return "diffusers"
    if "patch_embedding.weight" in names or any(".self_attn." in k for k in keys[:5000]):
        return "official"
    return None


def strip_comfyui_prefix(key: str) -> str:
    for prefix in COMFYUI_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"unknown DiT key layout {layout!r}; known: {', '.join(LAYOUTS)}")


def dit_state_dict_from(layout: str, sd: Mapping[str, T]) -> dict[str, T]:
    """A DiT state dict in ``layout`` (``official``, ``comfyui``, ``diffusers``) with official names."""
    _check_layout(layout)
    if layout == "official":
        return dict(sd)
    if layout == "comfyui":
        return {strip_comfyui_prefix(k): v for k, v in sd.items()}
    out: dict[str, T] = {}
    for key, value in sd.items():
        if any(f".{name}." in key for name in _DIFFUSERS_IGNORED):
            continue
        m = _BLOCK_RE.match(key)
        fused = None
        if m:
            for fused_name, targets in _FUSED.items():
                if m.group(2).startswith(fused_name + "."):
                    fused = (m.group(1), fused_name, targets)
                    break
        if fused is None:
            out[diffusers_to_official_key(key)] = value
            continue
        index, fused_name, targets = fused
        suffix = m.group(2)[len(fused_name) :]  # ".weight" / ".bias"
        parts = value.chunk(len(targets), dim=0)  # type: ignore[attr-defined]
        for target, part in zip(targets, parts):
            out[f"blocks.{index}.{target}{suffix}"] = part
    return out


def dit_state_dict_to(layout: str, sd: Mapping[str, T]) -> dict[str, T]:
    """An official-layout DiT state dict renamed into ``layout`` (``comfyui``: ``model.diffusion_model.``)."""
    _check_layout(layout)
    if layout == "official":
        return dict(sd)
    if layout == "comfyui":
        return {COMFYUI_PREFIXES[0] + k: v for k, v in sd.items()}
    return {official_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_config(config) -> dict:
    """``WanTransformer3DModel(**kwargs)`` for a :class:`~wan_kernel.models.dit_config.DiTConfig`."""
    image = config.has_image_input
    return {
        "patch_size": tuple(config.patch_size),
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_dim,
        "out_channels": config.out_dim,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads" if config.qk_norm else None,
        "eps": config.eps,
        "image_dim": 1280 if image else None,
        "added_kv_proj_dim": config.dim if image else None,
        "pos_embed_seq_len": 2 * 257 if config.model_type == "flf2v" else None,
    }
