"""Caching for training: VAE latents (and image-to-video conditioning) and T5 text embeddings.

What gets written is described in :mod:`wan_kernel.dataset.cache_files`. The flow:

- Latents: every source of every dataset is read in data-loader worker processes
  (``num_workers``): decoded, fps-resampled, cut into clips and bucketed
  (:func:`~wan_kernel.dataset.items.plan_source`), while the main process encodes batches of
  same-size items with the VAE and writes them. Image-to-video adds the first-frame conditioning
  and CLIP features computed by :func:`wan_kernel.pipelines.conditioning.encode_conditioning`,
  the same function generation uses. With CLIP, ``run_cache`` first runs a CLIP pass
  (:func:`compute_clip_features`: CLIP loaded alone, the features of every item of this rank kept
  in CPU memory in the stored dtype, about 0.66 MB per item in bfloat16, CLIP freed), then the VAE
  pass, so the two models are never in memory together; each source is decoded once per pass.
- Text: the captions, in batches, through :func:`wan_kernel.models.t5.encode_prompts` (real
  tokens only, as generation).

A file that cannot be read, an empty caption file or an encoder output with NaN/inf is reported
and skipped; the rest is cached and :attr:`CacheReport.failed` lists what failed. With
``skip_existing`` only items without a complete cache are computed; caches of items no longer in
the dataset are removed unless ``keep_cache``. Under ``torchrun``/``accelerate launch`` each rank
takes every ``world_size``-th source (:class:`~wan_kernel.pipelines.distributed.Ranks`).
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from wan_kernel.dataset.cache_files import (
    LATENT_SUFFIX,
    TEXT_SUFFIX,
    NonFiniteError,
    latent_cache_complete,
    parse_latent_cache_name,
    remove_partials,
    text_cache_complete,
    write_latent_cache,
    write_text_cache,
)
from wan_kernel.dataset.config import DatasetGroupConfig
from wan_kernel.dataset.items import Dropped, LatentItem, PlannedSource, Source, list_all_sources, plan_source
from wan_kernel.errors import InputError, WanError
from wan_kernel.pipelines.devices import free_memory, resolve_compute_dtype, resolve_device
from wan_kernel.pipelines.distributed import Ranks

LogFn = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------


@attrs.frozen
class CacheSettings:
    """How to cache (the options of ``wan run cache`` that are not model files).

    ``batch_size`` overrides every dataset's; ``num_workers`` ``None`` means ``cpu_count - 1``.
    """

    batch_size: int | None = None
    num_workers: int | None = None
    skip_existing: bool = False
    keep_cache: bool = False
    progress: bool = True

    def workers(self) -> int:
        if self.num_workers is not None:
            return max(0, self.num_workers)
        return max(0, min(8, (os.cpu_count() or 1) - 1))


@attrs.define
class CacheReport:
    """What one caching pass did. ``failed`` makes the command exit non-zero."""

    kind: str  # "latent" or "text"
    cached: int = 0
    skipped: int = 0
    failed: list[Dropped] = attrs.field(factory=list)
    dropped: list[Dropped] = attrs.field(factory=list)
    removed: int = 0
    encode_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def busy_fraction(self) -> float:
        """Share of the wall time the encoder was computing."""
        return self.encode_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def merge(self, others: Iterable[CacheReport]) -> CacheReport:
        """One report for several ranks (wall time: the slowest rank's)."""
        merged = CacheReport(self.kind)
        for r in [self, *others]:
            merged.cached += r.cached
            merged.skipped += r.skipped
            merged.failed += r.failed
            merged.dropped += r.dropped
            merged.removed += r.removed
            merged.encode_seconds += r.encode_seconds
            merged.wall_seconds = max(merged.wall_seconds, r.wall_seconds)
        return merged

    def summary(self) -> str:
        lines = [
            f"{self.kind} caches: {self.cached} written, {self.skipped} already cached (skipped), "
            f"{len(self.failed)} failed, {len(self.dropped)} not in the training set, "
            f"{self.removed} stale removed ({self.wall_seconds:.1f} s)"
        ]
        lines += [f"  dropped: {d.what}: {d.reason}" for d in self.dropped]
        lines += [f"  FAILED: {d.what}: {d.reason}" for d in self.failed]
        return "\n".join(lines)


def _split_sources(sources: list[Source], report: CacheReport) -> list[Source]:
    """Sources with a caption; the others go to ``report`` (failed or dropped)."""
    usable = []
    for source in sources:
        if source.caption is not None:
            usable.append(source)
        elif source.caption_failed:
            report.failed.append(Dropped(str(source.path), source.caption_problem or "no caption"))
        else:
            report.dropped.append(Dropped(str(source.path), source.caption_problem or "no caption"))
    return usable


def _cache_directories(group: DatasetGroupConfig) -> list[Path]:
    return list(dict.fromkeys(d.cache_directory for d in group.datasets))


def _remove_stale(
    group: DatasetGroupConfig,
    expected: set[Path],
    suffix: str,
    log: LogFn,
    *,
    protected: set[tuple[Path, str]] | None = None,
) -> int:
    """Delete ``*<suffix>`` caches in the cache directories that no dataset item produces.

    ``protected`` holds ``(cache directory, base name)`` of sources that failed to read this time:
    their earlier caches stay (the failure is reported; fixing the file should not cost them).
    """
    keep = {p.resolve() for p in expected}
    protected = {(d.resolve(), base) for d, base in protected or ()}
    removed = 0
    for directory in _cache_directories(group):
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob(f"*{suffix}")):
            parsed = parse_latent_cache_name(path) if suffix == LATENT_SUFFIX else None
            if suffix == LATENT_SUFFIX and parsed is None:
                continue
            if parsed is not None and (directory.resolve(), parsed.base) in protected:
                continue
            if path.resolve() not in keep:
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        log(
            f"removed {removed} cache file(s) of items no longer in the dataset (keep them with --keep_cache)"
        )
    return removed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Reading sources in worker processes
