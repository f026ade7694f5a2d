"""``wan lora info``: what a LoRA file holds, which model it fits, its metadata and hashes."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from wan_kernel.lora.adapters import LoraModule
from wan_kernel.lora.convert import modules_by_path
from wan_kernel.lora.formats import (
    kohya_hashes,
    read_lora,
)
from wan_kernel.models.weights import describe_keys, load_state_dict

__all__ = ["format_info", "lora_info"]


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
    modules, left = modules_by_path(lora, strict=False, what="read")
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
