"""``load_dit``: build a Wan2.1 DiT from a weight file, whatever its layout, size or dtype.

Steps: read the tensors (memory-mapped for safetensors); detect the key layout (official,
ComfyUI-prefixed, diffusers) and rename to the official names; infer the config from the shapes
(heads: ``num_heads=`` > ``config.json`` beside the weights > ``dim // 128``); build the model on
the ``meta`` device in the target dtype; without a quantizer, fold scaled-fp8 weights
(``P.scale_weight``: per tensor, per channel or per block of inputs) into plain weights; with one,
let it swap modules and quantize the tensors;
then cast each tensor on its own to the dtype its parameter declares, move it to ``device`` and
adopt it with ``load_state_dict(assign=True)``. No second full copy of the weights is made.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.models import arguments
from wan_kernel.models.attention import sdpa_attention
from wan_kernel.models.dit import COMPUTE_DTYPES, WanDiT
from wan_kernel.models.dit_config import MODEL_TYPE_WORDS, MODEL_TYPES, PRESETS, DiTConfig, infer_dit_config
from wan_kernel.models.dit_keys import detect_layout, dit_state_dict_from, dit_state_dict_to
from wan_kernel.models.quantization import check_quantizer
from wan_kernel.models.weights import (
    check_finite_weights,
    as_path,
    config_beside,
    describe_keys,
    float_elements_by_dtype,
    fold_fp8_scales,
    guess_model_kind,
    load_state_dict,
)

__all__ = [
    "TASKS",
    "DiTFile",
    "dit_state_dict_from",
    "dit_state_dict_to",
    "load_dit",
    "read_dit",
    "read_dit_config",
    "resolve_dtype",
]

TASKS: dict[str, tuple[str, DiTConfig | None]] = {
    **{name: (preset.model_type, preset) for name, preset in PRESETS.items()},
    **{model_type: (model_type, None) for model_type in MODEL_TYPES},
}
"""Task names ``load_dit(task=...)`` checks the weights against: model type and (if sized) preset."""

KEEP_FP32 = ("modulation",)
"""Parameters (by last name) kept in float32 whatever ``dtype`` is: the modulation tables are
added to the float32 time embedding, as in the official code."""


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float32``/``bfloat16``/``float16`` from a dtype or its name (``"bf16"``); ``None`` stays.

    :raises InputError: another dtype, an unknown name, or not a dtype at all.
    """
    return arguments.resolve_dtype(dtype, allowed=COMPUTE_DTYPES, what="the DiT", hint="use quant= for fp8")


