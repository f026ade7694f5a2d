"""The Wan2.1 diffusion transformer (DiT): text-to-video, image-to-video, first-last-frame-to-video.

Same architecture, parameter names and numerics as the official ``wan/modules/model.py``
(``WanModel``), with a batched API::

    dit = WanDiT(config, attention=backend)
    out = dit(x, t, context, clip_fea=None, y=None)   # [B, C_out, F, H, W] float32

Data flow (shapes for one batch; ``L = F/pf * H/ph * W/pw`` patch tokens, ``C = dim``)::

    x [B, C_in, F, H, W] --Conv3d patch--> [B, L, C]
    t [B] --sinusoid(256, float64)--> time_embedding --> e [B, C] --time_projection--> e0 [B, 6, C]
    context [B, <=512, text_dim] --zero-pad to 512--> text_embedding --> [B, 512, C]
    clip_fea [B, 257, 1280] --img_emb--> [B, 257, C]        (i2v; flf2v: [B, 514, C])
    blocks x N: x += gate * self_attn(mod(norm1(x)))   (qk RMSNorm, 3-D RoPE)
                x += cross_attn(norm3(x), text [+ image])
                x += gate * ffn(mod(norm2(x)))
    head: Linear(mod(norm(x))) --unpatchify--> [B, C_out, F, H, W]

Precision follows the official code run under ``autocast(bfloat16)``: the residual stream,
modulation, time embedding, norms, RoPE and the head are float32; every other Linear (and the
attention) runs in the model's compute dtype, the dtype of ``patch_embedding.weight`` (float32,
bfloat16 or float16). Attention is a plain callable (``wan_kernel.interfaces.AttentionBackend``
semantics) held by the model; no plugin lookup happens in ``forward``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from wan_kernel.errors import InputError
from wan_kernel.models.dit_config import IMAGE_DIM, IMAGE_TOKENS, ROPE_MAX_POSITIONS, DiTConfig

AttentionFn = Callable[..., torch.Tensor]
"""``fn(q, k, v, k_lens=None)``: ``[B, Lq, H, D]`` x ``[B, Lk, H, D]`` -> ``[B, Lq, H, D]``."""

COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes the DiT computes in (``load_dit(dtype=)`` accepts these; fp8 goes through ``quant=``)."""


