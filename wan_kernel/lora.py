"""LoRA at inference: read LoRA files of the common layouts and merge them into a Wan2.1 DiT.

A LoRA adds ``multiplier * scale * (up @ down)`` to a weight ``W [out, in]`` (``down [r, in]``,
``up [out, r]``, ``scale = alpha / r``; no alpha means ``alpha = r``, scale 1). Merging is done in
float32 and cast back to the weight's dtype, once per weight however many LoRAs touch it.

Layouts read (the module name is mapped to the DiT's official module path, e.g.
``blocks.0.self_attn.q``, using the model's own module names, so the mapping is unambiguous):

- kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (also Wan-Fun's ``lora_unet__`` and mixed ``lora_unet_blocks_0.self_attn.q``);
- ComfyUI / "original": ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` / ``.lora_B.weight``
  or ``.lora_down`` / ``.lora_up`` (optional ``.alpha``), full deltas ``.diff`` / ``.diff_b``;
- diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (diffusers module names,
  mapped back with :mod:`wan_kernel.models.dit_keys`), ``base_model.model.``, ``.default.``;
  the PEFT ``lora_alpha`` (safetensors metadata ``lora_adapter_metadata`` or an
  ``adapter_config.json`` beside the file) gives the scale when the file has no ``.alpha``.

Convolution LoRAs (``patch_embedding``, a Conv3d) merge as ``(up.flatten(1) @ down.flatten(1))``
reshaped to the weight's shape. LoRA modules with no target in the model are reported (a
:class:`LoraWarning` naming a few); when none of a file's modules match, the LoRA is for another
model and an :class:`~wan_kernel.errors.InputError` is raised.

Two ways in:

- :func:`merge_loras_into_state_dict` on a state dict, before ``load_state_dict`` and before any
  fp8 quantization; :func:`merging_quantizer` wraps a quantizer so ``load_dit(quant=...)`` merges
  right before quantizing, and :func:`load_dit_with_loras` does the whole load;
- :func:`apply_loras` on a live, unquantized model (what the generation pipeline calls).

``include_patterns`` / ``exclude_patterns`` are regular expressions searched (``re.search``, as
musubi-tuner's ``--include_patterns``) in a LoRA module's names: its name in the file, its kohya
spelling (``lora_unet_blocks_0_self_attn_q``) and its official path (``blocks.0.self_attn.q``).
A module is merged when some include pattern matches (or none is given) and no exclude pattern
matches. There are no default patterns at inference.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import attrs
import torch
from torch import nn

from wan_kernel.errors import InputError, WeightsError
from wan_kernel.models.dit_keys import (
    LAYOUTS,
    diffusers_to_official_key,
    official_to_diffusers_key,
    strip_comfyui_prefix,
)
from wan_kernel.models.weights import (
    FP8_SCALE_SUFFIXES,
    dequantize_fp8_weight,
    describe_keys,
    fp8_weight_scale,
    guess_model_kind,
    load_state_dict,
    read_safetensors_metadata,
)

__all__ = [
    "LoraSpec",
    "LoraModule",
    "LoraFile",
    "LoraReport",
    "LoraWarning",
    "read_lora",
    "merge_loras_into_state_dict",
    "merge_loras_into_model",
    "apply_loras",
    "merging_quantizer",
    "load_dit_with_loras",
]


class LoraWarning(UserWarning):
    """A LoRA was applied only in part: some of its modules have no target in the model."""


# --------------------------------------------------------------------------------------------
# What to apply
# --------------------------------------------------------------------------------------------


def _patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(p for p in value if p)


def _check_patterns(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as exc:
            option = "--" + attribute.name
            raise InputError(f"{option}: {pattern!r} is not a valid regular expression ({exc})") from None


@attrs.frozen
class LoraSpec:
    """One LoRA file to merge: ``--lora_weight PATH --lora_multiplier M --include/exclude_patterns``.

    :param path: the LoRA file (``.safetensors`` or ``.pth``/``.pt``).
    :param multiplier: strength; the delta is multiplied by it (negative values subtract).
    :param include_patterns: regexes; when given, only modules one of them matches are merged.
    :param exclude_patterns: regexes; modules any of them matches are not merged.
    """

    path: Path = attrs.field(converter=lambda p: Path(p).expanduser())
    multiplier: float = attrs.field(default=1.0, converter=float)
    include_patterns: tuple[str, ...] = attrs.field(
        default=(), converter=_patterns, validator=_check_patterns
    )
    exclude_patterns: tuple[str, ...] = attrs.field(
        default=(), converter=_patterns, validator=_check_patterns
    )

    @classmethod
    def coerce(cls, spec: "LoraSpec | str | os.PathLike | Mapping[str, Any]") -> "LoraSpec":
        """A spec from a spec, a path, or a mapping.

        Mapping keys: ``path``, ``multiplier``, ``include``/``include_patterns``,
        ``exclude``/``exclude_patterns`` (a pattern may be one string); ``None`` means the default.
        """
        if isinstance(spec, LoraSpec):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return cls(spec)
        if isinstance(spec, Mapping):
            aliases = {"include": "include_patterns", "exclude": "exclude_patterns", "weight": "path"}
            kwargs: dict[str, Any] = {}
            for key, value in spec.items():
                name = aliases.get(key, key)
                if name not in ("path", "multiplier", "include_patterns", "exclude_patterns"):
                    raise InputError(
                        f"unknown LoRA option {key!r}; "
                        "use path, multiplier, include_patterns, exclude_patterns"
                    )
                if value is not None:
                    kwargs[name] = value
            if "path" not in kwargs:
                raise InputError(f"a LoRA needs a path, got {dict(spec)!r}")
            return cls(**kwargs)
        raise InputError(f"a LoRA is given as a path or a LoraSpec, not {type(spec).__name__}")

    def selects(self, names: Iterable[str]) -> bool:
        """Whether a module known by ``names`` (its spellings) passes the include/exclude patterns."""
        names = [n for n in names if n]
        if self.include_patterns and not any(re.search(p, n) for p in self.include_patterns for n in names):
            return False
        return not any(re.search(p, n) for p in self.exclude_patterns for n in names)


SpecLike = LoraSpec | str | os.PathLike | Mapping[str, Any]
"""What the functions below accept for one LoRA: a spec, a path, or a mapping (:meth:`LoraSpec.coerce`)."""

# --------------------------------------------------------------------------------------------
# Reading LoRA files
# --------------------------------------------------------------------------------------------

# per-module suffix -> role; longest first so ``.lora_A.default.weight`` wins over shorter ones
_SUFFIXES: dict[str, str] = dict(
    sorted(
        {
            ".lora_down.weight": "down",
            ".lora_up.weight": "up",
            ".lora_A.weight": "down",
            ".lora_B.weight": "up",
            ".lora_A.default.weight": "down",
            ".lora_B.default.weight": "up",
            ".lora.down.weight": "down",
            ".lora.up.weight": "up",
            ".lora_B.bias": "bias",
            ".lora_B.default.bias": "bias",
            ".alpha": "alpha",
            ".diff": "diff",
            ".diff_b": "diff_b",
        }.items(),
        key=lambda item: -len(item[0]),
    )
)
# markers of adapter kinds this module does not merge (their modules are reported, not merged)
_UNSUPPORTED_MARKERS = (".hada_", ".lokr_", ".dora_scale", ".lora_mid.", ".w_norm", ".b_norm", ".set_weight")
_UNDERSCORED_PREFIXES = ("lora_unet__", "lora_unet_", "lycoris_")
_DOTTED_PREFIXES = (
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
    "transformer.",
    "pipe.dit.",
    "dit.",
)


@attrs.define
class LoraModule:
    """The tensors a LoRA file holds for one module (``name`` as spelled in the file).

    ``down [r, in, *k]`` and ``up [out, r, *1]`` (both or neither); ``alpha`` scales by ``alpha / r``
    (``None``: 1); ``diff`` is a full weight delta, ``diff_b`` a bias delta, ``bias`` the bias of
    ``up`` (PEFT ``lora_B.bias``, scaled like the product).
    """

    name: str
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None
    diff_b: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        return None if self.down is None else int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1 without an alpha)."""
        if self.alpha is None or self.rank is None:
            return 1.0
        return self.alpha / self.rank

    def weight_delta(self, shape: Sequence[int]) -> torch.Tensor | None:
        """``scale * (up @ down) + diff`` in float32, shaped like the target weight; ``None`` if empty.

        The caller has checked the shapes (:meth:`delta_shape_ok`).
        """
        delta = None
        if self.down is not None:
            up = self.up.flatten(1).float()  # [out, r]
            down = self.down.flatten(1).float()  # [r, in * k...]
            delta = (up @ down).reshape(shape) * self.scale
        if self.diff is not None:
            diff = self.diff.float().reshape(shape)
            delta = diff if delta is None else delta + diff
        return delta

    def bias_delta(self) -> torch.Tensor | None:
        """``diff_b + scale * lora_B.bias`` in float32, or ``None``."""
        delta = None
        if self.diff_b is not None:
            delta = self.diff_b.float().flatten()
        if self.bias is not None:
            b = self.bias.float().flatten() * self.scale
            delta = b if delta is None else delta + b
        return delta

    def delta_shape_ok(self, shape: Sequence[int]) -> bool:
        numel = math.prod(shape)
        if self.down is not None:
            if self.up.shape[0] != shape[0] or self.down[0].numel() * self.up.shape[0] != numel:
                return False
        return self.diff is None or self.diff.numel() == numel


