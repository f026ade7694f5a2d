"""Classifier-free guidance (CFG) around a velocity model, with per-step CFG schedules.

The official Wan2.1 pipelines run the model twice per step, with the prompt (``cond``) and with
the negative prompt (``uncond``), and sample with ``u + g * (c - u)`` in float32. A CFG schedule
(a :class:`~wan_kernel.interfaces.CfgSchedule` plugin such as ``late``) may skip the unconditional
pass on some steps: those steps use the conditional prediction alone, one forward instead of two.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from wan_kernel.errors import InputError

ModelCall = Callable[..., torch.Tensor]


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` in float32 (the official expression and order)."""
    cond = cond.to(torch.float32)
    uncond = uncond.to(torch.float32)
    return uncond + scale * (cond - uncond)


def guided_velocity(
    cond_fn: Callable[[], torch.Tensor],
    uncond_fn: Callable[[], torch.Tensor],
    scale: float,
    apply: bool,
) -> torch.Tensor:
    """One guided prediction: ``combine_cfg(cond_fn(), uncond_fn(), scale)`` when ``apply``,
    else ``cond_fn()`` alone (as float32); ``uncond_fn`` is then never called."""
    cond = cond_fn()
    if not apply:
        return cond.to(torch.float32)
    return combine_cfg(cond, uncond_fn(), scale)


def _merge_arg(key: str, cond: Any, uncond: Any) -> Any:
    """Join one keyword argument of the cond and uncond passes into a batch-of-2B argument."""
    if cond is None and uncond is None:
        return None
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        return torch.cat([cond, uncond], dim=0)
    if isinstance(cond, (list, tuple)) and isinstance(uncond, (list, tuple)):
        return [*cond, *uncond]  # e.g. context: a list of B tensors [L_i, D] per pass
    if type(cond) is type(uncond) and not isinstance(cond, torch.Tensor) and cond == uncond:
        return cond  # plain settings shared by both passes
    raise InputError(
        f"cannot batch the conditional and unconditional passes: argument {key!r} is "
        f"{type(cond).__name__} vs {type(uncond).__name__}; give tensors (batched on dim 0), "
        f"lists, or identical plain values, or use batched_cfg=False."
    )


class CfgVelocity:
    """``velocity_fn(x, t)`` for :func:`~wan_kernel.sampling.denoise` that applies CFG per step.

    Call ``i`` (0-based) is denoising step ``i``: it runs ``model_call(x, t, **cond_args)`` and,
    when guidance applies at step ``i``, ``model_call(x, t, **uncond_args)`` too, returning
    ``u + g * (c - u)`` in float32; otherwise the conditional prediction alone. With
    ``batched_cfg`` both passes run as one forward of batch ``2B`` (same result, one call).
    ``forwards`` counts model calls; one object serves one denoising run (``reset()`` to reuse).
    """

    def __init__(
        self,
        model_call: ModelCall,
        cond_args: Mapping[str, Any],
        uncond_args: Mapping[str, Any] | None,
        guidance_scale: float,
        cfg_schedule: Any | None,
        num_steps: int,
        *,
        apply_ratio: float | None = 1.0,
        batched_cfg: bool = False,
    ):
        self.model_call = model_call
        self.cond_args = dict(cond_args)
        self.uncond_args = None if uncond_args is None else dict(uncond_args)
        self.guidance_scale = guidance_scale
        self.cfg_schedule = cfg_schedule
        self.num_steps = num_steps
        self.apply_ratio = apply_ratio
        self.batched_cfg = batched_cfg
        self.step = 0
        self.forwards = 0
        self.applied: list[bool] = []  # per step taken: did guidance apply?
        self._batched_args: dict[str, Any] | None = None  # cond and uncond joined, built once

    def reset(self) -> None:
        self.step = 0
        self.forwards = 0
        self.applied = []

    def applies(self, step: int) -> bool:
        """Whether step ``step`` runs the unconditional pass."""
        if self.uncond_args is None or self.guidance_scale == 1.0:
            return False
        if self.cfg_schedule is None:
            return True
        return bool(self.cfg_schedule.applies(step, self.num_steps, self.apply_ratio))

    def _forward(self, x: torch.Tensor, t: torch.Tensor, args: Mapping[str, Any]) -> torch.Tensor:
        self.forwards += 1
        return self.model_call(x, t, **args)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.step >= self.num_steps:
            raise InputError(
                f"this guided velocity function was built for {self.num_steps} steps and has been "
                f"called {self.step} times; build a new one (or call reset()) for each denoising run."
            )
        apply = self.applies(self.step)
        self.applied.append(apply)
        self.step += 1
        if apply and self.batched_cfg:
            batch = x.shape[0]
            if self._batched_args is None:  # the same every step: join the arguments once
                self._batched_args = {
                    key: _merge_arg(key, self.cond_args[key], self.uncond_args[key])
                    for key in self.cond_args
                }
            out = self._forward(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), self._batched_args)
            return combine_cfg(out[:batch], out[batch:], self.guidance_scale)
        return guided_velocity(
            lambda: self._forward(x, t, self.cond_args),
            lambda: self._forward(x, t, self.uncond_args),
            self.guidance_scale,
            apply,
        )


