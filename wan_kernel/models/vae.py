"""The Wan2.1 3-D causal VAE (official ``wan/modules/vae.py``: ``WanVAE_`` and the ``WanVAE`` wrapper).

A video ``[B, 3, F, H, W]`` with ``F = 1 + 4k`` maps to latents ``[B, 16, 1 + k, H/8, W/8]``.
The encoder sees the video in causal chunks (the first frame, then groups of 4 frames); the
decoder sees one latent frame at a time. Every temporal convolution (kernel 3 in time) keeps the
last two frames of its input in a :class:`FeatureCache` and uses them as left context for the next
chunk, so chunked processing equals one causal pass over the whole clip while holding only a few
frames of activations.

Parameter names equal the official checkpoint's keys (``encoder.downsamples.0.residual.2.weight``,
``decoder.middle.1.to_qkv.weight``, ...), so ``Wan2.1_VAE.pth`` loads without renaming.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from wan_kernel.errors import InputError

CACHE_T = 2  # frames of left context a temporal conv (kernel 3) needs

from wan_kernel.models.vae_config import (  # noqa: F401 (re-exported: the VAE's facts live there)
    LATENT_CHANNELS,
    LATENT_MEAN,
    LATENT_STD,
    SPATIAL_STRIDE,
    TEMPORAL_STRIDE,
    VAE_CONFIGS,
    VAEConfig,
)

# --------------------------------------------------------------------------------------------
# Causal feature cache
# --------------------------------------------------------------------------------------------

class _Repeat:
    """Marks an upsample3d slot that has seen only the first latent frame (official ``'Rep'``)."""

    def __repr__(self) -> str:
        return "Rep"


REPEAT = _Repeat()


class FeatureCache:
    """Left context carried from one chunk to the next, one slot per temporal layer.

    Layers visit their slot in a fixed order within a chunk: :meth:`start_chunk` rewinds the
    cursor, :meth:`read` returns the current slot (``None`` before the first chunk wrote it) and
    :meth:`write` stores a new value and moves on. With ``device`` set (e.g. ``"cpu"``) cached
    frames live there between chunks and are copied back when read, which trades transfer time for
    accelerator memory on long videos.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = None if device is None else torch.device(device)
        self.slots: list[torch.Tensor | _Repeat | None] = []
        self.cursor = 0

    def start_chunk(self) -> None:
        self.cursor = 0

    def read(self, like: torch.Tensor) -> torch.Tensor | _Repeat | None:
        """The current slot, with a tensor moved to ``like``'s device."""
        if self.cursor >= len(self.slots):
            self.slots.append(None)
        value = self.slots[self.cursor]
        if isinstance(value, torch.Tensor):
            value = value.to(like.device)
        return value

    def write(self, value: torch.Tensor | _Repeat) -> None:
        if isinstance(value, torch.Tensor):
            # A copy, never a view: a view would keep the whole chunk's activation alive.
            if self.device is not None and value.device != self.device:
                value = value.to(self.device)
            else:
                value = value.clone()
        self.slots[self.cursor] = value
        self.cursor += 1


