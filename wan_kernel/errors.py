"""The typed errors the kernel raises for bad user input.

Every error here carries a message written for the person at the command line: what went wrong
and what to do about it. The CLI prints ``str(error)`` and exits non-zero, never a traceback.
"""

from __future__ import annotations


class WanError(Exception):
    """Base class of every user-facing error of the kernel and its plugins."""


class PluginError(WanError):
    """A problem with plugin discovery or selection."""


class UnknownPluginError(PluginError):
    """A name was asked for that no installed plugin registers."""

    def __init__(self, concern: str, name: str, known: list[str], install_hint: str | None = None):
        self.concern = concern
        self.name = name
        self.known = sorted(known)
        self.install_hint = install_hint
        known_text = ", ".join(self.known) if self.known else "none installed"
        message = f"unknown {concern} implementation {name!r}; known: {known_text}."
        if install_hint:
            message += f" {install_hint}"
        super().__init__(message)


class PluginUnavailableError(PluginError):
    """A registered implementation cannot run on this machine."""

    def __init__(self, concern: str, name: str, reason: str, distribution: str | None = None):
        self.concern = concern
        self.name = name
        self.reason = reason
        self.distribution = distribution
        where = f" (from {distribution})" if distribution else ""
        super().__init__(f"{concern} implementation {name!r}{where} cannot run here: {reason}")


class DuplicatePluginNameError(PluginError):
    """Two plugins register the same name for the same concern.

    When one of them is a first-party distribution (``builtin``), the advice names the other one,
    the newcomer, as the one to uninstall or disable.
    """

    def __init__(self, concern: str, name: str, first: str, second: str, *, builtin: str | None = None):
        self.concern = concern
        self.name = name
        self.distributions = (first, second)
        message = f"{concern} name {name!r} is registered twice: by {first} and by {second}. "
        if builtin in (first, second) and first != second:
            newcomer = second if builtin == first else first
            self.newcomer = newcomer
            message += (
                f"{name!r} is built into wan ({builtin}); {newcomer} registers it again. Uninstall "
                f"{newcomer} (pip uninstall {newcomer}), or disable it with WAN_DISABLE_PLUGINS={newcomer}, "
                f"or ask its authors to pick another name."
            )
        else:
            self.newcomer = second
            message += f"Uninstall one of them, or disable one with WAN_DISABLE_PLUGINS={second}."
        super().__init__(message)


class BrokenPluginError(PluginError):
    """A selected plugin failed to import or to register."""


class WeightsError(WanError):
    """A weight file is missing, unreadable, or not what the task needs."""


class InputError(WanError):
    """Bad user input other than weights: sizes, images, prompt files, options."""


class NonFiniteError(WanError):
    """A computation produced NaN or Inf values (NaN weights, a bad LoRA, a dtype overflow)."""


class OutputError(WanError):
    """An output cannot be written where the user asked: not writable, not free, disk full."""