def make_cfg_velocity(
    model_call: ModelCall,
    cond_args: Mapping[str, Any],
    uncond_args: Mapping[str, Any] | None,
    guidance_scale: float,
    cfg_schedule: Any | None = None,
    num_steps: int | None = None,
    *,
    apply_ratio: float | None = 1.0,
    batched_cfg: bool = False,
) -> CfgVelocity:
    """Build the guided ``velocity_fn(x, t)`` for a run of ``num_steps`` denoising steps.

    :param model_call: ``model_call(x, t, **args) -> v`` with ``x`` ``[B, ...]`` and ``t`` ``[B]``
        (e.g. ``lambda x, t, **a: dit(x, t, **a)``).
    :param cond_args: keyword arguments of the conditional pass (``context=[...]``, ``y=``, ...).
    :param uncond_args: those of the unconditional pass (negative prompt), or ``None`` for none.
    :param guidance_scale: ``g`` in ``u + g * (c - u)``; ``1.0`` means no guidance (one forward).
    :param cfg_schedule: an object with ``applies(step, num_steps, apply_ratio) -> bool`` (a
        :class:`~wan_kernel.interfaces.CfgSchedule`), or ``None`` to guide every step.
    :param num_steps: the number of denoising steps (as given to ``denoise``).
    :param apply_ratio: the share of steps the schedule guides (0..1), passed to it as is;
        ``None`` (no ratio given by the user) is passed through for the schedule to interpret.
    :param batched_cfg: run cond and uncond as one forward of batch ``2B`` (tensors are
        concatenated on dim 0, lists joined, identical plain values passed once).
    """
    if not callable(model_call):
        raise InputError("model_call must be callable as model_call(x, t, **args).")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise InputError(f"num_steps must be a positive integer; got {num_steps!r}.")
    try:
        scale = float(guidance_scale)
    except (TypeError, ValueError):
        raise InputError(f"guidance_scale must be a number; got {guidance_scale!r}.") from None
    if not math.isfinite(scale):
        raise InputError(f"guidance_scale must be finite; got {guidance_scale!r}.")
    ratio = None
    if apply_ratio is not None:
        try:
            ratio = float(apply_ratio)
        except (TypeError, ValueError):
            raise InputError(f"apply_ratio must be a number in [0, 1]; got {apply_ratio!r}.") from None
        if not 0.0 <= ratio <= 1.0:  # also rejects NaN
            raise InputError(f"apply_ratio must be in [0, 1]; got {apply_ratio!r}.")
    if cfg_schedule is not None and not callable(getattr(cfg_schedule, "applies", None)):
        raise InputError(
            "cfg_schedule must have applies(step, num_steps, apply_ratio); "
            f"got {type(cfg_schedule).__name__}."
        )
    if uncond_args is not None and batched_cfg and set(cond_args) != set(uncond_args):
        raise InputError(
            "batched_cfg needs the same argument names in both passes; got "
            f"{sorted(cond_args)} vs {sorted(uncond_args)}."
        )
    return CfgVelocity(
        model_call,
        cond_args,
        uncond_args,
        scale,
        cfg_schedule,
        num_steps,
        apply_ratio=ratio,
        batched_cfg=batched_cfg,
    )