# --------------------------------------------------------------------------------------------


@attrs.frozen
class _Failure:
    source: Source
    reason: str


class _SourceReader(torch.utils.data.Dataset):
    """A map-style dataset over sources: item ``i`` is ``plan_source(sources[i])`` (or a failure)."""

    def __init__(
        self, sources: list[Source], *, load_pixels: bool, wanted: Callable[[LatentItem], bool] | None
    ):
        self.sources = sources
        self.load_pixels = load_pixels
        self.wanted = wanted

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> PlannedSource | _Failure:
        source = self.sources[index]
        try:
            return plan_source(source, load_pixels=self.load_pixels, wanted=self.wanted)
        except WanError as exc:
            return _Failure(source, str(exc))
        except Exception as exc:  # a decoder crash on one file must not stop the dataset
            return _Failure(source, f"cannot read {source.path}: {type(exc).__name__}: {exc}")


def _as_is(value):
    return value


def read_sources(
    sources: list[Source],
    *,
    workers: int,
    load_pixels: bool = True,
    wanted: Callable[[LatentItem], bool] | None = None,
) -> Iterator[PlannedSource | _Failure]:
    """Plan every source, ``workers`` processes ahead of the consumer, in order."""
    reader = _SourceReader(sources, load_pixels=load_pixels, wanted=wanted)
    if workers == 0 or len(sources) < 2:
        yield from (reader[i] for i in range(len(reader)))
        return
    loader = torch.utils.data.DataLoader(
        reader,
        batch_size=None,
        shuffle=False,
        num_workers=min(workers, len(sources)),
        collate_fn=_as_is,
        prefetch_factor=2,
    )
    yield from loader


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Latents
# --------------------------------------------------------------------------------------------


