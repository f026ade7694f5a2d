"""Flow-matching Euler: ``x_next = x + (sigma_next - sigma) * v``.

The official Wan2.1 code has no Euler sampler; this is musubi-tuner's ``vanilla`` solver
(``FlowMatchDiscreteScheduler``): the step size is the float32 difference of consecutive sigmas of
the float32 schedule built by :func:`~wan_kernel.sampling.schedule.euler_sigmas` (from sigma 1,
shifted; the model is fed ``sigma * 1000`` without truncation). First order: one model call per step.
"""

from __future__ import annotations

import torch

from wan_kernel.sampling.schedule import Schedule


class EulerSolver:
    """``solver.step(i, x, v)`` maps the sample at ``sigmas[i]`` to the sample at ``sigmas[i + 1]``."""

    name = "euler"

    def __init__(self, schedule: Schedule):
        self.sigmas = schedule.sigmas.to(device="cpu", dtype=torch.float32)  # [n + 1]
        self.num_steps = schedule.num_steps

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dt = self.sigmas[i + 1] - self.sigmas[i]  # negative: towards the data
        return x + v * dt
