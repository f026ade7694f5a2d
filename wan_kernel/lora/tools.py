"""What ``wan lora convert | merge | info | resize | ema`` do, as functions.

Every output is written atomically (:func:`~wan_kernel.lora.formats.save_safetensors_atomic`) and
never over an existing file unless ``overwrite``. LoRA outputs get the ``sshs_*`` hashes recomputed.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.lora.adapters import LoraModule
from wan_kernel.lora.formats import (
    LoraFile,
    kohya_hashes,
    layout_state_dict,
    read_lora,
    resolve_layout,
    save_lora_file,
    save_safetensors_atomic,
)
from wan_kernel.lora.keys import kohya_name, official_path
from wan_kernel.lora.merge import LoraMerge, LoraReport
from wan_kernel.lora.spec import LoraSpec, SpecLike
from wan_kernel.models.weights import describe_keys, load_state_dict, read_safetensors_metadata

__all__ = [
    "ConvertResult",
    "combine_loras",
    "convert_lora",
    "ema_loras",
    "lora_info",
    "merge_into_dit",
    "resize_lora",
]

Log = Callable[[str], None] | None

_DEFAULT_PREFIX = {"comfyui": "diffusion_model", "diffusers": "transformer"}


def _modules_by_path(lora: LoraFile, *, strict: bool, what: str) -> tuple[dict[str, LoraModule], list[str]]:
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
    modules, left = _modules_by_path(lora, strict=strict, what="convert")
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
        modules, _ = _modules_by_path(lora, strict=strict, what="merge")
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


def merge_into_dit(
    dit: str | os.PathLike,
    specs: Iterable[SpecLike],
    output: str | os.PathLike,
    *,
    quantizer: Any = None,
    strict: bool = False,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    log: Log = None,
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
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it")  # before any work
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


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------

SIZES = {1536: "1.3B", 5120: "14B"}
"""The released Wan2.1 DiT widths."""
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


_WIDTH_SIDES = {
    **{f"{attn}.{p}": ("in", "out") for attn in ("self_attn", "cross_attn") for p in "qkvo"},
    "cross_attn.k_img": ("in", "out"),
    "cross_attn.v_img": ("in", "out"),
    "ffn.0": ("in",),
    "ffn.2": ("out",),
}
"""Block modules and which of their sides (input, output) is the model width ``dim``."""


def _fit(modules: dict[str, LoraModule]) -> dict[str, Any]:
    """Which model a LoRA fits, read off the shapes and the module names."""
    dims = set()
    for path, module in modules.items():
        m = _BLOCK_RE.match(path)
        sides = _WIDTH_SIDES.get(m.group(2)) if m else None
        if sides is None:
            continue
        t = module.tensors
        if "down" in t:
            width = {"in": int(t["down"].shape[1]), "out": int(t["up"].shape[0])}
        elif "hada_w1_a" in t and "hada_t1" not in t:
            width = {"in": int(t["hada_w1_b"].shape[1]), "out": int(t["hada_w1_a"].shape[0])}
        else:
            continue
        dims.update(width[side] for side in sides)
    blocks = sorted({int(m.group(1)) for p in modules if (m := _BLOCK_RE.match(p))})
    image = any(
        p.endswith(("cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img"))
        or p.startswith("img_emb.")
        for p in modules
    )
    flf2v = "img_emb.emb_pos" in modules
    model_type = "flf2v" if flf2v else "i2v or flf2v" if image else "t2v, i2v or flf2v (no image modules)"
    if len(dims) == 1:
        dim = dims.pop()
        size = SIZES.get(dim, f"dim {dim} (not a released size)")
    elif dims:
        size = f"inconsistent widths {sorted(dims)}"
    else:
        size = "unknown (no block linears to read the width from)"
    layers = blocks[-1] + 1 if blocks else 0
    if layers > 40 or (size == "1.3B" and layers > 30):
        size += f" (but it has {layers} blocks)"
    return {"model_type": model_type, "size": size, "blocks_needed": layers}


def lora_info(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``wan lora info`` shows, as plain data (``--json`` prints it)."""
    path = Path(path).expanduser()
    lora = read_lora(path)
    modules, left = _modules_by_path(lora, strict=False, what="read")
    rows = []
    for target, module in sorted(modules.items(), key=lambda kv: _sort_key(kv[0])):
        rows.append(
            {
                "module": target,
                "name": module.name,
                "kind": module.kind + (" + DoRA" if module.is_dora else ""),
                "rank": module.rank,
                "alpha": module.alpha,
                "scale": module.scale,
            }
        )
    kinds = Counter(r["kind"] for r in rows)
    pairs = Counter((r["rank"], r["alpha"]) for r in rows)
    blocks = sorted({int(m.group(1)) for r in rows if (m := _BLOCK_RE.match(r["module"]))})
    module_types = sorted({m.group(2) if (m := _BLOCK_RE.match(r["module"])) else r["module"] for r in rows})
    tensors = load_state_dict(path, what="LoRA")
    computed = kohya_hashes(tensors, lora.metadata) if path.suffix == ".safetensors" else None
    metadata = lora.metadata
    return {
        "path": str(path),
        "layout": lora.layout,
        "tensors": len(tensors),
        "modules": len(rows),
        "kinds": dict(kinds),
        "rank_alpha": (
            {"rank": rows[0]["rank"], "alpha": rows[0]["alpha"], "uniform": True}
            if len(pairs) == 1
            else {
                "uniform": False,
                "counts": [{"rank": r, "alpha": a, "modules": n} for (r, a), n in pairs.items()],
            }
        ),
        "blocks": blocks,
        "module_types": module_types,
        "fits": _fit(modules),
        "not_wan_modules": left,
        "per_module": rows,
        "training_metadata": {k: v for k, v in metadata.items() if k.startswith("ss_")},
        "modelspec": {k: v for k, v in metadata.items() if k.startswith("modelspec.")},
        "other_metadata": {
            k: v for k, v in metadata.items() if not k.startswith(("ss_", "modelspec.", "sshs_"))
        },
        "hashes": {
            "sshs_model_hash": computed[0] if computed else None,
            "sshs_legacy_hash": computed[1] if computed else None,
            "stored_sshs_model_hash": metadata.get("sshs_model_hash"),
            "stored_sshs_legacy_hash": metadata.get("sshs_legacy_hash"),
        },
    }


