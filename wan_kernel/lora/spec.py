"""What to merge: one LoRA file with its strength and include/exclude patterns."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from wan_kernel.errors import InputError

__all__ = ["LoraSpec", "SpecLike"]


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
            option = f"--{attribute.name}_patterns"
            raise InputError(f"{option}: {pattern!r} is not a valid regular expression ({exc})") from None


@attrs.frozen
class LoraSpec:
    """One LoRA file to merge: ``--lora_weight PATH --lora_multiplier M --include/exclude_patterns``.

    :param path: the LoRA file (``.safetensors`` or ``.pth``/``.pt``).
    :param multiplier: strength; the delta is multiplied by it (negative values subtract).
    :param include: regexes (one string or several); when given, only modules one of them matches
        (``re.search``, as musubi-tuner's ``--include_patterns``) are merged.
    :param exclude: regexes; modules any of them matches are not merged.

    A module's names searched by the patterns: its name in the file, its kohya spelling
    (``lora_unet_blocks_0_self_attn_q``) and its official path (``blocks.0.self_attn.q``).
    """

    path: Path = attrs.field(converter=lambda p: Path(p).expanduser())
    multiplier: float = attrs.field(default=1.0, converter=float)
    include: tuple[str, ...] = attrs.field(default=(), converter=_patterns, validator=_check_patterns)
    exclude: tuple[str, ...] = attrs.field(default=(), converter=_patterns, validator=_check_patterns)

    @property
    def include_patterns(self) -> tuple[str, ...]:
        return self.include

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        return self.exclude

    @classmethod
    def coerce(cls, spec: SpecLike) -> LoraSpec:
        """A spec from a spec, a path, or a mapping.

        Mapping keys: ``path``, ``multiplier``, ``include``/``include_patterns``,
        ``exclude``/``exclude_patterns`` (a pattern may be one string); ``None`` means the default.
        """
        if isinstance(spec, LoraSpec):
            return spec
        if isinstance(spec, (str, os.PathLike)):
            return cls(spec)
        if isinstance(spec, Mapping):
            aliases = {"include_patterns": "include", "exclude_patterns": "exclude", "weight": "path"}
            kwargs: dict[str, Any] = {}
            for key, value in spec.items():
                name = aliases.get(key, key)
                if name not in ("path", "multiplier", "include", "exclude"):
                    raise InputError(f"unknown LoRA option {key!r}; use path, multiplier, include, exclude")
                if value is not None:
                    kwargs[name] = value
            if "path" not in kwargs:
                raise InputError(f"a LoRA needs a path, got {dict(spec)!r}")
            return cls(**kwargs)
        raise InputError(f"a LoRA is given as a path or a LoraSpec, not {type(spec).__name__}")

    def selects(self, names: Iterable[str]) -> bool:
        """Whether a module known by ``names`` (its spellings) passes the include/exclude patterns."""
        names = [n for n in names if n]
        if self.include and not any(re.search(p, n) for p in self.include for n in names):
            return False
        return not any(re.search(p, n) for p in self.exclude for n in names)


SpecLike = LoraSpec | str | os.PathLike | Mapping[str, Any]
"""What the functions of :mod:`wan_kernel.lora` accept for one LoRA: a spec, a path, or a mapping."""


def specs_from_options(
    weights: Iterable[str | os.PathLike],
    multipliers: Iterable[float] = (),
    include_patterns: Iterable[str | None] = (),
    exclude_patterns: Iterable[str | None] = (),
) -> list[LoraSpec]:
    """One spec per ``--lora_weight``, the seed's way: multipliers (default 1.0) and
    ``--include_patterns`` / ``--exclude_patterns`` by position.

    :raises InputError: more multipliers than files, or a count that fits neither.
    """
    weights, multipliers = list(weights), [float(m) for m in multipliers]
    includes, excludes = list(include_patterns), list(exclude_patterns)
    if multipliers and len(multipliers) != len(weights):
        raise InputError(
            f"{len(multipliers)} --lora_multiplier values for {len(weights)} --lora_weight files; "
            "give one per file (or none for 1.0 each)"
        )
    return [
        LoraSpec(
            path,
            multipliers[i] if multipliers else 1.0,
            include=includes[i] if i < len(includes) else None,
            exclude=excludes[i] if i < len(excludes) else None,
        )
        for i, path in enumerate(weights)
    ]
