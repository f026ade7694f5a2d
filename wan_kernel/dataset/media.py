"""Reading the dataset's images and videos as ``uint8`` frames ``[F, H, W, 3]``.

- Images: through :func:`wan_kernel.pipelines.media.read_image` (EXIF orientation applied,
  transparency flattened onto white), so training sees images as generation does.
- Videos: PyAV, decoded frame by frame. The rotation a phone stores in the container (display
  matrix) is applied, so portrait clips come out portrait. The frame count is what decoding
  yields, never the container's claim (which is often missing or wrong).
- A folder of images is a video: its image files in sorted name order are the frames.
- ``source_fps`` resamples to 16 fps while decoding (:class:`~wan_kernel.dataset.frames.FpsResampler`);
  ``limit`` stops after that many kept frames.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import attrs
import numpy as np

from wan_kernel.dataset.config import is_image_file
from wan_kernel.dataset.frames import FpsResampler
from wan_kernel.errors import InputError


class MediaError(InputError):
    """A dataset file cannot be read (undecodable video, truncated image, ...)."""


@attrs.frozen
class VideoFrames:
    """Decoded (and resampled) frames with what the source said about itself."""

    frames: np.ndarray  # uint8 [F, H, W, 3] (only the first frame when read with ``pixels=False``)
    fps: float | None  # the container's average rate (None for folders of images)
    source_frames: int  # frames decoded before resampling (up to the limit)
    complete: bool  # False when decoding stopped at ``limit``
    count: int  # frames kept (after resampling)
    size: tuple[int, int]  # (width, height) of the source frames (upright, before ``fit``)


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """An image as ``uint8`` ``[H, W, 3]``; :class:`MediaError` when it cannot be read."""
    from wan_kernel.pipelines.media import read_image

    try:
        return np.asarray(read_image(path))
    except InputError as exc:
        raise MediaError(str(exc)) from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image as it will be read (EXIF rotation applied), from its header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"cannot read image {path}: {exc}") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def frame_files(folder: Path) -> list[Path]:
    """The image files of a folder of frames, in sorted name order."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith(".")
    )


def _rotation(frame, stream) -> int:
    """Clockwise degrees to turn a decoded frame upright (display matrix or the old ``rotate`` tag)."""
    rotation = getattr(frame, "rotation", None)  # PyAV >= 13: counter-clockwise degrees
    if rotation:
        return int(-rotation) % 360
    tag = stream.metadata.get("rotate") if stream.metadata else None
    try:
        return int(tag) % 360 if tag else 0
    except ValueError:
        return 0


def read_video(
    path: str | os.PathLike,
    *,
    source_fps: float | None = None,
    limit: int | None = None,
    pixels: bool = True,
    fit: Callable[[np.ndarray], np.ndarray] | None = None,
) -> VideoFrames:
    """Decode a video file or a folder of frames; :class:`MediaError` when it cannot be decoded.

    ``pixels=False`` still decodes every frame (to count them) but keeps only the first.
    ``fit`` is applied to each kept frame as it is decoded (e.g. the resize to its bucket), so a
    long video is held at the training size, never at its own.
    """
    fit = fit or (lambda frame: frame)
    size: tuple[int, int] | None = None
    path = Path(path)
    resampler = FpsResampler(source_fps)
    kept: list[np.ndarray] = []
    count = 0
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise MediaError(f"{path}: the folder holds no image files")
        seen = 0
        shapes = set()
        for file in files:
            if limit is not None and count >= limit:
                break
            seen += 1
            if resampler.keep():
                if pixels or not kept:
                    array = read_image_array(file)
                    shapes.add(array.shape)
                    size = size or (array.shape[1], array.shape[0])
                    kept.append(fit(array))
                else:
                    width, height = image_size(file)
                    shapes.add((height, width, 3))
                count += 1
        if len(shapes) > 1:
            raise MediaError(f"{path}: the frames do not all have the same size ({sorted(shapes)})")
        return VideoFrames(np.stack(kept), None, seen, seen == len(files), count, size)

    import av

    seen = 0
    complete = True
    fps = None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate) if stream.average_rate else None
            for frame in container.decode(stream):
                if limit is not None and count >= limit:
                    complete = False
                    break
                seen += 1
                if not resampler.keep():
                    continue
                count += 1
                if kept and not pixels:
                    continue
                array = frame.to_ndarray(format="rgb24")
                turn = _rotation(frame, stream)
                if turn:
                    array = np.ascontiguousarray(np.rot90(array, k=-(turn // 90)))
                size = size or (array.shape[1], array.shape[0])
                kept.append(fit(array))
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:  # type: ignore[attr-defined]
        reason = getattr(exc, "strerror", None) or str(exc)  # FFmpeg's words, without errno and path
        raise MediaError(f"cannot decode video {path}: {reason}") from None
    if not kept:
        raise MediaError(f"cannot decode video {path}: no frames")
    assert size is not None
    return VideoFrames(np.stack(kept), fps, seen, complete, count, size)