def _sort_key(path: str) -> tuple:
    m = _BLOCK_RE.match(path)
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, path)


def format_info(info: dict[str, Any], *, per_module: bool = False) -> str:
    """The human form of :func:`lora_info`."""
    lines = [
        f"{info['path']}",
        f"  layout:   {info['layout']} ({info['tensors']} tensors, {info['modules']} modules: "
        + ", ".join(f"{n} {k}" for k, n in sorted(info["kinds"].items()))
        + ")",
    ]
    ra = info["rank_alpha"]
    if ra["uniform"]:
        lines.append(
            f"  rank:     {ra['rank']}, alpha {ra['alpha'] if ra['alpha'] is not None else 'none (= rank)'}"
        )
    else:
        parts = [f"rank {c['rank']} alpha {c['alpha']}: {c['modules']}" for c in ra["counts"]]
        lines.append("  rank:     varies (" + "; ".join(parts) + ")")
    blocks = info["blocks"]
    lines.append(f"  blocks:   {_ranges(blocks) if blocks else 'none'}")
    lines.append(f"  modules:  {', '.join(info['module_types'])}")
    fits = info["fits"]
    lines.append(f"  fits:     {fits['model_type']}; {fits['size']}; needs {fits['blocks_needed']} block(s)")
    if info["not_wan_modules"]:
        lines.append(
            f"  not Wan:  {len(info['not_wan_modules'])} tensor(s) "
            f"({describe_keys(info['not_wan_modules'], 3)})"
        )
    h = info["hashes"]
    if h["sshs_model_hash"]:
        stored = h["stored_sshs_model_hash"]
        note = (
            ""
            if stored is None
            else (" (matches the stored one)" if stored == h["sshs_model_hash"] else f" (stored: {stored})")
        )
        lines.append(f"  sshs_model_hash:  {h['sshs_model_hash']}{note}")
        lines.append(f"  sshs_legacy_hash: {h['sshs_legacy_hash']}")
    for title, key in (
        ("training metadata", "training_metadata"),
        ("modelspec", "modelspec"),
        ("other metadata", "other_metadata"),
    ):
        if info[key]:
            lines.append(f"  {title}:")
            for k, v in sorted(info[key].items()):
                v = v if len(v) <= 200 else v[:200] + "..."
                lines.append(f"    {k} = {v}")
    if per_module:
        lines.append("  per module:")
        for r in info["per_module"]:
            lines.append(
                f"    {r['module']}: {r['kind']} rank {r['rank']} alpha {r['alpha']} (scale {r['scale']:g})"
            )
    return "\n".join(lines)


