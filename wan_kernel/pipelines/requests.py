"""Resolving what the user asked for (the options and each prompt spec) into checked :class:`Request` s."""

from __future__ import annotations

import random

from wan_kernel.errors import InputError
from wan_kernel.models.vae import SPATIAL_STRIDE, TEMPORAL_STRIDE
from wan_kernel.pipelines import media
from wan_kernel.pipelines.config import PATCH_SIZE, SIZE_MULTIPLE, GenerateConfig, Log, Request
from wan_kernel.pipelines.prompts import PromptSpec
from wan_kernel.pipelines.tasks import TaskSpec


def round_to_size_multiple(value: int) -> int:
    """The nearest pixel size the DiT takes (a positive multiple of ``SIZE_MULTIPLE``)."""
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def resolve_request(
    spec: PromptSpec, index: int, config: GenerateConfig, task: TaskSpec, *, log: Log | None = None
) -> Request:
    """One prompt spec resolved against the options and the task's defaults, and checked.

    A value of the spec (a ``--from_file`` line's ``--w``, ``--s``, ...) wins over the option, which
    wins over the task's default. Images are opened now so that a bad file fails before any model loads.

    :param index: the request's number in the run (names its outputs).
    :param log: receives notes (a size the task was not trained at).
    """
    cfg = config
    where = f"prompt line {spec.line}: " if spec.line is not None else ""
    height, width = cfg.video_size or task.size
    height = spec.height if spec.height is not None else height
    width = spec.width if spec.width is not None else width
    frames = spec.frames if spec.frames is not None else (cfg.video_length or task.frames)
    if task.mode == "t2i" and frames != 1:
        raise InputError(f"{where}{task.name} makes single images: use --video_length 1 (got {frames})")
    if (frames - 1) % TEMPORAL_STRIDE:
        n = (frames - 1) // TEMPORAL_STRIDE
        lower, upper = 1 + n * TEMPORAL_STRIDE, 1 + (n + 1) * TEMPORAL_STRIDE
        raise InputError(
            f"{where}the video length must be 4n+1 frames (1, 5, 9, ..., 81), got {frames}; "
            f"use {lower} or {upper}"
        )
    if not task.needs_image:
        bad = [
            f"{name} {value}"
            for name, value in (("height", height), ("width", width))
            if value % SIZE_MULTIPLE
        ]
        if bad:
            raise InputError(
                f"{where}{' and '.join(bad)} must be multiples of {SIZE_MULTIPLE} "
                f"(VAE stride {SPATIAL_STRIDE} x patch {PATCH_SIZE}); "
                f"use --video_size {round_to_size_multiple(height)} {round_to_size_multiple(width)}"
            )
    if task.supported_sizes and (height, width) not in task.supported_sizes and not task.needs_image:
        sizes = ", ".join(f"{h}x{w}" for h, w in task.supported_sizes)
        if log is not None:
            log(f"note: {height}x{width} (HxW) is not a size {task.name} was trained at ({sizes})")
    image_path = spec.image_path if spec.image_path is not None else cfg.image_path
    end_image_path = spec.end_image_path if spec.end_image_path is not None else cfg.end_image_path
    if task.needs_image and not image_path:
        raise InputError(f"{where}{task.name} needs a start image: pass --image_path FILE")
    if task.needs_end_image and not end_image_path:
        raise InputError(
            f"{where}{task.name} (first-last-frame) needs an end image: pass --end_image_path FILE"
        )
    if not task.needs_image and (image_path or end_image_path):
        raise InputError(
            f"{where}--image_path/--end_image_path need an image-to-video DiT, but this is {task.name}"
        )
    for path in (image_path, end_image_path):
        if path:
            media.read_image(path, background=cfg.image_background)  # fail now, not after the T5 stage
    steps = spec.steps if spec.steps is not None else (cfg.infer_steps or task.steps)
    shift = spec.flow_shift if spec.flow_shift is not None else cfg.flow_shift
    if shift is None:
        shift = task.default_flow_shift(height, width)
    guidance = spec.guidance_scale if spec.guidance_scale is not None else cfg.guidance_scale
    if guidance is None:
        guidance = task.guidance_scale
    negative = spec.negative_prompt if spec.negative_prompt is not None else cfg.negative_prompt
    if negative is None:
        negative = task.negative_prompt
    seed = spec.seed if spec.seed is not None else cfg.seed
    if seed is None:
        seed = random.randint(0, 2**32 - 1)
    out_frames = frames + (4 if (end_image_path and task.mode == "i2v") else 0)
    if cfg.trim_tail_frames >= out_frames:
        raise InputError(f"--trim_tail_frames {cfg.trim_tail_frames} would remove all {out_frames} frames")
    return Request(
        index=index,
        prompt=spec.prompt,
        negative_prompt=negative,
        height=int(height),
        width=int(width),
        frames=int(frames),
        steps=int(steps),
        flow_shift=float(shift),
        guidance_scale=float(guidance),
        seed=int(seed),
        image_path=image_path,
        end_image_path=end_image_path,
    )


__all__ = ["resolve_request", "round_to_size_multiple"]
