"""The generation pipeline: prompts (and images) in, videos / images / latents out.

Stages run one after another so that peak memory is the largest single stage, not their sum::

    text     tokenizer + T5: prompt and negative prompt -> context      (then T5 is freed)
    image    i2v/flf2v: CLIP features, VAE latent of the given frames    (then CLIP/VAE are freed)
    denoise  DiT loop with classifier-free guidance -> latents           (then the DiT is freed)
    decode   VAE decode -> pixels -> files                               (atomic writes)

With several prompts (``--from_file``) every stage runs for all prompts before the next stage
starts; with ``keep_models=True`` (``--interactive``) the models stay loaded between prompts.

Models come from a :class:`ModelSource`: :class:`FileModels` loads the user's weight files,
``wan_kernel.demo.DemoModels`` builds tiny ones, and tests inject their own. Plugins (attention,
quantization, offload, CFG schedule) are resolved once in :meth:`GenerationPipeline.setup`
through a :class:`~wan_kernel.plugins.PluginManager`, which tests may inject as well.

Noise is drawn as the official code does: ``torch.randn(16, F_lat, H/8, W/8)`` with a
``torch.Generator`` on the compute device seeded with the seed (``cpu_noise=True`` draws on the
CPU instead, as ComfyUI does). The seed is random when not given, always printed and saved in
the output metadata.
"""

from __future__ import annotations

import abc
import contextlib
import gc
import importlib.util
import os
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import attrs
import torch

from wan_kernel.checks import check_finite, check_finite_number, check_seed, decode_causes, denoise_causes
from wan_kernel.errors import InputError, WeightsError
from wan_kernel.files import check_save_path
from wan_kernel.models.compat import check_compatible
from wan_kernel.models.weights import check_finite_weights
from wan_kernel.models.quantization import resolve_quantizer
from wan_kernel.pipelines import media
from wan_kernel.pipelines.conditioning import ImageConditioning, encode_conditioning
from wan_kernel.pipelines.prompts import PromptSpec, check_text
from wan_kernel.pipelines.tasks import DEFAULT_FPS, TaskSpec, select_task
from wan_kernel.plugins import check_attention_backend, plugin_failure

OUTPUT_TYPES = ("video", "images", "latent", "both", "latent_images")
"""``--output_type`` values (the seed's): ``both`` = latent + video, ``latent_images`` = latent + PNGs."""
SOLVER_CHOICES = ("unipc", "dpm++", "euler", "vanilla")
LATENT_CHANNELS = 16
SIZE_MULTIPLE = 16
FILE_SUFFIXES = {".mp4": "video", ".png": "image", ".safetensors": "latent"}

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


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

    # LoRA at inference (applied by wan_kernel.lora.apply_loras when that module exists)
    lora_weights: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    lora_multipliers: tuple[float, ...] = attrs.field(default=(), converter=_tuple)
    include_patterns: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    exclude_patterns: tuple[str, ...] = attrs.field(default=(), converter=_tuple)

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
        return (self.frames - 1) // 4 + 1


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


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ModelInfo:
    """What the pipeline needs to know about the DiT before loading it (to pick the task)."""

    model_type: str
    dim: int
    num_layers: int
    description: str
    text_dim: int | None = None
    head_dim: int | None = None


class ModelSource(abc.ABC):
    """Where the pipeline gets its models. Each ``load_*`` builds a fresh model (the pipeline
    frees it after its stage unless it keeps models loaded)."""

    name: str = "models"

    @abc.abstractmethod
    def dit_info(self) -> ModelInfo: ...

    @abc.abstractmethod
    def load_dit(
        self, *, device: torch.device, dtype: torch.dtype | None, attention, quant
    ) -> torch.nn.Module: ...

    @abc.abstractmethod
    def load_vae(self, *, device: torch.device, dtype: torch.dtype | None, cache_device: str | None): ...

    @abc.abstractmethod
    def load_text_encoder(self, *, device: torch.device, dtype: torch.dtype | None, quant) -> tuple[Any, Any]:
        """``(t5, tokenizer)``."""

    @abc.abstractmethod
    def load_clip(self, *, device: torch.device, dtype: torch.dtype | None, attention) -> Any: ...

    def check(self, *, needs_dit: bool, needs_t5: bool, needs_vae: bool, needs_clip: bool) -> None:
        """Raise a clear error now when something a stage will need is missing."""

    def metadata(self) -> dict[str, Any]:
        return {}


