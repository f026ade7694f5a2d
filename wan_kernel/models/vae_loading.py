"""Loading the Wan2.1 VAE from any of its published key layouts, and converting between them.

Accepted files: the official ``Wan2.1_VAE.pth``; ``.safetensors`` with the official keys (ComfyUI's
repackaged ``wan_2.1_vae.safetensors``, optionally under a ``vae.`` / ``first_stage_model.``
prefix); diffusers' ``AutoencoderKLWan`` layout (its ``vae/`` folder, a pipeline folder holding
``vae/``, or the weight file alone). The width ``dim`` and ``z_dim`` are read from the weights.

Layouts, as ``vae_state_dict_to(layout, sd)`` (official -> layout) and
``vae_state_dict_from(layout, sd)`` (layout -> official):

- ``official`` / ``comfyui``: the official names (``encoder.downsamples.0.residual.2.weight``).
- ``diffusers``: ``AutoencoderKLWan`` names. Official -> diffusers renames ``conv1``/``conv2`` to
  ``quant_conv``/``post_quant_conv``, ``{encoder,decoder}.conv1`` to ``conv_in``, ``head.0``/``head.2``
  to ``norm_out``/``conv_out``, ``middle.{0,1,2}`` to ``mid_block.{resnets.0, attentions.0,
  resnets.1}``, ``encoder.downsamples.N`` to ``encoder.down_blocks.N``, and regroups the decoder's
  flat ``upsamples.N`` into ``up_blocks.I.resnets.K`` / ``up_blocks.I.upsamplers.0``; inside residual
  blocks ``residual.{0,2,3,6}`` / ``shortcut`` become ``norm1``/``conv1``/``norm2``/``conv2``/
  ``conv_shortcut``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.models.vae import VAEConfig, WanVAE, WanVAEModel
from wan_kernel.models import arguments
from wan_kernel.models.weights import (
    as_path,
    check_finite_weights,
    describe_keys,
    guess_model_kind,
    load_state_dict,
    strip_prefix,
)

VAE_LAYOUTS = ("official", "comfyui", "diffusers")
VAE_PREFIXES = ("first_stage_model.", "vae.", "model.")
VAE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_RESIDUAL_TO_DIFFUSERS = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
    "shortcut.": "conv_shortcut.",
}
_RESIDUAL_FROM_DIFFUSERS = {v: k for k, v in _RESIDUAL_TO_DIFFUSERS.items()}
_TOP_TO_DIFFUSERS = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_TOP_FROM_DIFFUSERS = {v: k for k, v in _TOP_TO_DIFFUSERS.items()}
_SIDE_TO_DIFFUSERS = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out."}
_SIDE_FROM_DIFFUSERS = {v: k for k, v in _SIDE_TO_DIFFUSERS.items()}


def _replace_prefix(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


# --------------------------------------------------------------------------------------------
# official -> diffusers
# --------------------------------------------------------------------------------------------

def _official_upsample_groups(keys: list[str]) -> dict[int, str]:
    """Flat ``decoder.upsamples.N`` index -> ``up_blocks.I.resnets.K.`` / ``up_blocks.I.upsamplers.0.``."""
    index_re = re.compile(r"decoder\.upsamples\.(\d+)\.(.*)")
    is_resample: dict[int, bool] = {}
    for key in keys:
        m = index_re.fullmatch(key)
        if m:
            n = int(m.group(1))
            resample = m.group(2).startswith(("resample.", "time_conv."))
            is_resample[n] = is_resample.get(n, False) or resample
    groups: dict[int, str] = {}
    block = resnet = 0
    for n in sorted(is_resample):
        if is_resample[n]:
            groups[n] = f"up_blocks.{block}.upsamplers.0."
            block, resnet = block + 1, 0
        else:
            groups[n] = f"up_blocks.{block}.resnets.{resnet}."
            resnet += 1
    return groups


def _middle_to_diffusers(index: int) -> str:
    # official middle = (resblock, attention, resblock)
    return f"mid_block.attentions.{index // 2}." if index % 2 else f"mid_block.resnets.{index // 2}."


def _key_to_diffusers(key: str, upsample_groups: dict[int, str]) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return _replace_prefix(key, _TOP_TO_DIFFUSERS)
    if m := re.fullmatch(r"middle\.(\d+)\.(.*)", rest):
        block = _middle_to_diffusers(int(m.group(1)))
        return f"{side}.{block}{_replace_prefix(m.group(2), _RESIDUAL_TO_DIFFUSERS)}"
    if side == "encoder" and (m := re.fullmatch(r"downsamples\.(\d+)\.(.*)", rest)):
        return f"encoder.down_blocks.{m.group(1)}.{_replace_prefix(m.group(2), _RESIDUAL_TO_DIFFUSERS)}"
    if side == "decoder" and (m := re.fullmatch(r"upsamples\.(\d+)\.(.*)", rest)):
        block = upsample_groups[int(m.group(1))]
        return f"decoder.{block}{_replace_prefix(m.group(2), _RESIDUAL_TO_DIFFUSERS)}"
    return f"{side}.{_replace_prefix(rest, _SIDE_TO_DIFFUSERS)}"


def _official_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    groups = _official_upsample_groups(list(state))
    return {_key_to_diffusers(k, groups): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# diffusers -> official
# --------------------------------------------------------------------------------------------

_UP_BLOCK_RE = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)")


def _diffusers_upsample_indices(keys: list[str]) -> dict[tuple[int, int], int]:
    """``(up block, resnet index or -1 for the upsampler)`` -> flat official ``upsamples.N`` index."""
    modules: set[tuple[int, int]] = set()
    for key in keys:
        m = _UP_BLOCK_RE.fullmatch(key)
        if m:
            modules.add((int(m.group(1)), int(m.group(3)) if m.group(3) is not None else -1))
    # within a block: resnets in order, then the upsampler
    order = sorted(modules, key=lambda bk: (bk[0], bk[1] < 0, bk[1]))
    return {module: n for n, module in enumerate(order)}


def _key_from_diffusers(key: str, upsample_indices: dict[tuple[int, int], int]) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return _replace_prefix(key, _TOP_FROM_DIFFUSERS)
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", rest):
        index = 2 * int(m.group(2)) + (1 if m.group(1) == "attentions" else 0)
        return f"{side}.middle.{index}.{_replace_prefix(m.group(3), _RESIDUAL_FROM_DIFFUSERS)}"
    if side == "encoder" and (m := re.fullmatch(r"down_blocks\.(\d+)\.(.*)", rest)):
        return f"encoder.downsamples.{m.group(1)}.{_replace_prefix(m.group(2), _RESIDUAL_FROM_DIFFUSERS)}"
    if m := _UP_BLOCK_RE.fullmatch(key):
        module = (int(m.group(1)), int(m.group(3)) if m.group(3) is not None else -1)
        index = upsample_indices[module]
        return f"decoder.upsamples.{index}.{_replace_prefix(m.group(4), _RESIDUAL_FROM_DIFFUSERS)}"
    return f"{side}.{_replace_prefix(rest, _SIDE_FROM_DIFFUSERS)}"


def _diffusers_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    indices = _diffusers_upsample_indices(list(state))
    return {_key_from_diffusers(k, indices): v for k, v in state.items()}


# --------------------------------------------------------------------------------------------
# public converters
# --------------------------------------------------------------------------------------------

def _check_layout(layout: str) -> str:
    if layout not in VAE_LAYOUTS:
        raise InputError(f"unknown VAE key layout {layout!r}; known: {', '.join(VAE_LAYOUTS)}")
    return layout


def vae_state_dict_to(layout: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official-layout VAE state dict to ``layout`` (tensors are shared, not copied)."""
    if _check_layout(layout) == "diffusers":
        return _official_to_diffusers(state)
    return dict(state)


