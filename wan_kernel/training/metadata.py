"""Metadata written into trained LoRA files: the seed's ``ss_*`` training keys and SAI ``modelspec.*``."""

from __future__ import annotations

import json
import time
from typing import Any

from wan_kernel.training.checkpoint import now_iso

MODELSPEC_VERSION = "1.0.0"
ARCHITECTURE = "wan2.1/lora"
IMPLEMENTATION = "https://github.com/Wan-Video/Wan2.1"


def lora_metadata(
    config: Any,
    *,
    session_id: str,
    started_at: float,
    network_dim: int,
    network_alpha: float,
    optimizer_name: str,
    num_train_items: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    max_train_steps: int,
    seed: int,
    datasets_json: str,
    task: str,
    step: int,
    epoch: int,
    resolution: str,
    final: bool,
    mixed_precision: str,
) -> dict[str, str]:
    """All metadata keys for one saved LoRA (strings)."""
    title = config.metadata_title or config.output_name
    meta: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": config.output_name,
        "ss_learning_rate": config.learning_rate,
        "ss_num_train_items": num_train_items,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_gradient_accumulation_steps": config.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": config.lr_warmup_steps,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_network_module": "networks.lora_wan",
        "ss_network_dim": network_dim,
        "ss_network_alpha": network_alpha,
        "ss_network_dropout": config.network_dropout,
        "ss_network_args": json.dumps(list(config.network_args)) if config.network_args else None,
        "ss_mixed_precision": mixed_precision,
        "ss_seed": seed,
        "ss_training_comment": config.training_comment,
        "ss_optimizer": optimizer_name
        + (f"({','.join(config.optimizer_args)})" if config.optimizer_args else ""),
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_fp8_base": config.fp8_base,
        "ss_fp8_scaled": config.fp8_scaled,
        "ss_timestep_sampling": config.timestep_sampling,
        "ss_sigmoid_scale": config.sigmoid_scale,
        "ss_discrete_flow_shift": config.discrete_flow_shift,
        "ss_weighting_scheme": config.weighting_scheme,
        "ss_min_timestep": config.min_timestep,
        "ss_max_timestep": config.max_timestep,
        "ss_dit_name": config.dit.name,
        "ss_task": task,
        "ss_datasets": datasets_json,
        "ss_base_weights": json.dumps([str(p) for p in config.base_weights]) if config.base_weights else None,
        "ss_steps": step,
        "ss_epoch": epoch,
        "ss_training_finished_at": time.time() if final else None,
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": config.metadata_arch or ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title if final else f"{title} step {step}",
        "modelspec.resolution": config.metadata_reso or resolution,
        "modelspec.date": now_iso(),
        "modelspec.author": config.metadata_author,
        "modelspec.description": config.metadata_description,
        "modelspec.license": config.metadata_license,
        "modelspec.tags": config.metadata_tags,
    }
    return {k: str(v) for k, v in meta.items() if v is not None}
