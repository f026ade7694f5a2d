"""Prompt lines with per-line overrides (``--from_file`` and ``--interactive``).

One prompt per line, in the seed trainer's syntax: the prompt text, then `` --key value`` parts::

    a red fox running through snow --w 832 --h 480 --f 81 --d 42 --s 20 --g 5.0 --fs 3.0
    a cat on a sofa --n blurry, low quality --i path/to/start.jpg

Keys: ``--w`` width, ``--h`` height, ``--f`` frames, ``--d`` seed, ``--s`` steps, ``--g`` (or
``--l``) guidance scale, ``--fs`` flow shift, ``--n`` negative prompt, ``--i`` start image,
``--ei`` end image. Empty lines and lines starting with ``#`` are skipped. A malformed line is an
:class:`InputError` naming its line number (unlike the seed trainer, which ignores unknown keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import attrs

from wan_kernel.errors import InputError


@attrs.frozen
class PromptSpec:
    """One prompt and the settings it overrides (``None`` = keep the command line's value)."""

    prompt: str
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    negative_prompt: str | None = None
    image_path: str | None = None
    end_image_path: str | None = None
    line: int | None = None
    """Line number in the prompt file (1-based), for messages."""

    def overrides(self) -> dict[str, Any]:
        """The fields this line sets, as ``GenerateConfig`` field names."""
        names = (
            "frames",
            "seed",
            "steps",
            "guidance_scale",
            "flow_shift",
            "negative_prompt",
            "image_path",
            "end_image_path",
        )
        out: dict[str, Any] = {"prompt": self.prompt}
        out.update({n: getattr(self, n) for n in names if getattr(self, n) is not None})
        return out


# key -> (field, converter, what the value must be)
_KEYS: dict[str, tuple[str, type, str]] = {
    "w": ("width", int, "an integer width in pixels"),
    "h": ("height", int, "an integer height in pixels"),
    "f": ("frames", int, "an integer number of frames"),
    "d": ("seed", int, "an integer seed"),
    "s": ("steps", int, "an integer number of steps"),
    "g": ("guidance_scale", float, "a number"),
    "l": ("guidance_scale", float, "a number"),
    "fs": ("flow_shift", float, "a number"),
    "n": ("negative_prompt", str, "a text"),
    "i": ("image_path", str, "a file path"),
    "ei": ("end_image_path", str, "a file path"),
}
_UNSUPPORTED = {
    "cn": "control videos (Fun-Control)",
    "ci": "control images",
    "cim": "control masks",
    "of": "one-frame inference",
}


def parse_prompt_line(line: str, *, line_number: int | None = None, source: str = "prompt") -> PromptSpec:
    """Parse one prompt line; raises :class:`InputError` naming the line on a malformed part."""
    where = f"{source} line {line_number}" if line_number is not None else source
    parts = line.strip().split(" --")
    text = parts[0].strip()
    if text.startswith("--"):
        raise InputError(
            f"{where}: the line starts with an option ({text.split()[0]}); put the prompt text first"
        )
    if not text:
        raise InputError(f"{where}: empty prompt before the options")
    values: dict[str, Any] = {}
    for part in parts[1:]:
        if not part.strip():
            continue
        key, _, raw = part.strip().partition(" ")
        raw = raw.strip()
        if key in _UNSUPPORTED:
            raise InputError(f"{where}: --{key} ({_UNSUPPORTED[key]}) is not supported by wan generate")
        if key not in _KEYS:
            known = " ".join(f"--{k}" for k in _KEYS)
            raise InputError(f"{where}: unknown option --{key}; known: {known}")
        field, convert, what = _KEYS[key]
        if not raw:
            raise InputError(f"{where}: --{key} needs a value ({what})")
        try:
            value = convert(raw)
        except ValueError:
            raise InputError(f"{where}: --{key} {raw!r} is not {what}") from None
        if field in ("width", "height", "frames", "steps") and value <= 0:
            raise InputError(f"{where}: --{key} must be positive, got {value}")
        values[field] = value
    return PromptSpec(prompt=text, line=line_number, **values)


def iter_prompt_lines(lines: Iterable[str], *, source: str = "prompt") -> Iterator[PromptSpec]:
    """Parse prompt lines lazily (for ``--interactive`` on stdin), skipping blanks and ``#`` comments."""
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        yield parse_prompt_line(stripped, line_number=number, source=source)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """Every prompt of a prompt file; the whole file is checked before anything runs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read prompt file {path}: {exc}") from None
    prompts = list(iter_prompt_lines(text.splitlines(), source=str(path)))
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts (only blank or # comment lines)")
    return prompts
