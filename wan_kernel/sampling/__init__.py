"""Flow-matching samplers of Wan2.1: schedules, solvers and the denoising loop.

``denoise(velocity_fn, noise, *, solver, steps, shift)`` runs the whole sampler; the pieces
(:func:`make_schedule`, the solver classes, :func:`make_solver`) are public for custom loops.
Classifier-free guidance helpers live in :mod:`wan_kernel.sampling.guidance`.

Solvers (see :mod:`wan_kernel.sampling.schedule` for their exact schedules):

- ``unipc``: the official default, UniPC-bh2 order 2 with the UniC corrector;
- ``dpm++``: the official DPM-Solver++ (2M, midpoint);
- ``euler``: flow-matching Euler on musubi-tuner's ``vanilla`` schedule (alias ``vanilla``).

Names are imported on first use, so that ``wan_kernel.sampling.solvers`` (the solver names, no
torch) stays cheap to import.
"""

from __future__ import annotations

from wan_kernel.lazy import lazy_exports

_EXPORTS = {
    "SOLVERS": "wan_kernel.sampling.solvers",
    "SOLVER_ALIASES": "wan_kernel.sampling.solvers",
    "canonical_solver": "wan_kernel.sampling.solvers",
    "CfgVelocity": "wan_kernel.sampling.guidance",
    "combine_cfg": "wan_kernel.sampling.guidance",
    "guided_velocity": "wan_kernel.sampling.guidance",
    "make_cfg_velocity": "wan_kernel.sampling.guidance",
    "DPMSolverPP": "wan_kernel.sampling.dpm",
    "EulerSolver": "wan_kernel.sampling.euler",
    "UniPCSolver": "wan_kernel.sampling.unipc",
    "Schedule": "wan_kernel.sampling.schedule",
    "make_schedule": "wan_kernel.sampling.schedule",
    "shift_sigmas": "wan_kernel.sampling.schedule",
    "denoise": "wan_kernel.sampling.loop",
    "make_solver": "wan_kernel.sampling.loop",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
