"""Training data: the latent and text caches that ``wan run cache`` writes, batched by bucket.

A cache directory holds, per source item, a latent file ``<base>_<WWWW>x<HHHH>_wan.safetensors``
(videos: ``<base>_<start:05d>-<frames:03d>_<WWWW>x<HHHH>_wan.safetensors``) with
``latents_<F>x<H>x<W>_<dtype>`` ``[16, F, H, W]`` (image-to-video caches also
``latents_image_<F>x<H>x<W>_<dtype>`` ``[20, F, H, W]`` and ``clip_<dtype>`` ``[257, 1280]``, or
``[2, 257, 1280]`` for first-last-frame), and a text file ``<base>_wan_te.safetensors`` with
``varlen_t5_<dtype>`` ``[L, 4096]`` (the seed's layout; see CONTRACT.md).

Items are grouped into buckets of equal latent shape (a batch is stacked within one bucket), each
dataset's items repeated ``num_repeats`` times and cut into batches of its ``batch_size``. The
order of an epoch is a pure function of ``(seed, epoch)`` (:func:`epoch_batches`), which is what
makes resuming in the middle of an epoch exact. With several processes, process ``r`` of ``n``
takes batches ``r, r + n, ...`` (the list is first padded by wrapping around so that every process
runs the same number of batches).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch
from safetensors import safe_open

from wan_kernel.errors import InputError

LATENT_KEY_RE = re.compile(r"^latents_(?P<f>\d+)x(?P<h>\d+)x(?P<w>\d+)_(?P<dtype>\w+)$")
IMAGE_KEY_RE = re.compile(r"^latents_image_(?P<f>\d+)x(?P<h>\d+)x(?P<w>\d+)_(?P<dtype>\w+)$")
CLIP_KEY_RE = re.compile(r"^clip_(?P<dtype>\w+)$")
TEXT_KEY_RE = re.compile(r"^varlen_t5_(?P<dtype>\w+)$")


@attrs.frozen
class CacheSource:
    """One dataset: its cache directory, batch size and repeats (a ``[[datasets]]`` entry)."""

    cache_directory: Path = attrs.field(converter=Path)
    batch_size: int = 1
    num_repeats: int = 1

    def __attrs_post_init__(self) -> None:
        if self.batch_size < 1 or self.num_repeats < 1:
            raise InputError(
                f"{self.cache_directory}: batch_size and num_repeats must be >= 1, "
                f"got {self.batch_size} and {self.num_repeats}"
            )


@attrs.frozen
class CachedItem:
    """One cached training item: where its tensors are and what they hold (from the file headers)."""

    latent_path: Path
    text_path: Path
    latent_key: str
    latent_shape: tuple[int, ...]  # [C, F, H, W]
    text_key: str
    text_dim: int
    image_key: str | None = None
    clip_key: str | None = None
    clip_shape: tuple[int, ...] | None = None

    @property
    def bucket(self) -> tuple:
        """Items of one bucket stack into one batch: equal latent shape and conditioning."""
        return (self.latent_shape, self.image_key is not None, self.clip_shape)


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return shapes, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise InputError(f"cannot read the cache file {path}: {exc}; delete it and run wan run cache again")


def _one(keys: dict[str, tuple[int, ...]], pattern: re.Pattern, path: Path, what: str) -> str | None:
    found = [k for k in keys if pattern.match(k)]
    if len(found) > 1:
        raise InputError(f"{path} holds several {what} tensors ({', '.join(found)}); re-create the cache")
    return found[0] if found else None


def scan_cache_directory(directory: Path, *, warn=print) -> list[CachedItem]:
    """The complete items of one cache directory (``wan_kernel.dataset.cache_files`` pairs latent
    and text files; a latent file without its text file is skipped with a warning, as the seed)."""
    from wan_kernel.dataset.cache_files import ARCHITECTURE, find_cached_items

    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"cache directory {directory} does not exist; run wan run cache first")
    found, orphans = find_cached_items(directory)
    for path in orphans:
        warn(f"warning: {path.name} has no text cache; skipped (run wan run cache --t5 ...)")
    items = []
    for pair in found:
        path, text_path = pair.latent_path, pair.text_path
        shapes, meta = _header(path)
        if meta.get("architecture", ARCHITECTURE) != ARCHITECTURE:
            raise InputError(f"{path} is a cache for {meta['architecture']!r}, not Wan2.1")
        latent_key = _one(shapes, LATENT_KEY_RE, path, "latent")
        if latent_key is None:
            raise InputError(f"{path} has no latents_<F>x<H>x<W>_<dtype> tensor; re-create the cache")
        text_shapes, _ = _header(text_path)
        text_key = _one(text_shapes, TEXT_KEY_RE, text_path, "text")
        if text_key is None:
            raise InputError(f"{text_path} has no varlen_t5_<dtype> tensor; re-create the text cache")
        clip_key = _one(shapes, CLIP_KEY_RE, path, "clip")
        items.append(
            CachedItem(
                latent_path=path,
                text_path=text_path,
                latent_key=latent_key,
                latent_shape=shapes[latent_key],
                text_key=text_key,
                text_dim=text_shapes[text_key][-1],
                image_key=_one(shapes, IMAGE_KEY_RE, path, "image latent"),
                clip_key=clip_key,
                clip_shape=None if clip_key is None else shapes[clip_key],
            )
        )
    return items


@attrs.define
class TrainingData:
    """The datasets of one run, scanned once; batches per epoch and process on demand."""

    sources: list[CacheSource]
    items: list[list[CachedItem]]  # per source

    @classmethod
    def scan(cls, sources: Sequence[CacheSource], *, warn=print) -> TrainingData:
        if not sources:
            raise InputError("no datasets: give --dataset_config (or cache directories)")
        items = [scan_cache_directory(s.cache_directory, warn=warn) for s in sources]
        for source, found in zip(sources, items):
            if not found:
                raise InputError(
                    f"{source.cache_directory} holds no complete cache items (latent + text files); "
                    "run wan run cache --dataset_config ... --vae ... --t5 ... first"
                )
        return cls(list(sources), items)

    @property
    def num_items(self) -> int:
        return sum(len(i) * s.num_repeats for s, i in zip(self.sources, self.items))

    def all_items(self) -> list[CachedItem]:
        return [item for found in self.items for item in found]

    def epoch_batches(self, seed: int, epoch: int) -> list[list[CachedItem]]:
        """Every batch of ``epoch`` (0-based) in training order, the same for the same ``(seed, epoch)``."""
        rng = random.Random(f"wan-train:{seed}:{epoch}")
        batches: list[list[CachedItem]] = []
        for source, found in zip(self.sources, self.items):
            buckets: dict[tuple, list[CachedItem]] = {}
            for item in found:
                buckets.setdefault(item.bucket, []).extend([item] * source.num_repeats)
            for key in sorted(buckets, key=repr):
                members = buckets[key]
                rng.shuffle(members)
                for i in range(0, len(members), source.batch_size):
                    batches.append(members[i : i + source.batch_size])
        rng.shuffle(batches)
        return batches

    def batches_per_process(self, num_processes: int) -> int:
        return math.ceil(len(self.epoch_batches(0, 0)) / num_processes)

    def process_batches(self, seed: int, epoch: int, rank: int, num_processes: int) -> list[list[CachedItem]]:
        """This process's share of :meth:`epoch_batches` (padded by wrapping so all shares are equal)."""
        batches = self.epoch_batches(seed, epoch)
        per = math.ceil(len(batches) / num_processes)
        padded = [batches[i % len(batches)] for i in range(per * num_processes)]
        return padded[rank::num_processes]


