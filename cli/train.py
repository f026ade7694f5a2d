"""``wan run train``: train a LoRA for a Wan2.1 DiT from cached latents and text embeddings.

Every option of the seed trainer's ``wan_train_network.py`` is accepted under its own spelling,
so a seed command line runs with ``accelerate launch ... wan_train_network.py`` replaced by
``wan run train`` (one process) or ``accelerate launch [--num_processes N] -m wan_cli.main run
train`` (several). Options that do not apply to Wan2.1 LoRA training here are accepted with a
note saying why (:data:`NOTED`) or refused with a clear message (:data:`REFUSED`).

The option table (:data:`OPTIONS`) is the one list of what the command takes: each entry's name
is the ``TrainConfig`` field it fills (or a noted/refused one) and the key a ``--config_file``
TOML uses.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from pathlib import Path
from typing import Any

import attrs
import click
from wan_cli.errors import WanCliError, handle_wan_errors
from wan_cli.generate import expand_multi_value_options

from wan_kernel.errors import InputError

TASK_NAMES = ("t2v-1.3B", "t2v-14B", "i2v-14B", "t2i-14B", "flf2v-14B")
ATTENTION_FLAGS = {"sdpa": "sdpa", "xformers": "xformers", "flash_attn": "flash_attn", "flash3": "flash3"}
NETWORK_MODULES = ("networks.lora_wan", "networks.lora", "lora_wan", "lora")
TIMESTEP_SAMPLING = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "logsnr")

EPILOG = """\b
Example (the seed's command, one process):
  wan run train --task t2v-1.3B --dit wan2.1_t2v_1.3B_bf16.safetensors \\
      --dataset_config dataset.toml --sdpa --mixed_precision bf16 --fp8_base \\
      --optimizer_type adamw8bit --learning_rate 2e-4 --gradient_checkpointing \\
      --network_module networks.lora_wan --network_dim 32 \\
      --timestep_sampling shift --discrete_flow_shift 3.0 \\
      --max_train_epochs 16 --save_every_n_epochs 1 --seed 42 \\
      --output_dir out --output_name my-lora
Several processes (data parallel; rank 0 writes the files):
  accelerate launch --num_processes 2 -m wan_cli.main run train ...same options...
Resume: --resume out/my-lora-step00000500-state (add --save_state to write state folders).

Also accepted for compatibility with the seed (each prints a note on what it does here): {noted}.
"""


def _flag(help: str) -> dict[str, Any]:
    return {"is_flag": True, "default": False, "help": help}


def _val(type_: Any, default: Any = None, help: str = "", **kw: Any) -> dict[str, Any]:
    return {"type": type_, "default": default, "help": help, **kw}


def _multi(type_: Any, help: str) -> dict[str, Any]:
    return {"type": type_, "multiple": True, "help": help + " (several values: --opt A B or --opt A --opt B)"}


PATH = click.Path(path_type=Path)
EXISTING = click.Path(path_type=Path, exists=True)

OPTIONS: list[tuple[str, dict[str, Any]]] = [
    # model
    (
        "dit",
        _val(EXISTING, None, "DiT weights (.safetensors file, folder of shards, or .pth).", required=True),
    ),
    (
        "task",
        _val(click.Choice(TASK_NAMES), None, "Task; read from the DiT when left out (checked when given)."),
    ),
    (
        "attn",
        _val(str, None, "Attention plugin by name (sdpa, xformers, flash_attn, flash3).  [default: sdpa]"),
    ),
    ("sdpa", _flag("Attention: torch scaled_dot_product_attention.")),
    ("xformers", _flag("Attention: xformers (plugin wan-attention-xformers).")),
    ("flash_attn", _flag("Attention: FlashAttention 2 (plugin wan-attention-flash).")),
    ("flash3", _flag("Attention: FlashAttention 3 (plugin wan-attention-flash).")),
    ("fp8_base", _flag("Keep the frozen DiT in fp8 (quantization plugin 'fp8').")),
    ("fp8_scaled", _flag("With --fp8_base: scaled fp8 (quantization plugin 'fp8_scaled').")),
    (
        "mixed_precision",
        _val(
            click.Choice(["no", "fp16", "bf16"]),
            None,
            "Compute dtype of the DiT and autocast.  [default: accelerate launch's setting, else no]",
        ),
    ),
    # data and outputs
    ("dataset_config", _val(EXISTING, None, "Dataset TOML (the one the cache step used).")),
    ("cache_directories", _multi(EXISTING, "Cache folders to train on instead of --dataset_config")),
    ("batch_size", _val(int, 1, "Batch size with --cache_directories.")),
    ("num_repeats", _val(int, 1, "Repeats with --cache_directories.")),
    (
        "quant",
        _val(str, None, "Quantization plugin for the frozen DiT by name (--fp8_base/--fp8_scaled pick one)."),
    ),
    (
        "output_dir",
        _val(PATH, None, "Folder for LoRA files, state folders, the effective config.", required=True),
    ),
    ("output_name", _val(str, None, "Base name of the outputs.", required=True)),
    # network
    ("network_module", _val(str, "networks.lora_wan", "Only networks.lora_wan (our LoRA) is available.")),
    ("network_dim", _val(int, None, "LoRA rank.  [default: 4]")),
    ("network_alpha", _val(float, 1.0, "LoRA alpha (scale alpha/rank).")),
    ("network_dropout", _val(float, None, "Dropout on the LoRA's down projection output.")),
    (
        "network_args",
        _multi(
            str,
            "key=value: rank_dropout, module_dropout, include_patterns, exclude_patterns, loraplus_lr_ratio",
        ),
    ),
    ("network_weights", _val(EXISTING, None, "Start from this LoRA file.")),
    ("dim_from_weights", _flag("Take ranks and alphas from --network_weights.")),
    ("base_weights", _multi(EXISTING, "LoRA files merged into the DiT before training")),
    ("base_weights_multiplier", _multi(float, "Multiplier per --base_weights file")),
    ("scale_weight_norms", _val(float, None, "Max-norm regularisation of each LoRA's delta.")),
    ("training_comment", _val(str, None, "Stored in the LoRA metadata (ss_training_comment).")),
    ("no_metadata", _flag("Write LoRA files without metadata.")),
    # memory
    ("gradient_checkpointing", _flag("Recompute each block's activations in backward.")),
    ("gradient_checkpointing_cpu_offload", _flag("Keep the saved activations in host memory.")),
    ("blocks_to_swap", _val(int, None, "Keep N DiT blocks in host memory, streamed to the GPU (CUDA only).")),
    ("use_pinned_memory_for_block_swap", _flag("Pinned host memory for swapped blocks.")),
    # optimisation
    (
        "optimizer_type",
        _val(str, "", "AdamW (default), AdamW8bit and other bitsandbytes ones, AdaFactor, module.Class."),
    ),
    ("optimizer_args", _multi(str, "key=value arguments of the optimizer")),
    ("learning_rate", _val(float, 2e-6, "Learning rate.")),
    ("max_grad_norm", _val(float, 1.0, "Gradient clipping (0: off).")),
    ("lr_scheduler", _val(str, "constant", "LR schedule (transformers names, or adafactor).")),
    ("lr_warmup_steps", _val(str, "0", "Warm-up steps: an integer, a ratio < 1, or N%.")),
    ("lr_decay_steps", _val(str, "0", "Decay steps (warmup_stable_decay).")),
    ("lr_scheduler_num_cycles", _val(int, 1, "Cycles of cosine_with_restarts.")),
    ("lr_scheduler_power", _val(float, 1.0, "Power of polynomial.")),
    ("lr_scheduler_timescale", _val(int, None, "Timescale of inverse_sqrt.")),
    (
        "lr_scheduler_min_lr_ratio",
        _val(float, None, "Minimum LR ratio (cosine_with_min_lr, warmup_stable_decay)."),
    ),
    (
        "lr_scheduler_type",
        _val(str, "", "A scheduler class module.Class (gets the optimizer and --lr_scheduler_args)."),
    ),
    ("lr_scheduler_args", _multi(str, "key=value arguments of the scheduler")),
    ("gradient_accumulation_steps", _val(int, 1, "Batches per optimizer step.")),
    ("max_train_steps", _val(int, 1600, "Optimizer steps (--max_train_epochs wins).")),
    ("max_train_epochs", _val(int, None, "Epochs to train.")),
    ("seed", _val(int, None, "Random seed (random when left out; recorded in the outputs).")),
    # timesteps
    (
        "timestep_sampling",
        _val(str, "sigma", "Timestep-sampling plugin (sigma, uniform, sigmoid, shift, flux_shift, logsnr)."),
    ),
    ("discrete_flow_shift", _val(float, 1.0, "Shift of 'shift' sampling.")),
    ("sigmoid_scale", _val(float, 1.0, "Scale of the sigmoid samplers.")),
    ("weighting_scheme", _val(str, "none", "Loss weighting: none, logit_normal, mode, cosmap, sigma_sqrt.")),
    ("logit_mean", _val(float, 0.0, "Mean of logit_normal / logsnr.")),
    ("logit_std", _val(float, 1.0, "Std of logit_normal / logsnr.")),
    ("mode_scale", _val(float, 1.29, "Scale of 'mode' weighting.")),
    ("min_timestep", _val(float, None, "Lowest timestep (0..1000).")),
    ("max_timestep", _val(float, None, "Highest timestep (0..1000).")),
    (
        "preserve_distribution_shape",
        _flag("Keep the sampler's shape inside the min/max range (rejection sampling)."),
    ),
    (
        "num_timestep_buckets",
        _val(int, None, "Stratify each epoch's timestep draws into this many equal buckets (>= 2)."),
    ),
    # saving
    (
        "save_precision",
        _val(
            click.Choice(["float", "fp32", "fp16", "bf16"]),
            None,
            "Dtype of saved LoRA files.  [default: float]",
        ),
    ),
    ("save_every_n_epochs", _val(int, None, "Save NAME-EEEEEE.safetensors every N epochs.")),
    ("save_every_n_steps", _val(int, None, "Save NAME-stepSSSSSSSS.safetensors every N steps.")),
    ("save_last_n_epochs", _val(int, None, "Keep only the last N epoch checkpoints.")),
    ("save_last_n_epochs_state", _val(int, None, "Keep only the last N epoch state folders.")),
    ("save_last_n_steps", _val(int, None, "Keep only the step checkpoints of the last N steps.")),
    ("save_last_n_steps_state", _val(int, None, "Keep only the step state folders of the last N steps.")),
    ("save_state", _flag("Write a state folder with every checkpoint (for --resume).")),
    ("save_state_on_train_end", _flag("Write NAME-state at the end.")),
    ("resume", _val(EXISTING, None, "Continue from a state folder (step, epoch, position, optimizer, RNG).")),
    ("metadata_title", _val(str, None, "modelspec.title")),
    ("metadata_author", _val(str, None, "modelspec.author")),
    ("metadata_description", _val(str, None, "modelspec.description")),
    ("metadata_license", _val(str, None, "modelspec.license")),
    ("metadata_tags", _val(str, None, "modelspec.tags")),
    ("metadata_reso", _val(str, None, "modelspec.resolution")),
    ("metadata_arch", _val(str, None, "modelspec.architecture")),
    # logging
    ("logging_dir", _val(PATH, None, "TensorBoard event files go here.")),
    (
        "log_with",
        _val(
            click.Choice(["tensorboard", "wandb", "all"]), None, "Trackers (tensorboard when --logging_dir)."
        ),
    ),
    ("log_prefix", _val(str, None, "Prefix of logged names.")),
    ("log_tracker_name", _val(str, None, "Tracker run name.  [default: network_train]")),
    ("wandb_run_name", _val(str, None, "wandb run name.")),
    ("log_config", _flag("Log the configuration to the trackers.")),
    # samples during training
    ("sample_prompts", _val(EXISTING, None, "Prompt file (.txt/.toml/.json) for samples during training.")),
    ("sample_every_n_steps", _val(int, None, "Sample every N steps.")),
    ("sample_every_n_epochs", _val(int, None, "Sample every N epochs.")),
    ("sample_at_first", _flag("Sample before training.")),
    ("vae", _val(EXISTING, None, "VAE weights (samples).")),
    ("vae_dtype", _val(str, None, "VAE dtype (samples).")),
    ("t5", _val(EXISTING, None, "T5 weights (samples).")),
    ("t5_tokenizer", _val(str, None, "Tokenizer for --t5 (builtin:bytes needs no download).")),
    ("fp8_t5", _flag("fp8 T5 (samples).")),
    ("clip", _val(EXISTING, None, "CLIP weights (i2v samples).")),
    # the config file
    (
        "config_file",
        _val(EXISTING, None, "TOML with the same keys as these options (the command line wins)."),
    ),
]

NOTED: dict[str, tuple[dict[str, Any], str]] = {
    "max_data_loader_n_workers": (_val(int, 8, ""), "cache files are read in the training process"),
    "persistent_data_loader_workers": (_flag(""), "cache files are read in the training process"),
    "split_attn": (_flag(""), "attention already runs per sample length (k_lens)"),
    "guidance_scale": (_val(float, 1.0, ""), "embedded guidance is a HunyuanVideo option; Wan ignores it"),
    "show_timesteps": (_val(str, None, ""), "timestep plots are not drawn"),
    "vae_cache_cpu": (_flag(""), "training uses cached latents"),
    "cuda_allow_tf32": (_flag(""), "applied: TF32 matmuls allowed"),
    "cuda_cudnn_benchmark": (_flag(""), "applied: cudnn.benchmark on"),
    "compile": (_flag(""), "torch.compile is not used for training here"),
    "compile_backend": (_val(str, None, ""), "torch.compile is not used for training here"),
    "compile_mode": (_val(str, None, ""), "torch.compile is not used for training here"),
    "compile_dynamic": (_flag(""), "torch.compile is not used for training here"),
    "compile_fullgraph": (_flag(""), "torch.compile is not used for training here"),
    "compile_cache_size_limit": (_val(int, None, ""), "torch.compile is not used for training here"),
    "dynamo_backend": (_val(str, None, ""), "torch.compile is not used for training here"),
    "dynamo_mode": (_val(str, None, ""), "torch.compile is not used for training here"),
    "dynamo_fullgraph": (_flag(""), "torch.compile is not used for training here"),
    "dynamo_dynamic": (_flag(""), "torch.compile is not used for training here"),
    "ddp_timeout": (_val(int, None, ""), "accelerate's default timeout is used"),
    "ddp_gradient_as_bucket_view": (_flag(""), "accelerate's DDP defaults are used"),
    "ddp_static_graph": (_flag(""), "accelerate's DDP defaults are used"),
    "block_swap_h2d_only": (_flag(""), "the blockswap plugin swaps both ways"),
    "block_swap_ring_size": (_val(int, None, ""), "the blockswap plugin sizes its own slots"),
    "img_in_txt_in_offloading": (_flag(""), "a HunyuanVideo option"),
    "disable_numpy_memmap": (_flag(""), "safetensors files are memory-mapped by safetensors itself"),
    "log_tracker_config": (_val(str, None, ""), "trackers use their defaults"),
    "wandb_api_key": (_val(str, None, ""), "set WANDB_API_KEY in the environment instead"),
    "huggingface_repo_id": (_val(str, None, ""), "nothing is uploaded: this tool never contacts the Hub"),
    "huggingface_repo_type": (_val(str, None, ""), "nothing is uploaded: this tool never contacts the Hub"),
    "huggingface_path_in_repo": (
        _val(str, None, ""),
        "nothing is uploaded: this tool never contacts the Hub",
    ),
    "huggingface_token": (_val(str, None, ""), "nothing is uploaded: this tool never contacts the Hub"),
    "huggingface_repo_visibility": (
        _val(str, None, ""),
        "nothing is uploaded: this tool never contacts the Hub",
    ),
    "save_state_to_huggingface": (_flag(""), "nothing is uploaded: this tool never contacts the Hub"),
    "async_upload": (_flag(""), "nothing is uploaded: this tool never contacts the Hub"),
    "dit_dtype": (
        _val(str, None, ""),
        "the DiT computes in the --mixed_precision dtype (as the seed: taken from the run)",
    ),
}
"""Seed options accepted for compatibility: ``name -> (click settings, why it has no effect)``."""

REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "sage_attn": (
        _flag(""),
        "SageAttention has no backward pass; train with --sdpa (or --xformers/--flash_attn)",
    ),
    "one_frame": (_flag(""), "one-frame (FramePack-style) training is not supported; leave --one_frame out"),
    "resume_from_huggingface": (
        _flag(""),
        "this tool never contacts the Hub; download the state and pass --resume DIR",
    ),
    "force_v2_1_time_embedding": (_flag(""), "a Wan2.2 option; this trainer handles Wan2.1 models"),
    "dit_high_noise": (_val(str, None, ""), "Wan2.2 two-expert training is not supported (Wan2.1 only)"),
    "timestep_boundary": (_val(str, None, ""), "Wan2.2 two-expert training is not supported (Wan2.1 only)"),
    "offload_inactive_dit": (_flag(""), "Wan2.2 two-expert training is not supported (Wan2.1 only)"),
}
"""Seed options that cannot work here: given, they stop the command with the reason."""

MULTI_VALUE = tuple(f"--{name}" for name, kw in OPTIONS if kw.get("multiple"))


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT


def _flatten_toml(doc: dict[str, Any]) -> dict[str, Any]:
    """Sections are flattened (the seed's rule): ``[a] b = 1`` and ``b = 1`` are the same key."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flatten_toml(value))
        else:
            out[key] = value
    return out


def _load_config_file(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """Eager: the TOML's values become the defaults, so anything on the command line wins."""
    if value is None:
        return None
    try:
        values = _flatten_toml(tomllib.loads(Path(value).read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{value} is not valid TOML: {exc}") from None
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(values) - known)
    if unknown:
        raise click.BadParameter(f"{value}: unknown keys {', '.join(unknown)} (keys are the option names)")
    for key, v in list(values.items()):
        if isinstance(v, list) and not any(p.name == key and p.multiple for p in ctx.command.params):
            raise click.BadParameter(f"{value}: {key} takes one value, got a list")
        if not isinstance(v, list) and any(p.name == key and p.multiple for p in ctx.command.params):
            values[key] = [v]
    ctx.default_map = {**(ctx.default_map or {}), **values}
    return value


class TrainCommand(click.Command):
    """Accepts the seed's multi-value options (``--network_args a=1 b=2``) as well as repeats."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, expand_multi_value_options(list(args), MULTI_VALUE))


def _add_options(func):
    for name, kw in reversed(OPTIONS):
        kw = dict(kw)
        if name == "config_file":
            kw.update(is_eager=True, callback=_load_config_file, expose_value=True)
        show = kw.pop("show_default", "default" in kw and kw.get("default") not in (None, "", False))
        func = click.option(f"--{name}", show_default=show, **kw)(func)
    for table in (NOTED, REFUSED):
        for name, (kw, _reason) in table.items():
            func = click.option(f"--{name}", hidden=True, **kw)(func)
    return func


def _attention(options: dict[str, Any]) -> str:
    chosen = [ATTENTION_FLAGS[n] for n in ATTENTION_FLAGS if options.pop(n)]
    if options.get("attn"):
        chosen.insert(0, options["attn"])
    if len(set(chosen)) > 1:
        raise InputError(f"give one attention backend, got {', '.join(dict.fromkeys(chosen))}")
    return chosen[0] if chosen else "sdpa"


def build_config(ctx: click.Context, options: dict[str, Any], log=print):
    """The :class:`~wan_kernel.training.config.TrainConfig` of the parsed options (notes printed)."""
    from wan_kernel.training.config import TrainConfig

    for name, (_kw, reason) in REFUSED.items():
        if _given(ctx, name):
            raise InputError(f"--{name}: {reason}")
    for name, (_kw, reason) in NOTED.items():
        if _given(ctx, name):
            log(
                f"note: --{name} has no effect here: {reason}"
                if not reason.startswith("applied")
                else f"note: --{name}: {reason}"
            )
    if options.get("cuda_allow_tf32"):
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if options.get("cuda_cudnn_benchmark"):
        import torch

        torch.backends.cudnn.benchmark = True
    module = options.pop("network_module")
    if module not in NETWORK_MODULES:
        raise InputError(
            f"--network_module {module}: only networks.lora_wan (a LoRA) is available here; "
            "LoHa/LoKr/LyCORIS "
            "networks are not"
        )
    options["attn"] = _attention(options)
    fields = {a.name for a in attrs.fields(TrainConfig)}
    values = {k: v for k, v in options.items() if k in fields}
    if values.get("network_dim") is None:
        values["network_dim"] = 4
    return TrainConfig(**values)


@click.command(
    "train",
    cls=TrainCommand,
    epilog=EPILOG.format(noted=", ".join(f"--{n}" for n in NOTED)),
    context_settings={"max_content_width": 110},
)
@_add_options
@click.pass_context
@handle_wan_errors
def train(ctx: click.Context, **options: Any) -> None:
    """Train a LoRA for a Wan2.1 DiT from the caches `wan run cache` wrote."""
    from wan_kernel.training.trainer import Trainer

    config = build_config(ctx, options)
    trainer = Trainer(config)
    if config.sample_prompts is not None:
        from wan_kernel.training.samples import SampleHook

        trainer.sample_hook = SampleHook.from_config(config)
    elif config.sample_every_n_steps or config.sample_every_n_epochs or config.sample_at_first:
        trainer.log(
            "note: --sample_every_n_*/--sample_at_first without --sample_prompts: no samples are made"
        )
    trainer.setup()
    try:
        trainer.run()
    except KeyboardInterrupt:
        saved = [p.name for p in trainer.files]
        last = f"the last checkpoint is {saved[-1]}" if saved else "nothing was saved"
        raise WanCliError(
            f"interrupted at step {trainer.global_step}; {last} (in {config.output_dir})", exit_code=130
        ) from None


if __name__ == "__main__":  # pragma: no cover
    train(sys.argv[1:])
