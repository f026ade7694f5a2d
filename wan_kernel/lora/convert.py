"""``wan lora convert`` and ``wan lora merge`` without a DiT: LoRA files rewritten in another layout,
or several LoRAs summed into one (exactly, by stacking ranks).

Outputs are written atomically, never over an existing file unless ``overwrite``, with the
``sshs_*`` hashes recomputed (:func:`~wan_kernel.lora.formats.save_lora_file`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import attrs
import torch

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.lora.adapters import LoraModule
from wan_kernel.lora.formats import (
    LoraFile,
    layout_state_dict,
    read_lora,
    resolve_layout,
    save_lora_file,
)
from wan_kernel.lora.keys import kohya_name, official_path
from wan_kernel.lora.spec import LoraSpec, SpecLike
from wan_kernel.models.weights import describe_keys

__all__ = ["ConvertResult", "combine_loras", "convert_lora", "modules_by_path", "write_layout"]

_DEFAULT_PREFIX = {"comfyui": "diffusion_model", "diffusers": "transformer"}


def modules_by_path(lora: LoraFile, *, strict: bool, what: str) -> tuple[dict[str, LoraModule], list[str]]:
    """The modules by official path, and the tensor names that name no Wan DiT module (an error if strict)."""
    out: dict[str, LoraModule] = {}
    left = list(lora.unrecognised)
    for name, module in lora.modules.items():
        target = official_path(name)
        if target is None:
            left.extend(module.keys)
        elif target in out:
            raise WeightsError(f"{lora.path}: modules {out[target].name!r} and {name!r} both target {target}")
        else:
            out[target] = module
    if left and strict:
        raise InputError(
            f"{lora.path}: {len(left)} tensor(s) name no Wan2.1 DiT module ({describe_keys(left, 5)}); "
            f"drop --strict to {what} the rest"
        )
    if not out:
        raise InputError(
            f"{lora.path}: none of its modules is a Wan2.1 DiT module ({describe_keys(left, 3)})"
        )
    return out, sorted(left)


def _with_prefix(
    tensors: dict[str, torch.Tensor], layout: str, prefix: str | None
) -> dict[str, torch.Tensor]:
    """Replace the layout's key prefix (``diffusion_model``/``transformer``) by ``--diffusers_prefix``."""
    default = _DEFAULT_PREFIX.get(layout)
    if prefix is None or default is None or prefix == default:
        return tensors
    prefix = prefix.rstrip(".")
    return {(prefix + "." if prefix else "") + k[len(default) + 1 :]: v for k, v in tensors.items()}


def _diffusers_metadata(modules: dict[str, LoraModule]) -> dict[str, str]:
    """PEFT's config as diffusers stores it (``lora_adapter_metadata``), so mixed ranks scale right.

    After folding, every module's scale is 1: ``lora_alpha = r`` for each (``rank_pattern`` and
    ``alpha_pattern`` name the modules whose rank is not the most common one).
    """
    from wan_kernel.models.dit_keys import official_to_diffusers_key

    ranks = {official_to_diffusers_key(p): m.rank for p, m in modules.items() if m.rank}
    if not ranks:
        return {}
    common = Counter(ranks.values()).most_common(1)[0][0]
    others = {name: r for name, r in ranks.items() if r != common}
    config = {
        "r": common,
        "lora_alpha": common,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(ranks),
        "use_dora": any(m.is_dora for m in modules.values()),
        "lora_bias": any("bias" in m.tensors or "diff_b" in m.tensors for m in modules.values()),
    }
    # diffusers keys each pipeline component's config by its name ("transformer.r", ...)
    packed = {f"transformer.{k}": v for k, v in config.items()}
    return {"lora_adapter_metadata": json.dumps(packed), "format": "pt"}


@attrs.frozen
class ConvertResult:
    path: Path
    layout: str
    modules: int
    tensors: int
    left_out: tuple[str, ...]
    """Tensor names of the input that name no Wan DiT module (not written)."""


def write_layout(
    modules: dict[str, LoraModule],
    output: str | os.PathLike,
    target: str,
    *,
    metadata: dict[str, str] | None = None,
    prefix: str | None = None,
    overwrite: bool = False,
) -> tuple[Path, int]:
    """Write modules (by official path) as a LoRA file in ``target``; returns (path, tensor count)."""
    layout = resolve_layout(target)
    tensors = _with_prefix(layout_state_dict(modules, layout), layout, prefix)
    meta = dict(metadata or {})
    if layout == "diffusers":
        meta.update(_diffusers_metadata(modules))
    else:
        meta.pop("lora_adapter_metadata", None)  # the folded alpha lives in the tensors now
    return save_lora_file(output, tensors, meta, overwrite=overwrite), len(tensors)


