"""Noise schedules (sigmas) and model timesteps of the flow-matching samplers.

Flow matching in Wan2.1: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` and the network predicts the
velocity ``v = noise - x0``; the model is fed ``t = sigma * 1000``. Sampling walks ``sigma`` from
(nearly) 1 down to 0 along a *shifted* grid, ``shift * s / (1 + (shift - 1) * s)``, which spends
more steps at high noise for larger ``shift``.

Each solver has the schedule its reference uses, reproduced number for number:

``unipc`` (official ``FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift)``)
    ``s = linspace(sigma_max, 0, steps + 1)[:-1]`` in float64, where ``sigma_max`` is the first
    sigma of the training table at shift 1, ``float32(1 - 1/1000)`` (= 0.99900001...);
    shifted in float64; timesteps ``int64(s * 1000)`` (truncation); sigmas ``[*s, 0]`` as float32.

``dpm++`` (official ``get_sampling_sigmas(steps, shift)`` + ``retrieve_timesteps(sigmas=...)``)
    ``s = linspace(1, 0, steps + 1)[:steps]`` in float64, shifted; the scheduler (built with
    ``shift=1``) shifts again by 1, which is the identity; timesteps ``int64(s * 1000)``; sigmas
    ``[*s, 0]`` as float32. The first sigma is exactly 1 and the first timestep 1000.

``euler`` (musubi-tuner's ``vanilla`` solver, ``FlowMatchDiscreteScheduler(shift=shift)``)
    The official Wan2.1 code has no Euler sampler; we follow the trainer whose options we accept.
    ``s = torch.linspace(1, 0, steps + 1)`` in float32, shifted in float32; timesteps are
    ``s[:-1] * 1000`` in float32 and are *not* truncated to integers.

Every schedule's ``timesteps`` are stored as a float32 tensor (integer-valued for ``unipc`` and
``dpm++``): the official pipeline hands the model an int64 tensor, and the model casts it to float
before its sinusoidal embedding, so the values are the same.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs
import numpy as np
import torch

from wan_kernel.errors import InputError
from wan_kernel.sampling.solvers import SOLVER_ALIASES, SOLVERS, canonical_solver  # noqa: F401 (re-exported)

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """The time shift ``shift * s / (1 + (shift - 1) * s)`` (works on floats, arrays and tensors)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@attrs.frozen
class Schedule:
    """A sampling schedule.

    ``sigmas``: float32 ``[steps + 1]``, strictly decreasing, ending in 0.
    ``timesteps``: float32 ``[steps]``, what the model is fed at each step (0..1000).
    ``solver``: the canonical solver name the schedule was built for.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor
    solver: str

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise InputError(f"steps must be a positive integer; got {steps!r}.")
    if steps < 1:
        raise InputError(f"steps must be at least 1; got {steps}.")
    return int(steps)


def _check_shift(shift) -> float:
    try:
        value = float(shift)
    except (TypeError, ValueError):
        raise InputError(f"shift must be a positive number; got {shift!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"shift must be a positive finite number; got {shift!r}.")
    return value


def _training_sigma_max(num_train_timesteps: int) -> float:
    # The official schedulers build the training table (shift 1) as 1 - linspace(1, 1/N, N)[::-1]
    # in float64, store it as float32 and take its first entry: float32(1 - 1/N).
    return float(np.float32(1.0 - 1.0 / num_train_timesteps))


def _from_float64_sigmas(s: np.ndarray, solver: str, num_train_timesteps: int) -> Schedule:
    """Official tail of ``set_timesteps``: int64-truncated timesteps, sigmas + [0] as float32."""
    timesteps = torch.from_numpy((s * num_train_timesteps).astype(np.float64)).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
    return Schedule(sigmas=sigmas, timesteps=timesteps.to(torch.float32), solver=solver)


def unipc_sigmas(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """The official UniPC schedule (see the module docstring)."""
    sigma_max = _training_sigma_max(num_train_timesteps)
    s = np.linspace(sigma_max, 0.0, steps + 1)[:-1]  # float64 [steps]
    s = shift_sigmas(s, shift)
    return _from_float64_sigmas(s, "unipc", num_train_timesteps)


def dpm_sigmas(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """The official DPM++ schedule (``get_sampling_sigmas``; see the module docstring)."""
    s = np.linspace(1.0, 0.0, steps + 1)[:steps]  # float64 [steps]
    s = shift_sigmas(s, shift)
    s = shift_sigmas(s, 1)  # the scheduler's own shift (configured as 1): the identity
    return _from_float64_sigmas(s, "dpm++", num_train_timesteps)


def euler_sigmas(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Schedule:
    """musubi-tuner's ``vanilla`` Euler schedule (see the module docstring)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    s = shift_sigmas(s, shift)
    timesteps = (s[:-1] * num_train_timesteps).to(torch.float32)
    return Schedule(sigmas=s, timesteps=timesteps, solver="euler")


