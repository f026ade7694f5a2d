"""The Wan2.1 DiT's configuration: typed data, the released sizes, and reading it off a state dict.

:class:`DiTConfig` holds what the official ``WanModel(...)`` constructor takes. The presets are
the released checkpoints; :func:`infer_dit_config` reads everything but the head count from the
tensor shapes of an official-layout state dict (convert other layouts first with
:mod:`wan_kernel.models.dit_keys`). Importing this module does not import torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import attrs

from wan_kernel.errors import InputError, WeightsError

MODEL_TYPES = ("t2v", "i2v", "flf2v")
MODEL_TYPE_WORDS = {
    "t2v": "text-to-video",
    "i2v": "image-to-video",
    "flf2v": "first-last-frame-to-video",
}
IMAGE_DIM = 1280
"""Width of the CLIP ViT-H/14 features the image embedding (``img_emb``) takes."""
IMAGE_TOKENS = 257
"""CLIP tokens per image (1 class token + 16 x 16 patches)."""
HEAD_DIM = 128
"""Head size of every released Wan2.1 DiT: the head count when nothing else says it."""
ROPE_MAX_POSITIONS = 1024
"""Length of the official RoPE table per axis (frames, rows, columns of the patch grid)."""


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value <= 0:
        raise InputError(f"DiT config: {attribute.name} must be positive, got {value}")


@attrs.frozen
class DiTConfig:
    """Hyper-parameters of one Wan2.1 DiT (names as in the official ``WanModel``)."""

    model_type: str = attrs.field(default="t2v", validator=attrs.validators.in_(MODEL_TYPES))
    dim: int = attrs.field(default=1536, validator=_positive)
    ffn_dim: int = attrs.field(default=8960, validator=_positive)
    num_heads: int = attrs.field(default=12, validator=_positive)
    num_layers: int = attrs.field(default=30, validator=_positive)
    in_dim: int = attrs.field(default=16, validator=_positive)
    out_dim: int = attrs.field(default=16, validator=_positive)
    text_dim: int = attrs.field(default=4096, validator=_positive)
    freq_dim: int = attrs.field(default=256, validator=_positive)
    text_len: int = attrs.field(default=512, validator=_positive)
    patch_size: tuple[int, int, int] = attrs.field(
        default=(1, 2, 2), converter=lambda v: tuple(int(i) for i in v)
    )
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __attrs_post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise InputError(f"DiT config: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise InputError(f"DiT config: head size dim/num_heads = {self.head_dim} must be even (RoPE)")
        if len(self.patch_size) != 3:
            raise InputError(f"DiT config: patch_size must have 3 entries (F, H, W), got {self.patch_size}")
        if self.freq_dim % 2:
            raise InputError(f"DiT config: freq_dim must be even, got {self.freq_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_input(self) -> bool:
        """True for i2v / flf2v: CLIP features go through ``img_emb`` into the cross-attention."""
        return self.model_type in ("i2v", "flf2v")

    @property
    def image_tokens(self) -> int:
        """Image context rows: 257 per CLIP image, two images for first-last-frame models."""
        if not self.has_image_input:
            return 0
        return IMAGE_TOKENS * (2 if self.model_type == "flf2v" else 1)

    @property
    def patch_numel(self) -> int:
        return math.prod(self.patch_size)

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Real RoPE channels per head for the frame, row and column axes (sum = head_dim)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    def describe(self) -> str:
        """One phrase for messages: ``an image-to-video DiT (dim 5120, 40 layers, in_dim 36)``."""
        words = MODEL_TYPE_WORDS[self.model_type]
        article = "an" if words[0] in "aeiou" else "a"
        return f"{article} {words} DiT (dim {self.dim}, {self.num_layers} layers, in_dim {self.in_dim})"

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> DiTConfig:
        """A preset by name (``t2v-1.3B``, ``t2v-14B``, ``i2v-14B``, ``flf2v-14B``, ``t2i-14B``)."""
        try:
            preset = PRESETS[name]
        except KeyError:
            raise InputError(f"unknown DiT preset {name!r}; known: {', '.join(PRESETS)}") from None
        return attrs.evolve(preset, **overrides) if overrides else preset

    def to_official_json(self) -> dict[str, Any]:
        """The fields of the ``config.json`` the official release ships beside the weights."""
        return {
            "_class_name": "WanModel",
            "model_type": self.model_type,
            "dim": self.dim,
            "ffn_dim": self.ffn_dim,
            "num_heads": self.num_heads,
            "num_layers": self.num_layers,
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "text_len": self.text_len,
            "freq_dim": self.freq_dim,
            "eps": self.eps,
        }


_T2V_14B = DiTConfig(
    model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, text_dim=4096
)
PRESETS: dict[str, DiTConfig] = {
    "t2v-1.3B": DiTConfig(
        model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, text_dim=4096
    ),
    "t2v-14B": _T2V_14B,
    "i2v-14B": attrs.evolve(_T2V_14B, model_type="i2v", in_dim=36),
    "flf2v-14B": attrs.evolve(_T2V_14B, model_type="flf2v", in_dim=36),
    "t2i-14B": _T2V_14B,
}
"""The released Wan2.1 DiTs (``t2i-14B`` is the text-to-video 14B used for single images)."""


# --------------------------------------------------------------------------------------------
# Reading the config off a state dict
# --------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    tensor = sd.get(key)
    if tensor is None:
        raise WeightsError(
            f"the DiT weights have no tensor {key!r}; the file is incomplete or not a Wan2.1 DiT"
        )
    return tuple(tensor.shape)


def infer_model_type(keys: Any) -> str:
    """``flf2v`` when ``img_emb.emb_pos`` is present, ``i2v`` for other ``img_emb.*``, else ``t2v``."""
    keys = set(keys)
    if "img_emb.emb_pos" in keys:
        return "flf2v"
    if any(k.startswith("img_emb.") for k in keys):
        return "i2v"
    return "t2v"


def infer_dit_config(
    sd: Mapping[str, Any],
    *,
    num_heads: int | None = None,
    config_json: Mapping[str, Any] | None = None,
) -> DiTConfig:
    """The :class:`DiTConfig` of an official-layout state dict.

    Shapes give everything except the head count, which comes, in this order, from
    ``num_heads``, from ``config_json`` (the official ``config.json``: ``num_heads``; a diffusers
    one: ``num_attention_heads``), else from the released head size (``dim // 128``).
    ``config_json`` also supplies ``eps`` and ``text_len`` when present. A ``config_json`` whose
    ``dim`` disagrees with the weights belongs to another model and is ignored.
    """
    dim, in_dim, *patch = _shape(sd, "patch_embedding.weight")
    if len(patch) != 3:
        raise WeightsError(
            f"patch_embedding.weight has shape {[dim, in_dim, *patch]}, expected a Conv3d kernel"
        )
    text_dim = _shape(sd, "text_embedding.0.weight")[1]
    freq_dim = _shape(sd, "time_embedding.0.weight")[1]
    ffn_dim = _shape(sd, "blocks.0.ffn.0.weight")[0]
    head_out = _shape(sd, "head.head.weight")[0]
    num_layers = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k)))
    patch_numel = math.prod(patch)
    if head_out % patch_numel:
        raise WeightsError(f"head.head.weight has {head_out} rows, not a multiple of the patch size {patch}")

    cfg = dict(config_json or {})
    if cfg:
        cfg_dim = cfg.get("dim")
        if cfg_dim is None and "num_attention_heads" in cfg and "attention_head_dim" in cfg:
            cfg_dim = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        if cfg_dim is not None and int(cfg_dim) != dim:
            cfg = {}  # a config.json for some other model: its head count would be wrong
    if num_heads is None:
        num_heads = cfg.get("num_heads", cfg.get("num_attention_heads"))
    if num_heads is None:
        num_heads = max(1, dim // HEAD_DIM)
    num_heads = int(num_heads)
    if num_heads <= 0 or dim % num_heads or (dim // num_heads) % 2:
        raise WeightsError(
            f"num_heads={num_heads} does not fit the DiT width {dim}: dim must be a multiple of num_heads "
            "with an even head size; pass num_heads= matching the model's config.json"
        )
    return DiTConfig(
        model_type=infer_model_type(sd.keys()),
        dim=dim,
        ffn_dim=ffn_dim,
        num_heads=num_heads,
        num_layers=num_layers,
        in_dim=in_dim,
        out_dim=head_out // patch_numel,
        text_dim=text_dim,
        freq_dim=freq_dim,
        text_len=int(cfg.get("text_len", 512)),
        patch_size=tuple(patch),
        eps=float(cfg.get("eps", 1e-6)),
        qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd,
    )