def _context_for_next_chunk(x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """The last ``CACHE_T`` frames of ``x``, completed with the previous context's last frame."""
    context = x[:, :, -CACHE_T:]  # [B, C, <=2, H, W]
    if context.shape[2] < CACHE_T and previous is not None:
        context = torch.cat([previous[:, :, -1:], context], dim=2)
    return context


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """A 3-D convolution padded only on the past side in time (``2 * padding_t`` frames on the left).

    ``forward(x, context)`` prepends ``context`` (earlier frames of the same input) in place of as
    many zero frames. :meth:`cached` does that with the layer's :class:`FeatureCache` slot.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pad_t, pad_h, pad_w = self.padding
        self._pad = [pad_w, pad_w, pad_h, pad_h, 2 * pad_t, 0]  # F.pad order: W, H, T(left, right)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, C_in, T, H, W]`` -> ``[B, C_out, T', H', W']``."""
        pad = list(self._pad)
        if context is not None and pad[4] > 0:
            x = torch.cat([context.to(x.device), x], dim=2)  # [B, C_in, T_ctx + T, H, W]
            pad[4] -= context.shape[2]
        return super().forward(F.pad(x, pad))

    def cached(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """Convolve one chunk with the left context cached from the previous chunk."""
        previous = cache.read(x)
        cache.write(_context_for_next_chunk(x, previous))
        return self(x, previous)


class RMSNorm(nn.Module):
    """``F.normalize`` over channels times ``sqrt(C) * gamma`` (official ``RMS_norm``, no bias).

    ``images=True`` for ``[N, C, H, W]`` inputs, ``False`` for ``[B, C, T, H, W]``.
    Half-precision inputs are normalised in float32.
    """

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            normed = F.normalize(x.float(), dim=1).to(x.dtype)
        else:
            normed = F.normalize(x, dim=1)
        return normed * self.scale * self.gamma


class Upsample(nn.Upsample):
    """Nearest-exact upsampling computed in float32 (half precision is not supported by every kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


class ResidualBlock(nn.Module):
    """``x + residual(x)``: (RMSNorm, SiLU, causal 3x3x3 conv) twice; 1x1x1 shortcut when widths differ."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(  # indices are the official parameter names
            RMSNorm(in_dim, images=False),  # 0
            nn.SiLU(),  # 1
            CausalConv3d(in_dim, out_dim, 3, padding=1),  # 2
            RMSNorm(out_dim, images=False),  # 3
            nn.SiLU(),  # 4
            nn.Dropout(dropout),  # 5
            CausalConv3d(out_dim, out_dim, 3, padding=1),  # 6
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """``x`` ``[B, in_dim, T, H, W]`` -> ``[B, out_dim, T, H, W]``."""
        norm1, act1, conv1, norm2, act2, dropout, conv2 = self.residual
        h = self.shortcut(x)
        x = conv1.cached(act1(norm1(x)), cache)
        x = conv2.cached(dropout(act2(norm2(x))), cache)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C, T, H, W]`` -> same shape."""
        b, c, t, h, w = x.shape
        identity = x
        x = rearrange(x, "b c t h w -> (b t) c h w")
        qkv = self.to_qkv(self.norm(x))  # [BT, 3C, H, W]
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)  # each [BT, 1, HW, C]
        x = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        x = rearrange(x, "n 1 (h w) c -> n c h w", h=h, w=w)
        x = self.proj(x)
        return rearrange(x, "(b t) c h w -> b c t h w", t=t) + identity


class Resample(nn.Module):
    """Spatial x2 up/down sampling per frame, with optional causal x2 temporal resampling.

    Modes: ``upsample2d``/``upsample3d`` (nearest-exact x2 then 3x3 conv to ``dim // 2``;
    3d adds ``time_conv`` doubling the frames), ``downsample2d``/``downsample3d`` (pad right/bottom
    by one, 3x3 stride-2 conv; 3d adds a stride-2 ``time_conv`` halving the frames).
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(
                Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """``x`` ``[B, C, T, H, W]`` -> ``[B, C', T', 2H, 2W]`` (up) or ``[B, C, T', H/2, W/2]`` (down)."""
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        t = x.shape[2]
        x = rearrange(x, "b c t h w -> (b t) c h w")
        x = self.resample(x)
        x = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """``[B, C, T, H, W]`` -> ``[B, C, 2T, H, W]``, except on the first chunk (kept as is).

        The first latent frame maps to one output frame: the slot is only marked ``REPEAT``. The
        next chunk runs ``time_conv`` with zero left context, later ones with the cached frames.
        """
        previous = cache.read(x)
        if previous is None:
            cache.write(REPEAT)
            return x
        context = x[:, :, -CACHE_T:]
        if context.shape[2] < CACHE_T:
            before = torch.zeros_like(context) if previous is REPEAT else previous[:, :, -1:]
            context = torch.cat([before, context], dim=2)
        cache.write(context)
        x = self.time_conv(x, None if previous is REPEAT else previous)  # [B, 2C, T, H, W]
        # the two channel halves are the even and odd output frames
        return rearrange(x, "b (two c) t h w -> b c (t two) h w", two=2)

    def _downsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        """``[B, C, T, H, W]`` -> ``[B, C, T', H, W]``: nothing on the first chunk, then stride-2 in time.

        A later chunk of ``T`` frames is prefixed by the previous chunk's last frame, then the
        unpadded kernel-3 stride-2 conv gives ``(T + 1 - 3) // 2 + 1`` frames (4 -> 2, 2 -> 1).
        """
        previous = cache.read(x)
        cache.write(x[:, :, -1:])
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous[:, :, -1:], x], dim=2))


def _run_blocks(blocks: nn.Sequential, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    for block in blocks:
        x = block(x) if isinstance(block, AttentionBlock) else block(x, cache)
    return x


def _head(out_dim: int, channels: int) -> nn.Sequential:
    return nn.Sequential(
        RMSNorm(out_dim, images=False), nn.SiLU(), CausalConv3d(out_dim, channels, 3, padding=1)
    )


def _run_head(head: nn.Sequential, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
    norm, act, conv = head
    return conv.cached(act(norm(x)), cache)


# --------------------------------------------------------------------------------------------
# Encoder / decoder
# --------------------------------------------------------------------------------------------

class Encoder3d(nn.Module):
    """Pixels ``[B, 3, T, H, W]`` (one chunk) -> ``[B, out_channels, T', H/8, W/8]``."""

    def __init__(self, config: VAEConfig, out_channels: int, dropout: float = 0.0):
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]  # real: 96, 96, 192, 384, 384
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)

        blocks: list[nn.Module] = []
        last = len(config.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != last:
                mode = "downsample3d" if config.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*blocks)

        width = dims[-1]
        self.middle = nn.Sequential(
            ResidualBlock(width, width, dropout), AttentionBlock(width), ResidualBlock(width, width, dropout)
        )
        self.head = _head(width, out_channels)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1.cached(x, cache)  # [B, dim, T, H, W]
        x = _run_blocks(self.downsamples, x, cache)  # [B, 4 dim, T', H/8, W/8]
        x = _run_blocks(self.middle, x, cache)
        return _run_head(self.head, x, cache)  # [B, out_channels, T', H/8, W/8]


