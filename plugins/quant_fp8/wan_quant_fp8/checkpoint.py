"""Quantize a live model, write a quantized model to safetensors, and read the file's tag back.

A file written by :func:`save_quantized` holds the model's state dict as stored (fp8 weights,
``scale_weight`` tensors, high-precision rest, same key names; a tied tensor under its first name
only) plus the safetensors metadata
``{"wan_quant": <mode>, "wan_quant_version": "1"}``. Loading it with the same mode
(``load_dit(path, quant="fp8_scaled")``) skips quantization: the fp8 tensors pass through
``quantize_state_dict`` unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from wan_kernel.errors import InputError
from wan_kernel.files import save_safetensors
from wan_quant_fp8.linear import Fp8Linear, convert_linears
from wan_quant_fp8.scheme import METADATA_FORMAT, METADATA_VERSION, SCHEMES, Fp8Scheme
from wan_quant_fp8.tensors import quantize_state_dict

FORMAT_VERSION = "1"


def quantize_model(
    model: nn.Module, mode: str | Fp8Scheme, *, target: str, device: torch.device | str | None = None
) -> nn.Module:
    """Quantize an already loaded ``target`` model in place (state dict -> swap -> quantize -> assign).

    The loaders do the same on a ``meta`` model while reading the file; this is for models built
    in memory (tests, benchmarks). ``device``: where to quantize and put the new tensors (default:
    where the model's first parameter is).
    """
    scheme = _scheme(mode)
    state = model.state_dict()
    if device is None:
        device = next(iter(state.values())).device if state else torch.device("cpu")
    convert_linears(model, scheme, target=target)
    stored = quantize_state_dict(state, scheme, target=target, device=device)
    del state
    expected = model.state_dict()
    stored = {k: v.to(device=device) if k in expected else v for k, v in stored.items()}
    model.load_state_dict(stored, strict=True, assign=True)
    return model


def quantized_mode_of(model: nn.Module) -> str | None:
    """The mode a model's fp8 layers were made with (``None`` when it has none)."""
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    if not layers:
        return None
    if any(m.use_scaled_mm for m in layers):
        return "fp8_fast"
    if all(m.scale_weight is None for m in layers):
        return "fp8"
    return "fp8_scaled"


def save_quantized(model: nn.Module, path: str | os.PathLike, *, mode: str | None = None) -> Path:
    """Write a quantized model (fp8 weights + scales + high-precision rest) as one safetensors file.

    A tensor the model holds under two names (tied weights: the T5's ``shared.weight`` and
    ``encoder.embed_tokens.weight``) is written once, under its first name in ``state_dict()``
    order; the kernel's T5 loader ties it again. safetensors refuses to write shared tensors.

    :param mode: the tag to record (default: read off the model's layers; pass ``fp8_t5`` for a T5).
    :returns: the path written. The write is atomic and replaces ``path``
        (:func:`wan_kernel.files.save_safetensors`: a hidden temporary renamed into place).
    :raises InputError: the model has no fp8 layers (quantize it or load it with ``quant=`` first).
    :raises OutputError: the folder cannot be written, or the disk filled up.
    """
    found = quantized_mode_of(model)
    if found is None:
        raise InputError(
            "this model has no fp8 layers; load it with quant='fp8_scaled' (or fp8) "
            "before saving it quantized"
        )
    mode = mode or found
    if mode not in SCHEMES:
        raise InputError(f"unknown fp8 mode {mode!r}; known: {', '.join(SCHEMES)}")
    tensors = _tensors_to_save(model)
    metadata = {METADATA_FORMAT: mode, METADATA_VERSION: FORMAT_VERSION}
    return save_safetensors(Path(path).expanduser(), tensors, metadata, exclusive=False)


def _tensors_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, each tensor once.

    A name whose tensor is exactly an earlier one (same storage, offset, shape and strides: a tied
    weight) is left out. Other views of one storage (e.g. the parts of a fused projection) are
    distinct tensors and are all kept.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, value in model.state_dict().items():
        if value.is_meta:
            raise InputError(f"{key} has no data (still on the meta device); load the weights before saving")
        value = value.detach()
        if value.numel():
            ident = (
                value.device,
                value.untyped_storage().data_ptr(),
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
                value.dtype,
            )
            if ident in seen:
                continue  # tied to a name written already
            seen.add(ident)
        tensors[key] = value.to("cpu").contiguous()
    return tensors


def read_quantization_tag(path: str | os.PathLike) -> str | None:
    """The mode recorded by :func:`save_quantized` in a safetensors file (``None``: no tag)."""
    from wan_kernel.models.weights import read_safetensors_metadata

    return read_safetensors_metadata(path).get(METADATA_FORMAT)


def _scheme(mode: str | Fp8Scheme) -> Fp8Scheme:
    if isinstance(mode, Fp8Scheme):
        return mode
    if mode not in SCHEMES:
        raise InputError(f"unknown fp8 mode {mode!r}; known: {', '.join(SCHEMES)}")
    return SCHEMES[mode]