def _file_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype holding most of the floating-point elements; fp8 and others map to bfloat16."""
    counts = float_elements_by_dtype(sd)
    dominant = max(counts, key=counts.get) if counts else torch.bfloat16
    return dominant if dominant in COMPUTE_DTYPES else torch.bfloat16


def _check_attention(attention: Callable | None) -> Callable:
    if attention is None:
        return sdpa_attention
    if callable(attention):
        return attention
    raise InputError(
        f"attention must be an attention implementation (a callable fn(q, k, v, k_lens)), got {attention!r}; "
        "resolve a backend name with wan_kernel.plugins.resolve('attention', name)"
    )


def _check_kind(path: Path, keys: list[str]) -> str:
    """The layout of a DiT file, or a WeightsError saying what the file is instead."""
    kind = guess_model_kind(keys)
    layout = detect_layout(keys) if kind == "a Wan DiT" else None
    if layout is None and kind == "a Wan DiT":
        raise WeightsError(
            f"{path} has Wan DiT tensor names in a layout this loader does not know "
            f"({describe_keys(keys, 3)}); it reads the official, ComfyUI (model.diffusion_model.) "
            "and diffusers layouts"
        )
    if layout is None:
        raise WeightsError(
            f"{path} looks like {kind}, not a Wan2.1 DiT (its tensors: {describe_keys(keys, 3)}); "
            "pass the diffusion model weights (the official diffusion_pytorch_model*.safetensors, "
            "a ComfyUI wan2.1_*.safetensors or a diffusers transformer folder)"
        )
    return layout


def _check_task(path: Path, config: DiTConfig, task: str) -> None:
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    model_type, preset = TASKS[task]
    what = config.describe()
    if config.model_type != model_type:
        raise WeightsError(
            f"{path}: this file is {what}, but the task {task} needs a {MODEL_TYPE_WORDS[model_type]} DiT"
        )
    if preset is not None and (config.dim, config.num_layers) != (preset.dim, preset.num_layers):
        raise WeightsError(
            f"{path}: this file is {what}, but the task {task} needs dim {preset.dim} with "
            f"{preset.num_layers} layers; pick the task that matches the file's size"
        )


def _set_dtypes(model: nn.Module, dtype: torch.dtype) -> None:
    """Put every parameter of the (meta) model in ``dtype``, the modulation tables in float32."""
    model.to(dtype)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and name in KEEP_FP32:
                module._parameters[name] = nn.Parameter(
                    param.detach().float(), requires_grad=param.requires_grad
                )


def _check_keys(
    path: Path,
    layout: str,
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    missing_only: bool = False,
) -> None:
    missing = [k for k in expected if k not in sd]
    if missing:
        raise WeightsError(
            f"{path}: the {layout}-layout DiT file lacks {len(missing)} tensor(s) the model needs: "
            f"{describe_keys(missing)}; the file is incomplete or from another model"
        )
    if missing_only:
        return
    unexpected = [k for k in sd if k not in expected]
    if unexpected:
        raise WeightsError(
            f"{path}: the {layout}-layout DiT file has {len(unexpected)} tensor(s) "
            "a Wan2.1 DiT does not have: "
            f"{describe_keys(unexpected)}; it is another model or a variant this loader does not support"
        )
    for key, ref in expected.items():
        if tuple(sd[key].shape) != tuple(ref.shape):
            raise WeightsError(
                f"{path}: tensor {key!r} has shape {list(sd[key].shape)}, but the DiT inferred from the file "
                f"needs {list(ref.shape)}; the file mixes tensors of different models"
            )


@attrs.frozen
class DiTFile:
    """A DiT weight file, read: its tensors in official names (memory-mapped where the format
    allows; fused projections split into views), its config and its key layout."""

    path: Path
    state_dict: dict[str, torch.Tensor] = attrs.field(repr=False)
    config: DiTConfig
    layout: str


def read_dit(path: str | os.PathLike, *, num_heads: int | None = None) -> DiTFile:
    """Read a DiT file once: its tensors (nothing copied where the format allows memory-mapping),
    config (heads as in :func:`load_dit`) and layout. :func:`load_dit` takes the result as its ``path``
    (once: it consumes the tensors).

    :raises WeightsError: the file is missing, unreadable, malformed, or not a Wan2.1 DiT (saying
        what it is); a ``config.json`` beside it is malformed.
    :raises InputError: ``path`` is not a path, ``num_heads`` not a positive int.
    """
    path = as_path(path, what="DiT").expanduser()
    num_heads = arguments.check_num_heads(num_heads, what="the DiT")
    raw = load_state_dict(path, what="DiT")
    layout = _check_kind(path, list(raw))
    sd = dit_state_dict_from(layout, raw)  # renames only (fused projections are split into views)
    del raw
    try:
        config = infer_dit_config(sd, num_heads=num_heads, config_json=config_beside(path))
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    return DiTFile(path, sd, config, layout)


def read_dit_config(path: str | os.PathLike, *, num_heads: int | None = None) -> tuple[DiTConfig, str]:
    """The DiT config and key layout of a weight file, read off its tensor names and shapes.

    Nothing is copied: ``.safetensors`` files (and ``.pth`` files torch can memory-map) are mapped,
    and only their headers / shapes are looked at. Heads as in :func:`load_dit`.

    :returns: ``(config, layout)``, ``layout`` one of ``official``, ``comfyui``, ``diffusers``.
    :raises WeightsError: the file is missing, unreadable, or not a Wan2.1 DiT (saying what it is).
    """
    dit_file = read_dit(path, num_heads=num_heads)
    return dit_file.config, dit_file.layout


def load_dit(
    path: str | os.PathLike | DiTFile,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    num_heads: int | None = None,
    quant: Any = None,
    attention: Callable | None = None,
    task: str | None = None,
    state_dict_transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> WanDiT:
    """Load a Wan2.1 DiT (t2v / i2v / flf2v, any size) from a file, a folder of shards or a ``.pth``.

    :param path: ``.safetensors`` file, folder of ``.safetensors`` shards, or ``.pth``/``.pt``; the
        official, ComfyUI-prefixed or diffusers ``WanTransformer3DModel`` key layout. Or a
        :class:`DiTFile` from :func:`read_dit` (the file is then not read again; ``num_heads`` was
        given to ``read_dit``).
    :param device: where the weights go.
    :param dtype: compute dtype (float32 / bfloat16 / float16, or a name); ``None``: the dtype most
        of the file's weights have (fp8 files: bfloat16). The ``modulation`` tables stay float32.
    :param num_heads: attention heads; else ``config.json`` beside the weights; else ``dim // 128``.
    :param quant: a resolved ``Quantizer`` object (a quantization plugin's implementation, e.g. from
        ``wan_kernel.pipelines.plugin_setup.resolve_quantizer("fp8_scaled", target="dit")``), or ``None``.
        Without it, scaled-fp8 files (musubi-tuner, ``fp8_scaled``, ComfyUI ``scaled_fp8``) are
        dequantized to ``dtype`` (:func:`wan_kernel.models.weights.fold_fp8_scales`).
    :param attention: an attention implementation ``fn(q, k, v, k_lens)`` (e.g. a resolved attention
        plugin); ``None``: PyTorch's SDPA (:func:`wan_kernel.models.attention.sdpa_attention`).
    :param task: optional task name (``t2v-14B``, ``i2v-14B``, ``t2v-1.3B``, ``t2v``, ...) the file must fit.
    :param state_dict_transform: called with the official-layout state dict (tensors as stored,
        scaled-fp8 weights folded unless ``quant``) before any quantizer sees it; returns the state
        dict to load. This is how LoRAs are merged before quantization:
        ``state_dict_transform=wan_kernel.lora.LoraMerge(specs)``.
    :returns: the model in eval mode with ``requires_grad`` off (training turns on what it trains).
    :raises WeightsError: the file is missing, unreadable, malformed, another kind of model,
        incomplete, or wrong for ``task``; a scaled-fp8 weight lacks its scale; a ``config.json``
        beside it is malformed; the weights (after ``state_dict_transform``) hold NaN or Inf.
    :raises InputError: an argument of the wrong type or value (``path`` not a path, an unknown
        ``dtype`` name, ``num_heads`` not a positive int, an unknown ``device``).
    """
    num_heads = arguments.check_num_heads(num_heads, what="the DiT")
    dtype = resolve_dtype(dtype)
    device = arguments.check_device(device)
    attention_fn = _check_attention(attention)
    quantizer = check_quantizer(quant, target="dit")

    dit_file = path if isinstance(path, DiTFile) else read_dit(path, num_heads=num_heads)
    # the file's dict is consumed: each tensor is replaced by its loaded copy, never two full copies
    path, sd, config, layout = dit_file.path, dit_file.state_dict, dit_file.config, dit_file.layout
    del dit_file
    if task is not None:
        _check_task(path, config, task)
    if dtype is None:
        dtype = _file_dtype(sd)

    with torch.device("meta"):
        model = WanDiT(config, attention=attention_fn)
    _set_dtypes(model, dtype)
    if quantizer is None:
        declared = {k: t.dtype for k, t in model.state_dict().items()}
        try:
            sd = fold_fp8_scales(sd, declared, dtype)
        except WeightsError as exc:
            raise WeightsError(f"{path}: {exc}") from None
    else:
        # every tensor of the plain model must be there (perhaps already quantized) ...
        _check_keys(path, layout, sd, model.state_dict(), missing_only=True)
    if state_dict_transform is not None:
        sd = state_dict_transform(sd)
    if quantizer is not None:
        model = quantizer.convert_for_runtime(model, target="dit")
        sd = quantizer.quantize_state_dict(sd, target="dit", device=device)
    # ... and the (converted) model must get exactly the tensors it declares
    expected = model.state_dict()
    _check_keys(path, layout, sd, expected)

    for key, ref in expected.items():  # one tensor at a time: never two full copies
        sd[key] = sd[key].to(device=device, dtype=ref.dtype)
    source = str(path)
    if state_dict_transform is not None:
        source += (
            " with its state_dict_transform applied (the LoRAs merged in: a multiplier too large, "
            "or a LoRA holding NaN?)"
        )
    check_finite_weights(sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise WeightsError(f"{path}: no weights were loaded for {describe_keys(left_on_meta)}")
    return model.eval().requires_grad_(False)
