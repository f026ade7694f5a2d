"""Reading and writing LoRA files in the layouts Wan tools use, and their metadata and hashes.

Layouts (see the README's "LoRA files" table for which tool loads which):

- ``kohya`` (musubi-tuner's training output, the default): ``lora_unet_<official path, . -> _>``
  with ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (LoHa ``.hada_*``, LoKr ``.lokr_*``,
  DoRA ``.dora_scale``, full deltas ``.diff`` / ``.diff_b``).
- ``comfyui`` (musubi's ``convert_lora.py --target other``, diffusion-pipe, ai-toolkit):
  ``diffusion_model.<official path>.lora_A.weight`` / ``.lora_B.weight``; the alpha is folded into
  both factors (each times ``sqrt(alpha / rank)``, in float32) and not stored, as the seed's
  converter does, so tools that ignore alpha apply the same delta. These are the key names
  ComfyUI's Wan key map accepts: ``comfy/lora.py::model_lora_keys_unet`` (checked at
  Comfy-Org/ComfyUI 17358c8f) maps every model weight ``diffusion_model.<path>.weight`` from
  ``lora_unet_<path with _>`` and from ``diffusion_model.<path>`` (there is no Wan-specific
  block); ``load_lora`` then reads ``.lora_A.weight``/``.lora_B.weight``, ``.alpha``,
  ``.dora_scale``, ``.diff``, ``.diff_b``, ``hada_*`` and ``lokr_*`` behind either prefix.
- ``diffusers`` (``WanPipeline.save_lora_weights``, finetrainers, SimpleTuner):
  ``transformer.<diffusers path>.lora_A.weight`` / ``.lora_B.weight``, no alpha (folded as above),
  PEFT DoRA ``.lora_magnitude_vector``, bias deltas as ``.lora_B.bias``. LoHa, LoKr, input-axis
  DoRA and full weight deltas have no diffusers form and are refused.

Read only: PEFT ``base_model.model.`` files (alpha from ``adapter_config.json`` beside the file or
diffusers' ``lora_adapter_metadata``), DiffSynth's bare names with ``.default.``.

Hashes: ``sshs_model_hash`` / ``sshs_legacy_hash`` as kohya's ``train_util.precalculate_safetensors_hashes``
computes them (sha256 of the tensor bytes of the file as ``safetensors.torch.save`` writes it with
only the ``ss_*`` metadata; the legacy hash is the first 8 hex digits of the sha256 of the 64 KiB
at offset 1 MiB), recomputed whenever a file is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.files import save_safetensors
from wan_kernel.lora.adapters import LoraModule
from wan_kernel.lora.keys import NETWORK_KEYS, kohya_name, official_path, split_key
from wan_kernel.models.dit_keys import official_to_diffusers_key
from wan_kernel.models.weights import (
    describe_keys,
    guess_model_kind,
    load_state_dict,
    read_safetensors_metadata,
)

__all__ = [
    "LAYOUTS",
    "LoraFile",
    "detect_layout",
    "factors_state_dict",
    "kohya_hashes",
    "layout_state_dict",
    "read_lora",
    "save_lora_file",
    "save_safetensors_atomic",
]

LAYOUTS = ("kohya", "comfyui", "diffusers")
"""The layouts :func:`layout_state_dict` writes."""
LAYOUT_ALIASES = {"default": "kohya", "other": "comfyui", "musubi": "kohya", "peft": "diffusers"}
"""The seed's ``convert_lora.py --target`` spellings (``default``, ``other``) and other names."""


def resolve_layout(name: str) -> str:
    layout = LAYOUT_ALIASES.get(name, name)
    if layout not in LAYOUTS:
        known = ", ".join([*LAYOUTS, *LAYOUT_ALIASES])
        raise InputError(f"unknown LoRA layout {name!r}; known: {known}")
    return layout


@attrs.define
class LoraFile:
    """A parsed LoRA file.

    :param modules: by module name as spelled in the file.
    :param unrecognised: tensor names that belong to no usable module (unknown suffixes, a lone
        ``alpha``, ...): never merged, always reported.
    :param metadata: the safetensors metadata (empty for ``.pth`` files).
    """

    path: Path | None
    layout: str
    modules: dict[str, LoraModule]
    unrecognised: list[str] = attrs.Factory(list)
    metadata: dict[str, str] = attrs.Factory(dict)

    @property
    def by_official_path(self) -> dict[str, LoraModule]:
        """The modules that name a Wan DiT module, by official path (others left out)."""
        out = {}
        for name, module in self.modules.items():
            target = official_path(name)
            if target is not None:
                out[target] = module
        return out


