"""UniPC (bh2) multistep solver for flow matching, as the official Wan2.1 sampler runs it.

Reference: Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models" (2023), and the official ``wan/utils/fm_solvers_unipc.py``
(``FlowUniPCMultistepScheduler`` with its defaults: ``solver_order=2``, ``solver_type='bh2'``,
``predict_x0=True``, ``lower_order_final=True``, corrector on every step but the first).

In flow matching ``alpha = 1 - sigma`` and the data prediction is ``x0 = x - sigma * v``. With
``lambda = log(alpha / sigma)`` and ``h = lambda_next - lambda_now``, one step is

- **UniC corrector** (every step after the first): with the new model output, re-do the previous
  step from the previous sample, so the sample entering this step is improved;
- **UniP predictor**: ``x_next = sigma_next / sigma * x - alpha_next * (e^{-h} - 1) * x0 - ...``
  plus a difference term from the previous ``x0`` (order 2).

The scalar coefficients are computed exactly as the official code does, as float32 0-dim tensors
(the sigma table is float32), so the result matches it to the last bit on the same hardware.
"""

from __future__ import annotations

import torch

from wan_kernel.sampling.schedule import Schedule


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of flow matching, ``log(1 - sigma) - log(sigma)`` (+inf at sigma 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _bh2_coefficients(rks: list, hh: torch.Tensor, order: int, device: torch.device):
    """``R`` (Vandermonde in ``rks``) and ``b`` of the UniPC linear system, B(h) = e^hh - 1.

    Like the official code, ``R`` and ``b`` live on the sample's device (the small solve runs there).
    """
    h_phi_1 = torch.expm1(hh)  # e^hh - 1
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = torch.expm1(hh)
    r = torch.tensor(rks, device=device)
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(torch.pow(r, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.stack(rows), torch.tensor(b, device=device), h_phi_1, b_h


def _weighted_sum(weights: torch.Tensor, terms: list[torch.Tensor]):
    """``sum_k weights[k] * terms[k]`` (0 when there are no terms)."""
    total = 0
    for w, term in zip(weights, terms):
        total = total + w * term
    return total


class UniPCSolver:
    """Stateful UniPC-bh2 stepper over one :class:`Schedule`.

    ``solver.step(i, x, v)`` takes the sample ``x`` at ``sigmas[i]`` and the model's velocity
    ``v`` there (both float32, same shape) and returns the sample at ``sigmas[i + 1]``. Steps must
    be taken in order ``0, 1, ..., n - 1``; the solver remembers the previous data predictions.

    ``order``: predictor order (1..3; the official sampler uses 2). ``lower_order_final`` lowers the
    order near the end so the last step is first order (official default, for any step count).
    """

    name = "unipc"

    def __init__(self, schedule: Schedule, *, order: int = 2, lower_order_final: bool = True):
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3; got {order}")
        self.sigmas = schedule.sigmas.to(device="cpu", dtype=torch.float32)  # [n + 1]
        self.num_steps = schedule.num_steps
        self.order = order
        self.lower_order_final = lower_order_final
        self._x0_history: list[torch.Tensor] = []  # newest last, at most `order` entries
        self._last_sample: torch.Tensor | None = None  # the sample the last predictor started from
        self._last_order = 0  # order the last predictor used (the corrector reuses it)
        self._next_index = 0

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if i != self._next_index:
            raise RuntimeError(f"UniPC steps must run in order: expected step {self._next_index}, got {i}")
        sigma = self.sigmas[i]
        x0 = x - sigma * v  # data prediction from the uncorrected sample

        if i > 0:
            x = self._correct(i, x0)

        self._x0_history = (self._x0_history + [x0])[-self.order :]

        order = self.order
        if self.lower_order_final:
            order = min(order, self.num_steps - i)
        order = min(order, i + 1)  # warm-up: not more history than steps taken

        self._last_sample = x
        self._last_order = order
        self._next_index = i + 1
        return self._predict(i, x, order)

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-``order``: from ``x`` at ``sigmas[i]`` to ``sigmas[i + 1]``."""
        sigma_t, sigma_s0 = self.sigmas[i + 1], self.sigmas[i]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        hh = -h  # predict_x0

        m0 = self._x0_history[-1]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (_lambda(self.sigmas[i - k]) - lambda_s0) / h
            rks.append(rk)
            d1s.append((self._x0_history[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        big_r, b, h_phi_1, b_h = _bh2_coefficients(rks, hh, order, x.device)

        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if d1s:
            if order == 2:
                rhos_p = torch.tensor([0.5], dtype=x.dtype, device=x.device)
            else:
                rhos_p = torch.linalg.solve(big_r[:-1, :-1], b[:-1]).to(x.dtype)
            x_t = x_t - alpha_t * b_h * _weighted_sum(rhos_p, d1s)
        return x_t

    def _correct(self, i: int, x0_now: torch.Tensor) -> torch.Tensor:
        """UniC: redo the previous step (``i - 1 -> i``) using the model output at step ``i``."""
        order = self._last_order
        x = self._last_sample
        sigma_t, sigma_s0 = self.sigmas[i], self.sigmas[i - 1]
        alpha_t = 1 - sigma_t
        lambda_s0 = _lambda(sigma_s0)
        h = _lambda(sigma_t) - lambda_s0
        hh = -h

        m0 = self._x0_history[-1]
        rks, d1s = [], []
        for k in range(1, order):
            rk = (_lambda(self.sigmas[i - (k + 1)]) - lambda_s0) / h
            rks.append(rk)
            d1s.append((self._x0_history[-(k + 1)] - m0) / rk)
        rks.append(1.0)
        big_r, b, h_phi_1, b_h = _bh2_coefficients(rks, hh, order, x.device)

        if order == 1:
            rhos_c = torch.tensor([0.5], dtype=x.dtype, device=x.device)
        else:
            rhos_c = torch.linalg.solve(big_r, b).to(x.dtype)

        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        correction = _weighted_sum(rhos_c[:-1], d1s) + rhos_c[-1] * (x0_now - m0)
        return x_t - alpha_t * b_h * correction
