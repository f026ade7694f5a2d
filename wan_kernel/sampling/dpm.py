"""DPM-Solver++ (multistep, midpoint) for flow matching, as the official Wan2.1 ``dpm++`` sampler.

Reference: Lu et al., "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models" (2022), and the official ``wan/utils/fm_solvers.py`` (``FlowDPMSolverMultistepScheduler``
with its defaults: ``algorithm_type='dpmsolver++'``, ``solver_order=2``, ``solver_type='midpoint'``,
``lower_order_final=True``, final sigma 0), driven by ``get_sampling_sigmas`` (sigmas from 1.0).

With ``alpha = 1 - sigma``, ``x0 = x - sigma * v`` and ``lambda = log(alpha / sigma)``:

- first order (DDIM): ``x_next = sigma_next / sigma * x - alpha_next * (e^{-h} - 1) * x0``;
- second order (midpoint): the same plus ``- 0.5 * alpha_next * (e^{-h} - 1) * D1`` with
  ``D1 = (x0 - x0_prev) / r0``, ``r0 = h_prev / h``;
- third order as in the paper (not used by the official sampler, available for experiments).

The first step (``sigma = 1``: ``lambda = -inf``) and the last step (``sigma_next = 0``) are first
order; at the second step ``r0`` is infinite, so its difference term vanishes, exactly as in the
official code. Scalars are float32 0-dim tensors computed as the official code does.
"""

from __future__ import annotations

import torch

from wan_kernel.sampling.schedule import Schedule


def _alpha_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha = 1 - sigma
    return alpha, torch.log(alpha) - torch.log(sigma)


class DPMSolverPP:
    """Stateful multistep DPM-Solver++ stepper over one :class:`Schedule`.

    ``solver.step(i, x, v)`` maps the sample at ``sigmas[i]`` (with the model's velocity ``v``
    there) to the sample at ``sigmas[i + 1]``; steps run in order. ``order`` is 1, 2 (official) or 3.
    ``lower_order_final``: below 15 steps, the second-to-last step of an order-3 solver is second
    order. The last step is always first order (the final sigma is 0).
    """

    name = "dpm++"

    def __init__(self, schedule: Schedule, *, order: int = 2, lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"DPM-Solver++ order must be 1, 2 or 3; got {order}")
        self.sigmas = schedule.sigmas.to(device="cpu", dtype=torch.float32)  # [n + 1]
        self.num_steps = schedule.num_steps
        self.order = order
        self.lower_order_final = lower_order_final
        self._x0_history: list[torch.Tensor] = []
        self._next_index = 0

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if i != self._next_index:
            raise RuntimeError(f"DPM-Solver++ steps must run in order: expected {self._next_index}, got {i}")
        n = self.num_steps
        x0 = x - self.sigmas[i] * v
        self._x0_history = (self._x0_history + [x0])[-self.order :]

        order = min(self.order, i + 1)  # warm-up
        if i == n - 1:
            order = 1
        elif i == n - 2 and self.lower_order_final and n < 15:
            order = min(order, 2)

        self._next_index = i + 1
        if order == 1:
            return self._first_order(i, x)
        if order == 2:
            return self._second_order(i, x)
        return self._third_order(i, x)

    def _first_order(self, i: int, x: torch.Tensor) -> torch.Tensor:
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        alpha_t, lambda_t = _alpha_lambda(sigma_t)
        _, lambda_s = _alpha_lambda(sigma_s)
        h = lambda_t - lambda_s
        m0 = self._x0_history[-1]
        return (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * m0

    def _second_order(self, i: int, x: torch.Tensor) -> torch.Tensor:
        sigma_t, sigma_s0, sigma_s1 = self.sigmas[i + 1], self.sigmas[i], self.sigmas[i - 1]
        alpha_t, lambda_t = _alpha_lambda(sigma_t)
        _, lambda_s0 = _alpha_lambda(sigma_s0)
        _, lambda_s1 = _alpha_lambda(sigma_s1)
        m0, m1 = self._x0_history[-1], self._x0_history[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        coef = alpha_t * (torch.exp(-h) - 1.0)
        return (sigma_t / sigma_s0) * x - coef * d0 - 0.5 * coef * d1

    def _third_order(self, i: int, x: torch.Tensor) -> torch.Tensor:
        sigma_t, sigma_s0, sigma_s1, sigma_s2 = (
            self.sigmas[i + 1],
            self.sigmas[i],
            self.sigmas[i - 1],
            self.sigmas[i - 2],
        )
        alpha_t, lambda_t = _alpha_lambda(sigma_t)
        _, lambda_s0 = _alpha_lambda(sigma_s0)
        _, lambda_s1 = _alpha_lambda(sigma_s1)
        _, lambda_s2 = _alpha_lambda(sigma_s2)
        m0, m1, m2 = self._x0_history[-1], self._x0_history[-2], self._x0_history[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        e = torch.exp(-h) - 1.0
        return (
            (sigma_t / sigma_s0) * x
            - (alpha_t * e) * m0
            + (alpha_t * (e / h + 1.0)) * d1
            - (alpha_t * ((e + h) / h**2 - 0.5)) * d2
        )
