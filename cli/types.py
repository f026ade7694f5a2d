"""Click parameter types shared by the ``wan`` commands: values checked when the command line is
parsed, so a bad value fails before any model is loaded (exit code 2, click's usage message).

- :data:`FINITE_FLOAT`: a float that is not NaN or infinite (click's ``float`` takes ``nan``).
- :data:`SEED`: an integer in the range ``torch.Generator.manual_seed`` accepts.
"""

from __future__ import annotations

import math
from typing import Any

import click

from wan_kernel.checks import SEED_RANGE


class FiniteFloat(click.ParamType):
    """A float that must be finite: ``nan``, ``inf`` and ``-inf`` are refused."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class Seed(click.ParamType):
    """An integer seed in ``SEED_RANGE`` (what ``torch.Generator.manual_seed`` accepts)."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        number = click.INT.convert(value, param, ctx)
        low, high = SEED_RANGE
        if not low <= number <= high:
            self.fail(
                f"{number} is out of range: torch takes seeds from {low} (-2**63) to {high} (2**64 - 1)",
                param,
                ctx,
            )
        return number


FINITE_FLOAT = FiniteFloat()
SEED = Seed()
