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

import math
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import attrs

from wan_kernel.checks import check_seed
from wan_kernel.errors import InputError

BOM = "\ufeff"


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


_OPTION_SPLIT = re.compile(r"\s+--(?=\S)")
"""Where an option starts: whitespace (spaces or tabs) then ``--`` then its key."""


def _check_value(where: str, key: str, field: str, value: Any) -> None:
    if field in ("width", "height", "frames", "steps") and value <= 0:
        raise InputError(f"{where}: --{key} must be positive, got {value}")
    if field in ("guidance_scale", "flow_shift") and not math.isfinite(value):
        raise InputError(f"{where}: --{key} must be a finite number, got {value}")
    if field == "flow_shift" and value <= 0:
        raise InputError(f"{where}: --{key} (flow shift) must be positive, got {value}")
    if field == "seed":
        check_seed(value, f"{where}: --{key}")


def check_text(text: str, what: str) -> str:
    """``text`` checked to be valid Unicode: a command-line argument that was not UTF-8 reaches
    Python with lone surrogates (``\\udcff``), which no tokenizer or file format can take.

    :raises InputError: naming ``what`` and the offending byte.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        byte = f" (byte 0x{ord(bad) - 0xDC00:02x})" if 0xDC80 <= ord(bad) <= 0xDCFF else ""
        raise InputError(
            f"{what} is not valid UTF-8 text{byte} at character {exc.start + 1}; use a UTF-8 terminal or "
            "put the prompt in a UTF-8 file (--from_file)"
        ) from None
    return text


def parse_prompt_line(line: str, *, line_number: int | None = None, source: str = "prompt") -> PromptSpec:
    """Parse one prompt line; raises :class:`InputError` naming the line on a malformed part.

    Options are separated from the text and from each other by any whitespace (spaces or tabs);
    a leading byte-order mark is ignored. Values are checked here (sizes positive, numbers
    finite, the flow shift positive, the seed in torch's range), so a whole file is checked
    before any work starts.
    """
    where = f"{source} line {line_number}" if line_number is not None else source
    check_text(line, where)
    parts = _OPTION_SPLIT.split(" " + line.lstrip(BOM).strip())
    text = parts[0].strip()
    if not text and len(parts) > 1:
        raise InputError(
            f"{where}: the line starts with an option (--{parts[1].split()[0]}); put the prompt text first"
        )
    if text.startswith("--"):
        raise InputError(
            f"{where}: the line starts with an option ({text.split()[0]}); put the prompt text first"
        )
    if not text:
        raise InputError(f"{where}: the prompt is empty")
    values: dict[str, Any] = {}
    for part in parts[1:]:
        if not part.strip():
            continue
        key, *rest = part.strip().split(None, 1)
        raw = rest[0].strip() if rest else ""
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
        _check_value(where, key, field, value)
        values[field] = value
    return PromptSpec(prompt=text, line=line_number, **values)


def iter_prompt_lines(lines: Iterable[str], *, source: str = "prompt") -> Iterator[PromptSpec]:
    """Parse prompt lines lazily (for ``--interactive`` on stdin), skipping blanks and ``#`` comments
    (a byte-order mark before them does not count)."""
    for number, line in enumerate(lines, start=1):
        stripped = line.lstrip(BOM).strip()
        if not stripped or stripped.startswith("#"):
            continue
        yield parse_prompt_line(stripped, line_number=number, source=source)


def decode_prompt_lines(data: bytes, *, source: str) -> list[str]:
    """``data`` split into lines and decoded as UTF-8 (a leading BOM dropped).

    :raises InputError: a line that is not valid UTF-8, naming the line and the byte.
    """
    lines = data.split(b"\n")
    out = []
    for number, raw in enumerate(lines, start=1):
        try:
            out.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{source} line {number}: not valid UTF-8 (byte {exc.start + 1} of the line, "
                f"0x{raw[exc.start]:02x}); save the file as UTF-8"
            ) from None
    if out:
        out[0] = out[0].lstrip(BOM)
    return out


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """Every prompt of a prompt file; the whole file is checked before anything runs.

    :raises InputError: the file is missing, not a regular readable file, not UTF-8, has a
        malformed line or a value out of range (naming the line), or holds no prompt.
    """
    from wan_kernel.pipelines.media import check_input_file  # numpy: only when a file is read

    path = Path(path)
    check_input_file(path, "prompt file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read prompt file {path}: {exc.strerror or exc}") from None
    prompts = list(iter_prompt_lines(decode_prompt_lines(data, source=str(path)), source=str(path)))
    if not prompts:
        raise InputError(f"prompt file {path} has no prompts (only blank or # comment lines)")
    return prompts


class StdinLines:
    """Standard input read line by line as bytes and decoded per line (``--interactive``): a line
    that is not UTF-8 is an :class:`InputError` naming it, and the next line still reads."""

    def __init__(self, stream):
        self._stream = stream
        self.number = 0

    def isatty(self) -> bool:
        try:
            return bool(self._stream.isatty())
        except (OSError, ValueError):
            return False

    def next_line(self) -> tuple[int, str]:
        """``(line number, text)``; raises ``EOFError`` at the end of the input."""
        try:
            raw = self._stream.readline()
        except (OSError, ValueError):  # closed or unreadable descriptor
            raise EOFError from None
        if not raw:
            raise EOFError
        self.number += 1
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"stdin line {self.number}: not valid UTF-8 (byte {exc.start + 1} of the line); "
                "the line is skipped"
            ) from None
        if self.number == 1:
            text = text.lstrip(BOM)
        return self.number, text


def open_stdin_lines(stdin=None) -> StdinLines:
    """Standard input for ``--interactive``, checked to be open.

    :raises InputError: standard input is closed (``<&-``) or not readable.
    """
    import io
    import os
    import sys

    stream = sys.stdin if stdin is None else stdin
    buffer = getattr(stream, "buffer", stream)
    closed = stream is None or bool(getattr(stream, "closed", False)) or not hasattr(buffer, "readline")
    if not closed:
        try:
            os.fstat(buffer.fileno())
        except io.UnsupportedOperation:  # an in-memory stream (tests): no descriptor to check
            pass
        except (OSError, ValueError):  # the descriptor is closed
            closed = True
    if closed:
        raise InputError(
            "--interactive reads prompts from standard input, which is closed; pipe prompts in "
            "(echo 'a fox' | wan run generate --interactive ...) or use --from_file FILE"
        )
    return StdinLines(buffer)