def detect_layout(keys: list[str] | Mapping[str, Any]) -> str:
    """``kohya``, ``comfyui``, ``diffusers``, ``peft`` or ``official`` (bare names) for LoRA tensor names."""
    names = list(keys)
    if any(n.startswith(("lora_unet_", "lycoris_", "lora_transformer_")) for n in names):
        return "kohya"
    if any(n.startswith(("diffusion_model.", "model.diffusion_model.")) for n in names):
        return "comfyui"
    if any(n.startswith("transformer.") or ".attn1." in n or ".attn2." in n for n in names):
        return "diffusers"
    if any(n.startswith("base_model.model.") for n in names):
        return "peft"
    return "official"


def _peft_alpha(path: Path, metadata: Mapping[str, str]) -> tuple[float | None, bool, dict[str, float]]:
    """``(lora_alpha, use_rslora, alpha_pattern)`` from diffusers' metadata or ``adapter_config.json``."""
    config: Any = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            config = {}
    beside = path.parent / "adapter_config.json"
    if not config and beside.is_file():
        try:
            config = json.loads(beside.read_text())
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{beside}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        return None, False, {}
    # diffusers packs the transformer's config as "transformer.lora_alpha", ...
    flat = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v for k, v in config.items()}
    alpha = flat.get("lora_alpha")
    pattern = flat.get("alpha_pattern") or {}
    return (
        float(alpha) if isinstance(alpha, (int, float)) else None,
        bool(flat.get("use_rslora", False)),
        {str(k): float(v) for k, v in pattern.items()} if isinstance(pattern, dict) else {},
    )


def parse_lora(
    sd: Mapping[str, torch.Tensor], *, path: Path | None = None, metadata: Mapping[str, str] | None = None
) -> LoraFile:
    """A :class:`LoraFile` from LoRA tensors (``path`` for messages and PEFT's ``adapter_config.json``).

    :raises WeightsError: the tensors are no LoRA (e.g. a DiT), or a module is incomplete
        (``down`` without ``up``, ranks that disagree, a non-scalar alpha).
    """
    where = str(path) if path is not None else "LoRA"
    metadata = dict(metadata or {})
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unrecognised: list[str] = []
    network: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key in NETWORK_KEYS:
            network[key] = tensor
            continue
        split = split_key(key)
        if split is None:
            unrecognised.append(key)
            continue
        name, role = split
        groups.setdefault(name, {})[role] = (key, tensor)
    musubi_lokr = "lokr_factor" in network
    modules: dict[str, LoraModule] = {}
    for name, roles in groups.items():
        alpha = None
        if "alpha" in roles:
            key, a = roles["alpha"]
            if a.numel() != 1 or not torch.isfinite(a.float()).all():
                raise WeightsError(
                    f"{where}: LoRA module {name!r} has an alpha that is not one finite number "
                    f"({list(a.shape)})"
                )
            alpha = float(a.float().item())
        module = LoraModule(
            name=name,
            tensors={role: t for role, (_, t) in roles.items() if role != "alpha"},
            alpha=alpha,
            keys=sorted(k for k, _ in roles.values()),
            musubi_lokr=musubi_lokr,
        )
        if not (
            {"down", "up", "diff", "diff_b", "bias", "hada_w1_a", "hada_w1_b"} & module.tensors.keys()
        ) and (module.kind != "lokr"):
            unrecognised.extend(module.keys)  # a lone alpha / dora_scale / magnitude: nothing to merge
            continue
        problems = module.problems()
        if problems:
            raise WeightsError(f"{where}: LoRA module {name!r} {problems[0]}; the file is incomplete")
        modules[name] = module
    if not modules:
        raise WeightsError(
            f"{where}: not a LoRA file: it looks like {guess_model_kind(list(sd))} "
            f"(its tensors: {describe_keys(list(sd), 3)}); pass a LoRA with lora_down/lora_up, "
            "lora_A/lora_B, LoHa or LoKr tensors"
        )
    if path is not None and not any(m.alpha is not None for m in modules.values()):
        lora_alpha, rslora, alpha_pattern = _peft_alpha(path, metadata)
        for module in modules.values():
            matching = (a for p, a in alpha_pattern.items() if re.match(rf"(.*\.)?{p}$", module.name))
            alpha = next(matching, lora_alpha)
            if alpha is not None and module.rank:
                module.alpha = alpha * math.sqrt(module.rank) if rslora else alpha
    return LoraFile(
        path=path,
        layout=detect_layout(list(sd)),
        modules=modules,
        unrecognised=sorted(unrecognised),
        metadata=metadata,
    )