def _ranges(values: Sequence[int]) -> str:
    out, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


# --------------------------------------------------------------------------------------------
# resize
# --------------------------------------------------------------------------------------------


def resize_lora(
    input: str | os.PathLike,
    output: str | os.PathLike,
    rank: int,
    *,
    target: str | None = None,
    dtype: torch.dtype | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> tuple[Path, dict[str, float]]:
    """Reduce every module to at most ``rank`` by an SVD of its delta; report the kept energy per module.

    ``dW = U S V^T`` (float32); ``up = U_r sqrt(S_r)``, ``down = sqrt(S_r) V_r^T``, alpha = r (scale 1).
    kept energy = ``sum(S_r^2) / sum(S^2)`` (1.0: the new delta is exact). LoHa and LoKr modules
    become plain LoRAs; DoRA magnitudes, bias and full deltas are kept as they are.

    :returns: the path and the kept energy of each module.
    """
    if rank < 1:
        raise InputError(f"--rank must be at least 1, got {rank}")
    lora = read_lora(input)
    modules, _ = _modules_by_path(lora, strict=strict, what="resize")
    layout = (
        resolve_layout(target)
        if target
        else (lora.layout if lora.layout in ("kohya", "comfyui", "diffusers") else "kohya")
    )
    out: dict[str, LoraModule] = {}
    energy: dict[str, float] = {}
    for path, module in modules.items():
        product = module.product()
        if product is None:
            out[path] = module
            continue
        delta = product.flatten(1) * module.scale  # [out, in * k]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        total = float(s.pow(2).sum())
        energy[path] = float(s[:r].pow(2).sum()) / total if total > 0 else 1.0
        root = s[:r].sqrt()
        up = u[:, :r] * root  # [out, r]
        down = root[:, None] * vh[:r]  # [r, in * k]
        t = module.tensors
        store = dtype or (t["down"].dtype if "down" in t else torch.float32)
        if "down" in t and t["down"].dim() > 2:  # a conv LoRA keeps its kernel dims
            down = down.reshape(r, *t["down"].shape[1:])
            up = up.reshape(up.shape[0], r, *([1] * (t["down"].dim() - 2)))
        tensors = {"down": down.to(store), "up": up.to(store)}
        for role in ("diff", "diff_b", "dora_scale", "magnitude"):
            if role in t:
                tensors[role] = t[role]
        if "bias" in t:
            tensors["diff_b"] = module.bias_delta()
        out[path] = LoraModule(name=path, tensors=tensors, alpha=float(r))
    metadata = dict(lora.metadata)
    if "ss_network_dim" in metadata:
        metadata["ss_network_dim"] = str(rank)
        metadata["ss_network_alpha"] = str(rank)
    written, _ = write_layout(out, output, layout, metadata=metadata, overwrite=overwrite)
    return written, energy


# --------------------------------------------------------------------------------------------
# post-hoc EMA
# --------------------------------------------------------------------------------------------


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Karras et al. 2024 (EDM2), Algorithm 2: the largest real root of
    ``g^3 + 7g^2 + (16 - t)g + 12 - t`` with ``t = sigma_rel^-2``."""
    import numpy as np

    if not 0 < sigma_rel < 12**-0.5:
        raise InputError(f"--sigma_rel must be between 0 and {12**-0.5:.4f}, got {sigma_rel}")
    t = sigma_rel**-2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    return float(roots[np.isreal(roots) & (roots.real >= 0)].real.max())


def ema_betas(
    count: int, *, beta: float = 0.95, beta2: float | None = None, sigma_rel: float | None = None
) -> list[float]:
    """The decay used when folding in checkpoint 2, 3, ... (musubi-tuner's ``lora_post_hoc_ema.py``).

    ``sigma_rel``: the power-function EMA, ``beta_t = (1 - 1/t) ** (gamma + 1)`` for t = 1, 2, ...;
    otherwise ``beta`` interpolated linearly to ``beta2`` over the checkpoints after the first.
    """
    steps = count - 1
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1 - 1 / t) ** (gamma + 1) for t in range(1, steps + 1)]
    end = beta if beta2 is None else beta2
    return [beta + (end - beta) * (i / (steps - 1)) if steps > 1 else beta for i in range(steps)]


def ema_loras(
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    beta: float = 0.95,
    beta2: float | None = None,
    sigma_rel: float | None = None,
    sort: bool = True,
    overwrite: bool = False,
    log: Log = None,
) -> Path:
    """Average a series of LoRA checkpoints of one run with the seed's post-hoc EMA.

    As musubi-tuner's ``lora_post_hoc_ema.py``: the files sorted by modification time (unless
    ``sort`` is false); the oldest initialises the average (float32); each later file ``x`` gives
    ``avg = beta * avg + (1 - beta) * x``; ``.alpha`` tensors must agree and are not averaged;
    non-float tensors are kept from the first file; tensors are stored back in their dtypes; the
    metadata is the newest file's, with the hashes recomputed.
    """
    files = [Path(p).expanduser() for p in paths]
    if len(files) < 2:
        raise InputError("post-hoc EMA needs at least two LoRA checkpoints")
    for f in files:
        if not f.is_file():
            raise WeightsError(f"{f}: file not found")
    if sort:
        files.sort(key=lambda f: f.stat().st_mtime)
    betas = ema_betas(len(files), beta=beta, beta2=beta2, sigma_rel=sigma_rel)
    first = load_state_dict(files[0], what="LoRA")
    dtypes = {k: v.dtype for k, v in first.items()}
    avg = {k: v.float() if v.is_floating_point() else v.clone() for k, v in first.items()}
    for f, b in zip(files[1:], betas):
        if log is not None:
            log(f"{f.name}: beta {b:.4f}")
        sd = load_state_dict(f, what="LoRA")
        if sd.keys() != avg.keys():
            missing, extra = avg.keys() - sd.keys(), sd.keys() - avg.keys()
            raise WeightsError(
                f"{f}: its tensors differ from {files[0].name}'s (missing {describe_keys(missing, 3)}; "
                f"extra {describe_keys(extra, 3)}); EMA averages checkpoints of one training run"
            )
        for key, value in sd.items():
            if key.endswith(".alpha"):
                if not torch.allclose(avg[key].float(), value.float()):
                    raise WeightsError(
                        f"{f}: {key} is {value.item()}, not {avg[key].item()} as in the other files"
                    )
                continue
            if not value.is_floating_point():
                continue
            avg[key] = avg[key] * b + value.float() * (1 - b)
    out = {k: v.to(dtypes[k]) for k, v in avg.items()}
    metadata = read_safetensors_metadata(files[-1]) if files[-1].suffix == ".safetensors" else {}
    return save_lora_file(output, out, metadata, overwrite=overwrite)
