"""The denoising loop: :func:`denoise` runs a solver over a schedule, :func:`make_solver` picks the step."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from wan_kernel.errors import InputError
from wan_kernel.sampling.dpm import DPMSolverPP
from wan_kernel.sampling.euler import EulerSolver
from wan_kernel.sampling.schedule import Schedule, make_schedule
from wan_kernel.sampling.unipc import UniPCSolver

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def make_solver(schedule: Schedule, *, order: int = 2):
    """The stepper for ``schedule.solver``: ``solver.step(i, x, v) -> x at sigmas[i + 1]``.

    ``order`` applies to ``unipc`` and ``dpm++`` (1..3, default 2 as in the official sampler).
    """
    if schedule.solver == "unipc":
        return UniPCSolver(schedule, order=order)
    if schedule.solver == "dpm++":
        return DPMSolverPP(schedule, order=order)
    return EulerSolver(schedule)


def denoise(
    velocity_fn: VelocityFn,
    noise: torch.Tensor,
    *,
    solver: str = "unipc",
    steps: int | None = None,
    shift: float = 5.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    timesteps: Sequence[float] | torch.Tensor | None = None,
    order: int = 2,
) -> torch.Tensor:
    """Run the flow-matching sampler from ``noise`` to a clean sample.

    :param velocity_fn: ``velocity_fn(x, t) -> v``; ``x`` is the current sample (float32, the
        shape of ``noise``), ``t`` a float32 tensor ``[B]`` (``B = noise.shape[0]``) on ``x``'s
        device holding this step's model timestep: the integer-valued ``int64(sigma * 1000)``
        the official pipeline feeds its model for ``unipc``/``dpm++``, ``sigma * 1000`` for
        ``euler``. ``v`` is the predicted velocity ``noise - x0``, same shape as ``x``.
        It is called exactly once per step, in order.
    :param noise: ``[B, ...]`` (e.g. ``[B, 16, F, H, W]`` latents), the sample at the first sigma.
    :param solver: ``unipc`` (official default), ``dpm++`` or ``euler`` (aliases accepted,
        e.g. ``vanilla``).
    :param steps: number of model calls; may be left out when ``sigmas``/``timesteps`` are given.
    :param shift: the noise-schedule shift (Wan2.1 uses 5.0; 3.0 for 480p image-to-video).
    :param generator: accepted for API stability and future stochastic solvers; the three ODE
        solvers are deterministic and draw no random numbers.
    :param callback: ``callback(step_index, num_steps, t, x)`` after every step, ``x`` the new sample.
    :param sigmas: custom noise levels, one per step (see :func:`make_schedule`); no shift applied.
    :param timesteps: custom model timesteps on the 0..1000 scale instead of ``sigmas``.
    :param order: solver order for ``unipc``/``dpm++`` (default 2, the official setting).
    :returns: the final sample, float32, the shape of ``noise``. The sample is carried in float32
        across steps, as the official pipeline does.
    """
    if not isinstance(noise, torch.Tensor):
        raise InputError(f"noise must be a torch.Tensor; got {type(noise).__name__}.")
    if noise.dim() < 1 or noise.shape[0] == 0:
        raise InputError(
            f"noise must have a batch dimension first, [B, ...]; got shape {tuple(noise.shape)}."
        )
    if not noise.is_floating_point():
        raise InputError(f"noise must be a floating-point tensor; got {noise.dtype}.")
    if not callable(velocity_fn):
        raise InputError("velocity_fn must be callable as velocity_fn(x, t).")
    if order not in (1, 2, 3):
        raise InputError(f"order must be 1, 2 or 3; got {order!r}.")
    del generator  # deterministic ODE solvers (documented above)

    schedule = make_schedule(solver, steps, shift, sigmas=sigmas, timesteps=timesteps)
    if schedule.solver == "unipc" and order == 3 and schedule.num_steps > 2 and schedule.sigmas[0] >= 1:
        raise InputError(
            "UniPC of order 3 cannot start at sigma 1 (its log-SNR is -inf there and the corrector's "
            "linear system breaks down); start the sigmas below 1 (the built-in grid starts at 0.999) "
            "or use order 2."
        )
    stepper = make_solver(schedule, order=order)
    n = schedule.num_steps
    batch = noise.shape[0]
    step_times = schedule.timesteps.to(noise.device)  # float32 [n]

    x = noise.to(torch.float32)
    for i in range(n):
        t = step_times[i].expand(batch)  # [B]
        v = velocity_fn(x, t)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise InputError(
                f"velocity_fn returned {got} at step {i}; expected a tensor of shape {tuple(x.shape)}."
            )
        x = stepper.step(i, x, v.to(torch.float32))
        if callback is not None:
            callback(i, n, t, x)
    return x