@attrs.define
class LoraFile:
    """A parsed LoRA file: its modules by file name, what kind of file it looked like, and leftovers."""

    path: Path
    layout: str
    modules: dict[str, LoraModule]
    unsupported: list[str]
    """Module names of adapter kinds not merged here (LoHa, LoKr, DoRA, ...)."""


def _peft_alpha(path: Path) -> tuple[float | None, bool, dict[str, float]]:
    """``(lora_alpha, use_rslora, alpha_pattern)`` from diffusers' metadata or ``adapter_config.json``."""
    config: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        raw = read_safetensors_metadata(path).get("lora_adapter_metadata")
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


def _describe_layout(names: Iterable[str]) -> str:
    names = list(names)
    if any(n.startswith(_UNDERSCORED_PREFIXES) for n in names):
        return "kohya"
    if any(n.startswith(("diffusion_model.", "model.diffusion_model.")) for n in names):
        return "comfyui"
    if any(".attn1." in n or ".attn2." in n or "condition_embedder" in n for n in names):
        return "diffusers"
    if any(n.startswith("base_model.model.") for n in names):
        return "peft"
    return "official"


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Parse a LoRA file of any supported layout (see the module docstring).

    :raises WeightsError: the file is missing or unreadable, is not a LoRA (e.g. a DiT), or has a
        module with ``down`` but no ``up`` (or mismatched ranks, or a non-scalar alpha).
    """
    path = Path(path).expanduser()
    sd = load_state_dict(path, what="LoRA")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unsupported: set[str] = set()
    for key, tensor in sd.items():
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix):
                parts.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            for marker in _UNSUPPORTED_MARKERS:
                if marker in key:
                    unsupported.add(key[: key.index(marker)])
                    break
    modules: dict[str, LoraModule] = {}
    for name, roles in parts.items():
        if name in unsupported:
            continue
        if not ({"down", "up", "diff", "diff_b", "bias"} & roles.keys()):
            continue  # a lone .alpha (e.g. of a LoHa module): nothing to merge
        modules[name] = _make_module(path, name, roles)
    if not modules:
        if unsupported:
            raise WeightsError(
                f"{path}: holds only adapter kinds this loader does not merge (LoHa, LoKr, DoRA, ...), "
                f"e.g. {describe_keys(unsupported, 3)}; convert it to a plain LoRA or merge it with its "
                "trainer"
            )
        raise WeightsError(
            f"{path}: not a LoRA file: it looks like {guess_model_kind(list(sd))} "
            f"(its tensors: {describe_keys(list(sd), 3)}); pass a LoRA with lora_down/lora_up or "
            "lora_A/lora_B tensors"
        )
    if not any(m.alpha is not None for m in modules.values()):
        lora_alpha, rslora, alpha_pattern = _peft_alpha(path)
        for module in modules.values():
            matching = (a for p, a in alpha_pattern.items() if re.match(rf"(.*\.)?{p}$", module.name))
            alpha = next(matching, lora_alpha)
            if alpha is not None and module.rank:
                module.alpha = alpha * math.sqrt(module.rank) if rslora else alpha
    layout = _describe_layout(modules)
    return LoraFile(path=path, layout=layout, modules=modules, unsupported=sorted(unsupported))


def _make_module(path: Path, name: str, roles: Mapping[str, torch.Tensor]) -> LoraModule:
    down, up = roles.get("down"), roles.get("up")
    if (down is None) != (up is None):
        have, lacks = ("down", "up") if up is None else ("up", "down")
        raise WeightsError(
            f"{path}: LoRA module {name!r} has a {have} matrix but no {lacks} matrix; the file is incomplete"
        )
    if down is not None and (down.dim() < 2 or up.dim() < 2 or up[0].numel() != down.shape[0]):
        raise WeightsError(
            f"{path}: LoRA module {name!r} has down {list(down.shape)} and up {list(up.shape)}, "
            "whose ranks do not agree"
        )
    alpha = None
    if "alpha" in roles:
        a = roles["alpha"]
        if a.numel() != 1 or not torch.isfinite(a.float()).all():
            raise WeightsError(
                f"{path}: LoRA module {name!r} has an alpha that is not one finite number ({list(a.shape)})"
            )
        alpha = float(a.float().item())
    return LoraModule(
        name=name,
        down=down,
        up=up,
        alpha=alpha,
        diff=roles.get("diff"),
        diff_b=roles.get("diff_b"),
        bias=roles.get("bias"),
    )


# --------------------------------------------------------------------------------------------
# Matching LoRA modules to the model's modules
# --------------------------------------------------------------------------------------------


class _Targets:
    """Looks LoRA module names up among the model's (official) module names."""

    def __init__(self, official_names: Iterable[str]):
        self.names = set(official_names)
        self.underscored: dict[str, str] = {}  # official and diffusers spellings, "." -> "_"
        self.ambiguous: set[str] = set()
        for name in sorted(self.names):
            for dotted in {name, official_to_diffusers_key(name)}:
                flat = dotted.replace(".", "_")
                if self.underscored.setdefault(flat, name) != name:
                    self.ambiguous.add(flat)

    def resolve(self, lora_name: str) -> str | None:
        """The official module path a LoRA module name refers to, or ``None``."""
        for prefix in _UNDERSCORED_PREFIXES:
            if lora_name.startswith(prefix):
                flat = lora_name[len(prefix) :].replace(".", "_")
                if flat in self.ambiguous:
                    raise InputError(
                        f"the LoRA module {lora_name!r} could mean several modules of this model"
                    )
                return self.underscored.get(flat)
        name = lora_name
        for prefix in _DOTTED_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        if name in self.names:
            return name
        official = diffusers_to_official_key(name)
        return official if official in self.names else None


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
    unsupported: tuple[str, ...]
    """LoRA module names of adapter kinds not merged here (LoHa, LoKr, DoRA)."""

    def summary(self) -> str:
        text = (
            f"LoRA {self.path.name} ({self.layout} layout) x{self.multiplier:g}: "
            f"merged into {len(self.merged)} module(s)"
        )
        if self.filtered:
            text += f", {len(self.filtered)} left out by the patterns"
        if self.unmatched:
            shown = describe_keys(self.unmatched, 3)
            text += f", {len(self.unmatched)} without a target in this model ({shown})"
        if self.unsupported:
            text += f", {len(self.unsupported)} of unsupported kinds ({describe_keys(self.unsupported, 3)})"
        return text


