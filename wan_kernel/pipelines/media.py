"""Reading input images and writing (and reading back) what ``wan generate`` produces.

- Images in: any format PIL reads; EXIF orientation applied; transparency flattened onto a solid
  background (white by default, since most cut-out images are drawn on white; ``black`` on
  request) so the model never sees undefined RGB under transparent pixels.
- Videos out: mp4, H.264, yuv420p, through PyAV; the prompt and settings go into the container
  metadata (``comment`` holds the settings as JSON, ``title`` the prompt).
- Images out: one PNG per frame, the settings JSON in a PNG text chunk.
- Latents out: safetensors ``{"latent": [16, F, H/8, W/8]}`` with the settings as string metadata.

Every write is atomic and exclusive (:class:`wan_kernel.files.AtomicOutput`): the file (or folder
of frames) is written under a hidden temporary name in the destination folder and published
under a name nobody holds, so an error or an interrupt never leaves a half-written output, and
two runs never overwrite each other's results.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from wan_kernel.errors import InputError
from wan_kernel.files import AtomicOutput, save_safetensors

BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
METADATA_KEY = "wan_settings"


# --------------------------------------------------------------------------------------------
# Input images
# --------------------------------------------------------------------------------------------


def read_image(path: str | os.PathLike, *, background: str = "white"):
    """Open an image as an RGB ``PIL.Image``, upright (EXIF orientation) and without alpha.

    Transparent and semi-transparent pixels are composited onto ``background`` (``white`` or
    ``black``). High bit-depth grayscale (16-bit and 32-bit integer, float) is scaled by its
    value range to 8 bits, not truncated.

    :raises InputError: a missing file, a folder, a pipe or device, an unreadable or corrupt image,
        or one larger than PIL's decompression-bomb limit.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if background not in BACKGROUNDS:
        raise InputError(f"unknown image background {background!r}; use one of {', '.join(BACKGROUNDS)}")
    check_input_file(path, "image")
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except Image.DecompressionBombError as exc:
        raise InputError(
            f"image {path} is too large to open safely ({exc}); shrink it (it only needs to be about the "
            "video size) or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _gray_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*BACKGROUNDS[background], 255))
        canvas.alpha_composite(rgba)
        image = canvas
    return image.convert("RGB")


def check_input_file(path: Path, what: str) -> None:
    """A regular, readable input file (never opened here: a FIFO would block), else an InputError
    naming ``what`` and the path (media, latent files, prompt files)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(info.st_mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(info.st_mode) else "not a regular file"
        raise InputError(f"{what} {path} is {kind}, not a regular file; pass a regular file")
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {what} {path}: permission denied")


def _gray_to_8bit(image):
    """A grayscale image of more than 8 bits (``I;16*``, ``I``, ``F``) as mode ``L``, scaled by the
    range of its type: 16-bit 0..65535, 32-bit integers 0..65535 (PNG's 16-bit read as ``I``) or
    0..255 when no value exceeds 255, floats 0..1 (or 0..255 when a value exceeds 1)."""
    from PIL import Image

    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    elif image.mode == "I":
        top = 65535.0 if values.size and values.max() > 255 else 255.0
    else:
        finite = values[np.isfinite(values)]
        top = 1.0 if finite.size == 0 or finite.max() <= 1.0 else 255.0
        values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
    scaled = np.clip(values / top, 0.0, 1.0) * 255.0
    return Image.fromarray(np.round(scaled).astype(np.uint8))


def image_to_tensor(image):
    """PIL RGB image -> float32 tensor ``[3, H, W]`` in ``[-1, 1]`` (as ``TF.to_tensor(x)*2-1``)."""
    import torch

    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
    return tensor.sub_(0.5).div_(0.5)


def video_to_uint8(video) -> np.ndarray:
    """Decoded video ``[3, F, H, W]`` in ``[-1, 1]`` -> ``uint8`` frames ``[F, H, W, 3]``."""
    import torch

    frames = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path``, else delete it.

    For ``directory=True`` the temporary is a folder; it replaces ``path`` if that does not exist
    or is an empty folder (a non-empty one is an :class:`OutputError`). The writers below use
    :class:`wan_kernel.files.AtomicOutput` with ``exclusive=True`` instead, which never replaces.
    """
    with AtomicOutput(path, directory=directory, exclusive=False) as out:
        yield out.tmp


def _metadata_text(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, ensure_ascii=False, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    *,
    fps: int = 16,
    metadata: Mapping[str, Any] | None = None,
    crf: int = 17,
    exclusive: bool = True,
) -> Path:
    """Write ``uint8`` frames ``[F, H, W, 3]`` as an H.264 yuv420p mp4 (atomically); return its path.

    ``metadata`` is stored as JSON in the container's ``comment`` and ``wan_settings`` tags; its
    ``prompt`` (if any) also as ``title``. Height and width must be even (yuv420p). With
    ``exclusive`` (the default) an existing file is never replaced: a taken name gets ``_1``, ...

    :raises OutputError: the file cannot be written (names the path and the reason: disk full, ...).
    """
    import av

    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    count, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise InputError(f"mp4 (yuv420p) needs even sizes, got {width}x{height}")
    with AtomicOutput(path, exclusive=exclusive) as out:
        container = av.open(str(out.tmp), mode="w", format="mp4", options={"movflags": "use_metadata_tags"})
        try:
            if metadata:
                text = _metadata_text(metadata)
                container.metadata["comment"] = text
                container.metadata[METADATA_KEY] = text
                if metadata.get("prompt"):
                    container.metadata["title"] = str(metadata["prompt"])
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for index in range(count):
                frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()
    return out.final


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float, dict[str, Any]]:
    """Decode an mp4: ``(frames uint8 [F, H, W, 3], fps, settings dict)`` (``{}`` without ours)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        text = container.metadata.get(METADATA_KEY) or container.metadata.get("comment") or ""
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    try:
        settings = json.loads(text) if text else {}
    except json.JSONDecodeError:
        settings = {}
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8), fps, settings


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _png_info(metadata: Mapping[str, Any] | None):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_itxt(METADATA_KEY, _metadata_text(metadata))
        if metadata.get("prompt"):
            info.add_itxt("prompt", str(metadata["prompt"]))
    return info


def write_image(
    path: str | os.PathLike,
    frame: np.ndarray,
    *,
    metadata: Mapping[str, Any] | None = None,
    exclusive: bool = True,
) -> Path:
    """Write one ``uint8`` frame ``[H, W, 3]`` as PNG (atomically), settings in a text chunk; return
    its path (``exclusive``: a taken name gets ``_1``, ...)."""
    from PIL import Image

    with AtomicOutput(path, exclusive=exclusive) as out:
        Image.fromarray(np.ascontiguousarray(frame)).save(out.tmp, format="PNG", pnginfo=_png_info(metadata))
    return out.final


def write_frames(
    folder: str | os.PathLike,
    frames: np.ndarray,
    *,
    metadata: Mapping[str, Any] | None = None,
    exclusive: bool = True,
) -> Path:
    """Write frames ``[F, H, W, 3]`` as ``folder/frame_00000.png``... (the folder appears whole);
    return the folder (``exclusive``: a taken, non-empty folder name gets ``_1``, ...)."""
    from PIL import Image

    info = _png_info(metadata)
    with AtomicOutput(folder, directory=True, exclusive=exclusive) as out:
        for index, frame in enumerate(frames):
            Image.fromarray(np.ascontiguousarray(frame)).save(
                out.tmp / f"frame_{index:05d}.png", format="PNG", pnginfo=info
            )
    return out.final


def read_png_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings dict stored in a PNG written by :func:`write_image` (``{}`` if none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(METADATA_KEY, "")
    return json.loads(text) if text else {}


# --------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------


def save_latent(
    path: str | os.PathLike,
    latent,
    *,
    metadata: Mapping[str, Any] | None = None,
    exclusive: bool = True,
) -> Path:
    """Save a latent ``[16, F, H/8, W/8]`` as safetensors with string metadata (atomically); return
    its path (``exclusive``: a taken name gets ``_1``, ...).

    Each metadata value is stored as JSON text under its key.
    """
    meta = {str(k): json.dumps(v, ensure_ascii=False, default=str) for k, v in (metadata or {}).items()}
    return save_safetensors(path, {"latent": latent.detach().float()}, meta, exclusive=exclusive)


def load_latent(path: str | os.PathLike):
    """Load a latent saved by :func:`save_latent`: ``(latent [16, F, H/8, W/8], metadata dict)``.

    Raises :class:`InputError` for a missing file or one without a ``latent`` tensor.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_input_file(path, "latent file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            raw = handle.metadata() or {}
            if "latent" in keys:
                latent = handle.get_tensor("latent")
            elif len(keys) == 1:
                latent = handle.get_tensor(keys[0])
            else:
                raise InputError(f"{path} holds no 'latent' tensor (keys: {', '.join(keys) or 'none'})")
    except (SafetensorError, OSError) as exc:
        raise InputError(f"cannot read latent file {path}: {exc}") from None
    if latent.ndim == 5 and latent.shape[0] == 1:
        latent = latent[0]
    if latent.ndim != 4:
        raise InputError(f"{path}: expected a latent [16, F, H/8, W/8], got shape {tuple(latent.shape)}")
    metadata: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return latent.float(), metadata