def _fp32_region(device: torch.device):
    """Disable autocast, as the official ``amp.autocast(dtype=float32)`` regions do."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _fp32_linear(layer: nn.Module, x: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """``layer(x)`` in float32; a plain ``nn.Linear`` stored in low precision is upcast on the fly.

    Modules swapped in by a quantizer run as they are (in ``compute_dtype``), output made float32.
    """
    if type(layer) is nn.Linear and layer.weight.dtype in COMPUTE_DTYPES:
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias)
    return layer(x.to(compute_dtype)).float()


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Timestep embedding ``[B, dim]`` in float64: ``[cos(t w_i), sin(t w_i)]``, ``w_i = 10000^(-i/half)``."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, device=t.device, dtype=torch.float64).div(half))  # [half]
    angles = torch.outer(t, freqs)  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_tables(
    config: DiTConfig, grid: tuple[int, int, int], seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D RoPE ``(cos, sin)``, each ``[seq_len, 1, head_dim / 2]`` float32.

    The head's channel pairs are split over frames, rows and columns
    (``d - 4*(d//6)``, ``2*(d//6)``, ``2*(d//6)`` channels, theta 10000); angles are computed in
    float64 as in the official table. Rows past the ``f*h*w`` real tokens (padding) get the
    identity rotation.
    """
    f, h, w = grid
    angles = []
    for size, channels in zip(grid, config.rope_dims):
        inv_freq = 1.0 / torch.pow(
            10000.0, torch.arange(0, channels, 2, device=device, dtype=torch.float64).div(channels)
        )  # [channels / 2]
        angles.append(torch.outer(torch.arange(size, device=device, dtype=torch.float64), inv_freq))
    af, ah, aw = angles  # [f, cf], [h, ch], [w, cw]
    grid_angles = torch.cat(
        [
            af[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)  # [L, 1, D/2]
    cos, sin = torch.cos(grid_angles), torch.sin(grid_angles)
    pad = seq_len - f * h * w
    if pad > 0:
        cos = torch.cat([cos, cos.new_ones(pad, *cos.shape[1:])])
        sin = torch.cat([sin, sin.new_zeros(pad, *sin.shape[1:])])
    return cos.float(), sin.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x`` ``[B, L, H, D]``; float32 result."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2)  # [B, L, H, D]


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS norm over the last dim, computed in float32; returns float32 (``weight`` applied in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        # official: norm(x.float()).type_as(x) * weight(float32)
        return normed.type_as(x).float() * self.weight.float()


class LayerNorm(nn.Module):
    """LayerNorm computed in float32, result in the input's dtype (``WanLayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False):
        super().__init__()
        self.dim = dim
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), (self.dim,), weight, bias, self.eps).type_as(x)


# --------------------------------------------------------------------------------------------
# Attention layers
# --------------------------------------------------------------------------------------------


class _Projections(nn.Module):
    """The ``q``/``k``/``v``/``o`` Linears and qk RMSNorms (over the full width) both attentions share."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class SelfAttention(_Projections):
    """Self-attention over the video tokens with qk RMSNorm (over the full width) and 3-D RoPE."""

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_lens: torch.Tensor | None,
        attention: AttentionFn,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``x`` ``[B, L, C]`` -> ``[B, L, C]`` in ``dtype``; keys at index ``>= k_lens[b]`` are ignored."""
        b, s = x.shape[:2]
        n, d = self.num_heads, self.head_dim
        x = x.to(dtype)
        q = self.norm_q(self.q(x)).view(b, s, n, d)  # [B, L, H, D]
        k = self.norm_k(self.k(x)).view(b, s, n, d)  # [B, L, H, D]
        v = self.v(x).view(b, s, n, d)  # [B, L, H, D]
        q = apply_rope(q, *rope).to(dtype)
        k = apply_rope(k, *rope).to(dtype)
        out = attention(q, k, v, k_lens)  # [B, L, H, D]
        return self.o(out.flatten(2).to(dtype))  # [B, L, C]


class CrossAttention(_Projections):
    """Cross-attention to the text rows (unmasked), plus the image rows for i2v/flf2v models.

    The image branch has its own key/value projections (``k_img``/``v_img``, ``norm_k_img``);
    its output is added to the text branch's before the output projection.
    """

    def __init__(
        self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6, image: bool = False
    ):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.image = image
        if image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        attention: AttentionFn,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``x`` ``[B, L, C]``, ``context`` ``[B, 512, C]``, ``context_img`` ``[B, 257(x2), C]``.

        Returns ``[B, L, C]`` in ``dtype``.
        """
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        x = x.to(dtype)
        q = self.norm_q(self.q(x)).view(b, -1, n, d).to(dtype)  # [B, L, H, D]
        k = self.norm_k(self.k(context)).view(b, -1, n, d).to(dtype)  # [B, 512, H, D]
        v = self.v(context).view(b, -1, n, d)  # [B, 512, H, D]
        out = attention(q, k, v, None).flatten(2)  # [B, L, C]
        if self.image:
            k_img = self.norm_k_img(self.k_img(context_img)).view(b, -1, n, d).to(dtype)  # [B, Li, H, D]
            v_img = self.v_img(context_img).view(b, -1, n, d)  # [B, Li, H, D]
            out_img = attention(q, k_img, v_img, None).flatten(2)  # [B, L, C]
            out = out.float() + out_img.float()  # summed in float32, as the official code does
        return self.o(out.to(dtype))  # [B, L, C]


# --------------------------------------------------------------------------------------------
# Block, head, image embedding
# --------------------------------------------------------------------------------------------


class DiTBlock(nn.Module):
    """One transformer block with 6-way float32 modulation (shift/scale/gate for attention and FFN)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.norm1 = LayerNorm(dim, eps)
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(
            dim, config.num_heads, config.qk_norm, eps, image=config.has_image_input
        )
        self.norm2 = LayerNorm(dim, eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        k_lens: torch.Tensor | None,
        attention: AttentionFn,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``x`` ``[B, L, C]`` (float32 after block 0), ``e`` ``[B, 6, C]`` -> ``[B, L, C]`` float32."""
        with _fp32_region(x.device):
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.float() + e).chunk(
                6, dim=1
            )
        y = self.self_attn(self.norm1(x).float() * (1 + scale_sa) + shift_sa, rope, k_lens, attention, dtype)
        with _fp32_region(x.device):
            x = x + y * gate_sa  # [B, L, C] float32
        x = x + self.cross_attn(self.norm3(x), context, context_img, attention, dtype)
        y = self.ffn((self.norm2(x).float() * (1 + scale_ff) + shift_ff).to(dtype))
        with _fp32_region(x.device):
            x = x + y * gate_ff
        return x


class Head(nn.Module):
    """Output head: LayerNorm, 2-way modulation (shift, scale), Linear to ``out_dim * prod(patch)``."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.dim
        self.norm = LayerNorm(dim, config.eps)
        self.head = nn.Linear(dim, config.out_dim * config.patch_numel)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x`` ``[B, L, C]``, ``e`` ``[B, C]`` float32 -> ``[B, L, out_dim * prod(patch)]`` float32."""
        with _fp32_region(x.device):
            shift, scale = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, C] each
            return _fp32_linear(self.head, self.norm(x).float() * (1 + scale) + shift, dtype)


class ImageEmbedding(nn.Module):
    """``img_emb``: CLIP features ``[B, 257, 1280]`` -> image context ``[B, 257, C]``.

    ``proj`` = LayerNorm(1280), Linear, GELU, Linear(1280 -> C), LayerNorm(C) (both LayerNorms
    affine, eps 1e-5). First-last-frame models add ``emb_pos`` ``[1, 514, 1280]`` to the two
    images' features laid end to end.
    """

    def __init__(self, dim: int, flf_pos_emb: bool = False):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(IMAGE_DIM),
            nn.Linear(IMAGE_DIM, IMAGE_DIM),
            nn.GELU(),
            nn.Linear(IMAGE_DIM, dim),
            nn.LayerNorm(dim),
        )
        if flf_pos_emb:
            self.emb_pos = nn.Parameter(torch.zeros(1, 2 * IMAGE_TOKENS, IMAGE_DIM))

    def forward(self, clip_fea: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``clip_fea`` ``[B, Li, 1280]`` -> ``[B, Li, C]`` in ``dtype``."""
        x = clip_fea
        if hasattr(self, "emb_pos"):
            x = x.float() + self.emb_pos.float()  # [B, 514, 1280]
        for layer in self.proj:
            if isinstance(layer, nn.LayerNorm):
                x = F.layer_norm(
                    x.float(), layer.normalized_shape, layer.weight.float(), layer.bias.float(), layer.eps
                )
            elif isinstance(layer, nn.GELU):
                x = layer(x)
            else:
                x = layer(x.to(dtype))
        return x.to(dtype)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class WanDiT(nn.Module):
    """The Wan2.1 DiT; parameter names are the official ``WanModel`` state-dict keys.

    :param config: the hyper-parameters (:class:`DiTConfig`; presets in ``dit_config.PRESETS``).
    :param attention: ``fn(q, k, v, k_lens=None)`` with ``wan_kernel.interfaces.AttentionBackend``
        semantics (e.g. ``wan_attention_sdpa.SdpaAttention()``); swap it with :meth:`set_attention`.
    """

    def __init__(self, config: DiTConfig, attention: AttentionFn):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(
            config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        self.head = Head(config)
        if config.has_image_input:
            self.img_emb = ImageEmbedding(dim, flf_pos_emb=config.model_type == "flf2v")
        self.gradient_checkpointing = False
        # plain attributes, not submodules: they hold no parameters and must not enter state_dict()
        object.__setattr__(self, "_attention", None)
        object.__setattr__(self, "_block_runner", None)
        self.set_attention(attention)
        if self.patch_embedding.weight.device.type != "meta":
            self.init_weights()

    # -- configuration ------------------------------------------------------------------------

    def set_attention(self, attention: AttentionFn) -> None:
        """Use ``attention`` (``fn(q, k, v, k_lens=None)``) in every attention layer from now on."""
        if not callable(attention):
            raise InputError(f"attention must be callable as fn(q, k, v, k_lens=None), got {attention!r}")
        object.__setattr__(self, "_attention", attention)

    @property
    def attention(self) -> AttentionFn:
        return self._attention

    def set_block_runner(self, runner) -> None:
        """Drive the block loop through ``runner.forward_blocks()`` (a ``BlockRunner``); ``None`` resets."""
        if runner is not None and not callable(getattr(runner, "forward_blocks", None)):
            raise InputError(f"{runner!r} is not a BlockRunner (it has no forward_blocks())")
        object.__setattr__(self, "_block_runner", runner)

    @property
    def block_runner(self):
        return self._block_runner

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward (``torch.utils.checkpoint``, non-reentrant)."""
        self.gradient_checkpointing = bool(enabled)

    @property
    def compute_dtype(self) -> torch.dtype:
        """Dtype of the matmuls: that of ``patch_embedding.weight`` (bfloat16 if it is not a float type)."""
        dtype = self.patch_embedding.weight.dtype
        return dtype if dtype in COMPUTE_DTYPES else torch.bfloat16

    def init_weights(self) -> None:
        """The official initialisation (Xavier linears, zero biases, N(0, .02) embeddings, zero head)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | Sequence[torch.Tensor],
        *,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        seq_len: int | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        :param x: noisy latents ``[B, C_x, F, H, W]``.
        :param t: timesteps ``[B]`` (a scalar or ``[1]`` is broadcast), floats in ``[0, 1000]``.
        :param context: text embeddings, a list of ``B`` tensors ``[L_i, text_dim]`` (``L_i <= 512``)
            or a zero-padded tensor ``[B, L, text_dim]``; padded to 512 rows with zeros, all attended.
        :param clip_fea: CLIP features ``[B, 257, 1280]`` (i2v) or ``[2B, 257, 1280]`` /
            ``[B, 514, 1280]`` (flf2v: first and last frame of each sample, in that order).
        :param y: conditioning ``[B, C_y, F, H, W]`` concatenated to ``x`` on channels
            (i2v: mask + image latents).
        :param seq_len: pad the token sequence to this length (the official ``seq_len``); the padded
            keys are masked and the padded rows dropped, so the output does not change.
        :returns: ``[B, out_dim, F, H, W]`` float32.
        """
        cfg = self.config
        x, t, y = self._check_video(x, t, y)
        b = x.shape[0]
        dtype = self.compute_dtype
        device = self.patch_embedding.weight.device
        if y is not None:
            x = torch.cat([x, y], dim=1)  # [B, C_in, F, H, W]

        # patch tokens
        x = self.patch_embedding(x.to(device=device, dtype=dtype))  # [B, C, f, h, w]
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)  # [B, L, C]
        tokens = x.shape[1]
        k_lens = None
        if seq_len is not None and seq_len != tokens:
            if seq_len < tokens:
                raise InputError(f"seq_len={seq_len} is smaller than the {tokens} patch tokens of the input")
            x = torch.cat([x, x.new_zeros(b, seq_len - tokens, cfg.dim)], dim=1)  # [B, seq_len, C]
            k_lens = torch.full((b,), tokens, dtype=torch.int32, device=device)
        rope = rope_tables(cfg, grid, x.shape[1], device)  # 2 x [L, 1, D/2]

        # time: float64 sinusoid, float32 MLPs
        with _fp32_region(device):
            e = sinusoidal_embedding(cfg.freq_dim, t.to(device)).float()  # [B, 256]
            e = _fp32_linear(self.time_embedding[0], e, dtype)
            e = _fp32_linear(self.time_embedding[2], self.time_embedding[1](e), dtype)  # [B, C]
            e0 = _fp32_linear(self.time_projection[1], self.time_projection[0](e), dtype)  # [B, 6C]
            e0 = e0.unflatten(1, (6, cfg.dim))  # [B, 6, C]

        # text (and image) context
        context = self.text_embedding(self._pad_context(context, b, device, dtype))  # [B, 512, C]
        context_img = None
        if clip_fea is not None and not cfg.has_image_input:
            raise InputError("clip_fea was given, but this is a text-to-video DiT without an image embedding")
        if cfg.has_image_input:
            context_img = self.img_emb(self._check_clip(clip_fea, b).to(device), dtype)  # [B, 257(x2), C]

        blocks = self.blocks if self._block_runner is None else self._block_runner.forward_blocks()
        args = (e0, context, context_img, rope, k_lens, self._attention, dtype)
        for block in blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, *args, use_reentrant=False)
            else:
                x = block(x, *args)

        x = self.head(x, e, dtype)  # [B, L, out * prod(patch)] float32
        return self.unpatchify(x[:, :tokens], grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``[B, f*h*w, out_dim * pf*ph*pw]`` -> ``[B, out_dim, f*pf, h*ph, w*pw]`` float32."""
        c, (pf, ph, pw) = self.config.out_dim, self.config.patch_size
        f, h, w = grid
        x = x.reshape(x.shape[0], f, h, w, pf, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], c, f * pf, h * ph, w * pw).float()

    # -- input checks -------------------------------------------------------------------------

    def _check_video(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 5:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"x must be a latent video tensor [B, C, F, H, W], got {shape}")
        b = x.shape[0]
        for size, p, axis in zip(x.shape[2:], cfg.patch_size, "FHW"):
            if size % p:
                raise InputError(f"latent {axis} = {size} is not a multiple of the patch size {p}")
            if size // p > ROPE_MAX_POSITIONS:
                raise InputError(
                    f"latent {axis} = {size} gives more than {ROPE_MAX_POSITIONS} patches (RoPE table)"
                )
        if cfg.has_image_input and y is None:
            raise InputError(f"this {cfg.model_type} DiT needs y (mask + image latents) and clip_fea")
        if y is not None and (y.ndim != 5 or y.shape[0] != b or y.shape[2:] != x.shape[2:]):
            raise InputError(f"y must be [B, C_y, F, H, W] matching x {list(x.shape)}, got {list(y.shape)}")
        channels = x.shape[1] + (0 if y is None else y.shape[1])
        if channels != cfg.in_dim:
            what = "x" if y is None else "x and y together"
            raise InputError(f"{what} have {channels} channels, but this DiT takes in_dim={cfg.in_dim}")
        t = torch.as_tensor(t)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(b)
        if t.ndim != 1 or t.shape[0] != b:
            raise InputError(f"t must be a tensor [B] with B={b} timesteps, got shape {list(t.shape)}")
        return x, t, y

    def _pad_context(
        self, context: torch.Tensor | Sequence[torch.Tensor], b: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """``context`` -> ``[B, text_len, text_dim]``: each sample's rows, then zeros."""
        cfg = self.config
        if isinstance(context, torch.Tensor):
            if context.ndim == 2:
                context = context[None]
            if context.ndim != 3:
                raise InputError(f"context must be [B, L, {cfg.text_dim}] or a list of [L, {cfg.text_dim}]")
            rows = list(context)
        else:
            rows = list(context)
        if len(rows) != b:
            raise InputError(f"context has {len(rows)} samples but x has {b}")
        out = torch.zeros(b, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
        for i, u in enumerate(rows):
            if u.ndim != 2 or u.shape[1] != cfg.text_dim:
                raise InputError(f"context[{i}] must be [L, {cfg.text_dim}], got {list(u.shape)}")
            if u.shape[0] > cfg.text_len:
                raise InputError(
                    f"context[{i}] has {u.shape[0]} rows, more than the DiT's text_len {cfg.text_len}; "
                    "truncate the text embedding"
                )
            out[i, : u.shape[0]] = u.to(device=device, dtype=dtype)
        return out

    def _check_clip(self, clip_fea: torch.Tensor | None, b: int) -> torch.Tensor:
        cfg = self.config
        if clip_fea is None:
            raise InputError(f"this {cfg.model_type} DiT needs clip_fea (CLIP image features [B, 257, 1280])")
        if clip_fea.ndim != 3 or clip_fea.shape[-1] != IMAGE_DIM:
            raise InputError(f"clip_fea must be [B, 257, {IMAGE_DIM}], got {list(clip_fea.shape)}")
        tokens = cfg.image_tokens
        if clip_fea.shape[0] * clip_fea.shape[1] != b * tokens:
            expected = (
                "[B, 257, 1280]" if tokens == IMAGE_TOKENS else "[2B, 257, 1280] (first and last frame)"
            )
            raise InputError(f"clip_fea must be {expected} for B={b}, got {list(clip_fea.shape)}")
        return clip_fea.reshape(b, tokens, IMAGE_DIM)  # flf2v: [2B, 257, d] -> [B, 514, d]

    def extra_repr(self) -> str:
        c = self.config
        return f"model_type={c.model_type}, dim={c.dim}, layers={c.num_layers}, heads={c.num_heads}"
