"""Merging LoRA files into a Wan2.1 DiT: into its state dict while loading, or into a live model.

The one way to load a DiT with LoRAs merged before quantization::

    from wan_kernel.lora import LoraMerge, LoraSpec
    merge = LoraMerge([LoraSpec("style.safetensors", 0.8)], strict=False, log=print)
    dit = load_dit(path, quant=quantizer, state_dict_transform=merge)
    merge.reports  # one LoraReport per file

``load_dit`` hands the transform the official-layout state dict before any quantizer sees it, so
fp8 weights are quantized once, with the LoRA in them. :func:`apply_loras` merges into a DiT that
is already built and not quantized.

Merging is done in float32, once per weight however many LoRAs touch it (in the order given;
DoRA modules rescale the weight as it is at that point), and cast back. Every module of a file is
either merged, left out by the include/exclude patterns, or reported as unmatched with its tensor
names (a :class:`LoraWarning`, and a line to ``log``); ``strict=True`` makes any unmatched tensor
an :class:`~wan_kernel.errors.InputError`. A file none of whose modules fit the model is an error.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.lora.adapters import LoraModule
from wan_kernel.lora.formats import check_output_file, read_lora, save_safetensors_atomic
from wan_kernel.lora.keys import kohya_name, official_path
from wan_kernel.lora.spec import LoraSpec, SpecLike
from wan_kernel.models.weights import (
    FP8_SCALE_SUFFIXES,
    dequantize_fp8_weight,
    describe_keys,
    fp8_weight_scale,
    load_state_dict,
    read_safetensors_metadata,
)

__all__ = ["LoraMerge", "LoraReport", "LoraWarning", "apply_loras", "merge_into_dit"]


class LoraWarning(UserWarning):
    """A LoRA was applied only in part: some of its tensors have no target in the model."""


@attrs.frozen
class LoraReport:
    """What merging one LoRA file did."""

    path: Path
    layout: str
    multiplier: float
    merged: tuple[str, ...]
    """Official module paths whose weights changed."""
    filtered: tuple[str, ...]
    """LoRA module names left out by the include/exclude patterns."""
    unmatched: tuple[str, ...]
    """LoRA module names with no target in the model (reported, not merged)."""
    unmatched_keys: tuple[str, ...]
    """Every tensor name of the file that was not merged and not left out by the patterns: the
    tensors of the unmatched modules and the tensors the reader did not recognise."""
    merged_keys: int = 0
    """How many of the file's tensors were merged."""

    def summary(self) -> str:
        text = (
            f"LoRA {self.path.name} ({self.layout} layout) x{self.multiplier:g}: "
            f"merged into {len(self.merged)} module(s) ({self.merged_keys} tensors)"
        )
        if self.filtered:
            text += f", {len(self.filtered)} left out by the patterns"
        if self.unmatched:
            shown = describe_keys(self.unmatched, 3)
            text += f", {len(self.unmatched)} without a target in this model ({shown})"
        if self.unmatched_keys:
            text += (
                f"; {len(self.unmatched_keys)} tensor(s) not merged ({describe_keys(self.unmatched_keys, 3)})"
            )
        return text


@attrs.define
class _Plan:
    """What to add, by official module path, and one report per LoRA file."""

    weight: dict[str, list[tuple[float, LoraModule]]] = attrs.Factory(dict)
    bias: dict[str, list[tuple[float, LoraModule]]] = attrs.Factory(dict)
    reports: list[LoraReport] = attrs.Factory(list)


