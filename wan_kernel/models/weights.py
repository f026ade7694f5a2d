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
import math
import os
import pickle
import stat
import struct
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from wan_kernel.errors import InputError, WeightsError

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


def check_readable_file(path: str | os.PathLike, *, what: str = "weights") -> Path:
    """``path`` as a :class:`Path`, checked to be a regular file this process may read.

    Looked at with ``stat`` only (nothing is opened), so a FIFO, a socket or a device node is
    refused before anything blocks on it.

    :raises WeightsError: missing, a folder, not a regular file, or not readable (names the file).
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise WeightsError(f"{what} file not found: {path}") from None
    except PermissionError:
        raise WeightsError(
            f"{path}: permission denied on a folder above it; cannot read the {what}"
        ) from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise WeightsError(f"{path} is a folder, expected a {what} file")
    if not stat.S_ISREG(info.st_mode):
        raise WeightsError(
            f"{path} is {_file_kind(info.st_mode)}, not a regular file; pass the {what} file itself"
        )
    if not os.access(path, os.R_OK):
        raise WeightsError(
            f"{path}: permission denied (cannot read the {what}); check the file's permissions "
            f"(chmod u+r {path}) or run as its owner"
        )
    return path


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_for_reading(path: Path, *, what: str = "weights"):
    """Open a file checked by :func:`check_readable_file` for binary reading, without ever blocking
    (``O_NONBLOCK``: a FIFO swapped in after the check cannot hang the open)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        raise WeightsError(f"{path}: permission denied (cannot read the {what})") from None
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise WeightsError(f"{path} is not a regular file; pass the {what} file itself")
    return os.fdopen(fd, "rb")


def _header_error(path: Path, message: str) -> WeightsError:
    return WeightsError(
        f"{path}: corrupt safetensors header: {message}; the file is damaged or was not written by "
        "safetensors (download or convert it again)"
    )