class Decoder3d(nn.Module):
    """Latents ``[B, z_dim, T, h, w]`` (one chunk) -> pixels ``[B, 3, T', 8h, 8w]``."""

    def __init__(self, config: VAEConfig, dropout: float = 0.0):
        super().__init__()
        mult = config.dim_mult
        dims = [config.dim * m for m in (mult[-1], *reversed(mult))]  # real: 384, 384, 384, 192, 96
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(
            ResidualBlock(dims[0], dims[0], dropout),
            AttentionBlock(dims[0]),
            ResidualBlock(dims[0], dims[0], dropout),
        )

        blocks: list[nn.Module] = []
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # every upsampling conv halves the width
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != last:
                mode = "upsample3d" if config.temporal_upsample[i] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*blocks)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        x = self.conv1.cached(x, cache)  # [B, 4 dim, T, h, w]
        x = _run_blocks(self.middle, x, cache)
        x = _run_blocks(self.upsamples, x, cache)  # [B, dim, T', 8h, 8w]
        return _run_head(self.head, x, cache)  # [B, 3, T', 8h, 8w]


def _encoder_chunks(frames: int) -> Iterator[slice]:
    """The first frame alone, then whole groups of ``TEMPORAL_STRIDE`` frames.

    A partial trailing group is dropped, as in the official loop.
    """
    yield slice(0, 1)
    for i in range((frames - 1) // TEMPORAL_STRIDE):
        start = 1 + TEMPORAL_STRIDE * i
        yield slice(start, start + TEMPORAL_STRIDE)


class WanVAEModel(nn.Module):
    """The official ``WanVAE_``: encoder, ``conv1`` (to mean/log-variance), ``conv2``, decoder.

    Works on un-normalised latents; :class:`WanVAE` adds the latent normalisation and clamping.
    """

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        z = config.z_dim
        self.encoder = Encoder3d(config, out_channels=2 * z)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(config)

    def encode_moments(
        self, video: torch.Tensor, *, cache_device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``video`` ``[B, 3, 1 + 4k, H, W]`` -> ``(mu, log_var)``, each ``[B, z_dim, 1 + k, H/8, W/8]``."""
        cache = FeatureCache(cache_device)
        outputs = []
        for chunk in _encoder_chunks(video.shape[2]):
            cache.start_chunk()
            outputs.append(self.encoder(video[:, :, chunk], cache))  # [B, 2 z, 1, H/8, W/8]
        moments = self.conv1(torch.cat(outputs, dim=2))  # [B, 2 z, 1 + k, H/8, W/8]
        mu, log_var = moments.chunk(2, dim=1)
        return mu, log_var

    def decode_raw(self, z: torch.Tensor, *, cache_device: torch.device | str | None = None) -> torch.Tensor:
        """Un-normalised ``z`` ``[B, z_dim, T, h, w]`` -> unclamped pixels ``[B, 3, 1 + 4(T-1), 8h, 8w]``."""
        cache = FeatureCache(cache_device)
        x = self.conv2(z)
        outputs = []
        for i in range(z.shape[2]):
            cache.start_chunk()
            outputs.append(self.decoder(x[:, :, i : i + 1], cache))  # 1 frame first, then 4 each
        return torch.cat(outputs, dim=2)


# --------------------------------------------------------------------------------------------
# The user-facing wrapper
# --------------------------------------------------------------------------------------------

class WanVAE:
    """Normalised encode/decode around :class:`WanVAEModel` (official ``WanVAE``).

    - ``encode(video)``: ``[B, 3, F, H, W]`` in [-1, 1], ``F = 1 + 4k``, ``H``/``W`` multiples of 8
      -> float32 latents ``[B, 16, 1 + k, H/8, W/8]`` normalised as ``(mu - mean) / std``.
    - ``decode(latents)``: the inverse, float32 pixels clamped to [-1, 1] (``clamp=False`` keeps
      the raw decoder output).

    Inputs are moved to the VAE's device and dtype; outputs are float32 on the VAE's device. Each
    sample of a batch is processed on its own with its own cache (as the official wrapper does),
    so peak memory is that of one video. ``cache_device="cpu"`` keeps the causal cache in CPU
    memory. Runs without autograd.
    """

    def __init__(
        self,
        model: WanVAEModel,
        *,
        cache_device: torch.device | str | None = None,
        mean: tuple[float, ...] = LATENT_MEAN,
        std: tuple[float, ...] = LATENT_STD,
    ):
        self.model = model
        self.cache_device = cache_device
        z_dim = model.config.z_dim
        if len(mean) != z_dim or len(std) != z_dim:
            raise ValueError(f"latent mean/std need {z_dim} values, got {len(mean)}/{len(std)}")
        device = self.device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, z_dim, 1, 1, 1)
        self.inv_std = (1.0 / torch.tensor(std, dtype=torch.float32, device=device)).view(1, z_dim, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def z_dim(self) -> int:
        return self.model.config.z_dim

    def to(self, device: torch.device | str) -> "WanVAE":
        """Move the VAE (and its latent statistics) to ``device``; returns ``self``."""
        self.model.to(device)
        self.mean = self.mean.to(device)
        self.inv_std = self.inv_std.to(device)
        return self

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``[B, 3, 1 + 4k, H, W]`` in [-1, 1] -> normalised float32 latents ``[B, 16, 1 + k, H/8, W/8]``."""
        _check_video(video)
        latents = []
        for sample in video.split(1):
            sample = sample.to(device=self.device, dtype=self.dtype)
            mu, _ = self.model.encode_moments(sample, cache_device=self.cache_device)
            latents.append((mu.float() - self.mean) * self.inv_std)
        return torch.cat(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
        """Normalised ``[B, 16, T, h, w]`` -> float32 pixels ``[B, 3, 1 + 4(T-1), 8h, 8w]`` in [-1, 1]."""
        _check_latents(latents, self.z_dim)
        videos = []
        for sample in latents.split(1):
            z = sample.to(device=self.device, dtype=torch.float32) / self.inv_std + self.mean
            pixels = self.model.decode_raw(z.to(self.dtype), cache_device=self.cache_device).float()
            videos.append(pixels.clamp_(-1.0, 1.0) if clamp else pixels)
        return torch.cat(videos)


def _check_video(video: object) -> None:
    if not isinstance(video, torch.Tensor):
        raise InputError(f"VAE encode takes a tensor [B, 3, F, H, W], got {type(video).__name__}")
    if video.ndim != 5:
        raise InputError(
            f"VAE encode takes a 5-D video tensor [B, 3, F, H, W], got shape {tuple(video.shape)}; "
            "for a single video or image add the missing axes (video.unsqueeze(0), image[:, :, None])"
        )
    b, c, f, h, w = video.shape
    if not video.is_floating_point():
        raise InputError(f"VAE encode takes floating-point pixels in [-1, 1], got dtype {video.dtype}")
    if c != 3:
        raise InputError(
            f"VAE encode takes 3 colour channels (RGB) on axis 1, got {c} (shape {tuple(video.shape)})"
        )
    if b == 0:
        raise InputError("VAE encode got an empty batch")
    if f < 1 or (f - 1) % TEMPORAL_STRIDE:
        lower = 1 + TEMPORAL_STRIDE * max(0, (f - 1) // TEMPORAL_STRIDE)
        raise InputError(
            f"VAE encode needs 1 + 4k frames (1, 5, 9, ..., 81), got {f}; trim the video to {lower} frames"
        )
    if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE or h == 0 or w == 0:
        raise InputError(
            f"VAE encode needs height and width that are positive multiples of 8, got {h}x{w}; "
            f"resize or crop to {max(8, h // 8 * 8)}x{max(8, w // 8 * 8)}"
        )


def _check_latents(latents: object, z_dim: int) -> None:
    if not isinstance(latents, torch.Tensor):
        raise InputError(f"VAE decode takes a tensor [B, {z_dim}, T, h, w], got {type(latents).__name__}")
    if latents.ndim != 5:
        raise InputError(
            f"VAE decode takes 5-D latents [B, {z_dim}, T, h, w], got shape {tuple(latents.shape)}; "
            "add the batch axis with latents.unsqueeze(0)"
        )
    if not latents.is_floating_point():
        raise InputError(f"VAE decode takes floating-point latents, got dtype {latents.dtype}")
    b, c, t, h, w = latents.shape
    if c != z_dim:
        raise InputError(
            f"VAE decode takes {z_dim} latent channels on axis 1, got {c} (shape {tuple(latents.shape)})"
        )
    if b == 0 or t == 0 or h == 0 or w == 0:
        raise InputError(f"VAE decode got empty latents of shape {tuple(latents.shape)}")
