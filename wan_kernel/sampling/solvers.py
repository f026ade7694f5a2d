"""The solver names: the one table of what ``solver=`` / ``--sample_solver`` accept.

Importing this module does not import torch (the CLI builds its choices from it).
"""

from __future__ import annotations

from wan_kernel.errors import InputError

SOLVERS: tuple[str, ...] = ("unipc", "dpm++", "euler")
"""The solver names :func:`make_schedule` and :func:`~wan_kernel.sampling.denoise` accept."""

SOLVER_ALIASES: dict[str, str] = {
    "uni_pc": "unipc",
    "uni-pc": "unipc",
    "dpm": "dpm++",
    "dpmpp": "dpm++",
    "dpm++2m": "dpm++",
    "dpmsolver++": "dpm++",
    "vanilla": "euler",  # musubi-tuner's spelling
    "flow_euler": "euler",
}
"""Other spellings users type, mapped to the canonical solver name."""

SOLVER_CHOICES: tuple[str, ...] = (*SOLVERS, "vanilla")
"""What ``wan run generate --sample_solver`` offers: the solvers and the seed trainer's ``vanilla``."""


def canonical_solver(name: str) -> str:
    """Return the canonical solver name for ``name`` (case-insensitive, aliases allowed)."""
    if not isinstance(name, str):
        raise InputError(f"solver must be a string, one of {', '.join(SOLVERS)}; got {name!r}.")
    key = name.strip().lower()
    key = SOLVER_ALIASES.get(key, key)
    if key not in SOLVERS:
        aliases = ", ".join(sorted(SOLVER_ALIASES))
        raise InputError(
            f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)} (also accepted: {aliases})."
        )
    return key