def convert_lora(
    input: str | os.PathLike,
    output: str | os.PathLike,
    target: str = "kohya",
    *,
    prefix: str | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> ConvertResult:
    """Convert a LoRA file between layouts (same delta in every layout; metadata carried, hashes recomputed).

    :param target: ``kohya``/``default``, ``comfyui``/``other``, ``diffusers``.
    :param prefix: the seed's ``--diffusers_prefix``: the key prefix written instead of
        ``diffusion_model`` (comfyui) or ``transformer`` (diffusers).
    """
    lora = read_lora(input)
    modules, left = modules_by_path(lora, strict=strict, what="convert")
    layout = resolve_layout(target)
    path, count = write_layout(
        modules, output, layout, metadata=lora.metadata, prefix=prefix, overwrite=overwrite
    )
    return ConvertResult(path, layout, len(modules), count, tuple(left))


# --------------------------------------------------------------------------------------------
# merge: LoRAs into one LoRA (exact, concatenated ranks), or into a DiT file
# --------------------------------------------------------------------------------------------


def combine_loras(
    specs: Iterable[SpecLike],
    output: str | os.PathLike,
    *,
    target: str = "kohya",
    dtype: torch.dtype = torch.float32,
    strict: bool = False,
    overwrite: bool = False,
) -> tuple[Path, dict[str, int]]:
    """Merge LoRAs (with multipliers and patterns) into one LoRA whose delta is exactly their sum.

    Per module the factors are stacked: ``up = [m1 s1 up1 | m2 s2 up2 | ...]``, ``down = [down1; down2; ...]``
    (rank = the sum of the ranks, alpha = rank so the scale is 1); full deltas are summed.
    LoHa, LoKr and DoRA modules have no exact sum of this form and are refused.

    :returns: the path and the rank of each written module.
    """
    specs = [LoraSpec.coerce(s) for s in specs]
    if not specs:
        raise InputError("give at least one LoRA to merge (--lora_weight)")
    parts: dict[str, list[tuple[float, LoraModule]]] = {}
    sources = []
    for spec in specs:
        lora = read_lora(spec.path)
        modules, _ = modules_by_path(lora, strict=strict, what="merge")
        for path, module in modules.items():
            if not spec.selects([module.name, path, kohya_name(path)]):
                continue
            if module.kind in ("loha", "lokr") or module.is_dora:
                kind = "DoRA" if module.is_dora else module.kind.upper()
                raise InputError(
                    f"{spec.path}: module {module.name!r} is a {kind}; LoRAs of this kind cannot be summed "
                    "into "
                    "one LoRA exactly. Merge them into the DiT instead (wan lora merge --dit ...)"
                )
            parts.setdefault(path, []).append((spec.multiplier, module))
        sources.append({"file": spec.path.name, "multiplier": spec.multiplier})
    if not parts:
        raise InputError("the include/exclude patterns leave no module to merge")
    combined: dict[str, LoraModule] = {}
    ranks = {}
    for path, entries in parts.items():
        downs, ups, tensors = [], [], {}
        for multiplier, module in entries:
            t = module.tensors
            if "down" in t:
                downs.append(t["down"].float())
                ups.append(t["up"].float() * (multiplier * module.scale))
            for role in ("diff", "diff_b"):
                if role in t:
                    value = t[role].float() * multiplier
                    tensors[role] = value if role not in tensors else tensors[role] + value
            if "bias" in t:
                value = t["bias"].float().flatten() * (multiplier * module.scale)
                tensors["diff_b"] = value if "diff_b" not in tensors else tensors["diff_b"] + value
        if downs:
            tensors["down"] = torch.cat(downs, dim=0).to(dtype)
            tensors["up"] = torch.cat(ups, dim=1).to(dtype)
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
        alpha = float(tensors["down"].shape[0]) if downs else None
        combined[path] = LoraModule(name=path, tensors=tensors, alpha=alpha)
        ranks[path] = int(tensors["down"].shape[0]) if downs else 0
    metadata = {
        "ss_network_module": "networks.lora_wan",
        "ss_base_model_version": "wan",
        "ss_network_dim": str(max(ranks.values())),
        "ss_network_alpha": str(max(ranks.values())),
        "wan_merged_from": json.dumps(sources),
    }
    written, _ = write_layout(combined, output, target, metadata=metadata, overwrite=overwrite)
    return written, ranks
