"""The CLI's single error path: user errors become ``error: ...`` on stderr, never a traceback.

- :class:`~wan_kernel.errors.WanError` (bad weights, bad input, unknown/broken/duplicate
  plugins, ...) -> ``error: <message>`` on stderr, exit code 1.
- click usage errors (unknown option, bad value) -> click's usage message, exit code 2.
- ``WAN_DEBUG=1`` in the environment -> the original exception propagates with its traceback
  (and a broken plugin's own import traceback is printed first).
- Anything else is a bug and keeps its traceback.

Commands get this for free when they run under the ``wan`` group (:class:`WanGroup` applies it
around every subcommand). A command that may also be invoked on its own (tests, other entry
points) decorates its callback with :func:`handle_wan_errors`::

    @click.command()
    @handle_wan_errors
    def generate(...): ...
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

import click

from wan_kernel.errors import WanError

DEBUG_ENV = "WAN_DEBUG"

F = TypeVar("F", bound=Callable[..., Any])


VERBOSE_META_KEY = "wan.verbose"
"""``ctx.meta`` key a command sets (``--verbose``) to ask for tracebacks, like ``WAN_DEBUG=1``."""


def debug_enabled() -> bool:
    """Whether ``WAN_DEBUG`` asks for tracebacks (any value but empty, ``0``, ``false``, ``no``), or
    the running command was given ``--verbose``."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(VERBOSE_META_KEY))


class WanCliError(click.ClickException):
    """A user-facing error: printed as ``error: <message>`` (continuation lines indented), exit 1."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def format_message(self) -> str:
        lines = str(self.message).strip().splitlines() or ["unknown error"]
        return "\n".join([f"error: {lines[0]}", *(f"  {line}" for line in lines[1:])])

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), file=file if file is not None else sys.stderr)


def to_cli_error(exc: WanError) -> WanCliError:
    """The CLI form of a kernel error (the message is the error's own ``str``)."""
    message = str(exc) or type(exc).__name__
    if getattr(exc, "plugin_traceback", None):
        message += f"\n(pass --verbose or set {DEBUG_ENV}=1 to see the plugin's traceback)"
    return WanCliError(message)


def _reraise_for_debug(exc: BaseException) -> None:
    plugin_traceback = getattr(exc, "plugin_traceback", None)
    if plugin_traceback:
        click.echo(f"The plugin failed with:\n{plugin_traceback}", err=True)


def handle_wan_errors(func: F) -> F:
    """Decorator: run ``func``; turn a :class:`WanError` into a :class:`WanCliError` (exit 1).

    With ``WAN_DEBUG=1`` the ``WanError`` propagates unchanged so its traceback is printed.
    Idempotent: nesting it (a decorated command under :class:`WanGroup`) is harmless.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except WanError as exc:
            if debug_enabled():
                _reraise_for_debug(exc)
                raise
            raise to_cli_error(exc) from exc

    return wrapper  # type: ignore[return-value]


class WanGroup(click.Group):
    """A click group that applies :func:`handle_wan_errors` around everything it invokes."""

    def invoke(self, ctx: click.Context) -> Any:
        return handle_wan_errors(super().invoke)(ctx)
