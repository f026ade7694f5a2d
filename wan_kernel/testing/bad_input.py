"""Table-driven bad-input tests for any ``wan`` command (generate today; cache, train, lora next).

A command's test module lists :class:`Case` rows, one per hostile input, grouped by class (the
classes of issue 11: ``files``, ``config``, ``options``, ``prompts``, ``media``, ``nonfinite``,
``plugins``, ``outputs``, ``api``), and runs each through :func:`run_cli_case` (a command line) or
:func:`run_api_case` (a Python call). Every case asserts three things:

- the exit code (1 for a user error, 2 for a usage error, 0 for an input that must now work);
- the message: each fragment in ``message`` appears in stderr (or the exception), and no
  ``Traceback`` does;
- the output folder's state: no temporary left (``*.partial*``, ``.wan-*``) and, for a failing
  case, no output file at all (nothing half-written, nothing stale); a passing case may say how
  many outputs it expects.

:func:`outcome_of` classifies a run as ``clean``, ``traceback`` or ``silent_wrong`` (exit 0 where
an error belonged, or a wrong number of outputs), and :func:`count_matrix` totals them, the
figures the issue asks for::

    from wan_kernel.testing.bad_input import Case, run_cli_case

    CASES = [Case("options", "seed-too-big", ["--seed", str(2**64)], exit_code=2, message=("out of range",))]

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
    def test_bad_input(case, tmp_path):
        run_cli_case(case, tmp_path, command=["run", "generate", "--preset", "demo"]).check()
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import attrs

CLASSES = ("files", "config", "options", "prompts", "media", "nonfinite", "plugins", "outputs", "api")
"""The bad-input classes of issue 11; every command's table uses these names."""

TEMPORARY_MARKERS = (".partial", ".wan-")
"""Name parts of temporaries: none may stay in an output folder after a run, whatever its end."""

Args = Sequence[str] | Callable[[Path], Sequence[str]]


@attrs.frozen
class Case:
    """One hostile input and what must happen.

    :param klass: one of :data:`CLASSES`.
    :param name: short id (unique within the class).
    :param args: the command line after the command, or ``fn(tmp_path) -> args`` that first writes
        the files the case needs; ``{out}`` in an argument is replaced by the output folder.
    :param exit_code: the exit status wanted (0: the input is valid and must now work).
    :param message: fragments that must all appear in stderr (or in the exception's text).
    :param outputs: how many outputs the folder must hold afterwards (default: none for a failing
        case, any number for a passing one); e.g. a failing ``--interactive`` line among good ones.
    :param input: standard input for the command.
    :param env: extra environment variables.
    :param skip: a reason to skip (e.g. a case that needs a non-root user), or ``None``.
    """

    klass: str = attrs.field(validator=attrs.validators.in_(CLASSES))
    name: str
    args: Args = ()
    exit_code: int = 1
    message: tuple[str, ...] = attrs.field(
        default=(), converter=lambda m: (m,) if isinstance(m, str) else tuple(m)
    )
    outputs: int | None = None
    input: str | bytes | None = None
    env: Mapping[str, str] = attrs.Factory(dict)
    skip: str | None = None

    @property
    def id(self) -> str:
        return f"{self.klass}-{self.name}"


@attrs.define
class Outcome:
    """What a case did: exit code, stderr, the output folder's files, and the verdict."""

    case: Case
    exit_code: int
    stderr: str
    out: Path
    traceback: bool = False
    wrong: str | None = None
    """A wrong result the case noticed itself (an API case's value check), or ``None``."""

    @property
    def files(self) -> list[Path]:
        return output_files(self.out)

    @property
    def temporaries(self) -> list[Path]:
        return leftover_temporaries(self.out)

    @property
    def silent_wrong(self) -> bool:
        """Exit 0 where an error belonged, or a success with the wrong number of outputs."""
        if self.wrong:
            return True
        if self.exit_code != 0:
            return False
        if self.case.exit_code != 0:
            return True
        return self.case.outputs is not None and len(self.files) != self.case.outputs

    @property
    def problems(self) -> list[str]:
        found = []
        if self.traceback:
            found.append("a traceback was printed")
        if self.wrong:
            found.append(f"wrong result: {self.wrong}")
        elif self.silent_wrong:
            found.append(f"silent wrong result: exit 0 with {len(self.files)} output(s)")
        elif self.exit_code != self.case.exit_code:
            found.append(f"exit code {self.exit_code}, expected {self.case.exit_code}")
        missing = [m for m in self.case.message if m not in self.stderr]
        if missing:
            found.append(f"message lacks {missing!r}")
        if self.temporaries:
            found.append(f"temporaries left: {[p.name for p in self.temporaries]}")
        if self.case.outputs is not None:
            if len(self.files) != self.case.outputs and not self.silent_wrong:
                found.append(f"{len(self.files)} output(s), expected {self.case.outputs}")
        elif self.case.exit_code != 0 and self.files:
            found.append(f"outputs written by a failing run: {[p.name for p in self.files]}")
        return found

    @property
    def verdict(self) -> str:
        """``traceback``, ``silent_wrong``, ``unclean`` (other problems) or ``clean``."""
        if self.traceback:
            return "traceback"
        if self.silent_wrong:
            return "silent_wrong"
        return "unclean" if self.problems else "clean"

    def check(self) -> None:
        """Fail the test (``AssertionError``) with every problem and the command's stderr."""
        assert not self.problems, f"{self.case.id}: {'; '.join(self.problems)}\n--- stderr ---\n{self.stderr}"


