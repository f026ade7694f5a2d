"""Classifier-free-guidance skip schedules (names ``none``, ``early``, ``late``, ``middle``,
``early_late``, ``alternate``).

Guidance costs a second (unconditional) forward pass per denoising step. A schedule decides, for
step ``i`` of ``n`` (0-based, in denoising order), whether that pass runs and the prediction is
``u + g * (c - u)`` ("A", applied) or the conditional prediction is used alone ("S", skipped).
``apply_ratio`` in ``[0, 1]`` is the share of steps that apply guidance; the number of applied
steps is ``a = int(n * apply_ratio)``, the floor of the floating-point product, exactly as
musubi-tuner's ``--cfg_skip_mode`` / ``--cfg_apply_ratio`` compute it (so ``100 * 0.29`` gives 28).

=============  ===========================================  ==================
name           applied steps                                n=10, ratio 0.6
=============  ===========================================  ==================
``none``       all                                          ``AAAAAAAAAA``
``early``      the last ``a`` (skips the early steps)       ``SSSSAAAAAA``
``late``       the first ``a`` (skips the late steps)       ``AAAAAASSSS``
``middle``     first ``a // 2`` and last ``a - a // 2``     ``AAASSSSAAA``
``early_late`` ``a`` steps from ``(n - a) // 2``            ``SSAAAAAASS``
``alternate``  when an accumulator ``w += ratio`` reaches   ``SASASAASAS``
               1 (then ``w -= 1``), in float arithmetic
=============  ===========================================  ==================

``alternate`` accumulates in floating point like musubi does, so rounding can leave it one
applied step short of ``a`` (10 steps at 0.6 apply 5 times, as the table shows). As in musubi,
``apply_ratio=None`` (the option not given) applies guidance at every step whatever the mode.

This module is also a template for third-party plugins: one module, small classes that subclass
the interface in :mod:`wan_kernel.interfaces`, a ``@hookimpl`` registry hook, an entry point in
the group ``wan_kernel`` (see this folder's ``pyproject.toml``), and tests beside it. It imports
nothing heavy, so ``wan plugins`` stays fast.
"""

from __future__ import annotations

import abc
import numbers
from typing import ClassVar

from wan_kernel import hookimpl
from wan_kernel.errors import InputError
from wan_kernel.interfaces import CfgSchedule

__all__ = [
    "AlternateSchedule",
    "EarlyLateSchedule",
    "EarlySchedule",
    "LateSchedule",
    "MiddleSchedule",
    "NoSkipSchedule",
    "SCHEDULES",
    "applied_step_count",
]


def _check_steps(step: int, num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise InputError(f"the number of denoising steps must be a positive integer, got {num_steps!r}.")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step < num_steps:
        raise InputError(
            f"step must be an integer in [0, {num_steps - 1}] for {num_steps} steps, got {step!r}."
        )


def _check_ratio(apply_ratio: float | None) -> None:
    if apply_ratio is None:
        return
    if isinstance(apply_ratio, bool) or not isinstance(apply_ratio, numbers.Real):
        raise InputError(f"cfg_apply_ratio must be a number in [0, 1], got {apply_ratio!r}.")
    if not 0.0 <= float(apply_ratio) <= 1.0:  # also rejects NaN
        raise InputError(
            f"cfg_apply_ratio must be in [0, 1] (the share of steps that apply guidance), "
            f"got {apply_ratio!r}."
        )


def applied_step_count(num_steps: int, apply_ratio: float) -> int:
    """``a = int(num_steps * apply_ratio)``: how many steps the window schedules apply."""
    _check_steps(0, num_steps)
    _check_ratio(apply_ratio)
    return int(num_steps * float(apply_ratio))


class _RatioSchedule(CfgSchedule):
    """Shared validation: a schedule whose decision depends on ``apply_ratio``."""

    def applies(self, step: int, num_steps: int, apply_ratio: float | None) -> bool:
        _check_steps(step, num_steps)
        _check_ratio(apply_ratio)
        if apply_ratio is None:  # musubi: skip modes only act when a ratio is given
            return True
        return self._applies(step, num_steps, float(apply_ratio))

    @abc.abstractmethod
    def _applies(self, step: int, num_steps: int, apply_ratio: float) -> bool:
        """The decision for a validated step and a ratio in ``[0, 1]``."""


class NoSkipSchedule(_RatioSchedule):
    name: ClassVar[str] = "none"
    description: ClassVar[str] = "guidance at every step (default)"

    def _applies(self, step: int, num_steps: int, apply_ratio: float) -> bool:
        return True


class _WindowSchedule(_RatioSchedule):
    """Applies guidance on one contiguous window ``[start, start + a)`` of the steps."""

    @abc.abstractmethod
    def _start(self, num_steps: int, applied: int) -> int:
        """First applied step, given ``applied = int(num_steps * apply_ratio)``."""

    def _applies(self, step: int, num_steps: int, apply_ratio: float) -> bool:
        applied = int(num_steps * apply_ratio)
        start = self._start(num_steps, applied)
        return start <= step < start + applied


class EarlySchedule(_WindowSchedule):
    name: ClassVar[str] = "early"
    description: ClassVar[str] = "skip guidance in the early steps, apply it in the last ones"

    def _start(self, num_steps: int, applied: int) -> int:
        return num_steps - applied


class LateSchedule(_WindowSchedule):
    name: ClassVar[str] = "late"
    description: ClassVar[str] = "apply guidance in the first steps, skip it in the late ones"

    def _start(self, num_steps: int, applied: int) -> int:
        return 0


class EarlyLateSchedule(_WindowSchedule):
    name: ClassVar[str] = "early_late"
    description: ClassVar[str] = "skip guidance in the early and late steps, apply it in the middle"

    def _start(self, num_steps: int, applied: int) -> int:
        return (num_steps - applied) // 2


class MiddleSchedule(_RatioSchedule):
    name: ClassVar[str] = "middle"
    description: ClassVar[str] = "apply guidance in the early and late steps, skip it in the middle"

    def _applies(self, step: int, num_steps: int, apply_ratio: float) -> bool:
        applied = int(num_steps * apply_ratio)
        skipped = num_steps - applied
        skip_start = (num_steps - skipped) // 2  # == applied // 2
        return not skip_start <= step < skip_start + skipped


class AlternateSchedule(_RatioSchedule):
    name: ClassVar[str] = "alternate"
    description: ClassVar[str] = "spread the guided steps evenly (accumulate the ratio, apply at 1)"

    def _applies(self, step: int, num_steps: int, apply_ratio: float) -> bool:
        w = 0.0
        apply = False
        for _ in range(step + 1):  # replay the accumulator up to this step (float, as musubi)
            w += apply_ratio
            apply = w >= 1.0
            if apply:
                w -= 1.0
        return apply


SCHEDULES: tuple[type[CfgSchedule], ...] = (
    NoSkipSchedule,
    EarlySchedule,
    LateSchedule,
    MiddleSchedule,
    EarlyLateSchedule,
    AlternateSchedule,
)
"""Every schedule this plugin registers, in registration order."""


@hookimpl
def wan_register_cfg_schedule(register):
    for schedule in SCHEDULES:
        register(schedule())
