"""The cache files training reads: the seed trainer's names, tensor names and metadata.

Latent caches (one per image, one per video clip), in the dataset's ``cache_directory``:

- images ``<base>_<WWWW>x<HHHH>_wan.safetensors``; video clips
  ``<base>_<start:05d>-<frames:03d>_<WWWW>x<HHHH>_wan.safetensors``, where ``W x H`` is the
  ORIGINAL media size (the trainer recomputes the bucket from it);
- tensors ``latents_<F>x<H>x<W>_<dtype>`` ``[16, F, H, W]`` (latent sizes), and for
  image-to-video ``latents_image_<F>x<H>x<W>_<dtype>`` ``[20, F, H, W]`` (4 mask + 16 latent
  channels) and ``clip_<dtype>`` ``[257, 1280]``;
- metadata ``architecture=wan``, ``format_version=1.0.1``, ``width``, ``height`` and, for
  videos, ``frame_count``.

Text caches (one per source file, shared by its clips): ``<base>_wan_te.safetensors`` with
``varlen_t5_<dtype>`` ``[L, 4096]`` (the real tokens only) and metadata ``architecture``,
``caption1``, ``format_version``.

``<dtype>`` is torch's name (``bfloat16``, ``float32``...). Every file is written under a hidden
temporary name and renamed when complete (:mod:`wan_kernel.files`), so a file with the final name
is always whole; :func:`remove_partials` clears what a killed run left.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import attrs
import torch

from wan_kernel.errors import InputError
from wan_kernel.files import clean_stale_temporaries, save_safetensors

ARCHITECTURE = "wan"
FORMAT_VERSION = "1.0.1"
LATENT_SUFFIX = f"_{ARCHITECTURE}.safetensors"
TEXT_SUFFIX = f"_{ARCHITECTURE}_te.safetensors"

_LATENT_NAME = re.compile(
    r"^(?P<base>.+?)(?:_(?P<start>\d{5})-(?P<frames>\d{3,}))?_(?P<width>\d{4,})x(?P<height>\d{4,})"
    + re.escape(LATENT_SUFFIX)
    + "$"
)


@attrs.frozen
class LatentCacheName:
    """What a latent cache file name says: the source's base name, its size, the clip if any."""

    base: str
    width: int
    height: int
    start: int | None = None
    frames: int | None = None

    @property
    def filename(self) -> str:
        return latent_cache_name(self.base, self.width, self.height, start=self.start, frames=self.frames)


def latent_cache_name(
    base: str, width: int, height: int, *, start: int | None = None, frames: int | None = None
) -> str:
    """``<base>_<WWWW>x<HHHH>_wan.safetensors`` (image), ``<base>_<start>-<frames>_<W>x<H>_wan...`` (clip)."""
    clip = "" if start is None else f"_{start:05d}-{frames:03d}"
    return f"{base}{clip}_{width:04d}x{height:04d}{LATENT_SUFFIX}"


def parse_latent_cache_name(name: str | os.PathLike) -> LatentCacheName | None:
    """The parts of a latent cache file name, ``None`` when it is not one."""
    match = _LATENT_NAME.match(Path(name).name)
    if match is None:
        return None
    start = match.group("start")
    return LatentCacheName(
        base=match.group("base"),
        width=int(match.group("width")),
        height=int(match.group("height")),
        start=int(start) if start is not None else None,
        frames=int(match.group("frames")) if start is not None else None,
    )


def text_cache_name(base: str) -> str:
    """``<base>_wan_te.safetensors``."""
    return f"{base}{TEXT_SUFFIX}"


