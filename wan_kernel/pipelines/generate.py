"""The generation pipeline: prompts (and images) in, videos / images / latents out.

:meth:`GenerationPipeline.run` reads top to bottom as the numbered steps below; each step is a
public stage function another pipeline (samples during training, the cache commands) can call::

    0. set-up     device, dtypes, plugins (resolved once), the task read off the DiT weights
    1. requests   prompt specs -> checked Requests              (pipelines.requests.resolve_request)
    2. text       tokenizer + T5 -> context, then T5 is freed   (pipelines.text_encoding.encode_texts)
    3. images     i2v/flf2v: CLIP features + VAE latent of the given frames, then both are freed
                                                                (pipelines.conditioning)
    4. denoise    build the DiT, run each request's loop, then the DiT is freed
                                                                (pipelines.dit_builder.build_dit,
                                                                 pipelines.denoising.denoise_request)
    5. decode     VAE decode -> pixels                          (pipelines.decoding.decode_latents)
    6. write      files, atomically                             (pipelines.outputs.write_outputs)

Stages run one after another so that peak memory is the largest single stage, not their sum.
With several prompts (``--from_file``) every stage runs for all prompts before the next one
starts; with ``keep_models=True`` (``--interactive``) the models stay loaded between prompts.

Models come from a :class:`~wan_kernel.pipelines.model_sources.ModelSource`. The seed is random
when not given, always printed and saved in the output metadata.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from wan_kernel.checks import check_finite, decode_causes, denoise_causes
from wan_kernel.errors import InputError, WeightsError
from wan_kernel.files import check_save_path
from wan_kernel.models.compat import check_compatible
from wan_kernel.models.vae import LATENT_CHANNELS
from wan_kernel.pipelines import media
from wan_kernel.pipelines.conditioning import (
    ImageConditioning,
    encode_conditioning,
    read_request_images,
    request_clip_features,
)
from wan_kernel.pipelines.config import (
    OUTPUT_TYPES,
    SIZE_MULTIPLE,
    SOLVER_CHOICES,
    GenerateConfig,
    GenerationResult,
    Log,
    Request,
    StageRecord,
)
from wan_kernel.pipelines.decoding import decode_latents
from wan_kernel.pipelines.denoising import Denoised, denoise_request
from wan_kernel.pipelines.devices import (
    free_memory,
    has_c_compiler,
    measure_stage,
    resolve_compute_dtype,
    resolve_device,
    stage_summary,
)
from wan_kernel.pipelines.dit_builder import build_dit, lora_specs, lora_support
from wan_kernel.pipelines.model_sources import (
    FileModels,
    ModelInfo,
    ModelSource,
    PrebuiltDiT,
    quantize_module,
)
from wan_kernel.pipelines.outputs import FILE_SUFFIXES, output_base, request_metadata, write_outputs
from wan_kernel.pipelines.plugin_setup import GenerationPlugins, resolve_generation_plugins
from wan_kernel.pipelines.prompts import PromptSpec
from wan_kernel.pipelines.requests import resolve_request
from wan_kernel.pipelines.tasks import DEFAULT_FPS, TaskSpec, select_task
from wan_kernel.pipelines.text_encoding import encode_texts
from wan_kernel.plugins import check_attention_backend, plugin_failure


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class GenerationPipeline:
    """Runs :class:`GenerateConfig` requests through the stages.

    :param config: the options.
    :param models: where models come from (default: :class:`FileModels` over the config's paths;
        :class:`PrebuiltDiT` hands it an already-built DiT).
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
        self.models = models if models is not None else FileModels(config)
        self.log = log
        self.progress = progress
        self.keep_models = keep_models
        self.stages: list[StageRecord] = []
        self._loaded: dict[str, Any] = {}
        self._ready = False
        self.task: TaskSpec | None = None
        self.plugins: GenerationPlugins | None = None
        self._request_count = 0

    # -- 0. set-up ----------------------------------------------------------------------------

    def setup(self) -> "GenerationPipeline":
        """Resolve the device, the plugins and the task; check the inputs the stages will need."""
        if self._ready:
            return self
        cfg = self.config
        cfg.check()
        # the output location: writable and free, before any model loads
        check_save_path(cfg.save_path, file_suffixes=tuple(FILE_SUFFIXES))
        self.device = resolve_device(cfg.device)
        self.dit_dtype = resolve_compute_dtype(cfg.dit_dtype, self.device, "dit_dtype")
        self.vae_dtype = resolve_compute_dtype(cfg.vae_dtype, self.device, "vae_dtype")
        self.t5_dtype = self.dit_dtype
        if cfg.latent_path is not None:
            self.models.check(needs_dit=False, needs_t5=False, needs_vae=True, needs_clip=False)
            self._ready = True
            return self

        # plugins: resolved once here, handed to the stages as objects
        self.plugins = resolve_generation_plugins(cfg, device=self.device, manager=self.plugin_manager)
        self._check_shared_dit()
        if cfg.lora_weights:
            lora_support()
            for path in cfg.lora_weights:
                if not Path(path).expanduser().exists():
                    raise WeightsError(f"--lora_weight {path}: file not found")
        if cfg.compile and self.device.type == "cpu" and not has_c_compiler():
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
        # what the attention plugin returns is checked once, here, against the interface
        check_attention_backend(
            self.plugins.attention,
            name=cfg.attn,
            device=self.device,
            dtype=self.dit_dtype,
            head_dim=info.head_dim or 64,
            manager=self.plugin_manager,
        )
        self.log(f"task: {self.task.name} ({info.description}); device {self.device}, attention {cfg.attn}")
        self._ready = True
        return self

    def _check_shared_dit(self) -> None:
        cfg = self.config
        if not self.models.shares_dit:
            return
        asked = [
            option
            for option, given in (
                ("--quant", cfg.quant),
                ("--lora_weight", cfg.lora_weights),
                ("--offload/--blocks_to_swap", self.plugins.offloader),
                ("--compile", cfg.compile),
            )
            if given
        ]
        if asked:
            raise InputError(
                f"{', '.join(asked)} cannot be applied to an already-built DiT ({self.models.name} models); "
                "apply them to the module before handing it over"
            )

    # -- model bookkeeping --------------------------------------------------------------------

    def stage(self, name: str):
        """A context manager timing one stage into :attr:`stages`."""
        return measure_stage(name, self.device, self.stages)

    def _model(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._loaded:
            self._loaded[key] = build()
        return self._loaded[key]

    def _release(self, *keys: str) -> None:
        if self.keep_models:
            return
        for key in keys:
            self._loaded.pop(key, None)
        free_memory(self.device)

    def _vae(self):
        cache = "cpu" if self.config.vae_cache_cpu else None
        return self._model(
            "vae", lambda: self.models.load_vae(device=self.device, dtype=self.vae_dtype, cache_device=cache)
        )

    def build_dit(self) -> torch.nn.Module:
        """The DiT of this run (:func:`~wan_kernel.pipelines.dit_builder.build_dit` with its plugins)."""
        self.setup()
        cfg, plugins = self.config, self.plugins
        return build_dit(
            self.models,
            device=self.device,
            dtype=self.dit_dtype,
            attention=plugins.attention,
            quantizer=plugins.quantizer,
            loras=lora_specs(
                cfg.lora_weights, cfg.lora_multipliers, cfg.include_patterns, cfg.exclude_patterns
            ),
            lora_strict=cfg.lora_strict,
            offloader=plugins.offloader,
            blocks_to_swap=cfg.blocks_to_swap,
            compile=cfg.compile,
            log=self.log,
        )

    # -- 1. requests --------------------------------------------------------------------------

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
            out.append(resolve_request(spec, self._request_count, cfg, self.task, log=self.log))
            self._request_count += 1
        return out

    # -- 2. text ------------------------------------------------------------------------------

    def encode_text(self, requests: Sequence[Request]) -> dict[str, torch.Tensor]:
        """T5 embeddings ``[L, text_dim]`` (CPU) of every distinct prompt and negative prompt."""
        with self.stage("text encoder"):
            t5, tokenizer = self._model(
                "t5",
                lambda: self.models.load_text_encoder(
                    device=self.device, dtype=self.t5_dtype, quant=self.plugins.t5_quantizer
                ),
            )
            texts = [t for r in requests for t in (r.prompt, r.negative_prompt)]
            embeddings = encode_texts(t5, tokenizer, texts, device=self.device)
            for embedding in embeddings.values():
                check_compatible(dit_text_dim=self.dit_info.text_dim, text_width=embedding.shape[-1])
            del t5, tokenizer
            self._release("t5")
        return embeddings

    # -- 3. images ----------------------------------------------------------------------------

    def encode_images(self, requests: Sequence[Request]) -> dict[int, ImageConditioning]:
        """i2v/flf2v: CLIP features and the VAE conditioning ``y`` of each request (``{}`` for t2v)."""
        task = self.task
        out: dict[int, ImageConditioning] = {}
        if not task.needs_image:
            return out
        background = self.config.image_background
        with self.stage("image encoders"):
            # CLIP runs once per image: the default (SDPA) attention, whatever backend the DiT uses
            clip = self._model(
                "clip", lambda: self.models.load_clip(device=self.device, dtype=None, attention=None)
            )
            images = {
                r.index: read_request_images(r.image_path, r.end_image_path, background=background)
                for r in requests
            }
            features = {
                index: request_clip_features(clip, start, end, mode=task.mode, device=self.device)
                for index, (start, end) in images.items()
            }
            for feature in features.values():
                check_compatible(image_width=feature.shape[-1])
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

    # -- 4. denoise ---------------------------------------------------------------------------

    def denoise(
        self,
        requests: Sequence[Request],
        text: dict[str, torch.Tensor],
        images: dict[int, ImageConditioning],
    ) -> dict[int, Denoised]:
        """The DiT loop for each request: ``{index: Denoised(latent [16, T, h, w] on the CPU, ...)}``."""
        cfg = self.config
        out = {}
        with self.stage("denoise"):
            dit = self._model("dit", self.build_dit)
            for r in requests:
                try:
                    out[r.index] = denoise_request(
                        dit,
                        r,
                        context=text[r.prompt],
                        negative_context=text[r.negative_prompt],
                        conditioning=images.get(r.index),
                        solver=cfg.sample_solver,
                        cfg_schedule=self.plugins.cfg_schedule,
                        cfg_apply_ratio=cfg.cfg_apply_ratio,
                        device=self.device,
                        cpu_noise=cfg.cpu_noise,
                        progress=self.progress,
                        log=self.log,
                    )
                except Exception as exc:  # a third-party kernel failing mid-run is named, not a traceback
                    failure = plugin_failure(
                        exc,
                        self.plugins.attention,
                        concern="attention",
                        name=cfg.attn,
                        manager=self.plugin_manager,
                    )
                    if failure is not None:
                        raise failure from exc
                    raise
                self._check_latent(out[r.index].latent, r, dit, images.get(r.index))
            del dit
            self._release("dit")
        return out

    def _check_latent(self, latent: torch.Tensor, r: Request, dit, cond: ImageConditioning | None) -> None:
        """No NaN/Inf in a denoised latent, else an error naming the likely cause (nothing is decoded)."""
        cfg = self.config
        check_finite(
            latent,
            what=f"the latents of prompt {r.index + 1} (seed {r.seed})",
            causes=lambda: denoise_causes(
                dit=dit,
                dit_source=str(cfg.dit or self.models.name),
                loras=list(zip(cfg.lora_weights, cfg.lora_multipliers or [1.0] * len(cfg.lora_weights))),
                dtype=self.dit_dtype,
                attention=cfg.attn,
                conditioning={"y": cond.y, "clip_fea": cond.clip_fea} if cond is not None else None,
            ),
            written="nothing was decoded or written",
        )

    # -- 5. decode ----------------------------------------------------------------------------

    def decode(self, latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """VAE decode of latents ``[16, T, h, w]`` -> videos ``[3, F, H, W]`` in [-1, 1] (CPU)."""
        with self.stage("decode"):
            vae = self._vae()
            videos = decode_latents(
                vae, latents, device=self.device, trim_tail_frames=self.config.trim_tail_frames
            )
            for video in videos:  # frames checked before anything is written
                check_finite(
                    video,
                    what="the decoded frames",
                    causes=lambda: decode_causes(
                        vae=vae, vae_source=str(self.config.vae or self.models.name), dtype=self.vae_dtype
                    ),
                )
            del vae
            self._release("vae")
        return videos

    # -- 6. write -----------------------------------------------------------------------------

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
        base, named = output_base(cfg.save_path, index=index, seed=seed, many=many, stem_hint=stem_hint)
        return write_outputs(
            base,
            latent=latent if cfg.latent_path is None else None,
            video=video,
            output_type=cfg.output_type,
            metadata=None if cfg.no_metadata else metadata,
            fps=int(metadata.get("fps") or cfg.fps or DEFAULT_FPS),
            named=named,
            log=self.log,
        )

    # -- the run ------------------------------------------------------------------------------

    def run(self, specs: Iterable[PromptSpec] | None = None) -> list[GenerationResult]:
        """Generate for the config's prompt (or ``specs``) and write the outputs."""
        self.setup()  # 0
        if self.config.latent_path is not None:
            return [self.decode_latent_file(self.config.latent_path)]
        requests = self.requests(specs)  # 1
        text = self.encode_text(requests)  # 2
        images = self.encode_images(requests)  # 3
        denoised = self.denoise(requests, text, images)  # 4
        latents = [denoised[r.index].latent for r in requests]
        needs_pixels = self.config.output_type != "latent"
        videos = self.decode(latents) if needs_pixels else [None] * len(requests)  # 5
        many = len(requests) > 1 or self._request_count > 1
        results = []
        for r, latent, video in zip(requests, latents, videos):  # 6
            metadata = request_metadata(r, self.config, self.task, self.models.metadata())
            outputs = self.save(latent, video, metadata, r.index, r.seed, many=many)
            done = denoised[r.index]
            results.append(
                GenerationResult(r, outputs, latent, video, metadata, done.model_calls, done.cfg_pattern)
            )
        return results

    def decode_latent_file(self, path: str) -> GenerationResult:
        """``--latent_path``: decode a saved latent (T5 and DiT are never loaded)."""
        latent, metadata = media.load_latent(path)
        check_finite(
            latent, what=f"the latent file {path}", causes=[f"{path} holds a failed run's result; regenerate it"]
        )
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

    def summary(self) -> str:
        """Stage timings and peak memory, one line per stage."""
        return stage_summary(self.stages, self.device)

    def close(self) -> None:
        """Free every model still loaded."""
        self._loaded.clear()
        if self._ready:
            free_memory(self.device)


def generate(config: GenerateConfig, **kwargs: Any) -> list[GenerationResult]:
    """Run one generation job (``GenerationPipeline(config, **kwargs).run()``) and free the models."""
    pipeline = GenerationPipeline(config, **kwargs)
    try:
        return pipeline.run()
    finally:
        pipeline.close()


__all__ = [
    "FILE_SUFFIXES",
    "OUTPUT_TYPES",
    "SIZE_MULTIPLE",
    "SOLVER_CHOICES",
    "FileModels",
    "GenerateConfig",
    "GenerationPipeline",
    "GenerationResult",
    "ModelInfo",
    "ModelSource",
    "PrebuiltDiT",
    "Request",
    "generate",
    "quantize_module",
]
