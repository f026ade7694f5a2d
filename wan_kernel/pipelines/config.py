"""What a generation run is asked to do: the options (:class:`GenerateConfig`), one resolved
generation (:class:`Request`) and what it produced (:class:`GenerationResult`).

Importing this module does not import torch (the CLI builds its choices from these tables).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs

from wan_kernel.checks import check_finite_number, check_seed
from wan_kernel.errors import InputError
from wan_kernel.models.vae_config import SPATIAL_STRIDE, TEMPORAL_STRIDE
from wan_kernel.pipelines.prompts import check_text
from wan_kernel.sampling.solvers import SOLVER_CHOICES

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

OUTPUT_TYPES = ("video", "images", "latent", "both", "latent_images")
"""``--output_type`` values (the seed's): ``both`` = latent + video, ``latent_images`` = latent + PNGs."""
PATCH_SIZE = 2
"""The DiT's spatial patch size: pixel sizes are multiples of ``SPATIAL_STRIDE * PATCH_SIZE``."""
SIZE_MULTIPLE = SPATIAL_STRIDE * PATCH_SIZE

Log = Callable[[str], None]


def _tuple(value: Any) -> tuple:
    return tuple(value) if value is not None else ()


@attrs.define(kw_only=True)
class GenerateConfig:
    """Everything ``wan run generate`` takes (names follow the seed trainer's options).

    ``None`` means "the task's default" for the sampling settings and the negative prompt.
    ``video_size`` is ``(height, width)``.
    """

    # what to generate
    prompt: str | None = None
    negative_prompt: str | None = None
    task: str | None = None
    video_size: tuple[int, int] | None = None
    video_length: int | None = None
    fps: int | None = None
    infer_steps: int | None = None
    flow_shift: float | None = None
    guidance_scale: float | None = None
    sample_solver: str = "unipc"
    seed: int | None = None
    cpu_noise: bool = False
    image_path: str | None = None
    end_image_path: str | None = None
    image_background: str = "white"
    trim_tail_frames: int = 0
    cfg_skip_mode: str = "none"
    cfg_apply_ratio: float | None = None

    # outputs
    output_type: str = "video"
    save_path: str = "outputs"
    latent_path: str | None = None
    no_metadata: bool = False

    # models
    dit: str | None = None
    vae: str | None = None
    t5: str | None = None
    clip: str | None = None
    t5_tokenizer: str | None = None
    num_heads: int | None = None
    dit_dtype: str | None = None
    vae_dtype: str | None = None

    # plugins and memory
    attn: str = "sdpa"
    quant: str | None = None
    t5_quant: str | None = None
    offload: str | None = None
    blocks_to_swap: int = 0
    compile: bool = False
    vae_cache_cpu: bool = False
    device: str | None = None

    # LoRA at inference (merged while the DiT loads: wan_kernel.lora.LoraMerge)
    lora_weights: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    lora_multipliers: tuple[float, ...] = attrs.field(default=(), converter=_tuple)
    include_patterns: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    exclude_patterns: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    lora_strict: bool = False
    """A LoRA tensor that matches nothing in the DiT is an error (else: reported and skipped)."""

    def check(self) -> None:
        """Cheap checks of the options alone (files and sizes are checked against the task later)."""
        if self.output_type not in OUTPUT_TYPES:
            raise InputError(
                f"unknown --output_type {self.output_type!r}; use one of {', '.join(OUTPUT_TYPES)}"
            )
        if self.sample_solver not in SOLVER_CHOICES:
            raise InputError(
                f"unknown --sample_solver {self.sample_solver!r}; use one of {', '.join(SOLVER_CHOICES)}"
            )
        if self.trim_tail_frames < 0:
            raise InputError(f"--trim_tail_frames must be >= 0, got {self.trim_tail_frames}")
        if self.blocks_to_swap < 0:
            raise InputError(f"--blocks_to_swap must be >= 0, got {self.blocks_to_swap}")
        if self.cfg_apply_ratio is not None and not 0.0 <= self.cfg_apply_ratio <= 1.0:
            raise InputError(f"--cfg_apply_ratio must be in [0, 1], got {self.cfg_apply_ratio}")
        if self.fps is not None and self.fps <= 0:
            raise InputError(f"--fps must be positive, got {self.fps}")
        if self.infer_steps is not None and self.infer_steps < 1:
            raise InputError(f"--infer_steps must be at least 1, got {self.infer_steps}")
        if self.video_length is not None and self.video_length < 1:
            raise InputError(f"--video_length must be at least 1, got {self.video_length}")
        if self.video_size is not None:
            if len(self.video_size) != 2 or min(self.video_size) <= 0:
                raise InputError(
                    f"--video_size takes HEIGHT WIDTH (two positive integers), got {self.video_size}"
                )
        if self.latent_path is not None and self.output_type not in ("video", "images"):
            raise InputError(
                "--latent_path decodes a saved latent: use --output_type video or images, "
                f"not {self.output_type}"
            )
        for option, value in (
            ("--flow_shift", self.flow_shift),
            ("--guidance_scale", self.guidance_scale),
            ("--cfg_apply_ratio", self.cfg_apply_ratio),
            *(("--lora_multiplier", m) for m in self.lora_multipliers),
        ):
            check_finite_number(value, option)
        if self.flow_shift is not None and self.flow_shift <= 0:
            raise InputError(f"--flow_shift must be positive, got {self.flow_shift}")
        if self.seed is not None:
            check_seed(self.seed)
        if self.prompt is not None and not self.prompt.strip():
            raise InputError("the prompt is empty: pass --prompt with some text")
        for option, text in (("--prompt", self.prompt), ("--negative_prompt", self.negative_prompt)):
            if text is not None:
                check_text(text, option)
        if self.lora_multipliers and len(self.lora_multipliers) != len(self.lora_weights):
            raise InputError(
                f"{len(self.lora_multipliers)} --lora_multiplier values for "
                f"{len(self.lora_weights)} --lora_weight files"
            )


@attrs.frozen
class Request:
    """One generation, fully resolved against the task's defaults. Sizes are pixels."""

    index: int
    prompt: str
    negative_prompt: str
    height: int
    width: int
    frames: int
    steps: int
    flow_shift: float
    guidance_scale: float
    seed: int
    image_path: str | None = None
    end_image_path: str | None = None

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // TEMPORAL_STRIDE + 1


@attrs.define
class StageRecord:
    """Wall time and peak memory of one stage (bytes: CUDA max allocated, or process peak RSS on CPU)."""

    name: str
    seconds: float = 0.0
    peak_bytes: int = 0


@attrs.define
class GenerationResult:
    """What one request produced: the files written, the settings, the tensors."""

    request: Request | None
    outputs: list[Path]
    latent: torch.Tensor | None = None
    video: torch.Tensor | None = None
    metadata: dict[str, Any] = attrs.Factory(dict)
    model_calls: int = 0
    cfg_pattern: str = ""