def _custom_schedule(
    solver: str,
    sigmas: Sequence[float] | torch.Tensor | None,
    timesteps: Sequence[float] | torch.Tensor | None,
    steps: int | None,
    num_train_timesteps: int,
) -> Schedule:
    if sigmas is not None and timesteps is not None:
        raise InputError("pass either sigmas or timesteps, not both.")
    given = sigmas if sigmas is not None else timesteps
    what = "sigmas" if sigmas is not None else "timesteps"
    values = torch.as_tensor(given, dtype=torch.float64).flatten()
    if values.numel() == 0:
        raise InputError(f"{what} is empty; give one value per step.")
    if not torch.isfinite(values).all():
        raise InputError(f"{what} must be finite numbers.")
    if timesteps is not None:
        values = values / num_train_timesteps
    if values.numel() > 1 and values[-1] == 0:
        values = values[:-1]  # a trailing final 0 is allowed and implied
    if not (values[0] <= 1) or not (values[-1] > 0):
        limit = "1" if sigmas is not None else str(num_train_timesteps)
        raise InputError(f"{what} must lie in (0, {limit}] before the final 0; got {given!r}.")
    if values.numel() > 1 and not (values[1:] < values[:-1]).all():
        raise InputError(f"{what} must be strictly decreasing (from noise to data); got {given!r}.")
    if steps is not None and int(steps) != values.numel():
        raise InputError(
            f"steps={steps} does not match the {values.numel()} {what} given; "
            "leave steps out or make them agree."
        )
    s = values.numpy()
    if timesteps is not None:
        t = torch.as_tensor(given, dtype=torch.float64).flatten()[: s.shape[0]]
        sig = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
        return Schedule(sigmas=sig, timesteps=t.to(torch.float32), solver=solver)
    if solver == "euler":
        sig = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
        return Schedule(sigmas=sig, timesteps=sig[:-1] * num_train_timesteps, solver=solver)
    return _from_float64_sigmas(s, solver, num_train_timesteps)


def make_schedule(
    solver: str,
    steps: int | None = None,
    shift: float = 5.0,
    *,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    timesteps: Sequence[float] | torch.Tensor | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> Schedule:
    """Build the schedule ``solver`` uses for ``steps`` steps at ``shift``.

    ``sigmas`` (``steps`` noise levels in ``(0, 1]``, strictly decreasing, optionally followed by
    the final 0) or ``timesteps`` (the same on the 0..1000 scale) replace the built-in grid; no
    shift is applied to them. With ``sigmas``, the model timesteps follow the solver's rule
    (``int64(sigma * 1000)`` for ``unipc``/``dpm++``, ``sigma * 1000`` for ``euler``); with
    ``timesteps``, the model is fed exactly those values and ``sigma = t / 1000``.
    """
    solver = canonical_solver(solver)
    if sigmas is not None or timesteps is not None:
        if steps is not None:
            _check_steps(steps)
        return _custom_schedule(solver, sigmas, timesteps, steps, num_train_timesteps)
    if steps is None:
        raise InputError("steps is required (or pass sigmas= / timesteps= to set the grid yourself).")
    steps = _check_steps(steps)
    shift = _check_shift(shift)
    if solver == "unipc":
        return unipc_sigmas(steps, shift, num_train_timesteps)
    if solver == "dpm++":
        return dpm_sigmas(steps, shift, num_train_timesteps)
    return euler_sigmas(steps, shift, num_train_timesteps)