def pixels_to_video(pixels: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """``uint8`` clips ``[F, H, W, 3]`` (same size) -> float32 ``[B, 3, F, H, W]`` in [-1, 1] on ``device``.

    The bytes travel to the device as ``uint8`` (a quarter of the float32 traffic) and are
    converted there; the arithmetic is the same on every device.
    """
    batch = torch.from_numpy(np.stack(pixels)).to(device)  # [B, F, H, W, 3] uint8
    return batch.permute(0, 4, 1, 2, 3).float().div_(127.5).sub_(1.0)


@attrs.frozen
class MissingLatentCache:
    """``--skip_existing``'s test, run in the reader processes (so it holds no model)."""

    image_conditioning: bool = False
    clip: bool = False

    def __call__(self, item: LatentItem) -> bool:
        return not latent_cache_complete(
            item.cache_path, image_conditioning=self.image_conditioning, clip=self.clip
        )


def first_frame(pixels: np.ndarray) -> torch.Tensor:
    """An item's first frame ``[3, H, W]`` float32 in [-1, 1] (CPU), exactly as :func:`pixels_to_video`
    gives it: what the image conditioning and CLIP see."""
    return pixels_to_video([pixels[:1]])[0, :, 0]


def compute_clip_features(
    group: DatasetGroupConfig,
    clip,
    settings: CacheSettings = CacheSettings(),
    *,
    store_dtype: torch.dtype = torch.float32,
    ranks: Ranks | None = None,
) -> dict[Path, torch.Tensor]:
    """The CLIP pass of image-to-video caching: ``{cache path: [257, 1280] features}`` for every item
    of this rank that the VAE pass will write (with ``skip_existing``: those without a complete i2v
    cache), kept on the CPU in ``store_dtype`` (the cache's dtype; the cast is the one the cache
    writer would do). Give the result to :class:`LatentEncoder` (``clip_features=``) once ``clip``
    is freed. Sources that cannot be read are left out; the VAE pass reports them.
    """
    from wan_kernel.pipelines.conditioning import clip_features

    ranks = ranks or Ranks.from_env()
    sources, _ = list_all_sources(group)
    mine = ranks.share([s for s in sources if s.caption is not None])
    wanted = MissingLatentCache(image_conditioning=True, clip=True) if settings.skip_existing else None
    features: dict[Path, torch.Tensor] = {}
    with _progress(len(mine), "clip", settings.progress) as bar:
        for planned in read_sources(mine, workers=settings.workers(), wanted=wanted):
            bar.update(1)
            if isinstance(planned, _Failure):
                continue
            for item, pixels in zip(planned.items, planned.pixels):
                if pixels is not None:
                    # one image per call, as generation: batching could change the last bits
                    image = first_frame(pixels)[None]  # [1, 3, H, W]
                    features[item.cache_path] = clip_features(clip, image)[0].to(store_dtype)
    return features


class LatentEncoder:
    """Encodes batches of :class:`LatentItem` s and writes their caches.

    :param vae: what ``load_vae`` returns (``encode(video)``; ``dtype`` is the stored dtype).
    :param clip: a CLIP vision model (``load_clip_vision``) run alongside the VAE, or ``None``.
    :param clip_features: CLIP features computed beforehand by :func:`compute_clip_features` (so
        CLIP and the VAE need not be loaded together), or ``None``; not with ``clip``.
    :param image_conditioning: also write ``latents_image`` (the i2v first-frame conditioning).
    """

    def __init__(
        self,
        vae,
        *,
        clip=None,
        clip_features: dict[Path, torch.Tensor] | None = None,
        image_conditioning: bool = False,
        store_dtype: torch.dtype | None = None,
    ):
        if clip is not None and clip_features is not None:
            raise InputError("give LatentEncoder either a CLIP model or precomputed clip_features, not both")
        self.vae = vae
        self.clip = clip
        self.clip_features = clip_features
        self.with_clip = clip is not None or clip_features is not None
        self.image_conditioning = image_conditioning or self.with_clip
        self.store_dtype = store_dtype or getattr(vae, "dtype", torch.float32)
        self.device = getattr(vae, "device", torch.device("cpu"))
        self.seconds = 0.0

    def complete(self, item: LatentItem) -> bool:
        """Whether ``item`` already has a whole cache with everything this encoder writes."""
        return not self.missing()(item)

    def missing(self) -> MissingLatentCache:
        """A picklable ``item -> bool``: true when the item's cache lacks what this encoder writes."""
        return MissingLatentCache(self.image_conditioning, self.with_clip)

    def encode(self, items: list[LatentItem], pixels: list[np.ndarray]) -> list[tuple[LatentItem, dict]]:
        """The tensors of each item: ``latents`` and, for i2v, ``image_latents`` / ``clip``."""
        from wan_kernel.pipelines.conditioning import encode_conditioning

        start = time.perf_counter()
        video = pixels_to_video(pixels, self.device)  # [B, 3, F, H, W]
        latents = self.vae.encode(video).to(self.store_dtype).cpu()  # [B, 16, T, H/8, W/8]
        outputs = []
        for index, item in enumerate(items):
            tensors: dict[str, Any] = {"latents": latents[index]}
            if self.image_conditioning:
                width, height = item.bucket
                first = video[index, :, 0].cpu()  # [3, H, W], already at the bucket size (CPU, as generation)
                clip_fea = None if self.clip is not None else torch.zeros(1, 257, 1280)
                if self.clip_features is not None:
                    if item.cache_path not in self.clip_features:
                        raise InputError(f"{item.label}: no CLIP features (the CLIP pass could not read it)")
                    clip_fea = self.clip_features[item.cache_path][None]
                # encode_conditioning derives the latent size from an area and the image's aspect
                # (official rounding); with the bare W*H, float error gives one latent pixel less
                # for some buckets, so ask for W*H plus a margin that rounds back to W x H exactly
                cond = encode_conditioning(
                    self.vae,
                    first,
                    frames=item.frames,
                    max_area=width * height + min(width, height),
                    clip=self.clip,
                    # without CLIP (--i2v alone) only y is kept; the placeholder is never stored
                    clip_fea=clip_fea,
                )
                if (cond.lat_h, cond.lat_w) != tuple(latents.shape[-2:]):
                    raise InputError(
                        f"{item.label}: the image conditioning came out {cond.width}x{cond.height}, "
                        f"not the bucket {width}x{height}"
                    )
                tensors["image_latents"] = cond.y
                if self.with_clip:
                    tensors["clip"] = cond.clip_fea[0]  # [257, 1280]
            outputs.append((item, tensors))
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        return outputs


def _usable_sources(
    group: DatasetGroupConfig, ranks: Ranks, report: CacheReport
) -> tuple[list[Source], list[Source]]:
    """``(usable, mine)``: the usable sources of ``group`` (dropped and unusable ones go into
    ``report``) and this rank's share of them, once the main rank has removed what killed runs
    left in the cache folders."""
    sources, dropped = list_all_sources(group)
    report.dropped += dropped
    usable = _split_sources(sources, report)
    mine = ranks.share(usable)
    if ranks.is_main:
        for directory in _cache_directories(group):
            remove_partials(directory)
    ranks.barrier()
    return usable, mine


def cache_latents(
    group: DatasetGroupConfig,
    encoder: LatentEncoder,
    settings: CacheSettings = CacheSettings(),
    *,
    ranks: Ranks | None = None,
    log: LogFn = _stderr,
) -> CacheReport:
    """Write the latent cache of every item of ``group`` (this rank's share); see the module doc."""
    ranks = ranks or Ranks.from_env()
    report = CacheReport("latent")
    wall = time.perf_counter()
    _, mine = _usable_sources(group, ranks, report)
    for directory in _cache_directories(group):
        directory.mkdir(parents=True, exist_ok=True)

    wanted = encoder.missing() if settings.skip_existing else None
    buffers: dict[tuple, list[tuple[LatentItem, np.ndarray]]] = defaultdict(list)
    expected: set[Path] = set()
    protected: set[tuple[str, str]] = set()

    def flush(key: tuple) -> None:
        batch = buffers.pop(key, [])
        if not batch:
            return
        items = [item for item, _ in batch]
        try:
            encoded = encoder.encode(items, [pixels for _, pixels in batch])
        except WanError as exc:  # e.g. a VAE that rejects the size: every item of the batch fails
            report.failed += [Dropped(item.label, str(exc)) for item in items]
            return
        for item, tensors in encoded:
            try:
                write_latent_cache(
                    item.cache_path,
                    tensors["latents"],
                    width=item.original_size[0],
                    height=item.original_size[1],
                    frame_count=item.frames if item.source.dataset.is_video else None,
                    image_latents=tensors.get("image_latents"),
                    clip=tensors.get("clip"),
                    item=item.label,
                )
                report.cached += 1
            except NonFiniteError as exc:
                report.failed.append(Dropped(item.label, str(exc)))

    with _progress(len(mine), "latents", settings.progress) as bar:
        for planned in read_sources(mine, workers=settings.workers(), wanted=wanted):
            bar.update(1)
            if isinstance(planned, _Failure):
                report.failed.append(Dropped(str(planned.source.path), planned.reason))
                protected.add((str(planned.source.dataset.cache_directory), planned.source.base))
                continue
            report.dropped += planned.dropped
            dataset = planned.source.dataset
            batch_size = settings.batch_size or dataset.batch_size
            for item, pixels in zip(planned.items, planned.pixels):
                expected.add(item.cache_path)
                if pixels is None:
                    report.skipped += 1
                    continue
                key = (dataset.index, *item.batch_key)
                buffers[key].append((item, pixels))
                if len(buffers[key]) >= batch_size:
                    flush(key)
            bar.set_postfix(cached=report.cached, failed=len(report.failed), refresh=False)
        for key in list(buffers):
            flush(key)

    report.encode_seconds = encoder.seconds
    everything = ranks.gather((sorted(str(p) for p in expected), sorted(protected)))
    if ranks.is_main and not settings.keep_cache:
        report.removed = _remove_stale(
            group,
            {Path(p) for paths, _ in everything for p in paths},
            LATENT_SUFFIX,
            log,
            protected={(Path(d), base) for _, kept in everything for d, base in kept},
        )
    report.wall_seconds = time.perf_counter() - wall
    return report


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


class TextEncoder:
    """Encodes captions with a T5 encoder and its tokenizer, as generation does."""

    def __init__(self, t5, tokenizer, *, device: torch.device | str | None = None):
        self.t5 = t5
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(t5.parameters()).device
        self.seconds = 0.0

    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        """One ``[L_i, dim]`` tensor (CPU, the encoder's dtype) per caption."""
        from wan_kernel.models.t5 import encode_prompts

        start = time.perf_counter()
        out = [e.cpu() for e in encode_prompts(self.t5, self.tokenizer, captions, device=self.device)]
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def cache_text(
    group: DatasetGroupConfig,
    encoder: TextEncoder,
    settings: CacheSettings = CacheSettings(),
    *,
    ranks: Ranks | None = None,
    log: LogFn = _stderr,
) -> CacheReport:
    """Write the text cache of every captioned source of ``group`` (this rank's share)."""
    ranks = ranks or Ranks.from_env()
    report = CacheReport("text")
    wall = time.perf_counter()
    usable, mine = _usable_sources(group, ranks, report)

    todo: dict[int, list[Source]] = defaultdict(list)
    for source in mine:
        if settings.skip_existing and text_cache_complete(source.text_cache_path, caption=source.caption):
            report.skipped += 1
        else:
            todo[source.dataset.index].append(source)
    total = sum(len(v) for v in todo.values())
    with _progress(total, "text", settings.progress) as bar:
        for index, pending in todo.items():
            batch_size = settings.batch_size or group.datasets[index].batch_size
            for at in range(0, len(pending), batch_size):
                batch = pending[at : at + batch_size]
                embeddings = encoder.encode([s.caption for s in batch])  # type: ignore[misc]
                for source, embedding in zip(batch, embeddings):
                    try:
                        write_text_cache(
                            source.text_cache_path, embedding, caption=source.caption, item=str(source.path)
                        )
                        report.cached += 1
                    except NonFiniteError as exc:
                        report.failed.append(Dropped(str(source.path), str(exc)))
                bar.update(len(batch))

    report.encode_seconds = encoder.seconds
    expected = {str(s.text_cache_path) for s in usable}  # every rank knows the whole list
    if ranks.is_main and not settings.keep_cache:
        report.removed = _remove_stale(group, {Path(p) for p in expected}, TEXT_SUFFIX, log)
    ranks.barrier()
    report.wall_seconds = time.perf_counter() - wall
    return report


# --------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def dry_run(group: DatasetGroupConfig, *, workers: int = 0, log: LogFn = print) -> CacheReport:
    """Say what caching would do without loading a model.

    For every source: its size on disk, fps and frame count (videos), the bucket, the clips
    ``(start, length)``; every dropped item with the reason; then the items per bucket.
    Returns a report whose ``cached`` counts the items that would be cached.
    """
    report = CacheReport("planned")
    sources, dropped = list_all_sources(group)
    report.dropped += dropped
    usable = _split_sources(sources, report)
    per_bucket: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    current = None
    for planned in read_sources(usable, workers=workers, load_pixels=False):
        source = planned.source
        dataset = source.dataset
        if dataset.index != current:
            current = dataset.index
            kind = "video" if dataset.is_video else "image"
            extra = ""
            if dataset.is_video:
                extra = f", {dataset.frame_extraction}, target_frames {list(dataset.target_frames)}" + (
                    f", source_fps {dataset.source_fps:g} -> 16" if dataset.source_fps else ""
                )
            log(
                f"{dataset.label}: {kind}, resolution {dataset.resolution[0]}x{dataset.resolution[1]}, "
                f"buckets {'on' if dataset.enable_bucket else 'off'}, batch_size {dataset.batch_size}, "
                f"num_repeats {dataset.num_repeats}{extra} -> {dataset.cache_directory}"
            )
        if isinstance(planned, _Failure):
            report.failed.append(Dropped(str(source.path), planned.reason))
            log(f"  {source.path.name}: FAILED: {planned.reason}")
            continue
        parts = [_megabytes(planned.file_size)]
        if dataset.is_video:
            if planned.fps:
                parts.append(f"{planned.fps:.2f} fps")
            parts.append(f"{planned.frame_count} frames" + (" (resampled)" if dataset.source_fps else ""))
        if planned.items:
            (width, height), (bucket_w, bucket_h) = planned.items[0].original_size, planned.items[0].bucket
            parts.append(f"{width}x{height} -> bucket {bucket_w}x{bucket_h}")
            if dataset.is_video:
                parts.append("clips " + " ".join(f"({i.start}, {i.frames})" for i in planned.items))
        for d in planned.dropped:
            parts.append(f"dropped: {d.reason}")
        log(f"  {source.path.name}: " + ", ".join(parts))
        report.dropped += planned.dropped
        for item in planned.items:
            counts = per_bucket[(dataset.index, *item.batch_key)]
            counts[0] += 1
            counts[1] += dataset.num_repeats
            report.cached += 1
    for d in report.dropped:
        log(f"dropped: {d.what}: {d.reason}")
    for d in report.failed:
        log(f"FAILED: {d.what}: {d.reason}")
    log("items per bucket (dataset, width x height x frames: items, per epoch with num_repeats):")
    for (index, width, height, frames), (count, repeated) in sorted(per_bucket.items()):
        log(f"  datasets[{index}] {width}x{height}x{frames}: {count} items, {repeated} per epoch")
    log(
        f"total: {report.cached} items to cache from {len(usable)} sources, "
        f"{len(report.dropped)} dropped, {len(report.failed)} failed"
    )
    return report


# --------------------------------------------------------------------------------------------
# The whole job: models from files, one at a time
# --------------------------------------------------------------------------------------------


@attrs.frozen
class CacheJob:
    """``wan run cache`` as data: which models (files) and how.

    Latents are cached when ``vae`` is given, text when ``t5`` is given. One model at a time, each
    freed before the next is loaded (CLIP for image-to-video, then the VAE, then the T5), so peak
    memory is the largest of them.
    """

    dataset_config: str
    vae: str | None = None
    vae_dtype: str = "bfloat16"
    vae_cache_cpu: bool = False
    disable_cudnn: bool = False
    clip: str | None = None
    i2v: bool = False
    t5: str | None = None
    fp8_t5: bool = False
    t5_tokenizer: str | None = None
    device: str | None = None
    settings: CacheSettings = CacheSettings()


def _device(name: str | None, ranks: Ranks) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank % max(1, torch.cuda.device_count()))
    return device


