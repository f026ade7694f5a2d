"""From a dataset config to the things that get cached.

- :func:`list_sources` walks each dataset (directory or JSONL) and returns one :class:`Source` per
  media file with its caption, plus the files dropped on the way (no caption, missing file).
- :func:`plan_source` reads one source and returns its :class:`LatentItem` s (one per image, one
  per video clip), each with its bucket and cache path, and the bucketed pixels when asked.
  It runs in the data-loader workers; it raises :class:`~wan_kernel.dataset.media.MediaError`
  for a file that cannot be read.
- :func:`check_unique_names` refuses two sources that would write the same cache file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import attrs
import numpy as np

from wan_kernel.dataset.buckets import BucketSelector, resize_to_bucket
from wan_kernel.dataset.cache_files import latent_cache_name, text_cache_name
from wan_kernel.dataset.config import (
    DatasetConfig,
    DatasetGroupConfig,
    is_image_file,
    is_video_file,
    read_jsonl,
)
from wan_kernel.dataset.frames import decode_limit, extract_clips
from wan_kernel.dataset.media import MediaError, image_size, read_image_array, read_video
from wan_kernel.errors import InputError


@attrs.frozen
class Source:
    """One media file (or folder of frames) of a dataset, with its caption.

    ``caption`` is ``None`` when there is none; ``caption_problem`` then says why, and
    ``caption_failed`` whether that is a fault to report (an empty or unreadable caption file)
    rather than a deliberate exclusion (no caption file at all, as the seed skips such files).
    """

    dataset: DatasetConfig
    path: Path
    caption: str | None
    caption_problem: str | None = None
    caption_failed: bool = False

    @property
    def base(self) -> str:
        """The base name caches are named after (file name without extension, or folder name)."""
        return self.path.name if self.path.is_dir() else self.path.stem

    @property
    def text_cache_path(self) -> Path:
        return self.dataset.cache_directory / text_cache_name(self.base)


@attrs.frozen
class Dropped:
    """Something that will not be cached, and why."""

    what: str
    reason: str


@attrs.frozen
class LatentItem:
    """One latent cache to write: an image, or a clip ``(start, frames)`` of a video."""

    source: Source
    original_size: tuple[int, int]  # (W, H) of the media
    bucket: tuple[int, int]  # (W, H) the pixels are resized and cropped to
    start: int | None = None
    frames: int = 1

    @property
    def cache_path(self) -> Path:
        width, height = self.original_size
        start = self.start if self.source.dataset.is_video else None
        name = latent_cache_name(self.source.base, width, height, start=start, frames=self.frames)
        return self.source.dataset.cache_directory / name

    @property
    def label(self) -> str:
        if self.start is None:
            return str(self.source.path)
        return f"{self.source.path} [frames {self.start}..{self.start + self.frames - 1}]"

    @property
    def batch_key(self) -> tuple[int, int, int]:
        """Items with the same key can be encoded in one batch: ``(W, H, frames)``."""
        return (*self.bucket, self.frames)


@attrs.frozen
class PlannedSource:
    """What :func:`plan_source` found in one source."""

    source: Source
    items: list[LatentItem]
    dropped: list[Dropped]
    pixels: list[np.ndarray | None]  # per item: uint8 [F, H, W, 3] at the bucket size, or None
    fps: float | None = None
    frame_count: int | None = None  # after resampling (videos)
    file_size: int = 0


# --------------------------------------------------------------------------------------------
# Sources and captions
# --------------------------------------------------------------------------------------------


def _read_caption(media: Path, extension: str) -> tuple[str | None, str | None, bool]:
    caption_path = media.parent / f"{media.name if media.is_dir() else media.stem}{extension}"
    if not caption_path.is_file():
        return None, f"no caption file {caption_path.name}", False
    try:
        text = caption_path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read caption file {caption_path}: {exc}", True
    if not text:
        return None, f"empty caption file {caption_path.name}", True
    return text, None, False


def _directory_media(dataset: DatasetConfig) -> list[Path]:
    assert dataset.directory is not None
    found = []
    for path in sorted(dataset.directory.iterdir()):
        if path.name.startswith("."):  # hidden: .DS_Store, .ipynb_checkpoints, our .wan_debug, temporaries
            continue
        if dataset.is_video:
            if (path.is_file() and is_video_file(path)) or (
                path.is_dir() and any(map(is_image_file, path.iterdir()))
            ):
                found.append(path)
        elif path.is_file() and is_image_file(path):
            found.append(path)
    return found


def list_sources(dataset: DatasetConfig) -> tuple[list[Source], list[Dropped]]:
    """The dataset's sources in a fixed order, and what was dropped while listing them."""
    sources: list[Source] = []
    dropped: list[Dropped] = []
    if dataset.directory is not None:
        for media in _directory_media(dataset):
            caption, problem, failed = _read_caption(media, dataset.caption_extension or ".txt")
            sources.append(Source(dataset, media, caption, problem, failed))
        return sources, dropped
    key = "video_path" if dataset.is_video else "image_path"
    assert dataset.jsonl_file is not None
    for number, entry in read_jsonl(dataset):
        where = f"{dataset.jsonl_file}:{number}"
        media = Path(entry[key]).expanduser()
        if not media.is_absolute() and not media.exists() and (dataset.jsonl_file.parent / media).exists():
            media = dataset.jsonl_file.parent / media
        if not media.exists():
            dropped.append(Dropped(f"{where} {entry[key]}", "file not found"))
            continue
        caption = entry.get("caption")
        caption = caption.strip() if isinstance(caption, str) else None
        problem = None if caption else ("empty caption" if caption == "" else "no 'caption' in the entry")
        sources.append(Source(dataset, media, caption or None, problem, caption == ""))
    return sources, dropped


