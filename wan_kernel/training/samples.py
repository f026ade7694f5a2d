"""Samples during training, made by the generation pipeline of ``wan run generate``.

The prompt file (``--sample_prompts``) uses the seed trainer's syntax:

- ``.txt``: one prompt per line with `` --w --h --f --d --s --l/--g --fs --n --i --ei`` overrides
  (:mod:`wan_kernel.pipelines.prompts`), ``#`` comments;
- ``.toml``: ``[prompt]`` defaults and ``[[prompt.subset]]`` entries;
- ``.json``: a list of strings or of objects;

table/object keys: ``prompt``, ``width``, ``height``, ``frame_count``, ``seed``, ``sample_steps``,
``guidance_scale`` (or ``cfg_scale``), ``discrete_flow_shift``, ``negative_prompt``,
``image_path``, ``end_image_path``.

Each sample runs :class:`~wan_kernel.pipelines.generate.GenerationPipeline` with the DiT being
trained (its LoRA active, dropout off) handed over as a
:class:`~wan_kernel.pipelines.model_sources.PrebuiltDiT`, and the VAE/T5/CLIP
from ``--vae``/``--t5``/``--clip``. Unset values take the seed's sampling defaults (256x256, one
frame, 20 steps) and otherwise ``wan run generate``'s task defaults (flow shift, guidance, the
negative prompt); a prompt without a seed gets ``training seed + prompt index``. So
``wan run generate --dit D --lora_weight NAME-stepN.safetensors`` with the settings recorded in the
sample's metadata makes the same picture (up to the rounding of merging the LoRA into the weights,
which ``--lora_weight`` does, against adding its output, which training does).

Files: ``OUTPUT_DIR/sample/NAME_{e000001|000100}_{index:02d}_{seed}.png|mp4``, written atomically by
the pipeline. Only process 0 samples; the RNG states are restored afterwards.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

import json
from pathlib import Path
from typing import Any

import torch

from wan_kernel.errors import InputError
from wan_kernel.pipelines.config import GenerateConfig
from wan_kernel.pipelines.generate import GenerationPipeline
from wan_kernel.pipelines.model_sources import FileModels, PrebuiltDiT
from wan_kernel.pipelines.prompts import PromptSpec, read_prompt_file

SAMPLE_DEFAULTS = {"video_size": (256, 256), "video_length": 1, "infer_steps": 20}
"""The seed's defaults for samples during training (height, width), frames, steps."""

_KEYS = {
    "prompt": "prompt",
    "width": "width",
    "height": "height",
    "frame_count": "frames",
    "seed": "seed",
    "sample_steps": "steps",
    "guidance_scale": "guidance_scale",
    "cfg_scale": "guidance_scale",
    "discrete_flow_shift": "flow_shift",
    "negative_prompt": "negative_prompt",
    "image_path": "image_path",
    "end_image_path": "end_image_path",
}


def _spec(entry: Any, where: str, index: int) -> PromptSpec:
    if isinstance(entry, str):
        return PromptSpec(prompt=entry, line=index + 1)
    if not isinstance(entry, dict):
        raise InputError(
            f"{where}: entry {index + 1} must be a prompt text or a table, got {type(entry).__name__}"
        )
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise InputError(
            f"{where}: entry {index + 1} has unknown keys {', '.join(unknown)}; known: {', '.join(_KEYS)}"
        )
    if not entry.get("prompt"):
        raise InputError(f"{where}: entry {index + 1} has no prompt")
    return PromptSpec(line=index + 1, **{_KEYS[k]: v for k, v in entry.items()})


def read_sample_prompts(path: Path) -> list[PromptSpec]:
    """The prompts of a ``.txt``/``.toml``/``.json`` prompt file (see the module docstring)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_prompt_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read --sample_prompts {path}: {exc}") from None
    if suffix == ".toml":
        try:
            doc = tomllib.loads(text).get("prompt", {})
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{path} is not valid TOML: {exc}") from None
        defaults = {k: v for k, v in doc.items() if k != "subset"}
        entries = [{**defaults, **subset} for subset in doc.get("subset", [])]
    elif suffix == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(entries, list):
            raise InputError(f"{path}: expected a JSON list of prompts")
    else:
        raise InputError(f"--sample_prompts {path}: use a .txt, .toml or .json file")
    specs = [_spec(e, str(path), i) for i, e in enumerate(entries)]
    if not specs:
        raise InputError(f"--sample_prompts {path} has no prompts")
    return specs


class SampleHook:
    """``hook(trainer, epoch=, step=)``: make and save every prompt's sample; returns the results."""

    def __init__(self, config, prompts: list[PromptSpec]):
        self.config = config
        self.prompts = prompts
        self.pipeline: GenerationPipeline | None = None

    @classmethod
    def from_config(cls, config) -> SampleHook:
        """Check the prompt file and the model paths now, before training starts."""
        prompts = read_sample_prompts(config.sample_prompts)
        missing = [o for o, v in (("--vae", config.vae), ("--t5", config.t5)) if v is None]
        if missing:
            raise InputError(f"--sample_prompts needs {' and '.join(missing)} (the models that make samples)")
        return cls(config, prompts)

    def _pipeline(self, trainer) -> GenerationPipeline:
        if self.pipeline is None:
            cfg = self.config
            dtype = {"no": "float32", "bf16": "bfloat16", "fp16": "float16"}[trainer.mixed_precision]
            gen = GenerateConfig(
                task=trainer.task,
                dit=str(cfg.dit),
                vae=str(cfg.vae),
                t5=str(cfg.t5),
                clip=None if cfg.clip is None else str(cfg.clip),
                t5_tokenizer=cfg.t5_tokenizer,
                dit_dtype=dtype,
                vae_dtype=cfg.vae_dtype,
                t5_quant="fp8_t5" if cfg.fp8_t5 else None,
                attn=cfg.attn,
                device=str(trainer.device),
                output_type="video",
                **SAMPLE_DEFAULTS,
            )
            models = PrebuiltDiT(trainer.dit, FileModels(gen), description="the DiT being trained")
            self.pipeline = GenerationPipeline(
                gen, models=models, log=trainer.log, progress=False, keep_models=True
            )
            self.pipeline.setup()
        return self.pipeline

    def __call__(self, trainer, *, epoch: int, step: int, at: str = "step") -> list:
        results = []
        if trainer.is_main:
            pipeline = self._pipeline(trainer)
            folder = self.config.output_dir / "sample"
            folder.mkdir(parents=True, exist_ok=True)
            tag = f"e{epoch:06d}" if at == "epoch" else f"{step:06d}"
            was_training = trainer.model.training
            trainer.model.eval()
            devices = [trainer.device] if trainer.device.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices):
                    for index, spec in enumerate(self.prompts):
                        seed = spec.seed if spec.seed is not None else trainer.seed + index
                        pipeline.config.save_path = str(
                            folder / f"{self.config.output_name}_{tag}_{index:02d}_{seed}.mp4"
                        )
                        spec = PromptSpec(**{**_fields(spec), "seed": seed})
                        pipeline._request_count = 0  # one file per call, named by save_path as given
                        results.extend(pipeline.run([spec]))
            finally:
                trainer.model.train(was_training)
        trainer.accelerator.wait_for_everyone()
        return results


def _fields(spec: PromptSpec) -> dict[str, Any]:
    import attrs

    return attrs.asdict(spec)