def leftover_temporaries(folder: Path) -> list[Path]:
    """Temporaries anywhere under ``folder`` (hidden ``.wan-`` files, ``.partial`` names)."""
    if not folder.exists():
        return []
    return sorted(p for p in folder.rglob("*") if any(m in p.name for m in TEMPORARY_MARKERS))


DEAD_PID = 999_999_999
"""A process id no live process has (above Linux's largest ``pid_max``)."""


def killed_run_temporary(target: Path, content: bytes = b"half a file") -> Path:
    """Create, beside ``target``, the temporary a run of this machine killed (``kill -9``) while
    writing ``target`` would have left (:func:`wan_kernel.files.temporary_name`, a dead pid)."""
    from wan_kernel.files import temporary_name

    name = temporary_name(target.stem, target.suffix).replace(f"-{os.getpid()}-", f"-{DEAD_PID}-", 1)
    path = target.parent / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def output_files(folder: Path) -> list[Path]:
    """The outputs in ``folder`` (files and frame folders at its top level, temporaries excluded)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not any(m in p.name for m in TEMPORARY_MARKERS))


def _resolve_args(case: Case, tmp_path: Path, out: Path) -> list[str]:
    args = case.args(tmp_path) if callable(case.args) else case.args
    return [str(a).replace("{out}", str(out)) for a in args]


@contextlib.contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Fail instead of hanging (a FIFO opened for reading blocks forever): ``SIGALRM`` after
    ``seconds`` raises ``TimeoutError`` in the main thread (a no-op where there is no SIGALRM)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        _release_fifos()  # a reader blocked in C on a FIFO only returns once a writer appears
        raise TimeoutError(f"{what} still running after {seconds} s (blocked?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def run_cli_case(
    case: Case,
    tmp_path: Path,
    *,
    command: Sequence[str],
    out_option: str | None = "--save_path",
    timeout: int = 120,
) -> Outcome:
    """Run ``wan <command> <case args> [out_option <tmp_path>/out]`` in-process (click's runner)."""
    import pytest
    from click.testing import CliRunner
    from wan_cli.main import cli

    if case.skip:
        pytest.skip(case.skip)
    out = tmp_path / "out"
    args = [*command, *_resolve_args(case, tmp_path, out)]
    if out_option and out_option not in args:
        args += [out_option, str(out)]
    with deadline(timeout, case.id):
        result = CliRunner().invoke(cli, args, input=case.input, env=dict(case.env))
    exc = result.exception
    traceback = "Traceback" in result.output or (exc is not None and not isinstance(exc, SystemExit))
    stderr = result.stderr
    if exc is not None and not isinstance(exc, SystemExit):
        stderr += f"\n[uncaught {type(exc).__name__}: {exc}]"
    return Outcome(case, result.exit_code, stderr, out, traceback)


class WrongResult(Exception):
    """Raised by an API case's ``call`` when the call succeeded with a wrong value (a silent wrong
    result: a 16-bit image read as white, a NaN accepted)."""


def run_api_case(
    case: Case, tmp_path: Path, call: Callable[[Path], Any], *, expected: type[BaseException] | tuple = ()
) -> Outcome:
    """Run ``call(tmp_path)`` for a Python-API case: raising ``expected`` (a typed error) counts as
    exit 1 with its message as stderr; :class:`WrongResult` as a silent wrong result; any other
    exception as a traceback; returning as exit 0."""
    import traceback as tb

    import pytest

    if case.skip:
        pytest.skip(case.skip)
    out = tmp_path / "out"
    try:
        with deadline(60, case.id):
            call(tmp_path)
    except WrongResult as exc:
        return Outcome(case, 0, str(exc), out, wrong=str(exc))
    except SystemExit as exc:  # the process would have ended here without a word
        return Outcome(case, 0, "", out, wrong=f"exited silently (SystemExit {exc.code!r})")
    except expected as exc:
        return Outcome(case, 1, str(exc), out)
    except Exception as exc:  # noqa: BLE001 - a wrong exception type is a traceback for the user
        return Outcome(case, 1, "".join(tb.format_exception(exc)), out, traceback=True)
    return Outcome(case, 0, "", out)


def count_matrix(outcomes: Sequence[Outcome]) -> dict[str, dict[str, int]]:
    """Per class and in total: cases ``tried``, ``clean``, ``traceback``, ``silent_wrong``, ``unclean``."""
    table: dict[str, dict[str, int]] = {}
    for outcome in outcomes:
        for key in (outcome.case.klass, "total"):
            row = table.setdefault(
                key, {"tried": 0, "clean": 0, "traceback": 0, "silent_wrong": 0, "unclean": 0}
            )
            row["tried"] += 1
            row[outcome.verdict] += 1
    if "total" in table:
        table["total"] = table.pop("total")
    return table


def format_matrix(table: Mapping[str, Mapping[str, int]]) -> str:
    """The matrix as aligned text, one row per class and a total."""
    columns = ("tried", "clean", "traceback", "silent_wrong", "unclean")
    lines = [f"{'class':<10}" + "".join(f"{c:>14}" for c in columns)]
    for klass, row in table.items():
        lines.append(f"{klass:<10}" + "".join(f"{row[c]:>14}" for c in columns))
    return "\n".join(lines)


_FIFOS: list[Path] = []


def make_fifo(path: Path) -> Path:
    """A named pipe at ``path`` (reading it would block forever: the cases check it never is)."""
    os.mkfifo(path)
    _FIFOS.append(path)
    return path


def _release_fifos() -> None:
    """Open every FIFO made by :func:`make_fifo` for writing and close it again: a reader stuck in
    ``open()`` gets end-of-file, so a case that hangs fails instead of blocking the test run."""
    for path in list(_FIFOS):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