def list_all_sources(group: DatasetGroupConfig) -> tuple[list[Source], list[Dropped]]:
    """:func:`list_sources` of every dataset, checked with :func:`check_unique_names`."""
    sources: list[Source] = []
    dropped: list[Dropped] = []
    for dataset in group.datasets:
        found, lost = list_sources(dataset)
        sources += found
        dropped += lost
    check_unique_names(sources)
    return sources, dropped


def check_unique_names(sources: Iterable[Source]) -> None:
    """Refuse two sources whose caches would have the same name in the same cache directory.

    The seed names caches by base name only, so ``a.png`` and ``a.jpg`` (or two ``clip.mp4`` in
    different folders sharing a cache directory) silently overwrite each other there.
    """
    seen: dict[tuple[Path, str], Source] = {}
    for source in sources:
        key = (source.dataset.cache_directory.resolve(), source.base)
        other = seen.get(key)
        if other is not None and other.path.resolve() != source.path.resolve():
            raise InputError(
                f"{other.path} and {source.path} would write the same cache files "
                f"({source.base}_*) in {source.dataset.cache_directory}: cache names come from the file "
                "name without its extension. Rename one of them, or give their datasets different "
                "cache_directory values."
            )
        seen.setdefault(key, source)


# --------------------------------------------------------------------------------------------
# Planning one source
# --------------------------------------------------------------------------------------------


def plan_source(source: Source, *, load_pixels: bool = True, wanted=None) -> PlannedSource:
    """The latent items of one source (see the module doc).

    :param load_pixels: read and bucket the pixels (``False``: sizes and clips only, for dry runs;
        videos are then decoded whole to count their frames; images are only ever sized from their
        header until their pixels are needed).
    :param wanted: optional ``LatentItem -> bool``; pixels are prepared only for wanted items
        (``--skip_existing`` passes "not cached yet").
    :raises MediaError: the file cannot be read.
    """
    dataset = source.dataset
    selector = BucketSelector.for_dataset(dataset)
    file_size = _size_on_disk(source.path)
    if not dataset.is_video:
        width, height = image_size(source.path)  # the header: a cached image is never decoded
        item = LatentItem(source, (width, height), selector.bucket(width, height))
        if min(item.bucket) < 16:
            return PlannedSource(
                source, [], [Dropped(str(source.path), f"{width}x{height} is smaller than 16 px")], []
            )
        pixels = None
        if load_pixels and (wanted is None or wanted(item)):
            image = read_image_array(source.path)
            if image.shape[:2] != (height, width):
                raise MediaError(f"{source.path}: the header says {width}x{height}, the pixels do not")
            pixels = resize_to_bucket(image, item.bucket)[None]
        return PlannedSource(source, [item], [], [pixels], file_size=file_size)

    limit = decode_limit(
        target_frames=dataset.target_frames, mode=dataset.frame_extraction, max_frames=dataset.max_frames
    )
    fit = _FitToBucket(selector) if load_pixels else None
    video = read_video(
        source.path,
        source_fps=dataset.source_fps,
        limit=limit if load_pixels else None,
        pixels=load_pixels,
        fit=fit,
    )
    count = video.count
    width, height = video.size
    bucket = selector.bucket(width, height)
    clips = extract_clips(
        count,
        target_frames=dataset.target_frames,
        mode=dataset.frame_extraction,
        frame_stride=dataset.frame_stride,
        frame_sample=dataset.frame_sample,
        max_frames=dataset.max_frames,
    )
    dropped: list[Dropped] = []
    if min(bucket) < 16:
        dropped.append(Dropped(str(source.path), f"{width}x{height} is smaller than 16 px"))
        clips = []
    elif not clips:
        have = f"{count} frames" + ("" if video.complete else "+")
        if dataset.frame_extraction == "full":
            reason = f"{have}: no frames"
        else:
            reason = f"{have}, fewer than the shortest target_frames ({min(dataset.target_frames)})"
        dropped.append(Dropped(str(source.path), reason))
    items = [LatentItem(source, (width, height), bucket, start, length) for start, length in clips]
    pixels: list[np.ndarray | None] = [None] * len(items)
    if load_pixels:
        for i, item in enumerate(items):  # video.frames are already at the bucket size
            if wanted is None or wanted(item):
                pixels[i] = video.frames[item.start : item.start + item.frames]
    return PlannedSource(
        source,
        items,
        dropped,
        pixels,
        fps=video.fps,
        frame_count=count if video.complete else None,
        file_size=file_size,
    )


class _FitToBucket:
    """Resizes decoded frames to the bucket of the first frame's size (all frames share a size)."""

    def __init__(self, selector: BucketSelector):
        self.selector = selector
        self.bucket: tuple[int, int] | None = None

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.bucket is None:
            self.bucket = self.selector.bucket(frame.shape[1], frame.shape[0])
        if min(self.bucket) < 16:
            return frame[:1, :1]  # too small to train on: dropped by the caller, keep nothing
        return resize_to_bucket(frame, self.bucket)


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = [
    "Dropped",
    "LatentItem",
    "MediaError",
    "PlannedSource",
    "Source",
    "check_unique_names",
    "list_all_sources",
    "list_sources",
    "plan_source",
]