def _missing(option: str, what: str, why: str) -> WeightsError:
    return WeightsError(f"{why} needs the {what}: pass {option} PATH")


class FileModels(ModelSource):
    """Models loaded from the paths of a :class:`GenerateConfig` (``--dit --vae --t5 --clip``)."""

    name = "files"

    def __init__(self, config: GenerateConfig, *, plugin_manager=None):
        self.config = config
        self.plugin_manager = plugin_manager
        self._info: ModelInfo | None = None

    def check(self, *, needs_dit: bool, needs_t5: bool, needs_vae: bool, needs_clip: bool) -> None:
        cfg = self.config
        wanted = [
            (needs_dit, cfg.dit, "--dit", "the DiT (diffusion model) weights", "generating"),
            (needs_t5, cfg.t5, "--t5", "the T5 text encoder weights", "encoding the prompt"),
            (needs_vae, cfg.vae, "--vae", "the VAE weights", "decoding and image conditioning"),
            (needs_clip, cfg.clip, "--clip", "the CLIP image encoder weights", "image-to-video"),
        ]
        for needed, path, option, what, why in wanted:
            if not needed:
                continue
            if not path:
                raise _missing(option, what, why)
            if not Path(path).expanduser().exists():
                raise WeightsError(f"{option} {path}: file not found ({what})")

    def dit_info(self) -> ModelInfo:
        if self._info is None:
            from wan_kernel.models.dit_loading import read_dit_config

            path = Path(self.config.dit).expanduser()
            try:  # memory-mapped: only the names and shapes are read here
                config, _ = read_dit_config(path, num_heads=self.config.num_heads)
            except WeightsError as exc:
                raise WeightsError(f"--dit {exc}") from None
            self._info = ModelInfo(
                config.model_type, config.dim, config.num_layers, config.describe(), config.text_dim, config.head_dim
            )
        return self._info

    def load_dit(self, *, device, dtype, attention, quant):
        from wan_kernel.models.dit_loading import load_dit

        return load_dit(
            self.config.dit,
            device=device,
            dtype=dtype,
            num_heads=self.config.num_heads,
            quant=quant,
            attention=attention,
            plugin_manager=self.plugin_manager,
        )

    def load_vae(self, *, device, dtype, cache_device):
        from wan_kernel.models.vae_loading import load_vae

        vae = load_vae(self.config.vae, device=device, dtype=dtype)
        if cache_device is not None:
            vae.cache_device = cache_device
        return vae

    def load_text_encoder(self, *, device, dtype, quant):
        from wan_kernel.models.t5 import load_t5
        from wan_kernel.models.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

        tokenizer = load_tokenizer(self.config.t5_tokenizer or DEFAULT_TOKENIZER)
        # quantized while loading (built on meta): never the full-precision encoder and its fp8 copy at once
        t5 = load_t5(
            self.config.t5, device=device, dtype=dtype, quant=quant, plugin_manager=self.plugin_manager
        )
        return t5, tokenizer

    def load_clip(self, *, device, dtype, attention):
        from wan_kernel.models.clip import load_clip_vision

        return load_clip_vision(self.config.clip, device=device, dtype=dtype, attention=attention)

    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {
            k: Path(v).name
            for k, v in (("dit", cfg.dit), ("vae", cfg.vae), ("t5", cfg.t5), ("clip", cfg.clip))
            if v
        }