def _check_set_up(job: CacheJob, group: DatasetGroupConfig) -> None:
    """Everything that can fail before a model is loaded: the model files (present, regular files,
    a readable safetensors header: a bad T5 is not found after the whole latent pass) and the
    cache folders (writable)."""
    from wan_kernel.files import check_output_folder
    from wan_kernel.models.weights import check_readable_file, read_safetensors_header, resolve_weight_files

    for path, what in ((job.clip, "CLIP"), (job.vae, "VAE"), (job.t5, "T5")):
        if path:
            for file in resolve_weight_files(path, what=what):
                check_readable_file(file, what=what)
                if file.suffix == ".safetensors":
                    read_safetensors_header(file)
    for directory in _cache_directories(group):
        check_output_folder(directory, what="cache_directory")


def run_cache(job: CacheJob, *, log: LogFn = _stderr) -> list[CacheReport]:
    """Load the dataset config, then each model in turn, cache, free it. One report per pass.

    Under several ranks every rank returns the merged report of all ranks.
    """
    from wan_kernel.dataset.config import load_dataset_config

    if not job.vae and not job.t5:
        raise InputError("nothing to cache: give --vae (latents) and/or --t5 (text encoder outputs)")
    if job.clip and not job.vae:
        raise InputError("--clip is used with the latent caches: give --vae too")
    group = load_dataset_config(job.dataset_config)
    _check_set_up(job, group)
    for dataset in group.datasets:
        if dataset.unused:
            log(
                f"{dataset.label}: ignoring {', '.join(dataset.unused)} (not used by Wan2.1 t2v/i2v training)"
            )
    ranks = Ranks.from_env()
    device = _device(job.device, ranks)
    reports = []
    if job.vae:
        from wan_kernel.models.clip import load_clip_vision
        from wan_kernel.models.vae_loading import load_vae

        vae_dtype = resolve_compute_dtype(job.vae_dtype, device, "vae_dtype")
        features = None
        if job.clip:
            clip = load_clip_vision(job.clip, device=device)
            features = compute_clip_features(group, clip, job.settings, store_dtype=vae_dtype, ranks=ranks)
            del clip
            free_memory(device)
        vae = load_vae(
            job.vae,
            device=device,
            dtype=vae_dtype,
            cache_device="cpu" if job.vae_cache_cpu else None,
        )
        encoder = LatentEncoder(vae, clip_features=features, image_conditioning=job.i2v)
        cudnn = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = cudnn and not job.disable_cudnn
        try:
            report = cache_latents(group, encoder, job.settings, ranks=ranks, log=log)
        finally:
            torch.backends.cudnn.enabled = cudnn
        del vae, features, encoder
        free_memory(device)
        reports.append(report)
    if job.t5:
        from wan_kernel.models.t5 import load_t5
        from wan_kernel.models.tokenizer import DEFAULT_TOKENIZER, load_tokenizer
        from wan_kernel.pipelines.plugin_setup import resolve_quantizer

        tokenizer = load_tokenizer(job.t5_tokenizer or DEFAULT_TOKENIZER)
        quantizer = resolve_quantizer("fp8_t5", target="t5") if job.fp8_t5 else None
        t5 = load_t5(job.t5, device=device, quant=quantizer)
        report = cache_text(
            group, TextEncoder(t5, tokenizer, device=device), job.settings, ranks=ranks, log=log
        )
        del t5
        free_memory(device)
        reports.append(report)
    if ranks.world_size > 1:
        reports = [parts[0].merge(parts[1:]) for parts in zip(*ranks.gather(reports))]
    return reports