def check_finite_lora(sd: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse a LoRA holding NaN or Inf (a diverged training run): every tool that reads one
    (merge, convert, resize, EMA, generation) would otherwise write or generate garbage.

    :raises WeightsError: naming the file and the first such tensor.
    """
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise WeightsError(
            f"{path}: this LoRA holds NaN/Inf values in {bad[0]}{more}; it is unusable (a training run "
            "that diverged?): take an earlier checkpoint"
        )


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Parse a LoRA file of any supported layout (see the module docstring).

    :raises WeightsError: the file is missing, unreadable, not a LoRA, has an incomplete module, or
        holds NaN/Inf values (merged or applied, they would turn every output black).
    """
    path = Path(path).expanduser()
    sd = load_state_dict(path, what="LoRA")
    check_finite_lora(sd, path)
    metadata = read_safetensors_metadata(path) if path.suffix == ".safetensors" and path.is_file() else {}
    return parse_lora(sd, path=path, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_KOHYA_SUFFIX = {"down": ".lora_down.weight", "up": ".lora_up.weight"}
_AB_SUFFIX = {"down": ".lora_A.weight", "up": ".lora_B.weight"}


def _folded(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` each times ``sqrt(alpha / rank)``, computed and stored in float32.

    Storing a folded 16-bit factor back in 16 bits would round the delta by up to 2^-8; float32
    keeps the converted file's delta equal to the original's (to 1e-7). Scale 1: left as stored.
    """
    down, up = module.tensors["down"], module.tensors["up"]
    if module.alpha is None or module.scale == 1.0:
        return down, up
    s = math.sqrt(abs(module.scale))
    return down.float() * s, up.float() * math.copysign(s, module.scale)


def layout_state_dict(modules: Mapping[str, LoraModule], layout: str = "kohya") -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in ``layout`` (``kohya``/``default``, ``comfyui``/``other``,
    ``diffusers``), from modules keyed by official module path.

    Every layout changes the model by the same delta: kohya always stores an alpha (``rank`` when
    the module had none, so that the scale stays 1); comfyui and diffusers fold ``alpha / rank``
    into the factors. LoHa/LoKr keep their tensors and alpha (kohya, comfyui).

    :raises InputError: a module has no form in ``layout`` (LoHa, LoKr, full deltas, input-axis
        DoRA in diffusers).
    """
    layout = resolve_layout(layout)
    out: dict[str, torch.Tensor] = {}
    for path, module in modules.items():
        kind = module.kind
        if layout == "diffusers":
            if kind in ("loha", "lokr") or "diff" in module.tensors:
                raise InputError(
                    f"LoRA module {path} is a {'full delta' if kind == 'diff' else kind.upper()}, which the "
                    "diffusers layout cannot hold (diffusers/PEFT files hold plain low-rank pairs); "
                    "convert to "
                    "--target kohya or comfyui instead"
                )
            stem = "transformer." + official_to_diffusers_key(path)
        elif layout == "comfyui":
            stem = "diffusion_model." + path
        else:
            stem = kohya_name(path)
        t = module.tensors
        if kind == "lora":
            if layout == "kohya":
                out[stem + _KOHYA_SUFFIX["down"]] = t["down"]
                out[stem + _KOHYA_SUFFIX["up"]] = t["up"]
                alpha = module.alpha if module.alpha is not None else float(module.rank)
                out[stem + ".alpha"] = torch.tensor(
                    alpha, dtype=torch.float32
                )  # exact scale in any save dtype
            else:
                down, up = _folded(module)
                out[stem + _AB_SUFFIX["down"]] = down
                out[stem + _AB_SUFFIX["up"]] = up
        elif kind == "lokr" and module.rank is None:
            # both Kronecker factors full: tools disagree on what alpha means here (LyCORIS and
            # ComfyUI ignore it, musubi-tuner divides by max(w2.shape)), so the scale is baked into
            # w2 (float32) and no alpha is written: every tool then applies scale 1
            for role, tensor in t.items():
                if role.startswith("lokr_"):
                    out[f"{stem}.{role}"] = tensor
            if module.scale != 1.0:
                out[stem + ".lokr_w2"] = t["lokr_w2"].float() * module.scale
        elif kind in ("loha", "lokr"):
            for role, tensor in t.items():
                if role.startswith(("hada_", "lokr_")):
                    out[f"{stem}.{role}"] = tensor
            if module.alpha is not None:
                out[stem + ".alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
        bias = _bias_delta_tensor(module)
        if bias is not None:
            if layout == "diffusers":
                if kind != "lora":
                    raise InputError(
                        f"LoRA module {path} changes only a bias, which the diffusers layout cannot hold; "
                        "convert to --target kohya or comfyui instead"
                    )
                # PEFT adds scale * lora_B.bias; with the alpha folded the scale is 1
                out[stem + ".lora_B.bias"] = bias
            else:
                out[stem + ".diff_b"] = bias
        if "diff" in t:
            out[stem + ".diff"] = t["diff"]
        if "magnitude" in t or "dora_scale" in t:
            out.update(_dora_tensors(path, stem, module, layout))
    return out


def factors_state_dict(
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float | None]], layout: str = "kohya"
) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors from plain factors ``{official path: (down [r, in], up [out, r], alpha)}``.

    What a trainer saves: ``save_lora_file(path, factors_state_dict(factors), metadata)`` writes
    musubi-tuner's layout (``lora_unet_<path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).
    """
    modules = {
        path: LoraModule(name=path, tensors={"down": down, "up": up}, alpha=alpha)
        for path, (down, up, alpha) in factors.items()
    }
    return layout_state_dict(modules, layout)


def _bias_delta_tensor(module: LoraModule) -> torch.Tensor | None:
    """The module's total bias change (``diff_b + scale * lora_B.bias``) in float32, or ``None``."""
    return module.bias_delta()


def _dora_tensors(path: str, stem: str, module: LoraModule, layout: str) -> dict[str, torch.Tensor]:
    t = module.tensors
    if "magnitude" in t:
        m = t["magnitude"].flatten()
        return (
            {stem + ".lora_magnitude_vector": m}
            if layout == "diffusers"
            else {stem + ".dora_scale": m[:, None]}
        )
    scale = t["dora_scale"]
    if layout != "diffusers":
        return {stem + ".dora_scale": scale}
    if scale.dim() > 1 and scale.shape[0] == 1 and scale.shape[1] != 1:
        raise InputError(
            f"LoRA module {path} is a DoRA normalised per input column (dora_scale {list(scale.shape)}), "
            "which PEFT/diffusers cannot hold (their magnitude is per output row); "
            "keep it in kohya or comfyui"
        )
    return {stem + ".lora_magnitude_vector": scale.flatten()}


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya's ``precalculate_safetensors_hashes``."""
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save({k: v.contiguous() for k, v in tensors.items()}, ss)
    buf = io.BytesIO(data)
    header_len = int.from_bytes(buf.read(8), "little")
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_safetensors_atomic(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write tensors as safetensors through :func:`wan_kernel.files.save_safetensors` (a hidden
    temporary renamed when complete); ``--overwrite`` semantics: an existing ``path`` is refused
    unless ``overwrite``, then replaced.

    :raises InputError: ``path`` exists and ``overwrite`` is false, or it is a folder.
    :raises OutputError: the folder cannot be written, or the disk filled up; no temporary is left.
    """
    path = check_output_file(path, overwrite=overwrite)
    # without --overwrite the name is published exclusively: a file another run made meanwhile is
    # never replaced (ours then gets a free ``_N`` name, which is returned)
    return save_safetensors(path, tensors, metadata, exclusive=not overwrite)


def check_output_file(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``path`` when a file can be written there (call it before the work, too).

    :raises InputError: it exists and ``overwrite`` is false, or it is a folder.
    :raises OutputError: its folder cannot take files (a part of the path is a file, read-only,
        immutable, a full disk).
    """
    from wan_kernel.files import check_output_folder

    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a .safetensors file name")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it")
    check_output_folder(path.parent, what=f"folder for {path.name}")
    return path


def save_lora_file(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write LoRA tensors as safetensors, atomically, with ``sshs_*`` hashes recomputed into the metadata.

    This is the writer for every LoRA file wan makes (conversion, merging, resizing, training):
    ``save_lora_file(path, layout_state_dict(modules, "kohya"), metadata)``.

    :raises InputError: ``path`` exists and ``overwrite`` is false.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = kohya_hashes(tensors, meta)
    return save_safetensors_atomic(path, tensors, meta, overwrite=overwrite)
