"""Stage: build the DiT a run denoises with: load it (quantized while loading), merge LoRAs,
attach block offload, compile the blocks. Every plugin arrives already resolved."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch

from wan_kernel.errors import InputError
from wan_kernel.models.weights import check_finite_weights
from wan_kernel.pipelines.model_sources import DiTSource


def lora_support():
    """The ``wan_kernel.lora`` module, or an :class:`InputError` when this install lacks it."""
    if importlib.util.find_spec("wan_kernel.lora") is None:
        raise InputError(
            "--lora_weight needs LoRA support (wan_kernel.lora), which this install does not have"
        )
    from wan_kernel import lora

    return lora


def lora_specs(
    paths: Sequence[str],
    multipliers: Sequence[float] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list:
    """One :class:`wan_kernel.lora.LoraSpec` per LoRA file (the options pair up by position, as the
    seed's ``--lora_weight``/``--lora_multiplier``/``--include_patterns``/``--exclude_patterns``)."""
    if not paths:
        return []
    return lora_support().specs_from_options(paths, multipliers, include, exclude)


def build_dit(
    models: DiTSource,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    attention: Callable | None,
    quantizer: Any = None,
    loras: Sequence[Any] = (),
    lora_strict: bool = False,
    offloader: Any = None,
    blocks_to_swap: int = 0,
    training: bool = False,
    pin_memory: bool = True,
    compile: bool = False,
    log: Callable[[str], None] = print,
) -> torch.nn.Module:
    """The DiT ready to denoise on ``device``.

    :param models: where the DiT comes from (``models.load_dit``): a :class:`ModelSource`, or a
        :class:`~wan_kernel.pipelines.model_sources.ReadDiT` (a DiT file already read, for training).
    :param device: the compute device.
    :param dtype: the compute dtype (``None``: the file's).
    :param attention: a resolved attention implementation (``None``: the model's default, SDPA).
    :param quantizer: a resolved ``Quantizer`` for the DiT, applied while loading, or ``None``.
    :param loras: LoRA specs (``wan_kernel.lora.LoraSpec``, paths or mappings): merged while
        loading, in float32 on ``device``, into the official-layout weights before any
        quantization (``load_dit(..., state_dict_transform=LoraMerge(loras))``).
    :param lora_strict: a LoRA tensor that matches nothing in the DiT is an error, not a warning.
    :param offloader: a resolved offload implementation (its ``attach(blocks, device=,
        blocks_to_swap=, training=)``): the model is loaded on the CPU and only the non-block
        parts move to ``device``; the runner swaps blocks in during the forward.
    :param blocks_to_swap: blocks kept off ``device`` (with ``offloader``).
    :param training: the DiT will be trained (backward passes): the offloader is told so, so that its
        runner also swaps blocks during the backward. What else training needs (the trainable
        network, gradient checkpointing) is the trainer's, set on the module this returns.
    :param pin_memory: the offloader keeps the swapped weights in pinned host memory.
    :param compile: ``torch.compile`` each transformer block.
    :param log: receives the LoRA merge summaries.
    """
    offload = offloader is not None
    extra = {}
    if loras:
        # the one LoRA route: merged into the weights as they are read, before any quantizer
        extra["state_dict_transform"] = lora_support().LoraMerge(
            loras, strict=lora_strict, log=log, device=device, dtype=dtype
        )
    dit = models.load_dit(
        device=torch.device("cpu") if offload else device,
        dtype=dtype,
        attention=attention,
        quant=quantizer,
        **extra,
    )
    if loras:  # whatever the model source: a merge that overflowed is refused before a single step
        check_finite_weights(
            dict(dit.named_parameters()),
            "the DiT with the LoRAs merged in (a multiplier too large, or a LoRA holding NaN?)",
        )
    if offload:
        for name, child in dit.named_children():
            if name != "blocks":
                child.to(device)
        runner = offloader.attach(
            dit.blocks, device=device, blocks_to_swap=blocks_to_swap, training=training, pin_memory=pin_memory
        )
        dit.set_block_runner(runner)
        runner.prepare()
    if compile:
        for block in dit.blocks:
            block.compile()
    return dit


__all__ = ["build_dit", "lora_specs", "lora_support"]