def quantize_module(model: torch.nn.Module, quantizer, *, target: str, device) -> torch.nn.Module:
    """Quantize a loaded model in place through a quantization plugin (used for ``--fp8_t5``)."""
    quantizer = resolve_quantizer(quantizer, target=target)
    state = model.state_dict()
    model = quantizer.convert_for_runtime(model, target=target)
    state = quantizer.quantize_state_dict(state, target=target, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    return model


# --------------------------------------------------------------------------------------------
# Stage bookkeeping
# --------------------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {name}: this machine has no CUDA GPU (or this torch build has no CUDA); "
            "use --device cpu"
        )
    return device


def _resolve_dtype(name: str | None, device: torch.device, what: str) -> torch.dtype:
    """Compute dtype: the option's, else bfloat16 on CUDA (the official param dtype) and float32 elsewhere."""
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from wan_kernel.models.dit_loading import resolve_dtype

    try:
        return resolve_dtype(name)
    except InputError as exc:
        raise InputError(f"--{what}: {exc}") from None


class GenerationPipeline:
    """Runs :class:`GenerateConfig` requests through the stages.

    :param config: the options.
    :param models: where models come from (default: :class:`FileModels` over the config's paths).
    :param plugin_manager: resolves attention / quantization / offload / CFG schedule names
        (default: the process-wide one).
    :param log: receives every message meant for the user (default: stderr).
    :param progress: show a tqdm progress bar with ETA over the denoising steps (on stderr).
    :param keep_models: keep models loaded between :meth:`run` calls (interactive mode).
    """

    def __init__(
        self,
        config: GenerateConfig,
        *,
        models: ModelSource | None = None,
        plugin_manager=None,
        log: Log = _stderr,
        progress: bool = True,
        keep_models: bool = False,
    ):
        self.config = config
        self.plugin_manager = plugin_manager
        self.models = models if models is not None else FileModels(config, plugin_manager=plugin_manager)
        self.log = log
        self.progress = progress
        self.keep_models = keep_models
        self.stages: list[StageRecord] = []
        self._loaded: dict[str, Any] = {}
        self._ready = False
        self.task: TaskSpec | None = None
        self._request_count = 0

    # -- set-up -------------------------------------------------------------------------------

    def _resolve(self, concern: str, name: str):
        from wan_kernel.plugins import resolve

        return resolve(concern, name, manager=self.plugin_manager)

    def setup(self) -> "GenerationPipeline":
        """Resolve the device, the plugins and the task; check the inputs the stages will need."""
        if self._ready:
            return self
        cfg = self.config
        cfg.check()
        check_save_path(cfg.save_path, file_suffixes=tuple(FILE_SUFFIXES))  # writable and free, before any work
        self.device = resolve_device(cfg.device)
        self.dit_dtype = _resolve_dtype(cfg.dit_dtype, self.device, "dit_dtype")
        self.vae_dtype = _resolve_dtype(cfg.vae_dtype, self.device, "vae_dtype")
        self.t5_dtype = self.dit_dtype
        if cfg.latent_path is not None:
            self.models.check(needs_dit=False, needs_t5=False, needs_vae=True, needs_clip=False)
            self._ready = True
            return self

        # plugins: resolved once here, called directly in the loop
        self.attention = self._resolve("attention", cfg.attn)
        self.cfg_schedule = self._resolve("cfg_schedule", cfg.cfg_skip_mode)
        # checked now against the model each one is for (the loaders check again, at no cost)
        self.quantizer = resolve_quantizer(cfg.quant, target="dit", manager=self.plugin_manager)
        self.t5_quantizer = resolve_quantizer(cfg.t5_quant, target="t5", manager=self.plugin_manager)
        offload = cfg.offload or ("blockswap" if cfg.blocks_to_swap else None)
        if offload and self.device.type != "cuda":
            raise InputError(
                f"--offload {offload} / --blocks_to_swap moves DiT blocks between CPU and GPU memory; "
                f"it needs a CUDA device, and this run is on {self.device}"
            )
        if offload and not cfg.blocks_to_swap:
            raise InputError(
                f"--offload {offload} needs --blocks_to_swap N (how many blocks to keep off the GPU)"
            )
        self.offloader = self._resolve("offload", offload) if offload else None
        if cfg.lora_weights:
            self._lora_module()
            for path in cfg.lora_weights:
                if not Path(path).expanduser().exists():
                    raise WeightsError(f"--lora_weight {path}: file not found")
        if cfg.compile and self.device.type == "cpu" and not _has_c_compiler():
            raise InputError(
                "--compile on the CPU needs a C compiler (torch.compile/inductor); drop --compile"
            )

        # the task, from the weights
        self.models.check(needs_dit=True, needs_t5=False, needs_vae=False, needs_clip=False)
        info = self.models.dit_info()
        self.task = select_task(info.model_type, info.dim, cfg.task)
        if cfg.blocks_to_swap and cfg.blocks_to_swap > info.num_layers - 1:
            raise InputError(
                f"--blocks_to_swap {cfg.blocks_to_swap} is too many for a DiT with {info.num_layers} blocks "
                f"(at most {info.num_layers - 1})"
            )
        self.models.check(
            needs_dit=True,
            needs_t5=True,
            needs_vae=cfg.output_type != "latent" or self.task.needs_image,
            needs_clip=self.task.needs_image,
        )
        self.dit_info = info
        check_attention_backend(
            self.attention, name=cfg.attn, device=self.device, dtype=self.dit_dtype,
            head_dim=info.head_dim or 64, manager=self.plugin_manager,
        )
        self.log(f"task: {self.task.name} ({info.description}); device {self.device}, attention {cfg.attn}")
        self._ready = True
        return self

    # -- requests -----------------------------------------------------------------------------

    def requests(self, specs: Iterable[PromptSpec] | None = None) -> list[Request]:
        """Resolve prompt specs (or the config's own ``prompt``) into checked :class:`Request` s."""
        self.setup()
        cfg = self.config
        if specs is None:
            if not cfg.prompt:
                raise InputError("no prompt: pass --prompt TEXT, --from_file FILE or --interactive")
            specs = [PromptSpec(prompt=cfg.prompt)]
        out = []
        for spec in specs:
            out.append(self._request(spec, self._request_count))
            self._request_count += 1
        return out

    def _request(self, spec: PromptSpec, index: int) -> Request:
        cfg, task = self.config, self.task
        assert task is not None
        where = f"prompt line {spec.line}: " if spec.line is not None else ""
        height, width = cfg.video_size or task.size
        height = spec.height if spec.height is not None else height
        width = spec.width if spec.width is not None else width
        frames = spec.frames if spec.frames is not None else (cfg.video_length or task.frames)
        if task.mode == "t2i" and frames != 1:
            raise InputError(f"{where}{task.name} makes single images: use --video_length 1 (got {frames})")
        if (frames - 1) % 4:
            lower, upper = 1 + (frames - 1) // 4 * 4, 1 + ((frames - 1) // 4 + 1) * 4
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
                    "(VAE stride 8 x patch 2); "
                    f"use --video_size {_round16(height)} {_round16(width)}"
                )
        if task.supported_sizes and (height, width) not in task.supported_sizes and not task.needs_image:
            sizes = ", ".join(f"{h}x{w}" for h, w in task.supported_sizes)
            self.log(f"note: {height}x{width} (HxW) is not a size {task.name} was trained at ({sizes})")
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
            raise InputError(
                f"--trim_tail_frames {cfg.trim_tail_frames} would remove all {out_frames} frames"
            )
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

    # -- stages -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRecord]:
        record = StageRecord(name)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            yield record
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                record.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            else:
                record.peak_bytes = _peak_rss_bytes()
            record.seconds = time.perf_counter() - start
            self.stages.append(record)

    def _model(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._loaded:
            self._loaded[key] = build()
        return self._loaded[key]

    def _release(self, *keys: str) -> None:
        if self.keep_models:
            return
        for key in keys:
            self._loaded.pop(key, None)
        _free(self.device)

    def encode_text(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """Stage 1: T5 embeddings ``[L, text_dim]`` (CPU) of every distinct prompt and negative prompt."""
        from wan_kernel.models.t5 import encode_prompts

        texts = list(dict.fromkeys([t for r in requests for t in (r.prompt, r.negative_prompt)]))
        with self.stage("text encoder"):
            t5, tokenizer = self._model(
                "t5",
                lambda: self.models.load_text_encoder(
                    device=self.device, dtype=self.t5_dtype, quant=self.t5_quantizer
                ),
            )
            embeddings = {}
            for text in texts:
                embeddings[text] = encode_prompts(t5, tokenizer, [text], device=self.device)[0].float().cpu()
                check_compatible(dit_text_dim=self.dit_info.text_dim, text_width=embeddings[text].shape[-1])
            del t5, tokenizer
            self._release("t5")
        return embeddings

    def encode_images(self, requests: Sequence[Request]) -> dict[int, ImageConditioning]:
        """Stage 2 (i2v/flf2v): CLIP features and the VAE conditioning ``y`` of each request."""
        task = self.task
        assert task is not None
        out: dict[int, ImageConditioning] = {}
        if not task.needs_image:
            return out
        with self.stage("image encoders"):
            # CLIP runs once per image: the default (SDPA) attention, whatever backend the DiT uses
            clip = self._model(
                "clip", lambda: self.models.load_clip(device=self.device, dtype=None, attention=None)
            )
            features = {}
            images = {}
            for r in requests:
                start = media.image_to_tensor(
                    media.read_image(r.image_path, background=self.config.image_background)
                )
                end = None
                if r.end_image_path:
                    end = media.image_to_tensor(
                        media.read_image(r.end_image_path, background=self.config.image_background)
                    )
                images[r.index] = (start, end)
                features[r.index] = self._clip_features(clip, start, end, task.mode)
                check_compatible(image_width=features[r.index].shape[-1])
            del clip
            self._release("clip")
            vae = self._vae()
            for r in requests:
                start, end = images[r.index]
                out[r.index] = encode_conditioning(
                    vae,
                    start,
                    frames=r.frames,
                    max_area=r.height * r.width,
                    end=end,
                    mode=task.mode,
                    clip_fea=features[r.index],
                )
            del vae
            self._release("vae")
        return out

    def _clip_features(self, clip, start: torch.Tensor, end: torch.Tensor | None, mode: str) -> torch.Tensor:
        from wan_kernel.pipelines.conditioning import clip_features, crop_to_aspect, resize_image

        images = [start]
        if end is not None and mode == "flf2v":
            images.append(resize_image(crop_to_aspect(end, *start.shape[1:]), *start.shape[1:]))
        with torch.no_grad():
            return torch.cat([clip_features(clip, image[None].to(self.device)) for image in images]).cpu()

    def _vae(self):
        cache = "cpu" if self.config.vae_cache_cpu else None
        return self._model(
            "vae", lambda: self.models.load_vae(device=self.device, dtype=self.vae_dtype, cache_device=cache)
        )

    def _prepare_dit(self) -> torch.nn.Module:
        cfg = self.config
        offload = self.offloader is not None
        quant = self.quantizer
        lora_specs = self._lora_specs()
        if lora_specs and quant is not None:
            # merge into the high-precision weights while loading, before they are quantized
            quant = self._lora_module().merging_quantizer(quant, lora_specs)
        dit = self.models.load_dit(
            device=torch.device("cpu") if offload else self.device,
            dtype=self.dit_dtype,
            attention=self.attention,
            quant=quant,
        )
        if lora_specs and self.quantizer is None:
            dit = self._lora_module().apply_loras(dit, lora_specs, log=self.log)
            check_finite_weights(dict(dit.named_parameters()), "the DiT with the LoRAs merged in (a multiplier too large?)")
        elif lora_specs:
            for report in quant.reports:
                self.log(report.summary())
        if offload:
            for name, child in dit.named_children():
                if name != "blocks":
                    child.to(self.device)
            runner = self.offloader.attach(
                dit.blocks, device=self.device, blocks_to_swap=cfg.blocks_to_swap, training=False
            )
            dit.set_block_runner(runner)
            runner.prepare()
        if cfg.compile:
            for block in dit.blocks:
                block.compile()
        return dit

    def _lora_module(self):
        if importlib.util.find_spec("wan_kernel.lora") is None:
            raise InputError(
                "--lora_weight needs LoRA support (wan_kernel.lora), which this install does not have"
            )
        from wan_kernel import lora

        return lora

    def _lora_specs(self) -> list[dict[str, Any]]:
        """One ``{path, multiplier, include, exclude}`` per ``--lora_weight`` (patterns by position)."""
        cfg = self.config
        multipliers = cfg.lora_multipliers or tuple(1.0 for _ in cfg.lora_weights)
        return [
            {
                "path": path,
                "multiplier": multipliers[i],
                "include": cfg.include_patterns[i] if i < len(cfg.include_patterns) else None,
                "exclude": cfg.exclude_patterns[i] if i < len(cfg.exclude_patterns) else None,
            }
            for i, path in enumerate(cfg.lora_weights)
        ]

    def denoise(
        self,
        requests: Sequence[Request],
        text: dict[str, torch.Tensor],
        images: dict[int, ImageConditioning],
    ) -> dict[int, tuple[torch.Tensor, int, str]]:
        """Stage 3: the DiT loop for each request.

        Returns ``{index: (latent [16, T, h, w] on the CPU, model calls, CFG pattern)}``.
        """
        from wan_kernel.sampling import denoise
        from wan_kernel.sampling.guidance import make_cfg_velocity

        cfg = self.config
        out = {}
        with self.stage("denoise"):
            dit = self._model("dit", self._prepare_dit)
            for r in requests:
                cond = images.get(r.index)
                lat_h, lat_w = (cond.lat_h, cond.lat_w) if cond else (r.height // 8, r.width // 8)
                lat_f = cond.latent_frames if cond else r.latent_frames
                noise_device = torch.device("cpu") if cfg.cpu_noise else self.device
                generator = torch.Generator(device=noise_device).manual_seed(r.seed)
                noise = torch.randn(
                    LATENT_CHANNELS,
                    lat_f,
                    lat_h,
                    lat_w,
                    dtype=torch.float32,
                    generator=generator,
                    device=noise_device,
                ).to(self.device)
                self.log(
                    f"[{r.index + 1}] seed {r.seed}: {r.width}x{r.height} (WxH) {r.frames} frame(s), "
                    f"{r.steps} steps, shift {r.flow_shift}, guidance {r.guidance_scale}"
                    + (f" (image conditioned: {lat_w * 8}x{lat_h * 8})" if cond else "")
                )
                extra: dict[str, Any] = {}
                if cond is not None:
                    extra = {"y": cond.y[None].to(self.device), "clip_fea": cond.clip_fea.to(self.device)}
                cond_args = {"context": [text[r.prompt].to(self.device)], **extra}
                uncond_args = {"context": [text[r.negative_prompt].to(self.device)], **extra}
                velocity = make_cfg_velocity(
                    dit,
                    cond_args,
                    uncond_args,
                    r.guidance_scale,
                    self.cfg_schedule,
                    r.steps,
                    apply_ratio=1.0 if cfg.cfg_apply_ratio is None else cfg.cfg_apply_ratio,
                )
                bar = self._progress_bar(r.steps, f"[{r.index + 1}] denoising")
                try:
                    with torch.no_grad():
                        latent = denoise(
                            velocity,
                            noise[None],
                            solver=cfg.sample_solver,
                            steps=r.steps,
                            shift=r.flow_shift,
                            generator=generator,
                            callback=(lambda i, n, t, x: bar.update(1)) if bar is not None else None,
                        )[0]
                except Exception as exc:
                    failure = plugin_failure(
                        exc, self.attention, concern="attention", name=cfg.attn, manager=self.plugin_manager
                    )
                    if failure is not None:
                        raise failure from exc
                    raise
                finally:
                    if bar is not None:
                        bar.close()
                check_finite(
                    latent,
                    what=f"the latents of prompt {r.index + 1} (seed {r.seed})",
                    causes=lambda: denoise_causes(
                        dit=dit,
                        dit_source=str(cfg.dit or self.models.name),
                        loras=[(s["path"], s["multiplier"]) for s in self._lora_specs()],
                        dtype=self.dit_dtype,
                        attention=cfg.attn,
                        conditioning=extra,
                    ),
                    written="nothing was decoded or written",
                )
                pattern = "".join("A" if a else "S" for a in velocity.applied)
                out[r.index] = (latent.cpu(), velocity.forwards, pattern)
            del dit
            self._release("dit")
        return out

    def _progress_bar(self, total: int, desc: str):
        if not self.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)

    def decode(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Stage 4: VAE decode of latents ``[16, T, h, w]`` -> videos ``[3, F, H, W]`` in [-1, 1] (CPU)."""
        videos = []
        with self.stage("decode"):
            vae = self._vae()
            for latent in latents:
                video = vae.decode(latent[None].to(self.device))[0].float().cpu()
                check_finite(
                    video,
                    what="the decoded frames",
                    causes=lambda: decode_causes(
                        vae=vae, vae_source=str(self.config.vae or self.models.name), dtype=self.vae_dtype
                    ),
                )
                if self.config.trim_tail_frames:
                    video = video[:, : -self.config.trim_tail_frames]
                videos.append(video)
            del vae
            self._release("vae")
        return videos

    # -- running ------------------------------------------------------------------------------

    def run(self, specs: Iterable[PromptSpec] | None = None) -> list[GenerationResult]:
        """Generate for the config's prompt (or ``specs``) and write the outputs."""
        self.setup()
        if self.config.latent_path is not None:
            return [self.decode_latent_file(self.config.latent_path)]
        requests = self.requests(specs)
        text = self.encode_text(requests)
        images = self.encode_images(requests)
        denoised = self.denoise(requests, text, images)
        needs_pixels = self.config.output_type != "latent"
        latents = [denoised[r.index][0] for r in requests]
        videos = self.decode(latents) if needs_pixels else [None] * len(requests)
        results = []
        for r, latent, video in zip(requests, latents, videos):
            metadata = self._metadata(r)
            _, calls, pattern = denoised[r.index]
            outputs = self.save(
                latent, video, metadata, r.index, r.seed, many=len(requests) > 1 or self._request_count > 1
            )
            results.append(GenerationResult(r, outputs, latent, video, metadata, calls, pattern))
        return results

    def decode_latent_file(self, path: str) -> GenerationResult:
        """``--latent_path``: decode a saved latent (T5 and DiT are never loaded)."""
        latent, metadata = media.load_latent(path)
        check_finite(latent, what=f"the latent file {path}", causes=[f"{path} was saved from a failed run; regenerate it"])
        if latent.shape[0] != LATENT_CHANNELS:
            raise InputError(
                f"{path}: a Wan latent has {LATENT_CHANNELS} channels, this one has {latent.shape[0]}"
            )
        self.log(f"decoding {path} ({tuple(latent.shape)})")
        video = self.decode([latent])[0]
        metadata = dict(metadata)
        if self.config.fps is not None:
            metadata["fps"] = self.config.fps
        seed = metadata.get("seed", "latent")
        outputs = self.save(latent, video, metadata, 0, seed, many=False, stem_hint=Path(path).stem)
        return GenerationResult(None, outputs, latent, video, metadata)

    def _metadata(self, r: Request) -> dict[str, Any]:
        cfg = self.config
        assert self.task is not None
        meta: dict[str, Any] = {
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "seed": r.seed,
            "task": self.task.name,
            "height": r.height,
            "width": r.width,
            "video_length": r.frames,
            "infer_steps": r.steps,
            "flow_shift": r.flow_shift,
            "guidance_scale": r.guidance_scale,
            "sample_solver": cfg.sample_solver,
            "cfg_skip_mode": cfg.cfg_skip_mode,
            "cfg_apply_ratio": cfg.cfg_apply_ratio,
            "fps": cfg.fps or self.task.fps or DEFAULT_FPS,
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
        meta.update(self.models.metadata())
        return meta

    # -- outputs ------------------------------------------------------------------------------

    def _base(
        self, index: int, seed: Any, many: bool, stem_hint: str | None = None
    ) -> tuple[Path, str | None]:
        """Where outputs go: ``(path without suffix, the suffix the user named or None)``."""
        save = Path(self.config.save_path).expanduser()
        suffix = save.suffix.lower()
        if suffix in FILE_SUFFIXES:
            base = save.with_suffix("")
            if many:
                base = base.with_name(f"{base.name}_{index:03d}")
            return base, suffix
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}_{seed}" + (f"_{stem_hint}" if stem_hint else "") + (f"_{index:03d}" if many else "")
        return save / name, None

    def save(
        self,
        latent: torch.Tensor,
        video: torch.Tensor | None,
        metadata: dict[str, Any],
        index: int,
        seed: Any,
        *,
        many: bool,
        stem_hint: str | None = None,
    ) -> list[Path]:
        """Write the outputs ``--output_type`` asks for; every file appears whole or not at all."""
        cfg = self.config
        base, named = self._base(index, seed, many, stem_hint)
        meta = None if cfg.no_metadata else metadata
        fps = int(metadata.get("fps") or cfg.fps or DEFAULT_FPS)
        kind = cfg.output_type
        written: list[Path] = []
        if kind in ("latent", "both", "latent_images") and cfg.latent_path is None:
            path = (
                base.with_suffix(".safetensors")
                if named
                else base.with_name(base.name + "_latent.safetensors")
            )
            written.append(media.save_latent(path, latent, metadata=meta))
        if kind in ("video", "both", "images", "latent_images"):
            assert video is not None
            frames = media.video_to_uint8(video)
            if frames.shape[0] == 1:
                written.append(media.write_image(base.with_suffix(".png"), frames[0], metadata=meta))
            elif kind in ("video", "both"):
                written.append(media.write_video(base.with_suffix(".mp4"), frames, fps=fps, metadata=meta))
            else:
                written.append(media.write_frames(base, frames, metadata=meta))
        for path in written:
            self.log(f"saved {path}")
        return written

    def summary(self) -> str:
        """Stage timings and peak memory, one line per stage."""
        if not self.stages:
            return "nothing ran"
        what = "peak GPU memory allocated" if self.device.type == "cuda" else "peak process memory (RSS)"
        lines = [f"{'stage':<16}{'time':>10}   {what}"]
        for record in self.stages:
            lines.append(f"{record.name:<16}{record.seconds:>9.2f}s   {_format_bytes(record.peak_bytes)}")
        total = sum(r.seconds for r in self.stages)
        lines.append(f"{'total':<16}{total:>9.2f}s   {_format_bytes(max(r.peak_bytes for r in self.stages))}")
        return "\n".join(lines)

    def close(self) -> None:
        """Free every model still loaded."""
        self._loaded.clear()
        if self._ready:
            _free(self.device)


def _round16(value: int) -> int:
    return max(SIZE_MULTIPLE, int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


def _has_c_compiler() -> bool:
    import shutil

    return any(shutil.which(cc) for cc in (os.environ.get("CC", ""), "cc", "gcc", "clang") if cc)


def generate(config: GenerateConfig, **kwargs: Any) -> list[GenerationResult]:
    """Run one generation job (``GenerationPipeline(config, **kwargs).run()``) and free the models."""
    pipeline = GenerationPipeline(config, **kwargs)
    try:
        return pipeline.run()
    finally:
        pipeline.close()


__all__ = [
    "OUTPUT_TYPES",
    "FileModels",
    "GenerateConfig",
    "GenerationPipeline",
    "GenerationResult",
    "ModelInfo",
    "ModelSource",
    "Request",
    "generate",
]
