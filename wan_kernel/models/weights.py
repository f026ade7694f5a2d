"""Reading weight files: single safetensors, folders of shards, and ``.pth``/``.pt`` state dicts.

Safetensors files are memory-mapped: tensors are views into the mapped file, so reading a 14B
checkpoint costs no RAM until a tensor is touched, and ``load_state_dict(assign=True)`` adopts
them without a second copy. ``.pth`` files load with ``torch.load(weights_only=True)``: a pickle
that tries to run code is refused. Every problem becomes a :class:`WeightsError` that names the
file and says what to do.

Scaled-fp8 files (musubi-tuner / ``fp8_scaled``, ComfyUI ``scaled_fp8``) store ``P.weight`` in fp8
with a ``P.scale_weight``; :func:`dequantize_fp8_weight` and :func:`fold_fp8_scales` are the one
place the kernel turns them back into plain weights (the DiT and T5 loaders, LoRA merging).
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch

from wan_kernel.errors import WeightsError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

SCALED_FP8_MARKERS = ("scaled_fp8",)
"""ComfyUI's marker tensor of scaled-fp8 files; it carries no weights."""
FP8_SCALE_SUFFIXES = (".scale_weight", ".scale_weight_tensor", ".scale_input")
"""The per-layer keys of a scaled-fp8 file beside ``P.weight``: the weight scale, musubi's two-level
per-tensor factor, and ComfyUI's static activation scale (unused here: activations are not fp8)."""


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the byte offset where its data starts."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100 * 1024 * 1024):
            raise WeightsError(f"{path}: not a safetensors file, or its header is corrupt")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    data_len = max((info["data_offsets"][1] for k, info in header.items() if k != "__metadata__"), default=0)
    if data_start + data_len > size:
        raise WeightsError(
            f"{path}: the file is truncated ({size} bytes, its header describes {data_start + data_len}); "
            "download or copy it again"
        )
    return header, data_start


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` string table of a safetensors file (empty when absent)."""
    header, _ = read_safetensors_header(path)
    return dict(header.get("__metadata__") or {})


def load_safetensors(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, as views into a memory map of it when possible."""
    path = Path(path)
    header, data_start = read_safetensors_header(path)
    if mmap:
        nbytes = path.stat().st_size
        storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=nbytes)
        whole = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,))
    else:
        whole = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = list(info["shape"])
        raw = whole[data_start + begin : data_start + end]
        numel = 1
        for s in shape:
            numel *= s
        if numel * dtype.itemsize != end - begin:
            raise WeightsError(f"{path}: tensor {name!r} has a corrupt size in the header")
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        if (data_start + begin) % dtype.itemsize:
            raw = raw.clone()  # unaligned in the file: one small copy so .view(dtype) works
        tensors[name] = raw.view(dtype).view(shape)
    return tensors


def load_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.pt`` state dict, loaded without running any pickled code."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(
            f"{path}: refused to load. The file is a pickle that needs arbitrary code to unpickle "
            f"(weights_only=True rejected it: {str(exc).splitlines()[0]}). Convert it to .safetensors "
            "with the tool that made it, or use the official release files."
        ) from None
    except RuntimeError as exc:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise WeightsError(f"{path}: not a readable PyTorch file ({str(exc).splitlines()[0]})") from None
    except Exception as exc:  # zipfile / EOF errors on truncated files
        raise WeightsError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            for key in ("state_dict", "model", "module", "model_state_dict", "params"):
                if key in obj:
                    obj = obj[key]
                    break
            else:
                break
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise WeightsError(f"{path}: holds no tensors in a state dict (found {type(obj).__name__})")


def _shard_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise WeightsError(f"{indexes[0]}: not a valid shard index ({exc})") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{folder}: shard(s) listed in {indexes[0].name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".bin"))
    return files


def resolve_weight_files(path: str | os.PathLike, *, what: str = "weights") -> list[Path]:
    """The weight files ``path`` designates: itself, or the shards inside a folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise WeightsError(f"{what} file not found: {path}")
    if path.is_dir():
        files = _shard_files(path)
        if not files:
            raise WeightsError(f"{path}: the folder holds no .safetensors or .pth files for the {what}")
        return files
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(
            f"{path}: unsupported weight file type {path.suffix!r}; give a .safetensors, .pth/.pt file "
            "or a folder of .safetensors shards"
        )
    return [path]


def load_state_dict(path: str | os.PathLike, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """All tensors from a file or folder of shards, keyed as stored."""
    state: dict[str, torch.Tensor] = {}
    for file in resolve_weight_files(path, what=what):
        part = load_safetensors(file) if file.suffix == ".safetensors" else load_pth(file)
        clash = state.keys() & part.keys()
        if clash:
            raise WeightsError(f"{file}: tensor(s) also present in another shard: {', '.join(sorted(clash)[:5])}")
        state.update(part)
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove the first of ``prefixes`` that every key starting with any of them shares."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def config_beside(path: str | os.PathLike) -> dict | None:
    """``config.json`` next to the weights (or inside the folder), if there is one."""
    path = Path(path)
    candidate = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not candidate.is_file():
        return None
    try:
        return json.loads(candidate.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{candidate}: not valid JSON ({exc})") from None


def describe_keys(keys: Iterable[str], limit: int = 5) -> str:
    """A short, readable sample of tensor names for error messages."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def key_mismatch(expected: Iterable[str], present: Iterable[str], *, missing_only: bool = False) -> str:
    """``missing a, b; unexpected c`` (samples by :func:`describe_keys`) for a loader's error
    message; empty when every expected name is present (and, unless ``missing_only``, no other)."""
    expected, present = set(expected), set(present)
    parts = []
    if missing := expected - present:
        parts.append(f"missing {describe_keys(missing)}")
    if not missing_only and (unexpected := present - expected):
        parts.append(f"unexpected {describe_keys(unexpected)}")
    return "; ".join(parts)


def assign_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: object, what: str) -> None:
    """``model.load_state_dict(state, strict=True, assign=True)``, with a shape mismatch turned into a
    :class:`WeightsError` that names the file and the model (``what``: "a umt5 encoder")."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{source}: tensor shapes do not fit {what} ({str(exc).splitlines()[-1].strip()})"
        ) from None


def float_elements_by_dtype(state: Mapping[str, torch.Tensor]) -> dict[torch.dtype, int]:
    """How many floating-point values ``state`` stores in each dtype (for a loader's default dtype)."""
    counts: dict[torch.dtype, int] = {}
    for t in state.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return counts


def guess_model_kind(keys: Iterable[str]) -> str:
    """What a set of tensor names looks like, for 'this is not a ... file' messages."""
    keys = list(keys)
    joined = "\n".join(keys[:2000])
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_A." in k or ".lora_down." in k for k in keys):
        return "a LoRA file"
    if "blocks.0.self_attn.q.weight" in joined or "self_attn.norm_q" in joined or "condition_embedder" in joined:
        return "a Wan DiT"
    if "encoder.conv1" in joined or "decoder.conv1" in joined or "quant_conv" in joined:
        return "a Wan VAE"
    if "token_embedding" in joined or "shared.weight" in joined or "encoder.block.0.layer" in joined:
        return "a T5 text encoder"
    if "visual." in joined or "vision_model." in joined or "patch_embedding" in joined:
        return "a CLIP model"
    return "an unrecognised model"


# --------------------------------------------------------------------------------------------
# scaled fp8
# --------------------------------------------------------------------------------------------


def fp8_weight_scale(sd: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor | None:
    """The total scale of the layer ``prefix``: ``P.scale_weight`` times musubi's two-level
    ``P.scale_weight_tensor`` factor (if any); ``None`` when the layer has no ``scale_weight``.

    :raises WeightsError: ``scale_weight_tensor`` is not one value.
    """
    scale = sd.get(prefix + ".scale_weight")
    factor = sd.get(prefix + ".scale_weight_tensor")
    if scale is None or factor is None:
        return scale
    if factor.numel() != 1:
        raise WeightsError(f"{prefix}.scale_weight_tensor has shape {list(factor.shape)}; expected one value")
    return scale.float() * factor.float().reshape(())


def dequantize_fp8_weight(
    weight: torch.Tensor, scale: torch.Tensor | None, *, dtype: torch.dtype, name: str = "weight"
) -> torch.Tensor:
    """``weight * scale`` computed in float32 and cast to ``dtype`` (``scale`` ``None``: a plain cast).

    Scale layouts: one value (scalar or ``[1]``: per tensor); ``[out]`` / ``[out, 1, ...]`` (per
    output channel); for a 2-D weight ``[out, in]`` also ``[out, nb, 1]`` or ``[out, nb]`` (one
    scale per block of ``in / nb`` inputs of a row: the weight is viewed as ``[out, nb, block]``).
    Give the total scale of a layer (:func:`fp8_weight_scale`) for musubi's two-level files.

    :raises WeightsError: the scale fits none of these layouts.
    """
    w = weight.float()
    if scale is None:
        return w.to(dtype)
    s = scale.to(device=w.device, dtype=torch.float32)
    out_features, n = w.shape[0], s.numel()
    if n == 1:
        w = w * s.reshape(())
    elif n == out_features and s.shape[0] == out_features:
        w = w * s.reshape(out_features, *([1] * (w.ndim - 1)))
    elif (
        w.ndim == 2
        and s.ndim in (2, 3)
        and s.shape[0] == out_features
        and s[0].numel() == s.shape[1]
        and w.shape[1] % s.shape[1] == 0
    ):
        blocks = s.shape[1]
        grouped = w.view(out_features, blocks, w.shape[1] // blocks)  # [out, nb, block]
        w = (grouped * s.reshape(out_features, blocks, 1)).view(w.shape)
    else:
        raise WeightsError(
            f"{name}: its scale_weight of shape {list(scale.shape)} does not fit the weight "
            f"{list(weight.shape)}; expected one value, [out, 1] or [out, in/block, 1]"
        )
    return w.to(dtype)


def fold_fp8_scales(
    sd: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], default: torch.dtype
) -> dict[str, torch.Tensor]:
    """Dequantize every ``P.weight`` that has a ``P.scale_weight`` (scaled-fp8 files read unquantized).

    Read: musubi-tuner / ``fp8_scaled`` files (block ``[out, in/64, 1]``, per channel ``[out, 1]``,
    per tensor ``[1]``; the two-level ``P.scale_weight_tensor`` factor is multiplied in) and
    ComfyUI ``scaled_fp8`` files (scalar scales; their ``P.scale_input`` and the ``scaled_fp8``
    marker carry no weights and are dropped). A weight becomes ``dtypes[key]`` (else ``default``);
    every other tensor is returned as it is (fp8 tensors without a scale too). The input mapping
    is not modified.

    :raises WeightsError: a scale does not fit its weight (the message names the key).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in SCALED_FP8_MARKERS or key.endswith(FP8_SCALE_SUFFIXES):
            continue
        scale = fp8_weight_scale(sd, key[: -len(".weight")]) if key.endswith(".weight") else None
        if scale is not None:
            value = dequantize_fp8_weight(value, scale, dtype=dtypes.get(key, default), name=key)
        out[key] = value
    return out