def write_debug_media(
    group: DatasetGroupConfig, *, mode: str, workers: int = 0, limit: int | None = None
) -> list[Path]:
    """``--debug_mode image|video``: write what the encoder would get, instead of caching.

    Each item's bucketed pixels go to ``<cache_directory>/.wan_debug/<cache name>.png`` (first frame)
    or ``.mp4`` (the clip at 16 fps), at most ``limit`` items (``--console_num_images``). No model
    is loaded.
    """
    from wan_kernel.pipelines.media import write_image, write_video

    if mode not in ("image", "video"):
        raise InputError(f"unknown debug mode {mode!r}; use image, video or console")
    sources, _ = list_all_sources(group)
    written = []
    for planned in read_sources([s for s in sources if s.caption is not None], workers=workers):
        if isinstance(planned, _Failure):
            continue
        for item, pixels in zip(planned.items, planned.pixels):
            if limit is not None and len(written) >= limit:
                return written
            stem = item.cache_path.name.removesuffix(".safetensors")
            folder = item.source.dataset.cache_directory / ".wan_debug"  # hidden: never read back as data
            if mode == "video" and pixels.shape[0] > 1:
                written.append(write_video(folder / f"{stem}.mp4", pixels, fps=16))
            else:
                written.append(write_image(folder / f"{stem}.png", pixels[0]))
    return written