def _plan(
    specs: Iterable[SpecLike],
    shapes: Mapping[str, Sequence[int]],
    biases: Mapping[str, Sequence[int]],
    *,
    strict: bool,
) -> _Plan:
    """Read every file, match its modules to ``shapes`` (official path -> weight shape), check shapes.

    Nothing is changed here: a bad file or a shape mismatch raises before any weight is touched.
    """
    plan = _Plan()
    for spec in [LoraSpec.coerce(s) for s in specs]:
        lora = read_lora(spec.path)
        merged, filtered, unmatched = [], [], []
        unmatched_keys = list(lora.unrecognised)
        merged_keys = 0
        for name, module in lora.modules.items():
            target = official_path(name)
            spellings = [name] + ([target, kohya_name(target)] if target else [])
            if not spec.selects(spellings):
                filtered.append(name)
                continue
            if target is None or target not in shapes:
                unmatched.append(name)
                unmatched_keys.extend(module.keys)
                continue
            _check_shapes(spec.path, name, module, target, shapes[target], biases.get(target))
            if module.kind != "diff" or "diff" in module.tensors or module.is_dora:
                plan.weight.setdefault(target, []).append((spec.multiplier, module))
            if "diff_b" in module.tensors or "bias" in module.tensors:
                plan.bias.setdefault(target, []).append((spec.multiplier, module))
            merged.append(target)
            merged_keys += len(module.keys)
        report = LoraReport(
            path=spec.path,
            layout=lora.layout,
            multiplier=spec.multiplier,
            merged=tuple(merged),
            filtered=tuple(filtered),
            unmatched=tuple(unmatched),
            unmatched_keys=tuple(sorted(unmatched_keys)),
            merged_keys=merged_keys,
        )
        if not merged:
            if unmatched:
                raise InputError(
                    f"{spec.path}: none of the LoRA's {len(unmatched)} module(s) exist in this DiT "
                    f"(e.g. {describe_keys(unmatched, 3)}); the LoRA was made for another model"
                )
            raise InputError(
                f"{spec.path}: the include/exclude patterns leave none of the LoRA's {len(filtered)} "
                "module(s); patterns are searched in names like lora_unet_blocks_0_self_attn_q "
                "and blocks.0.self_attn.q"
            )
        if report.unmatched_keys:
            if strict:
                raise InputError(
                    f"{spec.path}: {len(report.unmatched_keys)} tensor(s) of the LoRA match nothing in this "
                    f"DiT ({describe_keys(report.unmatched_keys, 5)}); {merged_keys} matched. Drop --strict "
                    "to merge the rest, or use a LoRA made for this model"
                )
            warnings.warn(report.summary(), LoraWarning, stacklevel=4)
        plan.reports.append(report)
    return plan


def _check_shapes(
    path: Path, name: str, module: LoraModule, target: str, shape: Sequence[int], bias: Sequence[int] | None
) -> None:
    if not module.delta_numel_ok(shape) or not module.dora_shape_ok(shape):
        got = ", ".join(f"{role} {list(t.shape)}" for role, t in sorted(module.tensors.items()))
        raise InputError(
            f"{path}: LoRA module {name!r} ({got}) does not fit {target} {list(shape)}; "
            "the LoRA was made for another model size or variant"
        )
    delta_b = module.bias_delta() if ("diff_b" in module.tensors or "bias" in module.tensors) else None
    if delta_b is not None and (bias is None or delta_b.numel() != math.prod(bias)):
        raise InputError(
            f"{path}: LoRA module {name!r} has a bias delta of {delta_b.numel()} values, but {target} has "
            f"{'no bias' if bias is None else f'a bias of shape {list(bias)}'}"
        )


def _merged_weight(
    base: torch.Tensor, entries: list[tuple[float, LoraModule]], device: torch.device | None
) -> torch.Tensor:
    """``base`` (any float dtype) with every entry merged, in float32 on ``device``."""
    acc = base.to(device or base.device, torch.float32, copy=True)  # the input (maybe a memory map) stays
    for multiplier, module in entries:
        acc = module.merged_weight(acc, multiplier)
    return acc


def _merged_bias(
    base: torch.Tensor, entries: list[tuple[float, LoraModule]], device: torch.device | None
) -> torch.Tensor:
    acc = base.to(device or base.device, torch.float32, copy=True)
    for multiplier, module in entries:
        delta = module.bias_delta()
        if delta is not None:
            acc.add_(delta.to(acc.device).reshape(acc.shape), alpha=multiplier)
    return acc


# --------------------------------------------------------------------------------------------
# State dicts (load time, before quantization)
# --------------------------------------------------------------------------------------------


