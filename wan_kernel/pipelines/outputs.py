"""Stage: write a request's outputs (latent, mp4, PNGs) and the settings stored with them.

Where files go: ``--save_path`` naming a file (``run.mp4``, ``run.png``, ``run.safetensors``) is
used as the base name (``run_001.mp4``... for several prompts); a folder gets
``<timestamp>_<seed>[_<hint>][_<index>]`` names. Suffixes are appended to the base, never swapped
for its last dotted part, so ``run.v2.mp4`` and stems like ``x1.0`` / ``x1.5`` keep their dots.
Every file is written to a temporary name and renamed when complete (``wan_kernel.pipelines.media``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from wan_kernel.pipelines import media
from wan_kernel.pipelines.tasks import DEFAULT_FPS

FILE_SUFFIXES = {".mp4": "video", ".png": "image", ".safetensors": "latent"}
"""``--save_path`` suffixes that name a file rather than a folder."""


def with_suffix_added(base: Path, suffix: str) -> Path:
    """``base`` with ``suffix`` appended to its name (``run.v2`` + ``.mp4`` -> ``run.v2.mp4``)."""
    return base.with_name(base.name + suffix)


def output_base(
    save_path: str, *, index: int, seed: Any, many: bool, stem_hint: str | None = None
) -> tuple[Path, str | None]:
    """Where one request's outputs go: ``(path without suffix, the suffix the user named or None)``.

    :param many: several requests in the run: an ``_<index:03d>`` tag keeps their files apart.
    :param stem_hint: a name part for folder outputs (the latent file's stem for ``--latent_path``).
    """
    save = Path(save_path).expanduser()
    suffix = save.suffix.lower()
    if suffix in FILE_SUFFIXES:
        base = save.with_name(save.name[: -len(suffix)])
        if many:
            base = base.with_name(f"{base.name}_{index:03d}")
        return base, suffix
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}_{seed}" + (f"_{stem_hint}" if stem_hint else "") + (f"_{index:03d}" if many else "")
    return save / name, None


def write_outputs(
    base: Path,
    *,
    latent: torch.Tensor | None,
    video: torch.Tensor | None,
    output_type: str,
    metadata: Mapping[str, Any] | None,
    fps: int,
    named: str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Write what ``output_type`` asks for; every file appears whole or not at all.

    :param base: from :func:`output_base`.
    :param latent: ``[16, T, h, w]``, written for ``latent``/``both``/``latent_images`` (``None``:
        no latent file, e.g. when decoding a saved latent).
    :param video: ``[3, F, H, W]`` in [-1, 1] for the pixel outputs; a single frame is a PNG.
    :param metadata: settings stored in the files (``None``: none).
    :param named: the suffix the user gave (from :func:`output_base`): the latent is then
        ``<base>.safetensors`` rather than ``<base>_latent.safetensors``.
    """
    written: list[Path] = []
    if output_type in ("latent", "both", "latent_images") and latent is not None:
        path = with_suffix_added(base, ".safetensors" if named else "_latent.safetensors")
        written.append(media.save_latent(path, latent, metadata=metadata))
    if output_type in ("video", "both", "images", "latent_images"):
        assert video is not None
        frames = media.video_to_uint8(video)
        if frames.shape[0] == 1:
            written.append(media.write_image(with_suffix_added(base, ".png"), frames[0], metadata=metadata))
        elif output_type in ("video", "both"):
            path = with_suffix_added(base, ".mp4")
            written.append(media.write_video(path, frames, fps=fps, metadata=metadata))
        else:
            written.append(media.write_frames(base, frames, metadata=metadata))
    if log is not None:
        for path in written:
            log(f"saved {path}")
    return written


def request_metadata(request, config, task, models: Mapping[str, Any]) -> dict[str, Any]:
    """The settings stored with one request's outputs (prompt, seed, task, sampling, plugins, files).

    :param request: a :class:`~wan_kernel.pipelines.config.Request`.
    :param config: the run's :class:`~wan_kernel.pipelines.config.GenerateConfig`.
    :param task: the run's :class:`~wan_kernel.pipelines.tasks.TaskSpec`.
    :param models: the model source's ``metadata()`` (weight file names).
    """
    r, cfg = request, config
    meta: dict[str, Any] = {
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt,
        "seed": r.seed,
        "task": task.name,
        "height": r.height,
        "width": r.width,
        "video_length": r.frames,
        "infer_steps": r.steps,
        "flow_shift": r.flow_shift,
        "guidance_scale": r.guidance_scale,
        "sample_solver": cfg.sample_solver,
        "cfg_skip_mode": cfg.cfg_skip_mode,
        "cfg_apply_ratio": cfg.cfg_apply_ratio,
        "fps": cfg.fps or task.fps or DEFAULT_FPS,
        "attn": cfg.attn,
        "quant": cfg.quant,
        "generator": "wan",
    }
    if r.image_path:
        meta["image_path"] = Path(r.image_path).name
    if r.end_image_path:
        meta["end_image_path"] = Path(r.end_image_path).name
    if cfg.lora_weights:
        meta["lora_weights"] = [Path(p).name for p in cfg.lora_weights]
        meta["lora_multipliers"] = list(cfg.lora_multipliers or [1.0] * len(cfg.lora_weights))
    meta.update(models)
    return meta


__all__ = ["FILE_SUFFIXES", "output_base", "request_metadata", "with_suffix_added", "write_outputs"]