def _check_header_entry(path: Path, name: str, info: object) -> None:
    """One tensor's header record: ``{"dtype": str, "shape": [int >= 0, ...], "data_offsets": [a, b]}``."""
    if not isinstance(info, dict):
        raise _header_error(path, f"the entry of tensor {name!r} is {type(info).__name__}, not a record")
    dtype = info.get("dtype")
    if not isinstance(dtype, str):
        raise _header_error(path, f"tensor {name!r} has no dtype name")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _header_error(path, f"tensor {name!r} has shape {shape!r}, expected a list of sizes >= 0")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _header_error(
            path,
            f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end] with 0 <= begin <= end",
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The parsed JSON header of a safetensors file and the byte offset where its data starts.

    Every record is checked (a dtype name, sizes >= 0, integer ``data_offsets`` inside the file).

    :raises WeightsError: unreadable, not safetensors, a malformed header, or truncated.
    """
    path = check_readable_file(path)
    with open_for_reading(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(size - 8, 100 * 1024 * 1024):
            raise WeightsError(f"{path}: not a safetensors file, or its header is corrupt")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise WeightsError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise _header_error(path, "__metadata__ is not a table of strings")
    for name, info in header.items():
        if name != "__metadata__":
            _check_header_entry(path, name, info)
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
        with open_for_reading(path) as f:
            whole = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
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


PTH_CONVERT_HINT = (
    "If you trust where the file came from, convert it once: python -c \"import torch; "
    "from safetensors.torch import save_file; sd = torch.load('{path}', weights_only=False); "
    "save_file({{k: v.contiguous() for k, v in sd.items()}}, '{stem}.safetensors')\" "
    "(use pickle.load(open('{path}', 'rb')) instead of torch.load for a plain pickle), then pass the "
    ".safetensors file"
)


def _is_legacy_pickle(path: Path) -> bool:
    """Whether ``path`` is a pickle written before torch's zip format (``torch.save`` < 1.6 or
    ``pickle.dump``): not a zip archive and starting with a pickle protocol opcode."""
    if zipfile.is_zipfile(path):
        return False
    with open_for_reading(path) as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def load_pth(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A ``.pth``/``.pt`` state dict, loaded without running any pickled code.

    :raises WeightsError: unreadable, truncated, an old (non-zip) pickle that only loads by running
        code, a pickle that needs arbitrary code, or no tensors in it.
    """
    path = check_readable_file(path)
    legacy = _is_legacy_pickle(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except pickle.UnpicklingError as exc:
        if legacy:
            raise WeightsError(
                f"{path}: an old-style (non-zip) pickle file; loading it would mean executing the code "
                f"pickled in it, which wan refuses to do. "
                + PTH_CONVERT_HINT.format(path=path, stem=path.with_suffix(""))
            ) from None
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
        if legacy:
            raise WeightsError(
                f"{path}: an old-style (non-zip) pickle file that torch cannot read safely "
                f"({type(exc).__name__}: {exc}). "
                + PTH_CONVERT_HINT.format(path=path, stem=path.with_suffix(""))
            ) from None
        raise WeightsError(f"{path}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, Mapping):
            for key in ("state_dict", "model", "module", "model_state_dict", "params"):
                if key in obj:
                    obj = obj[key]
                    break
            else:
                break
    if isinstance(obj, Mapping):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise WeightsError(f"{path}: holds no tensors in a state dict (found {type(obj).__name__})")


def read_json_object(path: Path, *, what: str) -> dict:
    """A JSON file that must hold one object (UTF-8, readable, a regular file).

    :raises WeightsError: naming the file: unreadable, not UTF-8, not JSON, or not an object.
    """
    path = check_readable_file(path, what=what)
    with open_for_reading(path, what=what) as f:
        raw = f.read(64 * 1024 * 1024)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise WeightsError(f"{path}: the {what} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise WeightsError(f"{path}: the {what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise WeightsError(f"{path}: the {what} must be a JSON object {{...}}, not a {type(value).__name__}")
    return value


def _shard_files(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = indexes[0]
        weight_map = read_json_object(index, what="shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(
                f"{index}: not a valid shard index: it needs a \"weight_map\" object of tensor name -> "
                f"shard file name (found {type(weight_map).__name__})"
            )
        bad = [v for v in weight_map.values() if not isinstance(v, str) or not v or Path(v).name != v]
        if bad:
            raise WeightsError(
                f"{index}: not a valid shard index: weight_map values must be file names in the same "
                f"folder, found {bad[0]!r}"
            )
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{folder}: shard(s) listed in {index.name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".bin"))
    return files


def resolve_weight_files(path: str | os.PathLike, *, what: str = "weights") -> list[Path]:
    """The weight files ``path`` designates: itself, or the shards inside a folder.

    :raises WeightsError: missing, unreadable, not a weight file, or a folder without weights.
    """
    path = as_path(path, what=what).expanduser()
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot look at the {what} ({exc.strerror or exc})") from None
    if not exists:
        raise WeightsError(f"{what} file not found: {path}")
    if is_dir:
        if not os.access(path, os.R_OK | os.X_OK):
            raise WeightsError(f"{path}: permission denied (cannot list the folder of {what})")
        files = _shard_files(path)
        if not files:
            raise WeightsError(f"{path}: the folder holds no .safetensors or .pth files for the {what}")
        return [check_readable_file(f, what=what) for f in files]
    check_readable_file(path, what=what)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(
            f"{path}: unsupported weight file type {path.suffix!r}; give a .safetensors, .pth/.pt file "
            "or a folder of .safetensors shards"
        )
    return [path]


def as_path(path: object, *, what: str = "weights") -> Path:
    """``path`` (a ``str`` or ``os.PathLike``) as a :class:`Path`.

    :raises InputError: anything else (``None``, a number, bytes, an object whose ``__fspath__``
        returns something other than a string), naming what was given.
    """
    if isinstance(path, Path):
        return path
    if isinstance(path, str):
        if not path.strip():
            raise InputError(f"the {what} path is empty")
        return Path(path)
    if isinstance(path, os.PathLike):
        try:
            value = os.fspath(path)
        except Exception as exc:  # a broken __fspath__
            raise InputError(f"the {what} path {path!r} cannot be turned into a path ({exc})") from None
        if isinstance(value, str):
            return Path(value)
    raise InputError(
        f"the {what} path must be a str or os.PathLike, got {type(path).__name__} ({path!r:.80})"
    )


def load_state_dict(path: str | os.PathLike, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """All tensors from a file or folder of shards, keyed as stored.

    :raises WeightsError: any file missing, unreadable or malformed (the message names it).
    :raises InputError: ``path`` is not a path.
    """
    state: dict[str, torch.Tensor] = {}
    for file in resolve_weight_files(path, what=what):
        part = load_safetensors(file) if file.suffix == ".safetensors" else load_pth(file)
        clash = state.keys() & part.keys()
        if clash:
            raise WeightsError(f"{file}: tensor(s) also present in another shard: {', '.join(sorted(clash)[:5])}")
        state.update(part)
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    check_fp8_scales(state, str(path))
    if what in FINITE_CHECKED_KINDS:
        check_finite_weights(state, str(path))
    return state


FINITE_CHECKED_KINDS = ("LoRA",)
"""Kinds of file (``what=``) checked for NaN/Inf as soon as they are read: small files whose every
value is used. Model weights are checked by their loaders once on the compute device instead."""


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def check_fp8_scales(state: Mapping[str, torch.Tensor], source: str) -> None:
    """In a scaled-fp8 file (one with any ``P.scale_weight``), every fp8 ``P.weight`` needs its scale.

    An fp8 weight stored scaled but read without its scale is off by the scale factor (typically
    100x to 1000x): the model runs and produces noise. Plain fp8 files (no scales at all) pass.

    :raises WeightsError: naming the file and the weights that lack a scale.
    """
    scaled = {k[: -len(".scale_weight")] for k in state if k.endswith(".scale_weight")}
    if not scaled and not any(k in state for k in SCALED_FP8_MARKERS):
        return
    unscaled = [
        k
        for k, v in state.items()
        if k.endswith(".weight") and v.dtype in FP8_DTYPES and k[: -len(".weight")] not in scaled
    ]
    if unscaled:
        raise WeightsError(
            f"{source}: a scaled-fp8 file, but {len(unscaled)} fp8 weight(s) have no scale_weight: "
            f"{describe_keys(unscaled)}. Without its scale such a weight is wrong by its scale factor and "
            "the model would generate noise; the file is incomplete or damaged: convert or download it again"
        )


def strip_prefix(state: dict[str, torch.Tensor], prefixes: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove the first of ``prefixes`` that every key starting with any of them shares."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


CONFIG_INT_FIELDS = frozenset(
    {
        "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_len", "freq_dim",
        "text_dim", "num_attention_heads", "attention_head_dim", "hidden_size", "intermediate_size",
        "num_hidden_layers", "vision_width", "vision_heads", "vision_layers", "image_size", "patch_size",
    }
)
"""Fields of a ``config.json`` beside the weights that must be positive integers (``true`` is not 1)."""
CONFIG_FLOAT_FIELDS = frozenset({"eps", "layer_norm_eps", "norm_eps"})
CONFIG_STR_FIELDS = frozenset({"model_type", "_class_name"})
CONFIG_SECTIONS = ("vision_config",)
"""Nested objects (transformers' CLIP config) checked with the same rules."""


def check_config_types(config: Mapping[str, object], source: str) -> None:
    """Raise a :class:`WeightsError` naming ``source`` and the field when a known ``config.json``
    field has the wrong type (``"num_heads": true``, ``"dim": "5120"``, ``"eps": null``)."""
    for key, value in config.items():
        if key in CONFIG_INT_FIELDS:
            if key == "patch_size" and isinstance(value, list):
                ok = bool(value) and all(_is_int(v) and v > 0 for v in value)
            else:
                ok = _is_int(value) and value > 0
            if not ok:
                raise WeightsError(f"{source}: \"{key}\" must be a positive integer, got {json.dumps(value)}")
        elif key in CONFIG_FLOAT_FIELDS:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or value <= 0:
                raise WeightsError(f"{source}: \"{key}\" must be a positive number, got {json.dumps(value)}")
        elif key in CONFIG_STR_FIELDS:
            if not isinstance(value, str):
                raise WeightsError(f"{source}: \"{key}\" must be a string, got {json.dumps(value)}")
        elif key in CONFIG_SECTIONS and value is not None:
            if not isinstance(value, dict):
                raise WeightsError(f"{source}: \"{key}\" must be an object, got {json.dumps(value)[:60]}")
            check_config_types(value, f"{source} ({key})")


def config_beside(path: str | os.PathLike) -> dict | None:
    """``config.json`` next to the weights (or inside the folder), if there is one.

    :raises WeightsError: it exists but is unreadable, not UTF-8 JSON, not an object, or a known
        field has the wrong type (see :func:`check_config_types`).
    """
    path = Path(path)
    candidate = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not candidate.exists() and not candidate.is_symlink():
        return None
    config = read_json_object(candidate, what="config.json")
    check_config_types(config, str(candidate))
    return config


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


def check_finite_weights(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse weights holding NaN or Inf (a damaged file, a bad conversion or merge): they make the
    model produce NaN (a black video) or quietly wrong output. Run on the tensors once they are
    on the compute device (fast there); fp8 tensors are checked through float32 one at a time.

    :raises WeightsError: naming the file and up to three tensors.
    """
    from wan_kernel.checks import nonfinite_tensors

    bad = nonfinite_tensors(state)
    if bad:
        raise WeightsError(
            f"{source}: the weights hold NaN or Inf values (in {', '.join(bad)}); the file is damaged or was "
            "saved from a diverged training run: download, convert or export it again"
        )
