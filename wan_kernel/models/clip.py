"""The CLIP ViT-H/14 vision tower Wan2.1's image-to-video path takes its image features from.

Architecture (official ``wan/modules/clip.py`` ``VisionTransformer``, open-clip xlm-roberta ViT-H/14)::

    x = patch_embedding(pixels)                    # conv 14x14 stride 14, NO bias -> [B, C, S/14, S/14]
    x = [cls_embedding; x] + pos_embedding         # [B, 1 + (S/14)^2, C]
    x = pre_norm(x)                                # LayerNorm
    for block in transformer[:-1]:                 # features: every block but the last
        x = x + proj(attn(to_qkv(norm1(x))))       # fused qkv, scale 1/sqrt(head_dim), no mask
        x = x + mlp(norm2(x))                      # Linear -> exact (erf) GELU -> Linear

The module is written here rather than taken from transformers' ``CLIPVisionModel`` (which computes
the same function) because: ``features`` must stop before the last block (transformers runs all
blocks and keeps every hidden state to return ``hidden_states[-2]``); the official checkpoint's
fused ``to_qkv`` is used as stored; and transformers 5 changed ``CLIPVisionModel``'s module tree
(no ``vision_model.``), so its key names depend on the installed version. The HF layout is still
accepted as input (``vision_model.*``, q/k/v fused while loading), and ``tests/test_clip.py``
checks this module against transformers' ``CLIPVisionModel`` on the same weights.

LayerNorms compute in float32 and return the input dtype, as the official ``LayerNorm`` does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.models import arguments
from wan_kernel.models.weights import (
    as_path,
    assign_state_dict,
    check_finite_weights,
    config_beside,
    describe_keys,
    guess_model_kind,
    key_mismatch,
    load_state_dict,
)

#: OpenAI CLIP normalisation the official ``CLIPModel.visual`` applies.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Head size of the real ViT-H/14 (1280 wide, 16 heads), used when nothing else says.
REAL_HEAD_DIM = 80
CLIP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes ``load_clip_vision(dtype=)`` computes in."""

AttentionFn = Callable[..., torch.Tensor]


@attrs.frozen
class ClipVisionSpec:
    """The shape of a CLIP vision tower. ``image_size`` and ``width`` come from the weights."""

    image_size: int
    patch_size: int
    width: int
    mlp_dim: int
    num_heads: int
    num_layers: int
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2


