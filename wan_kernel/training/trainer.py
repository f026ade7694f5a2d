"""The LoRA training loop on Hugging Face ``accelerate``: ``train(TrainConfig) -> TrainResult``.

One optimizer step = ``gradient_accumulation_steps`` batches of this process (fewer at the end of
an epoch), each a flow-matching step (:mod:`wan_kernel.training.flow_matching`) on the frozen DiT
with the float32 LoRA (:mod:`wan_kernel.training.network`) hooked into its Linears. The DiT is
built by generation's own stage, :func:`~wan_kernel.pipelines.dit_builder.build_dit` (attention and
quantization plugins resolved once; ``--base_weights`` merged before quantization; block swap
through the offload plugin with ``training=True``) and is not a submodule of what ``accelerate``
prepares: only the LoRA is wrapped for data parallelism, saved in state folders and given to the
optimizer.

Determinism: the order of the batches of an epoch depends only on ``(seed, epoch)``; the noise and
timesteps of a batch come from a generator seeded by ``(seed, epoch, batch index, process)``; the
dropout of the LoRA uses torch's global RNG, whose state is saved in state folders. So a run
stopped after a saved state and resumed with ``--resume`` gives the same LoRA as a run that never
stopped (to the bit on CPU; on GPUs as far as their kernels are deterministic).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import resource
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from wan_kernel.errors import InputError, WanError
from wan_kernel.interfaces import TimestepSamplingConfig
from wan_kernel.training import checkpoint as ckpt
from wan_kernel.training.config import SAVE_PRECISION, TrainConfig, dump_toml
from wan_kernel.training.data import CacheSource, TrainingData, describe_sources, load_batch
from wan_kernel.training.timestep_buckets import epoch_uniforms
from wan_kernel.training.flow_matching import (
    flow_matching_loss,
    loss_weights,
    model_timesteps,
    noisy_latents,
    velocity_target,
)
from wan_kernel.training.metadata import lora_metadata
from wan_kernel.training.network import LoraNetwork, dims_from_weights, network_config_from_args
from wan_kernel.training.optim import build_optimizer, build_scheduler

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingStopped(WanError):
    """Training stopped on a non-finite loss or weights (nothing with NaN was saved)."""


@attrs.define
class TrainResult:
    """What a run did: steps, where the files are, the loss per optimizer step (this run only)."""

    global_step: int
    epoch: int
    output_dir: Path
    files: list[Path]
    final_lora: Path | None
    seconds: float
    peak_memory_bytes: int
    losses: list[float]
    resumed_from: int | None = None


class TrainingModel(nn.Module):
    """What ``accelerate`` prepares: the LoRA as submodule, the frozen DiT as a plain attribute."""

    def __init__(self, network: LoraNetwork, dit: nn.Module):
        super().__init__()
        self.network = network
        object.__setattr__(self, "dit", dit)

    def forward(self, x, t, context, clip_fea=None, y=None):
        return self.dit(x, t, context, clip_fea=clip_fea, y=y)


# --------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------


def data_sources(config: TrainConfig) -> list[CacheSource]:
    """The datasets: from ``--dataset_config`` (the cache step's TOML, read by
    ``wan_kernel.dataset.config``) or plain cache directories."""
    if config.dataset_config is None:
        return [CacheSource(d, config.batch_size, config.num_repeats) for d in config.cache_directories]
    from wan_kernel.dataset.config import load_dataset_config

    group = load_dataset_config(config.dataset_config)
    return [CacheSource(d.cache_directory, d.batch_size, d.num_repeats) for d in group.datasets]


def check_caches(data: TrainingData, dit_config, task: str) -> None:
    """The caches fit the DiT: text width, latent channels, image conditioning (i2v/flf2v)."""
    needs_image = dit_config.has_image_input
    for item in data.all_items():
        name = item.latent_path
        if item.text_dim != dit_config.text_dim:
            raise InputError(
                f"{item.text_path}: text embeddings are {item.text_dim} wide but the DiT ({task}) takes "
                f"{dit_config.text_dim}; re-create the text cache with the matching T5"
            )
        channels = item.latent_shape[0]
        if needs_image and item.image_key is None:
            raise InputError(
                f"{name} has no image latents (latents_image_*), but the DiT is {dit_config.describe()} "
                f"({task}); cache with wan run cache --clip ... (image-to-video caches)"
            )
        if needs_image and item.clip_key is None:
            raise InputError(f"{name} has no CLIP features (clip_*); cache with --clip for {task}")
        if not needs_image and (item.image_key is not None or item.clip_key is not None):
            raise InputError(
                f"{name} is an image-to-video cache (latents_image / clip), but the DiT is "
                f"{dit_config.describe()} ({task}); train an i2v-14B DiT on it, or re-cache without --clip"
            )
        image_channels = item.image_key and 20 or 0
        if channels + image_channels != dit_config.in_dim:
            raise InputError(
                f"{name}: latents with {channels}{' + 20 image' if image_channels else ''} channels "
                f"do not fit "
                f"the DiT's in_dim {dit_config.in_dim}"
            )
        if needs_image and item.clip_shape is not None:
            tokens = math.prod(item.clip_shape[:-1])
            if tokens != dit_config.image_tokens:
                raise InputError(
                    f"{name}: CLIP features {list(item.clip_shape)} do not fit {task} "
                    f"({dit_config.image_tokens} image tokens)"
                )


def task_of(dit_config) -> str:
    """The task name of a DiT config (``t2v-1.3B`` for the 1.3B width, else the 14B names)."""
    if dit_config.model_type == "t2v":
        return "t2v-1.3B" if dit_config.dim == 1536 else "t2v-14B"
    return f"{dit_config.model_type}-14B"


def _batch_seed(seed: int, epoch: int, index: int, rank: int) -> int:
    digest = hashlib.sha256(f"wan-train-noise:{seed}:{epoch}:{index}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _log_with(config: TrainConfig) -> list[str] | None:
    if config.log_with is None and config.logging_dir is None:
        return None
    wanted = config.log_with or "tensorboard"
    if wanted not in ("tensorboard", "wandb", "all"):
        raise InputError(f"--log_with must be tensorboard, wandb or all, got {wanted!r}")
    import importlib.util

    out = []
    if wanted in ("tensorboard", "all"):
        if importlib.util.find_spec("tensorboard") is None:
            raise InputError("--log_with tensorboard needs tensorboard: pip install tensorboard")
        if config.logging_dir is None:
            raise InputError("--log_with tensorboard needs --logging_dir (where the event files go)")
        out.append("tensorboard")
    if wanted in ("wandb", "all"):
        if importlib.util.find_spec("wandb") is not None:
            out.append("wandb")
        elif wanted == "wandb":
            raise InputError("--log_with wandb needs wandb: pip install wandb")
    return out


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything for one :class:`TrainConfig` and runs it (:meth:`run`)."""

    def __init__(self, config: TrainConfig, *, log: Callable[[str], None] = print, accelerator=None):
        self.config = config
        self._log = log
        self.accelerator = accelerator or self._make_accelerator()
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.files: list[Path] = []
        self.session_id = uuid.uuid4().hex
        self.started_at = time.time()
        self.sample_hook: Callable[..., None] | None = None

    def log(self, message: str) -> None:
        if self.is_main:
            self._log(message)

    # -- set-up -------------------------------------------------------------------------------

    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState
        from accelerate.utils import DistributedDataParallelKwargs

        config = self.config
        net_args = " ".join(config.network_args)
        handlers = [DistributedDataParallelKwargs(find_unused_parameters="module_dropout" in net_args)]
        # one run per Accelerator: forget the settings of an earlier run in this process (the
        # process group, PartialState, is kept)
        AcceleratorState._reset_state()
        GradientState._reset_state()
        try:
            return Accelerator(
                cpu=not torch.cuda.is_available(),  # lets torchrun/gloo start several CPU processes
                mixed_precision=config.mixed_precision,
                log_with=_log_with(config),
                project_dir=str(config.logging_dir) if config.logging_dir else None,
                kwargs_handlers=handlers,
            )
        except ValueError as exc:  # e.g. fp16 without a GPU
            raise InputError(
                f"--mixed_precision {config.mixed_precision or '(from accelerate)'}: {exc}"
            ) from None

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from wan_kernel.lora import LoraSpec
        from wan_kernel.files import check_output_folder
        from wan_kernel.models.dit_loading import read_dit
        from wan_kernel.pipelines.dit_builder import build_dit
        from wan_kernel.pipelines.model_sources import ReadDiT
        from wan_kernel.pipelines.plugin_setup import resolve_quantizer
        from wan_kernel.plugins import resolve

        cfg, acc = self.config, self.accelerator
        self.seed = cfg.seed
        if self.seed is None:  # one random seed for all processes: they must agree on the data order
            from accelerate.utils import broadcast_object_list

            self.seed = broadcast_object_list([random.SystemRandom().randrange(1 << 31)])[0]
        set_seed(self.seed)

        # the output folder and the data first: both fail before a 14B model is loaded
        if self.is_main:
            check_output_folder(cfg.output_dir, what="--output_dir")
        self.data = TrainingData.scan(data_sources(cfg), warn=self.log)
        self.batches_per_epoch = self.data.batches_per_process(acc.num_processes)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation_steps)
        if cfg.max_train_epochs is not None:
            self.max_steps = cfg.max_train_epochs * self.steps_per_epoch
        else:
            self.max_steps = cfg.max_train_steps
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)

        # plugins, resolved once
        attention = resolve("attention", cfg.attn)
        if not getattr(attention, "supports_backward", True):
            raise InputError(f"attention {cfg.attn!r} cannot train (no backward); use --sdpa for training")
        quant_name = cfg.quantization
        quant = resolve_quantizer(quant_name, target="dit")  # None stays None; fp8_t5 is refused
        self.sampler = resolve("timestep_sampling", cfg.timestep_sampling)
        self.timestep_config = TimestepSamplingConfig(
            discrete_flow_shift=cfg.discrete_flow_shift,
            sigmoid_scale=cfg.sigmoid_scale,
            weighting_scheme=cfg.weighting_scheme,
            logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std,
            mode_scale=cfg.mode_scale,
            min_timestep=cfg.min_timestep,
            max_timestep=cfg.max_timestep,
            preserve_distribution_shape=cfg.preserve_distribution_shape,
        )
        swap = cfg.blocks_to_swap or 0
        offloader = None
        if swap:
            if self.device.type != "cuda":
                raise InputError(
                    f"--blocks_to_swap moves DiT blocks between host memory and a CUDA GPU; this process "
                    f"runs on {self.device.type}. Leave --blocks_to_swap out here"
                )
            offloader = resolve("offload", "blockswap")

        # the frozen DiT
        self.mixed_precision = str(acc.mixed_precision)  # the option, else the launcher's setting
        dtype = DTYPES[self.mixed_precision]
        multipliers = cfg.base_weights_multiplier or (1.0,)
        base = [
            LoraSpec(p, multiplier=multipliers[i] if len(multipliers) > 1 else multipliers[0])
            for i, p in enumerate(cfg.base_weights)
        ]
        # read once (memory-mapped): the caches are checked against it before anything is loaded
        dit_file = read_dit(cfg.dit)
        self.task = cfg.task or task_of(dit_file.config)
        check_caches(self.data, dit_file.config, self.task)
        num_layers = dit_file.config.num_layers
        if swap and swap > num_layers - 1:  # refused before the model is loaded
            raise InputError(
                f"--blocks_to_swap {swap} is too many for {num_layers} blocks (max {num_layers - 1})"
            )
        self.log(f"loading DiT {cfg.dit}" + (f" ({quant_name})" if quant_name else ""))
        # generation's DiT stage, so a training run and `wan run generate` build the DiT alike:
        # --base_weights merged into the high-precision weights before any quantization, then the
        # blocks handed to the offloader (told the model will be trained)
        dit = build_dit(
            ReadDiT(dit_file, task=cfg.task),
            device=self.device,
            dtype=dtype,
            attention=attention,
            quantizer=quant,
            loras=base,
            offloader=offloader,
            blocks_to_swap=swap,
            training=True,
            pin_memory=cfg.use_pinned_memory_for_block_swap,
            log=self.log,
        )
        del dit_file

        # the LoRA
        net_cfg = network_config_from_args(
            cfg.network_dim, cfg.network_alpha, cfg.network_dropout, cfg.network_args
        )
        initial = self._read_network_weights() if cfg.network_weights else None
        dims = alphas = None
        if cfg.dim_from_weights:
            if initial is None:
                raise InputError(
                    "--dim_from_weights needs --network_weights (the file to take the ranks from)"
                )
            dims, alphas = dims_from_weights(initial)
        network = LoraNetwork(dit, net_cfg, dims=dims, alphas=alphas)
        if initial is not None:
            unmatched = network.load_kohya_state_dict(initial, source=str(cfg.network_weights))
            self.log(
                f"LoRA weights from {cfg.network_weights}"
                + (f"; {len(unmatched)} modules had no target" if unmatched else "")
            )
        network.to(self.device)
        network.attach(dit)
        dit.enable_gradient_checkpointing(cfg.gradient_checkpointing)
        self.dit, self.network, self.net_cfg = dit, network, net_cfg
        self.log(
            f"task {self.task}: LoRA rank {net_cfg.dim} alpha {net_cfg.alpha:g} "
            f"on {len(network.loras)} modules "
            f"({sum(p.numel() for p in network.parameters()):,} parameters)"
        )

        # optimisation
        groups = network.param_groups(cfg.learning_rate)
        optimizer, self.optimizer_name = build_optimizer(
            cfg.optimizer_type, groups, cfg.learning_rate, cfg.optimizer_args
        )
        self.scheduler = build_scheduler(
            optimizer,
            name=cfg.lr_scheduler,
            total_steps=self.max_steps,
            warmup=cfg.lr_warmup_steps,
            decay_steps=cfg.lr_decay_steps,
            num_cycles=cfg.lr_scheduler_num_cycles,
            power=cfg.lr_scheduler_power,
            timescale=cfg.lr_scheduler_timescale,
            min_lr_ratio=cfg.lr_scheduler_min_lr_ratio,
            scheduler_type=cfg.lr_scheduler_type or None,
            scheduler_args=cfg.lr_scheduler_args,
        )
        self.model, self.optimizer = acc.prepare(TrainingModel(network, dit), optimizer)
        acc.register_for_checkpointing(self.scheduler)

        # where things go
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        self.global_step, self.start_epoch, self.start_batch = 0, 0, 0
        self.resumed_from = None
        if cfg.resume is not None:
            self._resume(cfg.resume)

    def _read_network_weights(self) -> dict[str, torch.Tensor]:
        """``--network_weights`` as a kohya state dict (any layout ``wan_kernel.lora.read_lora`` reads)."""
        from wan_kernel.lora import kohya_name, read_lora

        path = self.config.network_weights
        lora = read_lora(path)
        sd = {}
        for target, module in lora.by_official_path.items():
            if module.kind != "lora" or module.is_dora:
                raise InputError(
                    f"--network_weights {path}: {module.name} is a "
                    f"{'DoRA' if module.is_dora else module.kind} "
                    "module; training continues plain LoRAs only"
                )
            name = kohya_name(target)
            sd[f"{name}.lora_down.weight"] = module.get("down")
            sd[f"{name}.lora_up.weight"] = module.get("up")
            if module.alpha is not None:
                sd[f"{name}.alpha"] = torch.tensor(float(module.alpha))
        if not sd:
            raise InputError(f"--network_weights {path}: no module of it targets the Wan DiT")
        return sd

    def _resume(self, state_dir: Path) -> None:
        state = ckpt.read_train_state(state_dir)
        if state["seed"] != self.seed and self.config.seed is not None:
            self.log(f"note: the state was trained with --seed {state['seed']}; continuing with its seed")
        self.seed = int(state["seed"])
        saved_processes = int(state.get("num_processes", 1))
        if saved_processes != self.accelerator.num_processes:
            self.log(
                f"note: the state was saved by {saved_processes} process(es), this run has "
                f"{self.accelerator.num_processes}: the batches of the current epoch are shared out anew, "
                "so the "
                "run continues from the same step but is not the one an uninterrupted run would have made"
            )
        self.accelerator.load_state(str(state_dir))
        self.global_step = int(state["global_step"])
        self.start_epoch = int(state["epoch"])
        self.start_batch = int(state["batches_done_in_epoch"])
        if self.start_batch >= self.batches_per_epoch:
            self.start_epoch, self.start_batch = self.start_epoch + 1, 0
        self.resumed_from = self.global_step
        self.log(f"resumed at step {self.global_step} (epoch {self.start_epoch + 1})")

    # -- one step -----------------------------------------------------------------------------

    def batch_loss(
        self, batch: dict[str, Any], generator: torch.Generator, uniform: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The flow-matching loss of one batch (noise and timesteps drawn from ``generator``; the
        timesteps from the stratified numbers ``uniform`` ``[B]`` instead when given)."""
        x0 = batch["latents"].float()  # [B, 16, F, H, W]
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        t = self.sampler.sample(
            b, config=self.timestep_config, latent_shape=tuple(x0.shape), generator=generator, uniform=uniform
        )
        weights = loss_weights(self.sampler, t, self.timestep_config)
        x0, noise, t, weights = (v.to(self.device) for v in (x0, noise, t, weights))
        x_t = noisy_latents(x0, noise, t)
        context = [c.to(self.device) for c in batch["t5"]]
        y = batch.get("latents_image")
        clip = batch.get("clip")
        offload = (
            torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
            if self.config.gradient_checkpointing_cpu_offload
            else contextlib.nullcontext()
        )
        with offload:
            pred = self.model(
                x_t,
                model_timesteps(t),
                context,
                clip_fea=None if clip is None else clip.to(self.device),
                y=None if y is None else y.to(self.device),
            )
        return flow_matching_loss(pred, velocity_target(x0, noise), weights)

    def _apply_max_norm(self) -> None:
        """``--scale_weight_norms``: scale each LoRA whose ``||up @ down|| * scale`` exceeds the bound."""
        bound = self.config.scale_weight_norms
        with torch.no_grad():
            for lora in self.network.loras.values():
                up, down = lora.lora_up.weight, lora.lora_down.weight
                norm = (up @ down).norm() * lora.scale
                if norm > bound:
                    ratio = (bound / norm).sqrt()
                    up.mul_(ratio)
                    down.mul_(ratio)

    # -- saving -------------------------------------------------------------------------------

    def _metadata(self, *, step: int, epoch: int, final: bool) -> dict[str, str] | None:
        if self.config.no_metadata:
            return None
        shapes = sorted({item.latent_shape[1:] for item in self.data.all_items()})
        _, h, w = shapes[0]
        return lora_metadata(
            self.config,
            session_id=self.session_id,
            started_at=self.started_at,
            network_dim=self.net_cfg.dim,
            network_alpha=self.net_cfg.alpha,
            optimizer_name=self.optimizer_name,
            num_train_items=self.data.num_items,
            num_batches_per_epoch=self.batches_per_epoch,
            num_epochs=self.num_epochs,
            max_train_steps=self.max_steps,
            seed=self.seed,
            datasets_json=describe_sources(self.data),
            task=self.task,
            step=step,
            epoch=epoch,
            resolution=f"{w * 8}x{h * 8}",
            final=final,
            mixed_precision=self.mixed_precision,
        )

    def save_lora(self, name: str, *, epoch: int, final: bool = False) -> Path | None:
        """Rank 0 writes ``NAME.safetensors`` (atomically); every process waits for it."""
        path = self.config.output_dir / f"{name}.safetensors"
        if self.is_main:
            dtype = getattr(torch, SAVE_PRECISION[self.config.save_precision])
            tensors = self.network.kohya_state_dict(dtype)
            ckpt.save_lora(path, tensors, self._metadata(step=self.global_step, epoch=epoch, final=final))
            self.files.append(path)
            self.log(f"saved {path}")
        self.accelerator.wait_for_everyone()
        return path

    def save_state(self, name: str, *, epoch: int, batches_done: int) -> Path:
        """Every process writes its part of ``NAME`` through a temporary folder; rank 0 publishes it."""
        acc = self.accelerator
        final = self.config.output_dir / name
        tmp = final.with_name(f".{final.name}.tmp")
        if self.is_main:
            ckpt.new_state_dir(final)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if self.is_main:
            ckpt.write_json_atomic(
                tmp / ckpt.TRAIN_STATE_FILE,
                {
                    "version": ckpt.TRAIN_STATE_VERSION,
                    "global_step": self.global_step,
                    "epoch": epoch,
                    "batches_done_in_epoch": batches_done,
                    "seed": self.seed,
                    "num_processes": acc.num_processes,
                    "output_name": self.config.output_name,
                    "saved_at": ckpt.now_iso(),
                },
            )
            ckpt.publish_state_dir(tmp, final)
            self.files.append(final)
            self.log(f"saved state {final}")
        acc.wait_for_everyone()
        return final

    def _prune(self, kind: str, current: int) -> None:
        if not self.is_main:
            return
        cfg = self.config
        out, name = cfg.output_dir, cfg.output_name
        keep = cfg.save_last_n_epochs if kind == "epoch" else cfg.save_last_n_steps
        keep_state = cfg.save_last_n_epochs_state if kind == "epoch" else cfg.save_last_n_steps_state
        for path in ckpt.prune(out, name, kind=kind, keep=keep, current=current, state=False):
            self.log(f"removed {path.name} (--save_last_n_{kind}s)")
        for path in ckpt.prune(out, name, kind=kind, keep=keep_state or keep, current=current, state=True):
            self.log(f"removed {path.name} (--save_last_n_{kind}s_state)")

    def save_effective_config(self) -> Path | None:
        if not self.is_main:
            return None
        path = self.config.output_dir / f"{self.config.output_name}_config.toml"
        values = self.config.to_dict()
        values["seed"] = self.seed
        values.pop("show_progress", None)
        values = {k: v for k, v in values.items() if v not in (None, [], "")}
        ckpt.write_bytes_atomic(path, dump_toml(values).encode())
        return path

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        self.save_effective_config()
        if acc.log_with:
            acc.init_trackers(
                cfg.log_tracker_name or "network_train", config={"seed": self.seed, "task": self.task}
            )
        start = time.time()
        losses: list[float] = []
        recent: list[float] = []
        self.log(
            f"{self.data.num_items} items, {self.batches_per_epoch} batches per epoch and process, "
            f"{self.steps_per_epoch} steps per epoch, {self.max_steps} steps ({self.num_epochs} epochs), "
            f"{acc.num_processes} process(es), seed {self.seed}"
        )
        progress = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            disable=not (self.is_main and cfg.show_progress),
            desc="steps",
            dynamic_ncols=True,
        )
        if cfg.sample_at_first and self.sample_hook is not None and self.resumed_from is None:
            self.sample_hook(self, epoch=0, step=0, at="step")
        self.model.train()
        epoch = self.start_epoch
        position = self.start_batch
        last = (epoch, position)  # where the next step starts: (epoch, batches done in it)
        done = self.global_step >= self.max_steps
        ga = cfg.gradient_accumulation_steps
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        while not done and epoch < self.num_epochs:
            batches = self.data.process_batches(self.seed, epoch, acc.process_index, acc.num_processes)
            position = self.start_batch if epoch == self.start_epoch else 0
            while position < len(batches) and not done:
                group = range(position, min(position + ga, len(batches)))
                value = self._optimizer_step(batches, group, epoch, trainable)
                position = group[-1] + 1
                last = (epoch, position)
                losses.append(value)
                recent = (recent + [value])[-100:]
                self._report(progress, value, sum(recent) / len(recent), epoch)
                done = self.global_step >= self.max_steps
                if not done:
                    self._after_step(epoch, position)
            epoch += 1
            if position >= len(batches) and not done:  # a whole epoch, and not the end of training
                self._after_epoch(epoch)
        progress.close()

        final_epoch = last[0] + 1
        final = self.save_lora(cfg.output_name, epoch=final_epoch, final=True)
        if cfg.save_state or cfg.save_state_on_train_end:
            self.save_state(f"{cfg.output_name}-state", epoch=last[0], batches_done=last[1])
        if self.sample_hook and (cfg.sample_every_n_epochs or cfg.sample_every_n_steps):
            self.sample_hook(
                self,
                epoch=final_epoch,
                step=self.global_step,
                at="epoch" if cfg.sample_every_n_epochs else "step",
            )
        acc.end_training()
        seconds = time.time() - start
        peak = _peak_memory(self.device)
        self.log(
            f"done: {self.global_step} steps in {seconds:.1f} s, peak memory {peak / 2**30:.2f} GiB"
            f"{' (GPU)' if self.device.type == 'cuda' else ' (process RSS)'}; LoRA {final}; "
            f"files in {cfg.output_dir}"
        )
        return TrainResult(
            global_step=self.global_step,
            epoch=final_epoch,
            output_dir=cfg.output_dir,
            files=list(self.files),
            final_lora=final,
            seconds=seconds,
            peak_memory_bytes=peak,
            losses=losses,
            resumed_from=self.resumed_from,
        )

    def _after_step(self, epoch: int, position: int) -> None:
        """Checkpoints and samples due after an optimizer step (not the last one)."""
        cfg, step = self.config, self.global_step
        if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
            name = ckpt.step_name(cfg.output_name, step)
            self.save_lora(name, epoch=epoch + 1)
            if cfg.save_state:
                self.save_state(f"{name}-state", epoch=epoch, batches_done=position)
            self._prune("step", step)
        if self.sample_hook and cfg.sample_every_n_steps and step % cfg.sample_every_n_steps == 0:
            self.sample_hook(self, epoch=epoch + 1, step=step, at="step")

    def _after_epoch(self, epochs_done: int) -> None:
        """Checkpoints and samples due after a whole epoch (not the last one)."""
        cfg = self.config
        if cfg.save_every_n_epochs and epochs_done % cfg.save_every_n_epochs == 0:
            name = ckpt.epoch_name(cfg.output_name, epochs_done)
            self.save_lora(name, epoch=epochs_done)
            if cfg.save_state:
                self.save_state(f"{name}-state", epoch=epochs_done, batches_done=0)
            self._prune("epoch", epochs_done)
        if self.sample_hook and cfg.sample_every_n_epochs and epochs_done % cfg.sample_every_n_epochs == 0:
            self.sample_hook(self, epoch=epochs_done, step=self.global_step, at="epoch")

    def _optimizer_step(self, batches, group: range, epoch: int, trainable: list) -> float:
        """Forward/backward of the batches ``group`` of this epoch, then one optimizer step; the mean loss."""
        acc, cfg = self.accelerator, self.config
        step_loss = torch.zeros((), device=self.device)
        uniforms = self._timestep_uniforms(batches, epoch)
        for k, index in enumerate(group):
            generator = torch.Generator().manual_seed(_batch_seed(self.seed, epoch, index, acc.process_index))
            sync = contextlib.nullcontext() if k == len(group) - 1 else acc.no_sync(self.model)
            with sync:
                uniform = None if uniforms is None else uniforms[index]
                loss = self.batch_loss(load_batch(batches[index]), generator, uniform) / len(group)
                acc.backward(loss)
            step_loss += loss.detach()
        mean_loss = acc.reduce(step_loss.clone(), reduction="mean")
        if not torch.isfinite(mean_loss):
            raise TrainingStopped(self._stop_message(f"the loss is {mean_loss.item()}", epoch))
        if acc.sync_gradients and cfg.max_grad_norm:
            acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.scale_weight_norms:
            self._apply_max_norm()
        if not all(bool(torch.isfinite(p).all()) for p in trainable):
            raise TrainingStopped(self._stop_message("the LoRA weights became non-finite", epoch))
        self.global_step += 1
        return float(mean_loss)

    def _timestep_uniforms(self, batches, epoch: int) -> list[torch.Tensor] | None:
        """``--num_timestep_buckets``: this process's stratified numbers of ``epoch``, one per batch
        (built once per epoch; a pure function of the seed, epoch and process, so resume repeats them)."""
        buckets = self.config.num_timestep_buckets or 0
        if buckets < 2:
            return None
        if getattr(self, "_uniforms_epoch", None) != epoch:
            self._uniforms = epoch_uniforms(
                [len(b) for b in batches], buckets, seed=self.seed, epoch=epoch,
                rank=self.accelerator.process_index,
            )
            self._uniforms_epoch = epoch
        return self._uniforms

    def _report(self, progress, value: float, average: float, epoch: int) -> None:
        cfg, acc = self.config, self.accelerator
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        if any(lr is None for lr in lrs):  # AdaFactor with relative_step: its schedule knows the rate
            lrs = list(self.scheduler.get_lr())
        progress.update(1)
        progress.set_postfix(loss=f"{value:.4f}", avg=f"{average:.4f}", lr=f"{lrs[0]:.2e}", epoch=epoch + 1)
        if acc.trackers:
            logs = {"loss/current": value, "loss/average": average}
            logs.update({f"lr/group{i}": float(lr) for i, lr in enumerate(lrs)})
            acc.log({f"{cfg.log_prefix or ''}{k}": v for k, v in logs.items()}, step=self.global_step)

    def _stop_message(self, what: str, epoch: int) -> str:
        saved = [p.name for p in self.files]
        last = f"the last complete checkpoint is {saved[-1]}" if saved else "nothing was saved in this run"
        return (
            f"training stopped at step {self.global_step + 1} (epoch {epoch + 1}): {what}. Nothing of this "
            f"step was saved; {last}. Lower --learning_rate, set --max_grad_norm, or check the caches"
        )


def train(config: TrainConfig, *, log: Callable[[str], None] = print, sample_hook=None) -> TrainResult:
    """Run one training job; see the module docstring."""
    trainer = Trainer(config, log=log)
    trainer.sample_hook = sample_hook
    trainer.setup()
    return trainer.run()
