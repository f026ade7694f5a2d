"""The dataset TOML (the seed trainer's schema) read and validated into typed config.

A file has an optional ``[general]`` table (defaults for every dataset) and a ``[[datasets]]``
array; a dataset is a video dataset when it has ``video_directory`` or ``video_jsonl_file``::

    [general]
    resolution = [960, 544]         # int or [W, H]
    caption_extension = ".txt"
    batch_size = 1
    enable_bucket = true

    [[datasets]]
    image_directory = 'C:\\data\\images'       # single quotes: Windows paths as they are
    cache_directory = "cache/images"
    num_repeats = 2

    [[datasets]]
    video_directory = "data/videos"
    target_frames = [1, 25, 45]
    frame_extraction = "head"       # head | chunk | slide | uniform | full
    source_fps = 30.0               # resampled to 16 fps

Everything is checked before anything runs: an unknown key names the closest known one, a wrong
type, a missing directory or an empty dataset names the dataset (``datasets[i]``) and the key.
Relative paths are taken from the current folder (as the seed does), or from the TOML's folder
when only that one exists; a cache directory that does not exist yet follows its dataset's
source.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from wan_kernel.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")
FRAME_EXTRACTIONS = ("head", "chunk", "slide", "uniform", "full")
DEFAULT_RESOLUTION = (960, 544)
TARGET_FPS = 16.0
"""Wan2.1 is trained at 16 fps: ``source_fps`` resamples to this."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


# --------------------------------------------------------------------------------------------
# The schema: one table of keys, what they hold and where they may appear
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Key:
    """One TOML key: its type check (returns the parsed value or raises ``ValueError`` with what
    was expected), where it may appear, and whether this tool uses it."""

    parse: Callable[[Any], Any]
    where: frozenset[str]  # {"general", "image", "video"}
    used: bool = True


def _int(minimum: int = 1) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"an integer >= {minimum}")
        if value < minimum:
            raise ValueError(f"an integer >= {minimum}")
        return value

    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a path (a non-empty string)")
    if any(c in value for c in "\t\n\r\b\f"):
        raise ValueError(
            "a path without tab/newline characters (a Windows path in double quotes turns \\t, \\n, "
            "\\b, \\f, \\r into those characters: write it in single quotes, 'C:\\data\\videos', "
            "or with forward slashes)"
        )
    return value


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 16:
        return (value, value)
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 16 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise ValueError("an integer >= 16 or [width, height]")