#: The real model Wan2.1 uses (``clip_xlm_roberta_vit_h_14``, vision tower).
VIT_H_14 = ClipVisionSpec(
    image_size=224, patch_size=14, width=1280, mlp_dim=5120, num_heads=16, num_layers=32
)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens=None) -> torch.Tensor:
    """Plain softmax attention in Wan's layout: q/k/v ``[B, L, H, D]`` -> ``[B, L, H, D]``."""
    if k_lens is not None:
        raise InputError("the CLIP vision tower attends without key lengths")
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )  # [B, H, L, D]
    return out.transpose(1, 2)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, returned in the input's dtype (official ``clip.LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).type_as(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, width: int, num_heads: int, attention: AttentionFn):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.attention = attention
        self.to_qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, self.head_dim).unbind(2)  # 3 x [B, L, H, D]
        x = self.attention(q, k, v)  # [B, L, H, D]
        return self.proj(x.reshape(b, s, c))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, spec: ClipVisionSpec, attention: AttentionFn):
        super().__init__()
        self.norm1 = LayerNorm32(spec.width, eps=spec.eps)
        self.attn = SelfAttention(spec.width, spec.num_heads, attention)
        self.norm2 = LayerNorm32(spec.width, eps=spec.eps)
        self.mlp = nn.Sequential(
            nn.Linear(spec.width, spec.mlp_dim), nn.GELU(), nn.Linear(spec.mlp_dim, spec.width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipVisionTower(nn.Module):
    """CLIP vision transformer without its pooling head (Wan only uses hidden states).

    Parameter names are the official ones (``transformer.N.attn.to_qkv`` ...), so official
    checkpoints load as stored.
    """

    def __init__(self, spec: ClipVisionSpec, attention: AttentionFn | None = None):
        super().__init__()
        self.spec = spec
        self.image_size = spec.image_size
        self.patch_size = spec.patch_size
        attention = attention or sdpa_attention
        self.patch_embedding = nn.Conv2d(
            3, spec.width, kernel_size=spec.patch_size, stride=spec.patch_size, bias=False
        )
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, spec.width))
        self.pos_embedding = nn.Parameter(torch.zeros(1, spec.num_tokens, spec.width))
        self.pre_norm = LayerNorm32(spec.width, eps=spec.eps)
        self.transformer = nn.ModuleList([AttentionBlock(spec, attention) for _ in range(spec.num_layers)])
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != s or pixels.shape[3] != s:
            raise InputError(
                f"CLIP pixels must be [B, 3, {s}, {s}] (the size of its position table); "
                f"got {list(pixels.shape)}. "
                "Use clip.preprocess(images) or clip.encode_images(images) for other sizes."
            )

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens entering the first block: ``[B, 3, S, S]`` -> ``[B, 1 + (S/14)^2, width]``."""
        self._check_pixels(pixels)
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(w.device, w.dtype)).flatten(2).transpose(1, 2)  # [B, N, C]
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + N, C]
        return self.pre_norm(x + self.pos_embedding)

    def run(self, pixels: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Hidden states after the first ``num_blocks`` blocks, ``[B, 1 + (S/14)^2, width]``."""
        x = self.embed(pixels)
        for block in self.transformer[:num_blocks]:
            x = block(x)
        return x

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Hidden states after all blocks but the last (what Wan's image-to-video path uses).

        :param pixels: normalised images ``[B, 3, S, S]`` (``S`` = ``image_size``, 224 for ViT-H/14).
        :returns: ``[B, 1 + (S/14)^2, width]`` (``[B, 257, 1280]`` for ViT-H/14).
        """
        return self.run(pixels, len(self.transformer) - 1)

    def forward_all_blocks(self, pixels: torch.Tensor) -> torch.Tensor:
        """Hidden states after every block (no post-norm, no head), ``[B, 1 + (S/14)^2, width]``."""
        return self.run(pixels, len(self.transformer))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`features`."""
        return self.features(pixels)

    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Images in [-1, 1] -> normalised pixels, as the official ``CLIPModel.visual`` does it.

        Bicubic resize (``align_corners=False``, no antialias) to ``image_size``, ``x * 0.5 + 0.5``,
        then OpenAI mean/std, computed in float32.

        :param images: ``[B, 3, H, W]``, or a list of ``[3, H, W]`` / ``[1, 3, H, W]`` of any sizes.
        :returns: ``[B, 3, S, S]`` float32.
        """
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise InputError(f"images must be [B, 3, H, W] in [-1, 1]; got {list(images.shape)}")
            parts = [images]
        else:
            parts = []
            for image in images:
                if image.ndim == 3:
                    image = image.unsqueeze(0)
                if image.ndim != 4 or image.shape[:2] != (1, 3):
                    raise InputError(f"each image must be [3, H, W] in [-1, 1]; got {list(image.shape)}")
                parts.append(image)
            if not parts:
                raise InputError("no images to preprocess")
        size = (self.image_size, self.image_size)
        x = torch.cat(
            [F.interpolate(p.float(), size=size, mode="bicubic", align_corners=False) for p in parts]
        )  # [B, 3, S, S]
        x = x * 0.5 + 0.5
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def encode_images(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """``features(preprocess(images))``: images in [-1, 1] -> ``[B, 1 + (S/14)^2, width]``."""
        return self.features(self.preprocess(images))


# ---------------------------------------------------------------------------------------------
# Loading

_OFFICIAL_BLOCK = re.compile(
    r"transformer\.(\d+)\.(norm1|norm2|attn\.to_qkv|attn\.proj|mlp\.0|mlp\.2)\.(weight|bias)"
)
_HF_BLOCK = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.2",
}
_OFFICIAL_UNUSED = ("post_norm.weight", "post_norm.bias", "head")
_HF_UNUSED = ("post_layernorm.weight", "post_layernorm.bias", "embeddings.position_ids")


def _vision_prefix(keys: Sequence[str], source: str) -> tuple[str, str]:
    """``(layout, prefix)``: where the vision tower's keys start and whether they are official or HF."""
    hits = [k for k in keys if k.endswith("patch_embedding.weight")]
    if not hits:
        raise WeightsError(
            f"{source}: this is not a CLIP vision file: it looks like {guess_model_kind(keys)} "
            f"(tensors: {describe_keys(keys)}). Give the CLIP ViT-H/14 weights, e.g. the official "
            "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth or ComfyUI's clip_vision_h.safetensors."
        )
    if len(hits) > 1:
        raise WeightsError(
            f"{source}: holds several patch embeddings ({', '.join(hits[:4])}); give one vision model"
        )
    prefix = hits[0][: -len("patch_embedding.weight")]
    if prefix.endswith("embeddings."):
        return "hf", prefix[: -len("embeddings.")]
    return "official", prefix


def hf_to_official(state: Mapping[str, torch.Tensor], *, source: str = "weights") -> dict[str, torch.Tensor]:
    """transformers ``CLIPVisionModel`` keys (prefix removed) -> official ``VisionTransformer`` keys.

    q/k/v projections are concatenated into ``to_qkv`` (one new tensor per block).
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in _HF_UNUSED:
            continue
        if key == "embeddings.class_embedding":
            out["cls_embedding"] = value.reshape(1, 1, -1)
        elif key == "embeddings.patch_embedding.weight":
            out["patch_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["pos_embedding"] = value.unsqueeze(0)
        elif key.startswith("pre_layrnorm."):
            out["pre_norm." + key.split(".", 1)[1]] = value
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault(f"transformer.{m.group(1)}.attn.to_qkv.{m.group(3)}", {})[m.group(2)] = value
        elif (m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)) and m.group(
            2
        ) in _HF_BLOCK:
            out[f"transformer.{m.group(1)}.{_HF_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise WeightsError(f"{source}: unexpected tensor {key!r} in a CLIP vision model")
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"{source}: {key} lacks {sorted({'q', 'k', 'v'} - set(parts))} projection(s)")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def clip_state_to_official(
    state: Mapping[str, torch.Tensor], *, source: str = "weights"
) -> dict[str, torch.Tensor]:
    """The vision tower's tensors of any accepted file, keyed as the official ``VisionTransformer``.

    Accepts the official full CLIP (``visual.*`` + text tower, ignored), the vision tower alone,
    and transformers/ComfyUI ``CLIPVisionModel`` files (``vision_model.*``, optional outer prefixes).
    """
    layout, prefix = _vision_prefix(list(state), source)
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if layout == "hf":
        return hf_to_official(picked, source=source)
    out = {}
    for key, value in picked.items():
        if key in _OFFICIAL_UNUSED:
            continue
        embedding = key in ("patch_embedding.weight", "cls_embedding", "pos_embedding")
        if embedding or key.startswith("pre_norm.") or _OFFICIAL_BLOCK.fullmatch(key):
            out[key] = value
        elif key.startswith("patch_embedding.bias"):
            raise WeightsError(
                f"{source}: the patch embedding has a bias: this is a CLIP without pre-norm, not ViT-H/14"
            )
        elif prefix == "" and not key.startswith(
            ("transformer.", "pre_norm", "post_norm", "patch", "cls", "pos")
        ):
            continue  # a text tower beside an unprefixed vision tower
        else:
            raise WeightsError(f"{source}: unexpected tensor {prefix + key!r} in a CLIP vision tower")
    return out


def _heads_from_config(config: dict | None, width: int) -> int | None:
    """Heads from a CLIP ``config.json`` describing this tower; other configs (the DiT's) are ignored."""
    if not config:
        return None
    for section in (config.get("vision_config"), config):
        if isinstance(section, dict) and section.get("hidden_size") == width:
            heads = section.get("num_attention_heads") or section.get("num_heads")
            if heads:
                return int(heads)
        if isinstance(section, dict) and section.get("vision_width") == width and section.get("vision_heads"):
            return int(section["vision_heads"])
    return None


def infer_clip_spec(
    state: Mapping[str, torch.Tensor], *, num_heads: int | None, source: str = "weights"
) -> ClipVisionSpec:
    """Sizes from official-layout tensors; ``num_heads`` as resolved by the caller (or width // 80)."""
    for key in ("patch_embedding.weight", "cls_embedding", "pos_embedding", "pre_norm.weight"):
        if key not in state:
            raise WeightsError(f"{source}: the CLIP vision tower lacks {key!r} (has {describe_keys(state)})")
    width, channels, patch, _ = state["patch_embedding.weight"].shape
    if channels != 3:
        raise WeightsError(f"{source}: patch embedding takes {channels} channels, expected 3 (RGB)")
    tokens = state["pos_embedding"].shape[-2]
    grid = round((tokens - 1) ** 0.5)
    if grid * grid != tokens - 1:
        raise WeightsError(f"{source}: position table has {tokens} rows, not 1 + a square number of patches")
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.(\d+)\.", k))}
    if not layer_ids or layer_ids != set(range(max(layer_ids) + 1)):
        raise WeightsError(f"{source}: transformer blocks are missing (found {sorted(layer_ids)})")
    if len(layer_ids) < 2:
        raise WeightsError(
            f"{source}: features need at least 2 blocks (all but the last); found {len(layer_ids)}"
        )
    if num_heads is None:
        if width % REAL_HEAD_DIM:
            raise WeightsError(
                f"{source}: cannot tell the number of attention heads of a {width}-wide CLIP "
                f"(not a multiple of the real head size {REAL_HEAD_DIM}); pass num_heads=..."
            )
        num_heads = width // REAL_HEAD_DIM
    if num_heads <= 0 or width % num_heads:
        raise WeightsError(f"{source}: width {width} is not divisible by num_heads={num_heads}")
    return ClipVisionSpec(
        image_size=grid * patch,
        patch_size=int(patch),
        width=int(width),
        mlp_dim=int(state["transformer.0.mlp.0.weight"].shape[0]),
        num_heads=int(num_heads),
        num_layers=len(layer_ids),
    )


def load_clip_vision(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    num_heads: int | None = None,
    attention: AttentionFn | None = None,
) -> ClipVisionTower:
    """Load the CLIP vision tower from an official, vision-only or transformers/ComfyUI file.

    :param path: ``.pth``/``.safetensors`` file or folder of shards.
    :param device: where the weights go.
    :param dtype: compute dtype; ``None`` keeps the file's.
    :param num_heads: attention heads; else a CLIP ``config.json`` beside the file, else ``width // 80``.
    :param attention: ``fn(q, k, v)`` on ``[B, L, H, D]`` (an attention plugin); default SDPA.
    :returns: :class:`ClipVisionTower` in eval mode, with ``features``, ``preprocess``, ``encode_images``.
    :raises WeightsError: the file is missing, unreadable, malformed or not a CLIP vision tower.
    :raises InputError: ``path`` is not a path; ``dtype``, ``device`` or ``num_heads`` of the wrong
        type or value.
    """
    path = as_path(path, what="CLIP vision").expanduser()
    dtype = arguments.resolve_dtype(dtype, allowed=CLIP_DTYPES, what="the CLIP vision tower")
    device = arguments.check_device(device)
    num_heads = arguments.check_num_heads(num_heads, what="the CLIP vision tower")
    source = str(path)
    raw = load_state_dict(path, what="CLIP vision")
    state = clip_state_to_official(raw, source=source)
    width = state["patch_embedding.weight"].shape[0] if "patch_embedding.weight" in state else 0
    if num_heads is None:
        num_heads = _heads_from_config(config_beside(path), width)
    spec = infer_clip_spec(state, num_heads=num_heads, source=source)
    if dtype is None:
        dtype = state["patch_embedding.weight"].dtype
    if not dtype.is_floating_point:
        raise WeightsError(f"{source}: weights are stored as {dtype}; pass a float dtype=")
    with torch.device("meta"):
        model = ClipVisionTower(spec, attention)
    mismatch = key_mismatch(model.state_dict(), state)
    if mismatch:
        raise WeightsError(f"{source}: CLIP vision tensors do not fit the architecture: {mismatch}")
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    check_finite_weights(state, source)
    assign_state_dict(model, state, source=source, what="a CLIP vision tower")
    # non-persistent buffers were built on meta: make them real
    model.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    model.std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return model.eval().requires_grad_(False)