def load_batch(items: Sequence[CachedItem]) -> dict[str, object]:
    """Read one batch: ``latents`` ``[B, 16, F, H, W]``, ``t5`` (list of ``[L_i, dim]``), and for
    image-to-video ``latents_image`` ``[B, 20, F, H, W]`` and ``clip`` ``[B, 257(x2), 1280]``; the
    cached dtypes are kept."""
    latents, texts, images, clips = [], [], [], []
    for item in items:
        with safe_open(str(item.latent_path), framework="pt") as f:
            latents.append(f.get_tensor(item.latent_key))
            if item.image_key is not None:
                images.append(f.get_tensor(item.image_key))
            if item.clip_key is not None:
                clips.append(f.get_tensor(item.clip_key))
        with safe_open(str(item.text_path), framework="pt") as f:
            texts.append(f.get_tensor(item.text_key))
    batch: dict[str, object] = {"latents": torch.stack(latents), "t5": texts}
    if images:
        batch["latents_image"] = torch.stack(images)
    if clips:
        clip = torch.stack(clips)  # [B, 257, 1280] or [B, 2, 257, 1280]
        batch["clip"] = clip.reshape(clip.shape[0], -1, clip.shape[-1])  # [B, 257 (x2), 1280]
    return batch


def describe_sources(data: TrainingData) -> str:
    """JSON for the ``ss_datasets`` metadata key."""
    return json.dumps(
        [
            {
                "cache_directory": str(s.cache_directory),
                "batch_size": s.batch_size,
                "num_repeats": s.num_repeats,
                "num_items": len(i),
            }
            for s, i in zip(data.sources, data.items)
        ]
    )