def _module_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Official module path -> the key of its weight (``P.weight``; other parameters by their own name)."""
    out = {}
    for key in state_dict:
        if key.endswith(".weight"):
            out[key[: -len(".weight")]] = key
        elif not key.endswith((".bias", *FP8_SCALE_SUFFIXES)):
            out.setdefault(key, key)  # e.g. blocks.0.modulation (ComfyUI's "generic" non-.weight keys)
    return out


def _bias_key(weight_key: str) -> str | None:
    return weight_key[: -len("weight")] + "bias" if weight_key.endswith(".weight") else None


class LoraMerge:
    """A state-dict transform merging LoRA files: ``load_dit(..., state_dict_transform=LoraMerge(specs))``.

    Called with an official-layout DiT state dict, it merges in place (merged tensors are replaced,
    never written into) and returns it. A weight stored in fp8 (plain, or scaled with any layout
    :func:`~wan_kernel.models.weights.dequantize_fp8_weight` reads) is dequantized in float32,
    merged, and stored in bfloat16 without its scale keys, so that a quantizer afterwards quantizes
    the merged weight once; fp8 weights no LoRA touches stay as stored.

    :param specs: :class:`LoraSpec` objects (or paths, or mappings :meth:`LoraSpec.coerce` takes).
    :param strict: any tensor of a file that matches nothing in the model is an error.
    :param log: receives one summary line per file.
    :param device: where to compute (e.g. the GPU); merged tensors go back where they were.
    :param dtype: the dtype of merged weights (default: each weight's stored dtype; fp8: bfloat16).
        The loader passes the model's compute dtype so a merged weight is rounded once.

    After a call, :attr:`reports` holds one :class:`LoraReport` per file.
    """

    def __init__(
        self,
        specs: Iterable[SpecLike],
        *,
        strict: bool = False,
        log: Callable[[str], None] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.specs = [LoraSpec.coerce(s) for s in specs]  # bad paths/patterns fail before any load
        self.strict = strict
        self.log = log
        self.device = None if device is None else torch.device(device)
        self.dtype = dtype
        self.reports: list[LoraReport] = []

    def __repr__(self) -> str:
        return f"LoraMerge({[str(s.path) for s in self.specs]}, strict={self.strict})"

    def __call__(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.specs:
            self.reports = []
            return state_dict
        keys = _module_keys(state_dict)
        shapes = {name: tuple(state_dict[key].shape) for name, key in keys.items()}
        biases = {}
        for name, key in keys.items():
            bias_key = _bias_key(key)
            if bias_key in state_dict:
                biases[name] = tuple(state_dict[bias_key].shape)
        try:
            plan = _plan(self.specs, shapes, biases, strict=self.strict)
        except WeightsError as exc:
            raise WeightsError(f"merging LoRAs: {exc}") from None
        for name in plan.weight:  # every target is checked before any is changed
            _check_state_dict_target(state_dict, keys[name])
        for name, entries in plan.weight.items():
            key = keys[name]
            weight = state_dict[key]
            base, out_dtype = weight, self.dtype or weight.dtype
            if weight.dtype.itemsize == 1:  # fp8: dequantize (with its scales), merge, keep bfloat16
                prefix = key[: -len(".weight")]
                where = self.device or weight.device
                scale = fp8_weight_scale(state_dict, prefix)
                base = dequantize_fp8_weight(weight.to(where), scale, dtype=torch.float32, name=key)
                for suffix in FP8_SCALE_SUFFIXES:
                    state_dict.pop(prefix + suffix, None)
                out_dtype = self.dtype or torch.bfloat16
            merged = _merged_weight(base, entries, self.device)
            state_dict[key] = merged.to(device=weight.device, dtype=out_dtype)
        for name, entries in plan.bias.items():
            key = _bias_key(keys[name])
            bias = state_dict[key]
            state_dict[key] = _merged_bias(bias, entries, self.device).to(bias.device, bias.dtype)
        self.reports = plan.reports
        if self.log is not None:
            for report in self.reports:
                self.log(report.summary())
        return state_dict


def _check_state_dict_target(state_dict: Mapping[str, torch.Tensor], key: str) -> None:
    """A LoRA can be merged into ``state_dict[key]``: a float weight, and an fp8 one's scales fit it.

    The scales are tried on the ``meta`` device: nothing is computed or copied.
    """
    weight = state_dict[key]
    if not weight.dtype.is_floating_point:
        raise InputError(
            f"cannot merge a LoRA into {key}: it is stored as {weight.dtype}; load the bf16/fp16 DiT instead"
        )
    if weight.dtype.itemsize == 1:
        prefix = key[: -len(".weight")]
        names = (prefix + ".scale_weight", prefix + ".scale_weight_tensor")
        scales = {k: state_dict[k].to("meta") for k in names if k in state_dict}
        scale = fp8_weight_scale(scales, prefix)
        dequantize_fp8_weight(weight.to("meta"), scale, dtype=torch.float32, name=key)


# --------------------------------------------------------------------------------------------
# Live models
# --------------------------------------------------------------------------------------------


def _strip_compiled(name: str) -> str:
    return name.replace("_orig_mod.", "")


def apply_loras(
    model: nn.Module,
    specs: Iterable[SpecLike],
    *,
    strict: bool = False,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Merge LoRA files into a built, unquantized DiT's weights (in place, computed where they live).

    ``specs``: :class:`LoraSpec` objects, paths, or mappings (:meth:`LoraSpec.coerce`). Unmatched
    tensors: a :class:`LoraWarning` (an error with ``strict``); ``log`` gets one line per file.
    Returns ``model``. For a quantized DiT, merge while loading: ``load_dit(...,
    state_dict_transform=LoraMerge(specs))``.

    :raises InputError: a targeted weight is quantized, or a LoRA matches nothing / does not fit.
    :raises WeightsError: a file is missing, unreadable or not a LoRA.
    """
    params = {_strip_compiled(n): p for n, p in model.named_parameters()}
    buffers = {_strip_compiled(n): b for n, b in model.named_buffers()}
    weights: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        if name.endswith(".weight"):
            weights[name[: -len(".weight")]] = p
        elif not name.endswith(".bias"):
            weights.setdefault(name, p)
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    biases = {n: tuple(params[n + ".bias"].shape) for n in weights if n + ".bias" in params}
    plan = _plan(specs, shapes, biases, strict=strict)
    for name in [*plan.weight, *plan.bias]:
        weight = weights[name]
        quant_buffers = [b for b in buffers if b.startswith(name + ".") and "scale" in b.rsplit(".", 1)[-1]]
        if weight.dtype.itemsize == 1 or not weight.dtype.is_floating_point or quant_buffers:
            raise InputError(
                f"cannot merge a LoRA into {name}: the DiT's weights are already quantized ({weight.dtype}). "
                "LoRA must be merged while loading, before quantization: pass "
                "state_dict_transform=wan_kernel.lora.LoraMerge(specs) to load_dit"
            )
        if weight.is_meta:
            raise InputError(
                f"cannot merge a LoRA into {name}: the model's weights are not loaded (meta device)"
            )
    with torch.no_grad():
        for name, entries in plan.weight.items():
            w = weights[name]
            w.copy_(_merged_weight(w, entries, None))
        for name, entries in plan.bias.items():
            b = params[name + ".bias"]
            b.copy_(_merged_bias(b, entries, None))
    if log is not None:
        for report in plan.reports:
            log(report.summary())
    return model


# --------------------------------------------------------------------------------------------
# DiT files (wan lora merge --dit, wan run generate --save_merged_model)
# --------------------------------------------------------------------------------------------


def merge_into_dit(
    dit: str | os.PathLike,
    specs: Iterable[SpecLike],
    output: str | os.PathLike,
    *,
    quantizer: Any = None,
    strict: bool = False,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Path, list[LoraReport]]:
    """Merge LoRAs into a DiT file and write the result in the input's key layout and dtypes.

    Merging is done in float32 (:class:`~wan_kernel.lora.LoraMerge`) and each merged weight is
    cast back to its stored dtype (fp8-stored weights a LoRA touches become bfloat16). With
    ``quantizer`` (a resolved quantization plugin, e.g. ``fp8_scaled``) the merged weights are
    quantized once and the file holds the quantized form (what ``load_dit(quant=...)`` builds).
    ``wan run generate --save_merged_model`` writes the same file.
    """
    from wan_kernel.models.dit_keys import (
        COMFYUI_PREFIXES,
        detect_layout,
        dit_state_dict_from,
        dit_state_dict_to,
    )

    dit = Path(dit).expanduser()
    output = Path(output).expanduser()
    check_output_file(output, overwrite=overwrite)  # before any work
    if output.resolve() == dit.resolve():
        raise InputError(f"{output} is the input DiT; write the merged model to another file")
    raw = load_state_dict(dit, what="DiT")
    layout = detect_layout(list(raw))
    if layout is None:
        raise WeightsError(f"{dit}: not a Wan2.1 DiT in a layout wan reads ({describe_keys(list(raw), 3)})")
    # ComfyUI files come with "model.diffusion_model." or "diffusion_model.": keep the input's
    comfy_prefix = next((p for p in COMFYUI_PREFIXES if any(k.startswith(p) for k in raw)), None)
    merge = LoraMerge(specs, strict=strict, log=log, device=device)
    sd = merge(dit_state_dict_from(layout, raw))
    del raw
    metadata = read_safetensors_metadata(dit) if dit.is_file() and dit.suffix == ".safetensors" else {}
    metadata = {k: v for k, v in metadata.items() if not k.startswith("wan_quant")}
    if quantizer is not None:
        sd = quantizer.quantize_state_dict(sd, target="dit", device=device or "cpu")
        metadata["wan_quant"] = getattr(quantizer, "name", type(quantizer).__name__)
        metadata["wan_quant_version"] = "1"
    metadata["wan_merged_loras"] = json.dumps(
        [{"file": r.path.name, "multiplier": r.multiplier, "modules": len(r.merged)} for r in merge.reports]
    )
    sd = {k: v.to("cpu") for k, v in sd.items()}
    out = {comfy_prefix + k: v for k, v in sd.items()} if comfy_prefix else dit_state_dict_to(layout, sd)
    return save_safetensors_atomic(output, out, metadata, overwrite=overwrite), merge.reports