def vae_state_dict_from(layout: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a VAE state dict in ``layout`` to the official layout (tensors are shared, not copied)."""
    if _check_layout(layout) == "diffusers":
        return _diffusers_to_official(state)
    return dict(state)


def detect_vae_layout(keys) -> str:
    """``diffusers`` when the names are ``AutoencoderKLWan``'s, else ``official``."""
    markers = (
        "quant_conv.", "post_quant_conv.", "encoder.conv_in.", "decoder.conv_in.", "decoder.up_blocks."
    )  # fmt: skip
    return "diffusers" if any(k.startswith(markers) for k in keys) else "official"


# --------------------------------------------------------------------------------------------
# load_vae
# --------------------------------------------------------------------------------------------

def _weights_path(path: Path) -> Path:
    """A diffusers pipeline folder holds the VAE in ``vae/``; anything else is used as given."""
    if path.is_dir() and (path / "vae").is_dir() and not any(
        p.suffix in (".safetensors", ".pth", ".pt", ".bin") for p in path.iterdir()
    ):
        return path / "vae"
    return path


def _official_state(path: Path) -> dict[str, torch.Tensor]:
    state = strip_prefix(load_state_dict(path, what="VAE"), VAE_PREFIXES)
    if detect_vae_layout(state) == "diffusers":
        state = vae_state_dict_from("diffusers", state)
    required = ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight")
    if not all(k in state for k in required):
        kind = guess_model_kind(state)
        if kind != "a Wan VAE":
            raise WeightsError(
                f"{path}: this looks like {kind}, not a Wan2.1 VAE (keys: {describe_keys(state)}). "
                "Pass the VAE file (Wan2.1_VAE.pth or wan_2.1_vae.safetensors) as the VAE."
            )
    return state


def _infer_config(state: dict[str, torch.Tensor], path: Path) -> VAEConfig:
    try:
        dim = state["encoder.conv1.weight"].shape[0]
        z_dim = state["conv2.weight"].shape[0]
    except KeyError as exc:
        raise WeightsError(f"{path}: the VAE weights lack {exc.args[0]}; the file is incomplete") from None
    if z_dim != 16:
        raise WeightsError(
            f"{path}: this VAE has {z_dim} latent channels; only the Wan2.1 VAE (16 channels) is supported"
            + (" (48 channels is the Wan2.2 VAE)" if z_dim == 48 else "")
        )
    return VAEConfig(dim=dim, z_dim=z_dim)


def _check_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
        for k in sorted(expected.keys() & state.keys())
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {describe_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {describe_keys(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {', '.join(wrong[:5])}")
    if problems:
        raise WeightsError(
            f"{path}: not a complete Wan2.1 VAE ({'; '.join(problems)}). "
            "Use the official Wan2.1_VAE.pth, ComfyUI's wan_2.1_vae.safetensors "
            "or a diffusers AutoencoderKLWan folder."
        )


def load_vae(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    cache_device: torch.device | str | None = None,
) -> WanVAE:
    """Load the Wan2.1 VAE; returns a :class:`WanVAE` with ``encode(video)`` / ``decode(latents)``.

    :param path: ``.pth``/``.safetensors`` file or folder, in the official, ComfyUI or diffusers layout.
    :param device: where the VAE runs.
    :param dtype: the dtype the VAE computes in (float32 when ``None``, as the official code);
        results are float32 whatever it is.
    :param cache_device: where the causal feature cache lives between chunks (``"cpu"`` saves
        accelerator memory on long videos); ``None`` keeps it beside the activations.
    :raises WeightsError: the file is missing, unreadable, malformed or not a Wan2.1 VAE.
    :raises InputError: ``path`` is not a path, ``dtype`` / ``device`` unknown or unsupported.
    """
    dtype = arguments.resolve_dtype(dtype, allowed=VAE_DTYPES, what="the VAE") or torch.float32
    device = arguments.check_device(device)
    path = _weights_path(as_path(path, what="VAE").expanduser())
    state = _official_state(path)
    config = _infer_config(state, path)
    with torch.device("meta"):
        model = WanVAEModel(config)
    _check_keys(model, state, path)
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    check_finite_weights(state, str(path))
    model.load_state_dict(state, assign=True)
    model.eval().requires_grad_(False)
    return WanVAE(model, cache_device=cache_device)