def _int_list(value: Any) -> tuple[int, ...]:
    if (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return tuple(int(v) for v in value)
    raise ValueError("a non-empty list of integers")


def _target_frames(value: Any) -> tuple[int, ...]:
    frames = _int_list(value)
    if any(v < 1 for v in frames):
        raise ValueError("a non-empty list of frame counts >= 1")
    return round_target_frames(frames)


def _extraction(value: Any) -> str:
    if value not in FRAME_EXTRACTIONS:
        raise ValueError(f"one of {', '.join(FRAME_EXTRACTIONS)}")
    return value


def _fps(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("a positive number of frames per second (e.g. 30.0)")
    return float(value)


_ALL = frozenset({"general", "image", "video"})
_DATA = frozenset({"image", "video"})
_IMAGE = frozenset({"image"})
_VIDEO = frozenset({"video"})

KEYS: dict[str, Key] = {
    # ascendable: [general] or per dataset
    "resolution": Key(_size, _ALL),
    "caption_extension": Key(_str, _ALL),
    "batch_size": Key(_int(), _ALL),
    "num_repeats": Key(_int(), _ALL),
    "enable_bucket": Key(_bool, _ALL),
    "bucket_no_upscale": Key(_bool, _ALL),
    # sources
    "image_directory": Key(_path, _IMAGE),
    "image_jsonl_file": Key(_path, _IMAGE),
    "video_directory": Key(_path, _VIDEO),
    "video_jsonl_file": Key(_path, _VIDEO),
    "cache_directory": Key(_path, _DATA),
    # videos
    "target_frames": Key(_target_frames, _VIDEO),
    "frame_extraction": Key(_extraction, _VIDEO),
    "frame_stride": Key(_int(), _VIDEO),
    "frame_sample": Key(_int(), _VIDEO),
    "max_frames": Key(_int(), _VIDEO),
    "source_fps": Key(_fps, _VIDEO),
    # accepted for the seed's files, not used by the Wan2.1 text/image-to-video caches
    "control_directory": Key(_path, _DATA, used=False),
    "fp_latent_window_size": Key(_int(), _DATA, used=False),
    "fp_1f_clean_indices": Key(_int_list, _IMAGE, used=False),
    "fp_1f_target_index": Key(_int(0), _IMAGE, used=False),
    "fp_1f_no_post": Key(_bool, _IMAGE, used=False),
    "no_resize_control": Key(_bool, _IMAGE, used=False),
    "control_resolution": Key(_size, _IMAGE, used=False),
    "multiple_target": Key(_bool, _IMAGE, used=False),
}
"""Every key of the dataset TOML (the seed's schema): parser, where it may appear, used or not."""

GENERAL_KEYS = tuple(k for k, spec in KEYS.items() if "general" in spec.where)
SOURCE_KEYS = ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file")


def round_target_frames(frames) -> tuple[int, ...]:
    """Each count rounded down to ``4n + 1`` (what the VAE takes), duplicates dropped, sorted."""
    return tuple(sorted({(int(f) - 1) // 4 * 4 + 1 for f in frames}))


# --------------------------------------------------------------------------------------------
# Typed config
# --------------------------------------------------------------------------------------------


@attrs.frozen
class DatasetConfig:
    """One ``[[datasets]]`` entry with the ``[general]`` defaults applied.

    ``resolution`` is ``(width, height)``. For image datasets the video keys keep their defaults.
    ``unused`` lists the keys that were given but mean nothing to Wan2.1 text/image-to-video
    caching (control videos, one-frame and FramePack options).
    """

    index: int
    is_video: bool
    cache_directory: Path
    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    caption_extension: str | None = None
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    directory: Path | None = None
    jsonl_file: Path | None = None
    target_frames: tuple[int, ...] = (1,)
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None
    unused: tuple[str, ...] = ()

    @property
    def source(self) -> Path:
        """The directory or JSONL file the items come from."""
        return self.directory if self.directory is not None else self.jsonl_file  # type: ignore[return-value]

    @property
    def label(self) -> str:
        """``datasets[i] (path)``, how messages name this dataset."""
        return f"datasets[{self.index}] ({self.source})"


@attrs.frozen
class DatasetGroupConfig:
    """The whole TOML: its datasets in file order."""

    datasets: list[DatasetConfig]
    path: Path | None = None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_BASIC_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')


def _repair_windows_paths(text: str) -> str:
    """Double the backslashes of double-quoted strings that TOML would reject (``"C:\\data"``).

    Only backslashes that do not start a valid TOML escape are doubled, so ``"C:\\\\data"`` is untouched.
    """

    def fix(match: re.Match) -> str:
        s = match.group(0)
        out, i = [], 0
        while i < len(s):
            if s[i] == "\\":
                if i + 1 < len(s) and s[i + 1] in 'btnfr"\\uU':
                    out.append(s[i : i + 2])
                    i += 2
                    continue
                out.append("\\\\")
                i += 1
                continue
            out.append(s[i])
            i += 1
        return "".join(out)

    return _BASIC_STRING.sub(fix, text)


def _parse_toml(path: Path) -> dict:
    if path.exists() and not path.is_file():  # a FIFO would block the read forever
        kind = "a folder" if path.is_dir() else "not a regular file (a named pipe or device?)"
        raise InputError(f"dataset config {path} is {kind}; give the dataset TOML file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"dataset config not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read dataset config {path}: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        repaired = _repair_windows_paths(text)
        if repaired != text:
            try:
                return tomllib.loads(repaired)
            except tomllib.TOMLDecodeError:
                pass
        raise InputError(f"dataset config {path} is not valid TOML: {exc}") from None


def _closest(key: str, known) -> str:
    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _check_keys(table: dict, allowed, where: str) -> None:
    for key in table:
        if key not in allowed:
            if key in KEYS:
                hint = (
                    " (it belongs in a [[datasets]] entry)"
                    if where == "[general]"
                    else " (it is for a different kind of dataset)"
                )
            else:
                hint = _closest(key, allowed)
            raise InputError(f"{where}: unknown key {key!r}{hint}")


def _parse_value(key: str, value: Any, where: str) -> Any:
    try:
        return KEYS[key].parse(value)
    except ValueError as exc:
        raise InputError(f"{where}: {key} must be {exc}, got {value!r}") from None


def _locate(raw: str, base: Path | None, *, prefer_base: bool = False) -> Path:
    """A path from the TOML: as written (relative to the current folder) when it exists there, else
    beside the TOML when it exists there (or, with ``prefer_base``, whenever it does not exist)."""
    path = Path(raw).expanduser()
    if path.is_absolute() or path.exists() or base is None:
        return path
    beside = base / path
    return beside if beside.exists() or prefer_base else path


def load_dataset_config(path: str | os.PathLike) -> DatasetGroupConfig:
    """Read and validate a dataset TOML; raises :class:`InputError` naming the dataset and key."""
    path = Path(path)
    data = _parse_toml(path)
    base = path.parent
    _check_keys(data, ("general", "datasets"), f"dataset config {path}")
    general = data.get("general", {})
    if not isinstance(general, dict):
        raise InputError(f"dataset config {path}: [general] must be a table")
    _check_keys(general, GENERAL_KEYS, "[general]")
    defaults = {k: _parse_value(k, v, "[general]") for k, v in general.items()}
    entries = data.get("datasets")
    if not entries:
        raise InputError(f"dataset config {path} has no [[datasets]] entry")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise InputError(f"dataset config {path}: datasets must be an array of tables ([[datasets]])")
    datasets = [_dataset(i, entry, defaults, base) for i, entry in enumerate(entries)]
    return DatasetGroupConfig(datasets=datasets, path=path)


def _dataset(index: int, entry: dict, defaults: dict, base: Path) -> DatasetConfig:
    where = f"datasets[{index}]"
    _check_keys(entry, KEYS, where)  # a misspelt source key is named before "no source given"
    sources = [k for k in SOURCE_KEYS if k in entry]
    if len(sources) != 1:
        given = ", ".join(sources) if sources else "none"
        raise InputError(
            f"{where}: give exactly one of image_directory, image_jsonl_file, video_directory, "
            f"video_jsonl_file (given: {given})"
        )
    source_key = sources[0]
    kind = "video" if source_key.startswith("video") else "image"
    allowed = [k for k, spec in KEYS.items() if kind in spec.where or "general" in spec.where]
    _check_keys(entry, allowed, where)
    values = dict(defaults)
    values.update({k: _parse_value(k, v, where) for k, v in entry.items()})

    source = _locate(values[source_key], base)
    source_beside_toml = source != Path(values[source_key]).expanduser()
    is_dir = source_key.endswith("directory")
    if is_dir and not source.is_dir():
        raise InputError(f"{where}: {source_key} {source} is not a directory")
    if not is_dir and not source.is_file():
        raise InputError(f"{where}: {source_key} {source} is not a file")
    if "cache_directory" in values:
        # a new cache folder goes where the sources were found: beside the TOML if they were
        cache_directory = _locate(values["cache_directory"], base, prefer_base=source_beside_toml)
    elif is_dir:
        cache_directory = source
    else:
        raise InputError(f"{where}: cache_directory is required for a dataset from {source_key}")
    if cache_directory.exists() and not cache_directory.is_dir():
        raise InputError(f"{where}: cache_directory {cache_directory} exists and is not a directory")
    if is_dir and values.get("caption_extension") is None:
        raise InputError(
            f"{where}: caption_extension is required for a dataset from {source_key} "
            "(the captions are <name><caption_extension> beside each file, e.g. '.txt')"
        )

    if not values.get("enable_bucket", False):
        values["bucket_no_upscale"] = False  # as the seed: meaningless without buckets
    fields = {k: values[k] for k in KEYS if k in values and KEYS[k].used and k not in SOURCE_KEYS}
    fields.pop("cache_directory", None)
    config = DatasetConfig(
        index=index,
        is_video=kind == "video",
        cache_directory=cache_directory,
        directory=source if is_dir else None,
        jsonl_file=None if is_dir else source,
        unused=tuple(k for k in entry if not KEYS[k].used),
        **fields,
    )
    _check_not_empty(config, source_key)
    return config


def _check_not_empty(config: DatasetConfig, source_key: str) -> None:
    where = f"datasets[{config.index}]"
    if config.directory is not None:
        if config.is_video:
            found = any(
                (p.is_file() and is_video_file(p)) or (p.is_dir() and any(map(is_image_file, p.iterdir())))
                for p in config.directory.iterdir()
                if not p.name.startswith(".")
            )
            what = "video files (or folders of frames)"
        else:
            found = any(
                p.is_file() and is_image_file(p) and not p.name.startswith(".")
                for p in config.directory.iterdir()
            )
            what = "image files"
        if not found:
            raise InputError(
                f"{where}: {source_key} {config.directory} holds no {what}: the dataset is empty"
            )
        return
    read_jsonl(config)  # raises for a malformed or empty file


def read_jsonl(config: DatasetConfig) -> list[tuple[int, dict]]:
    """The entries of a JSONL dataset as ``(line number, object)``; errors name the file and line."""
    assert config.jsonl_file is not None
    where = f"datasets[{config.index}]"
    path_key = "video_path" if config.is_video else "image_path"
    entries = []
    try:
        lines = config.jsonl_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{where}: cannot read {config.jsonl_file}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: {config.jsonl_file}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(item, dict) or not isinstance(item.get(path_key), str):
            raise InputError(f"{where}: {config.jsonl_file}:{number}: needs a {path_key!r} string")
        if "caption" in item and not isinstance(item["caption"], str):
            raise InputError(f"{where}: {config.jsonl_file}:{number}: 'caption' must be a string")
        entries.append((number, item))
    if not entries:
        raise InputError(f"{where}: {config.jsonl_file} has no entries: the dataset is empty")
    return entries