def text_cache_path_for(latent_path: str | os.PathLike) -> Path:
    """The text cache that belongs to a latent cache (same folder, same base name)."""
    parsed = parse_latent_cache_name(latent_path)
    if parsed is None:
        raise InputError(f"{latent_path} is not a latent cache file name (<base>_<W>x<H>{LATENT_SUFFIX})")
    return Path(latent_path).with_name(text_cache_name(parsed.base))


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name of a dtype without the ``torch.`` prefix (``bfloat16``)."""
    return str(dtype).removeprefix("torch.")


def _sizes(tensor: torch.Tensor) -> str:
    return "x".join(str(s) for s in tensor.shape[-3:])


def latent_key(latents: torch.Tensor, *, name: str = "latents") -> str:
    """``<name>_<F>x<H>x<W>_<dtype>`` for a latent ``[C, F, H, W]``."""
    return f"{name}_{_sizes(latents)}_{dtype_name(latents.dtype)}"


def strip_key(key: str) -> str:
    """A cache tensor name without its size and dtype: ``latents_1x68x120_bfloat16`` -> ``latents``."""
    parts = key.split("_")
    parts = parts[:-1]  # dtype
    if parts and re.fullmatch(r"\d+x\d+x\d+", parts[-1]):
        parts = parts[:-1]
    if parts[:2] == ["varlen", "t5"]:
        return "t5"
    return "_".join(parts)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_atomic(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> Path:
    """Write a cache file through :func:`wan_kernel.files.save_safetensors`, replacing an older one
    (a cache is rewritten on purpose); a killed write leaves only a hidden temporary, never a file
    with a cache's name.

    :raises OutputError: the folder cannot be written, or the disk filled up.
    """
    return save_safetensors(path, tensors, metadata, exclusive=False)


def _check_finite(tensor: torch.Tensor, what: str, item: str) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(
            f"{item}: the {what} has {bad} non-finite values (NaN/inf); nothing was written. "
            "Check the file, or run the encoder in float32 (--vae_dtype float32 / without --fp8_t5)"
        )


class NonFiniteError(InputError):
    """An encoder produced NaN/inf for an item (the seed silently wrote zeros)."""


def write_latent_cache(
    path: str | os.PathLike,
    latents: torch.Tensor,
    *,
    width: int,
    height: int,
    frame_count: int | None = None,
    image_latents: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
    item: str | None = None,
) -> Path:
    """Write one latent cache (see the module doc); raises :class:`NonFiniteError` for NaN/inf.

    :param latents: ``[16, F, H, W]`` in the dtype to store.
    :param width: ``height``: the original media size (also in the file name).
    :param frame_count: the clip length in frames, for videos.
    :param image_latents: ``[20, F, H, W]`` image-to-video conditioning (mask + latent).
    :param clip: ``[257, 1280]`` (or ``[N, 257, 1280]``) CLIP features, stored in ``latents``' dtype.
    """
    item = item or str(path)
    tensors = {latent_key(latents): latents}
    _check_finite(latents, "latent", item)
    if image_latents is not None:
        image_latents = image_latents.to(latents.dtype)
        _check_finite(image_latents, "image-conditioning latent", item)
        tensors[latent_key(image_latents, name="latents_image")] = image_latents
    if clip is not None:
        clip = clip.to(latents.dtype)
        _check_finite(clip, "CLIP feature", item)
        tensors[f"clip_{dtype_name(clip.dtype)}"] = clip
    metadata = {
        "architecture": ARCHITECTURE,
        "width": str(width),
        "height": str(height),
        "format_version": FORMAT_VERSION,
    }
    if frame_count is not None:
        metadata["frame_count"] = str(frame_count)
    return save_atomic(path, tensors, metadata)


def write_text_cache(
    path: str | os.PathLike, t5: torch.Tensor, *, caption: str, item: str | None = None
) -> Path:
    """Write one text cache: ``varlen_t5_<dtype>`` ``[L, dim]`` (real tokens only) and the caption.

    Tensors of other encoders already in the file are kept; earlier ``varlen_t5_*`` are replaced.
    """
    path = Path(path)
    _check_finite(t5, "text embedding", item or str(path))
    tensors: dict[str, torch.Tensor] = {}
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                tensors = {k: handle.get_tensor(k) for k in handle.keys() if not k.startswith("varlen_t5_")}
        except Exception:  # an unreadable old cache is simply replaced
            tensors = {}
    tensors[f"varlen_t5_{dtype_name(t5.dtype)}"] = t5
    metadata = {"architecture": ARCHITECTURE, "caption1": caption, "format_version": FORMAT_VERSION}
    return save_atomic(path, tensors, metadata)


def remove_partials(directory: str | os.PathLike) -> int:
    """Delete the temporaries killed runs left in ``directory`` (those of a concurrent run, whose
    process is alive, are kept: :func:`wan_kernel.files.clean_stale_temporaries`); how many."""
    return len(clean_stale_temporaries(directory))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def cache_keys(path: str | os.PathLike) -> tuple[list[str], dict[str, str]] | None:
    """Tensor names and metadata of a cache file (header only); ``None`` if it is not readable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except Exception:
        return None


def read_cache(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A cache file's tensors by short name (``latents``, ``latents_image``, ``clip``, ``t5``), metadata."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {strip_key(k): handle.get_tensor(k) for k in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except Exception as exc:
        raise InputError(f"cannot read cache file {path}: {exc}") from None
    return tensors, metadata


def read_latent_cache(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``{"latents": [16, F, H, W], ...}`` (plus ``latents_image`` / ``clip`` when present)."""
    tensors, _ = read_cache(path)
    if "latents" not in tensors:
        raise InputError(f"{path} holds no latents_* tensor: not a Wan latent cache")
    return tensors


def read_text_cache(path: str | os.PathLike) -> torch.Tensor:
    """The ``[L, dim]`` T5 embedding of a text cache."""
    tensors, _ = read_cache(path)
    if "t5" not in tensors:
        raise InputError(f"{path} holds no varlen_t5_* tensor: not a Wan text cache")
    return tensors["t5"]


def latent_cache_complete(
    path: str | os.PathLike, *, image_conditioning: bool = False, clip: bool = False
) -> bool:
    """Whether ``path`` is a whole latent cache holding what is asked for (used by ``--skip_existing``)."""
    found = cache_keys(path)
    if found is None:
        return False
    names = {strip_key(k) for k in found[0]}
    return (
        "latents" in names
        and (not image_conditioning or "latents_image" in names)
        and (not clip or "clip" in names)
    )


@attrs.frozen
class CachedItem:
    """A latent cache and the text cache it trains with (what the trainer iterates over)."""

    latent_path: Path
    text_path: Path
    name: LatentCacheName


def find_cached_items(directory: str | os.PathLike) -> tuple[list[CachedItem], list[Path]]:
    """The latent caches of a cache directory that have their text cache, in name order, and
    the latent caches that have none (the seed trainer skips those with a warning)."""
    directory = Path(directory)
    found: list[CachedItem] = []
    orphans: list[Path] = []
    for path in sorted(directory.glob(f"*{LATENT_SUFFIX}")):
        name = parse_latent_cache_name(path)
        if name is None or path.name.startswith("."):
            continue
        text = directory / text_cache_name(name.base)
        if text.is_file():
            found.append(CachedItem(path, text, name))
        else:
            orphans.append(path)
    return found, orphans


def text_cache_complete(path: str | os.PathLike, *, caption: str | None = None) -> bool:
    """Whether ``path`` is a whole text cache (of ``caption``, when given)."""
    found = cache_keys(path)
    if found is None:
        return False
    keys, metadata = found
    if not any(k.startswith("varlen_t5_") for k in keys):
        return False
    return caption is None or metadata.get("caption1") == caption