@attrs.define
class _Plan:
    """The deltas to add, by official module path, and one report per LoRA file."""

    weight: dict[str, list[tuple[float, LoraModule]]] = attrs.Factory(dict)
    bias: dict[str, list[tuple[float, LoraModule]]] = attrs.Factory(dict)
    reports: list[LoraReport] = attrs.Factory(list)


def _kohya_name(official: str) -> str:
    return "lora_unet_" + official.replace(".", "_")


def _plan(
    specs: Iterable[Any],
    shapes: Mapping[str, Sequence[int]],
    biases: Mapping[str, Sequence[int]],
) -> _Plan:
    """Read every file, match its modules to ``shapes`` (official module path -> weight shape), check shapes.

    Nothing is changed here: a bad file or a shape mismatch raises before any weight is touched.
    """
    targets = _Targets(shapes)
    plan = _Plan()
    for spec in (LoraSpec.coerce(s) for s in specs):
        lora = read_lora(spec.path)
        merged, filtered, unmatched = [], [], []
        for name, module in lora.modules.items():
            target = targets.resolve(name)
            spellings = [name] + ([target, _kohya_name(target)] if target else [])
            if not spec.selects(spellings):
                filtered.append(name)
                continue
            if target is None:
                unmatched.append(name)
                continue
            _check_shapes(spec.path, name, module, target, shapes[target], biases.get(target))
            if module.down is not None or module.diff is not None:
                plan.weight.setdefault(target, []).append((spec.multiplier, module))
            if module.diff_b is not None or module.bias is not None:
                plan.bias.setdefault(target, []).append((spec.multiplier, module))
            merged.append(target)
        report = LoraReport(
            path=spec.path,
            layout=lora.layout,
            multiplier=spec.multiplier,
            merged=tuple(merged),
            filtered=tuple(filtered),
            unmatched=tuple(unmatched),
            unsupported=tuple(lora.unsupported),
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
        if unmatched or lora.unsupported:
            warnings.warn(report.summary(), LoraWarning, stacklevel=3)
        plan.reports.append(report)
    return plan


def _check_shapes(
    path: Path, name: str, module: LoraModule, target: str, shape: Sequence[int], bias: Sequence[int] | None
) -> None:
    if not module.delta_shape_ok(shape):
        got = (
            f"up {list(module.up.shape)} @ down {list(module.down.shape)}"
            if module.down is not None
            else f"diff {list(module.diff.shape)}"
        )
        raise InputError(
            f"{path}: LoRA module {name!r} ({got}) does not fit {target}.weight {list(shape)}; "
            "the LoRA was made for another model size or variant"
        )
    delta_b = module.diff_b if module.diff_b is not None else module.bias
    if delta_b is not None and (bias is None or delta_b.numel() != math.prod(bias)):
        raise InputError(
            f"{path}: LoRA module {name!r} has a bias delta of {delta_b.numel()} values, but {target} has "
            f"{'no bias' if bias is None else f'a bias of shape {list(bias)}'}"
        )


def _merged(
    tensor: torch.Tensor,
    entries: list[tuple[float, LoraModule]],
    delta: Callable[[LoraModule], torch.Tensor | None],
    *,
    device: torch.device | None,
    base: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``base + sum(multiplier * delta)`` computed in float32 on ``device``, cast back.

    ``base``: the float32 value of ``tensor`` when it is not ``tensor.float()`` (a dequantized fp8
    weight); the result goes where ``tensor`` is, in ``out_dtype`` (default: ``tensor``'s dtype).
    """
    where = device or tensor.device
    if base is None:
        acc = tensor.to(where, torch.float32, copy=True)  # the input (maybe a memory map) is never written
    else:
        acc = base.to(where, torch.float32)
    for multiplier, module in entries:
        d = delta(module)
        if d is not None:
            acc.add_(d.to(where).reshape(acc.shape), alpha=multiplier)
    return acc.to(device=tensor.device, dtype=out_dtype or tensor.dtype)


def _is_low_precision(t: torch.Tensor) -> bool:
    return t.dtype.itemsize == 1 or not t.dtype.is_floating_point


# --------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------


def _official_module_keys(state_dict: Mapping[str, torch.Tensor], layout: str | None) -> dict[str, str]:
    """Official module path -> the state dict's key of its weight (``layout`` None: detected)."""
    from wan_kernel.models.dit_keys import detect_layout

    if layout is None:
        layout = detect_layout(list(state_dict)) or "official"
    if layout not in LAYOUTS:
        raise InputError(f"unknown DiT key layout {layout!r}; known: {', '.join(LAYOUTS)}")
    rename = {
        "official": lambda k: k,
        "comfyui": strip_comfyui_prefix,
        "diffusers": diffusers_to_official_key,
    }[layout]
    out = {}
    for key in state_dict:
        if key.endswith(".weight"):
            out[rename(key)[: -len(".weight")]] = key
    return out


def merge_loras_into_state_dict(
    state_dict: dict[str, torch.Tensor],
    specs: Iterable[SpecLike],
    layout: str | None = "official",
    *,
    device: torch.device | str | None = None,
) -> list[LoraReport]:
    """Merge LoRA files into a DiT state dict, in place (merged tensors are replaced, never written into).

    Call it before quantization. A weight stored in fp8 (plain, or a scaled-fp8 file's with a
    ``<module>.scale_weight`` of any layout :func:`~wan_kernel.models.weights.dequantize_fp8_weight`
    reads: per tensor, per channel, per block, musubi's two-level ``scale_weight_tensor``) is
    dequantized in float32, merged, and stored in bfloat16 with its scale keys removed, so that a
    quantizer afterwards quantizes the merged weight once. fp8 weights no LoRA touches are left
    as stored.

    :param state_dict: tensors keyed in ``layout``.
    :param layout: ``official``, ``comfyui`` or ``diffusers`` key names; ``None``: detect.
    :param specs: :class:`LoraSpec` objects (or paths, or mappings :meth:`LoraSpec.coerce` takes).
    :param device: where to compute (e.g. the GPU); merged tensors go back where they were.
    :returns: one :class:`LoraReport` per file.
    :raises WeightsError: a file is missing, unreadable or not a LoRA; an fp8 weight's scale does
        not fit it (checked, like everything else, before any tensor is changed).
    :raises InputError: a LoRA matches nothing in the model, or its shapes do not fit it.
    """
    device = None if device is None else torch.device(device)
    keys = _official_module_keys(state_dict, layout)
    shapes = {name: tuple(state_dict[key].shape) for name, key in keys.items()}
    biases = {
        name: tuple(state_dict[key[: -len("weight")] + "bias"].shape)
        for name, key in keys.items()
        if key[: -len("weight")] + "bias" in state_dict
    }
    plan = _plan(specs, shapes, biases)
    for name in plan.weight:  # every target is checked before any is changed
        _check_state_dict_target(state_dict, keys[name])
    for name, entries in plan.weight.items():
        key = keys[name]
        weight = state_dict[key]
        base, out_dtype = None, None
        if weight.dtype.itemsize == 1:  # fp8: dequantize (with its scales), merge, keep bfloat16
            prefix = key[: -len(".weight")]
            where = device or weight.device
            scale = fp8_weight_scale(state_dict, prefix)
            base = dequantize_fp8_weight(weight.to(where), scale, dtype=torch.float32, name=key)
            for suffix in FP8_SCALE_SUFFIXES:
                state_dict.pop(prefix + suffix, None)
            out_dtype = torch.bfloat16
        state_dict[key] = _merged(
            weight,
            entries,
            lambda m, s=weight.shape: m.weight_delta(s),
            device=device,
            base=base,
            out_dtype=out_dtype,
        )
    for name, entries in plan.bias.items():
        key = keys[name][: -len("weight")] + "bias"
        state_dict[key] = _merged(state_dict[key], entries, LoraModule.bias_delta, device=device)
    return plan.reports


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


def _strip_compiled(name: str) -> str:
    return name.replace("_orig_mod.", "")


def merge_loras_into_model(
    model: nn.Module, specs: Iterable[SpecLike]
) -> list[LoraReport]:
    """Merge LoRA files into a live, unquantized model's weights (in place; computed where they live).

    :raises InputError: a targeted weight is quantized (fp8): merge at load time instead; or a
        LoRA matches nothing / does not fit.
    :raises WeightsError: a file is missing, unreadable or not a LoRA.
    """
    modules = {_strip_compiled(n): m for n, m in model.named_modules()}
    weights: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if isinstance(w, torch.Tensor):
            weights[name] = w
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    biases = {}
    for n in weights:
        bias = getattr(modules[n], "bias", None)
        if isinstance(bias, torch.Tensor):
            biases[n] = tuple(bias.shape)
    plan = _plan(specs, shapes, biases)
    for name in [*plan.weight, *plan.bias]:
        _check_mergeable(name, modules[name], weights[name])
    with torch.no_grad():
        for name, entries in plan.weight.items():
            w = weights[name]
            w.copy_(_merged(w, entries, lambda m, s=w.shape: m.weight_delta(s), device=None))
        for name, entries in plan.bias.items():
            b = modules[name].bias
            b.copy_(_merged(b, entries, LoraModule.bias_delta, device=None))
    return plan.reports


def _check_mergeable(name: str, module: nn.Module, weight: torch.Tensor) -> None:
    quant_buffers = [b for b, _ in module.named_buffers(recurse=False) if "scale" in b]
    if _is_low_precision(weight) or quant_buffers:
        raise InputError(
            f"cannot merge a LoRA into {name}: the DiT's weights are already quantized ({weight.dtype}). "
            "LoRA must be merged while loading, before quantization: use "
            "wan_kernel.lora.load_dit_with_loras(path, specs, quant=...) or pass "
            "quant=wan_kernel.lora.merging_quantizer(quantizer, specs) to load_dit"
        )
    if weight.is_meta:
        raise InputError(f"cannot merge a LoRA into {name}: the model's weights are not loaded (meta device)")


def apply_loras(
    model: nn.Module,
    specs: Iterable[SpecLike],
    *,
    log: Callable[[str], None] | None = None,
) -> nn.Module:
    """Merge LoRA files into a loaded, unquantized DiT and return it (the same object).

    ``specs``: :class:`LoraSpec` objects, paths, or mappings with ``path``, ``multiplier``,
    ``include``/``include_patterns``, ``exclude``/``exclude_patterns``. Modules without a target
    are reported with a :class:`LoraWarning`; ``log`` (if given) gets one summary line per file.
    For an fp8-quantized DiT use :func:`load_dit_with_loras` or :func:`merging_quantizer`.
    """
    for report in merge_loras_into_model(model, list(specs)):
        if log is not None:
            log(report.summary())
    return model


# --------------------------------------------------------------------------------------------
# Load-time merging (before quantization)
# --------------------------------------------------------------------------------------------


class _MergingQuantizer:
    """A quantizer that merges LoRAs into the DiT state dict, then lets the wrapped one quantize it."""

    def __init__(self, inner: Any, specs: Sequence[LoraSpec]):
        self.inner = inner
        self.specs = specs
        self.reports: list[LoraReport] = []

    def __getattr__(self, name: str) -> Any:  # name, supported_targets, availability, ...
        return getattr(self.inner, name)

    def convert_for_runtime(self, model: nn.Module, *, target: str) -> nn.Module:
        return self.inner.convert_for_runtime(model, target=target)

    def quantize_state_dict(
        self, state_dict: dict[str, torch.Tensor], *, target: str, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        if target == "dit":
            self.reports = merge_loras_into_state_dict(state_dict, self.specs, "official", device=device)
        return self.inner.quantize_state_dict(state_dict, target=target, device=device)


def merging_quantizer(quantizer: Any, specs: Iterable[SpecLike]) -> Any:
    """Wrap a quantizer (a plugin name or object) so ``load_dit(quant=...)`` merges ``specs`` first.

    ``load_dit`` hands the quantizer the official-layout state dict; the wrapper merges the LoRAs
    into it in float32 and passes it on, so the quantized weights include the LoRA. After loading,
    its ``reports`` attribute holds one :class:`LoraReport` per file.
    """
    if isinstance(quantizer, str):
        from wan_kernel.plugins import resolve

        quantizer = resolve("quantization", quantizer)
    return _MergingQuantizer(quantizer, [LoraSpec.coerce(s) for s in specs])


def load_dit_with_loras(
    path: str | os.PathLike,
    specs: Iterable[SpecLike],
    *,
    quant: Any = None,
    log: Callable[[str], None] | None = None,
    **load_kwargs: Any,
) -> nn.Module:
    """``load_dit(path, quant=quant, loras=specs, log=log, **load_kwargs)``: LoRAs merged while
    loading (before quantization if ``quant``)."""
    from wan_kernel.models.dit_loading import load_dit

    return load_dit(path, quant=quant, loras=specs, log=log, **load_kwargs)
