"""The configuration of one training run: typed data with the seed trainer's option names.

``wan run train`` builds a :class:`TrainConfig` from its same-named options (and a
``--config_file`` TOML with the same keys); :func:`wan_kernel.training.trainer.train` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from wan_kernel.errors import InputError

MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_PRECISION = {
    None: "float32",
    "float": "float32",
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def _opt_path(value: Any) -> Path | None:
    return None if value in (None, "") else Path(value).expanduser()


def _paths(value: Any) -> tuple[Path, ...]:
    return tuple(Path(v).expanduser() for v in (value or ()))


def _strs(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Every setting the trainer uses (defaults as the seed's ``wan_train_network.py``)."""

    # model
    dit: Path = attrs.field(converter=Path)
    task: str | None = None
    attn: str = "sdpa"
    fp8_base: bool = False
    fp8_scaled: bool = False
    quant: str | None = None
    mixed_precision: str | None = None  # None: what the launcher says (accelerate's config/env), else "no"
    # data
    dataset_config: Path | None = attrs.field(default=None, converter=_opt_path)
    cache_directories: tuple[Path, ...] = attrs.field(default=(), converter=_paths)
    batch_size: int = 1
    num_repeats: int = 1
    # output
    output_dir: Path = attrs.field(converter=Path)
    output_name: str = "lora"
    # network
    network_dim: int | None = None
    network_alpha: float | None = 1.0
    network_dropout: float | None = None
    network_args: tuple[str, ...] = attrs.field(default=(), converter=_strs)
    network_weights: Path | None = attrs.field(default=None, converter=_opt_path)
    dim_from_weights: bool = False
    base_weights: tuple[Path, ...] = attrs.field(default=(), converter=_paths)
    base_weights_multiplier: tuple[float, ...] = attrs.field(
        default=(), converter=lambda v: tuple(float(x) for x in v or ())
    )
    scale_weight_norms: float | None = None
    # memory
    gradient_checkpointing: bool = False
    gradient_checkpointing_cpu_offload: bool = False
    blocks_to_swap: int | None = None
    use_pinned_memory_for_block_swap: bool = False
    # optimisation
    optimizer_type: str = ""
    optimizer_args: tuple[str, ...] = attrs.field(default=(), converter=_strs)
    learning_rate: float = 2e-6
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: str = "0"
    lr_decay_steps: str = "0"
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_scheduler_timescale: int | None = None
    lr_scheduler_min_lr_ratio: float | None = None
    lr_scheduler_type: str = ""
    lr_scheduler_args: tuple[str, ...] = attrs.field(default=(), converter=_strs)
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1600
    max_train_epochs: int | None = None
    seed: int | None = None
    # timesteps
    timestep_sampling: str = "sigma"
    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: float | None = None
    max_timestep: float | None = None
    preserve_distribution_shape: bool = False
    num_timestep_buckets: int | None = None
    # saving
    save_precision: str | None = None
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    save_last_n_epochs: int | None = None
    save_last_n_epochs_state: int | None = None
    save_last_n_steps: int | None = None
    save_last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False
    resume: Path | None = attrs.field(default=None, converter=_opt_path)
    no_metadata: bool = False
    training_comment: str | None = None
    metadata_title: str | None = None
    metadata_author: str | None = None
    metadata_description: str | None = None
    metadata_license: str | None = None
    metadata_tags: str | None = None
    metadata_reso: str | None = None
    metadata_arch: str | None = None
    # logging
    logging_dir: Path | None = attrs.field(default=None, converter=_opt_path)
    log_with: str | None = None
    log_prefix: str | None = None
    log_tracker_name: str | None = None
    wandb_run_name: str | None = None
    log_config: bool = False
    # samples during training
    sample_prompts: Path | None = attrs.field(default=None, converter=_opt_path)
    sample_every_n_steps: int | None = None
    sample_every_n_epochs: int | None = None
    sample_at_first: bool = False
    vae: Path | None = attrs.field(default=None, converter=_opt_path)
    vae_dtype: str | None = None
    t5: Path | None = attrs.field(default=None, converter=_opt_path)
    t5_tokenizer: str | None = None
    fp8_t5: bool = False
    clip: Path | None = attrs.field(default=None, converter=_opt_path)
    # run-time
    show_progress: bool = True

    def __attrs_post_init__(self) -> None:
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise InputError(
                f"--mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )
        if self.save_precision not in SAVE_PRECISION:
            raise InputError(f"--save_precision must be float, fp16 or bf16, got {self.save_precision!r}")
        if self.gradient_accumulation_steps < 1:
            raise InputError("--gradient_accumulation_steps must be >= 1")
        if self.max_train_epochs is None and self.max_train_steps < 1:
            raise InputError("--max_train_steps must be >= 1")
        if self.max_train_epochs is not None and self.max_train_epochs < 1:
            raise InputError("--max_train_epochs must be >= 1")
        if self.fp8_scaled and not self.fp8_base:
            raise InputError("--fp8_scaled needs --fp8_base (the seed's rule): add --fp8_base")
        if self.base_weights_multiplier and len(self.base_weights_multiplier) not in (
            1,
            len(self.base_weights),
        ):
            raise InputError("--base_weights_multiplier takes one value, or one per --base_weights file")
        if self.num_timestep_buckets is not None and self.num_timestep_buckets < 0:
            raise InputError("--num_timestep_buckets must be >= 0 (0 or 1: no buckets)")
        if (self.num_timestep_buckets or 0) >= 2 and self.preserve_distribution_shape:
            raise InputError(
                "--num_timestep_buckets cannot be used with --preserve_distribution_shape (rejection "
                "sampling cannot keep the stratified draws); drop one of the two"
            )
        if self.blocks_to_swap is not None and self.blocks_to_swap < 0:
            raise InputError("--blocks_to_swap must be >= 0")
        if self.dataset_config is None and not self.cache_directories:
            raise InputError("give --dataset_config (the TOML the cache step used)")

    @property
    def quantization(self) -> str | None:
        """The quantization plugin name for the frozen base (``fp8``, ``fp8_scaled``) or None."""
        if self.quant:
            return self.quant
        if self.fp8_base:
            return "fp8_scaled" if self.fp8_scaled else "fp8"
        return None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings, tuples as lists) for the saved effective config."""
        out = {}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) if isinstance(v, Path) else v for v in value]
            out[field.name] = value
        return out


def dump_toml(values: dict[str, Any]) -> str:
    """A flat TOML document of scalars and lists (``None`` values are left out)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{s}"'

    lines = []
    for key in sorted(values):
        v = values[key]
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            lines.append(f"{key} = [{', '.join(scalar(x) for x in v)}]")
        else:
            lines.append(f"{key} = {scalar(v)}")
    return "\n".join(lines) + "\n"
