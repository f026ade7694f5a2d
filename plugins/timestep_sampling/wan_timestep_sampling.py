"""Training timestep samplers for flow matching (names ``uniform``, ``sigmoid``, ``shift``,
``flux_shift``, ``logsnr``, ``sigma``), with the seed trainer's (musubi-tuner's) formulas.

Every sampler returns float32 noise levels ``t`` ``[B]`` (``x_t = (1 - t) x_0 + t noise``; the
model is fed ``t * 1000``) and is a pure function of the ``torch.Generator`` it is given: the same
seed gives the same draw. Random numbers are drawn on the generator's device (on ``device`` when
no generator is given) and the result is moved to ``device``.

Continuous samplers (``N`` is a standard normal draw, ``sigmoid(x) = 1 / (1 + e^-x)``):

- ``uniform``: ``t ~ U[0, 1)``.
- ``sigmoid``: ``t = sigmoid(sigmoid_scale * N)``.
- ``shift``: the sigmoid draw, then ``t <- s t / (1 + (s - 1) t)`` with ``s = discrete_flow_shift``.
- ``flux_shift``: the same with a resolution-dependent ``s = exp(mu)``, where ``mu`` is the line
  through ``(256, 0.5)`` and ``(4096, 1.15)`` evaluated (and extrapolated) at the token count
  ``(H // 2) * (W // 2)`` of the latents ``[..., H, W]``. This is Flux's
  ``time_shift(mu, 1, t) = e^mu / (e^mu + 1/t - 1)``, which equals the shift formula above.
- ``logsnr``: ``lambda ~ N(logit_mean, logit_std)``, ``t = sigmoid(-lambda / 2)`` (so
  ``-2 logit(t) = lambda``).

Their ``t`` lies in ``[0, 1]``: mathematically in ``(0, 1)`` (``[0, 1)`` for ``uniform``), but
float32 rounding can produce exactly 0 or 1 for extreme normal draws. The range
``[min_timestep, max_timestep] / 1000`` is applied in one of two ways:

- default: ``t <- t (t_max - t_min) + t_min``, which squeezes the whole distribution into the
  range (its shape is distorted);
- ``preserve_distribution_shape``: rejection sampling; draws outside ``[t_min, t_max]``
  (inclusive) are discarded, in at most :data:`MAX_REJECTION_ROUNDS` rounds of at least
  :data:`REJECTION_CHUNK` draws; a range too unlikely to fill the batch is an ``InputError``.

``sigma`` (musubi's default) draws ``u`` from the weighting-scheme density (``logit_normal``:
``sigmoid(N(logit_mean, logit_std))``; ``mode``: ``u <- 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u)``
for uniform ``u``; otherwise uniform) and picks a level of the discrete training schedule: the
levels ``k / N`` for ``k = N, N-1, ..., 1`` (``N = num_train_timesteps``), shifted by
``s = discrete_flow_shift`` (``s sigma / (1 + (s - 1) sigma)``, as ``shift``), keeping only the
``n`` levels with ``min_timestep <= N t <= max_timestep``; ``t`` is the level at index
``floor(u n)`` of that downward list. Unlike musubi (which leaves this schedule unshifted and, by
indexing the downward schedule with the limits, mirrors them), the shift is applied and the limits
mean what they say: ``min_timestep=0, max_timestep=200`` gives ``t`` in ``[0.001, 0.2]``. Values lie
in ``(0, 1]`` (1 inclusive, 0 never). ``preserve_distribution_shape`` has no effect in this mode
(the draw always stays inside the limits); limits that hold no level are an ``InputError``.

Every sampler also takes ``uniform=`` (float32 ``[B]`` in ``[0, 1)``, e.g. the trainer's
stratified ``--num_timestep_buckets`` draws): it then uses those numbers instead of drawing from
the generator, turning them into standard normals by the inverse CDF ``sqrt(2) erfinv(2 u - 1)``
where the sampler needs normals (``uniform`` uses ``u`` itself; ``sigma`` uses it as its uniform or,
for ``logit_normal``, its normal). Rejection sampling cannot use given numbers, so ``uniform=``
with ``preserve_distribution_shape`` is an ``InputError`` in the continuous samplers.

``weighting_scheme`` ``cosmap`` and ``sigma_sqrt`` only change the loss weights
(:func:`loss_weights`); ``logit_normal`` and ``mode`` only change ``sigma`` sampling.

This module is also a template for third-party plugins: one module, small classes that subclass
the interface in :mod:`wan_kernel.interfaces`, a ``@hookimpl`` registry hook, an entry point in
the group ``wan_kernel`` (see this folder's ``pyproject.toml``), and tests beside it. It imports
torch only inside functions, so ``wan plugins`` stays fast.
"""

from __future__ import annotations

import abc
import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from wan_kernel import hookimpl
from wan_kernel.errors import InputError
from wan_kernel.interfaces import (
    WEIGHTING_SCHEMES,
    TimestepSampler,
    TimestepSamplingConfig,
    weighting_scheme_loss_weights,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "FluxShiftSampler",
    "LogSnrSampler",
    "MAX_REJECTION_ROUNDS",
    "REJECTION_CHUNK",
    "SAMPLERS",
    "ShiftSampler",
    "SigmaSampler",
    "SigmoidSampler",
    "UniformSampler",
    "WEIGHTING_SCHEMES",
    "flux_shift_mu",
    "loss_weights",
    "shift_timesteps",
    "sigma_levels",
    "validate_config",
]

MAX_REJECTION_ROUNDS = 1000
"""Most rounds of draws ``preserve_distribution_shape`` makes before giving up."""

REJECTION_CHUNK = 1024
"""Least number of draws per rejection round (the batch size when larger)."""

FLUX_SHIFT_POINTS = ((256.0, 0.5), (4096.0, 1.15))
"""``(tokens, mu)`` pairs the ``flux_shift`` line passes through."""


# --------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number, got {value!r}.")
    return float(value)


def validate_config(config: TimestepSamplingConfig) -> tuple[float, float]:
    """Check ``config`` and return the timestep limits ``(t_min, t_max)`` in ``0..num_train_timesteps``.

    Raises :class:`~wan_kernel.errors.InputError` for an unknown weighting scheme, limits outside
    ``0..num_train_timesteps`` or ``min_timestep >= max_timestep``, a non-positive shift or
    ``logit_std < 0``, and non-finite numbers.
    """
    if not isinstance(config, TimestepSamplingConfig):
        raise InputError(f"expected a TimestepSamplingConfig, got {type(config).__name__}.")
    if config.weighting_scheme not in WEIGHTING_SCHEMES:
        raise InputError(
            f"unknown weighting_scheme {config.weighting_scheme!r}; "
            f"choose one of: {', '.join(WEIGHTING_SCHEMES)}."
        )
    total = config.num_train_timesteps
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 1:
        raise InputError(f"num_train_timesteps must be a positive integer, got {total!r}.")
    if _finite(config.discrete_flow_shift, "discrete_flow_shift") <= 0:
        raise InputError(f"discrete_flow_shift must be > 0, got {config.discrete_flow_shift!r}.")
    _finite(config.sigmoid_scale, "sigmoid_scale")
    _finite(config.logit_mean, "logit_mean")
    if _finite(config.logit_std, "logit_std") < 0:
        raise InputError(f"logit_std must be >= 0, got {config.logit_std!r}.")
    _finite(config.mode_scale, "mode_scale")

    limits = []
    for what, value, default in (
        ("min_timestep", config.min_timestep, 0.0),
        ("max_timestep", config.max_timestep, float(total)),
    ):
        if value is None:
            limits.append(default)
            continue
        value = _finite(value, what)
        if not 0.0 <= value <= total:
            raise InputError(f"{what} must be in 0..{total}, got {value:g}.")
        limits.append(value)
    t_min, t_max = limits
    if t_min >= t_max:
        raise InputError(
            f"min_timestep ({t_min:g}) must be smaller than max_timestep ({t_max:g}); "
            f"leave either out for its default (0 and {total})."
        )
    return t_min, t_max


def shift_timesteps(t: "torch.Tensor", shift: float) -> "torch.Tensor":
    """``s t / (1 + (s - 1) t)``: moves noise levels towards 1 for ``s > 1`` (same shape as ``t``)."""
    return (t * shift) / (1 + (shift - 1) * t)


def flux_shift_mu(height: int, width: int) -> float:
    """``mu`` of ``flux_shift`` for latents of ``height x width``: the line through
    :data:`FLUX_SHIFT_POINTS` at the token count ``(height // 2) * (width // 2)``."""
    (x1, y1), (x2, y2) = FLUX_SHIFT_POINTS
    slope = (y2 - y1) / (x2 - x1)
    tokens = (int(height) // 2) * (int(width) // 2)
    return slope * tokens + (y1 - slope * x1)


def loss_weights(sigmas: "torch.Tensor", weighting_scheme: str) -> "torch.Tensor":
    """Per-sample loss weights of ``weighting_scheme`` for noise levels ``sigmas`` (float32, same shape):
    the kernel's :func:`~wan_kernel.interfaces.weighting_scheme_loss_weights`, which every sampler's
    :meth:`~wan_kernel.interfaces.TimestepSampler.loss_weights` applies with ``config.weighting_scheme``."""
    return weighting_scheme_loss_weights(sigmas, weighting_scheme)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _draw_device(generator: "torch.Generator | None", device: Any) -> "torch.device":
    import torch

    return generator.device if generator is not None else torch.device(device)


def _randn(n: int, generator: "torch.Generator | None", device: Any) -> "torch.Tensor":
    import torch

    return torch.randn(n, generator=generator, device=_draw_device(generator, device), dtype=torch.float32)


def _rand(n: int, generator: "torch.Generator | None", device: Any) -> "torch.Tensor":
    import torch

    return torch.rand(n, generator=generator, device=_draw_device(generator, device), dtype=torch.float32)


def _given_uniform(uniform: "torch.Tensor", batch_size: int) -> "torch.Tensor":
    """Check the ``uniform=`` numbers of a sample call: float32 ``[batch_size]`` in ``[0, 1]``."""
    import torch

    if not isinstance(uniform, torch.Tensor) or tuple(uniform.shape) != (batch_size,):
        shape = tuple(uniform.shape) if isinstance(uniform, torch.Tensor) else type(uniform).__name__
        raise InputError(f"uniform must be a tensor of shape [{batch_size}] (the batch size), got {shape}.")
    u = uniform.to(torch.float32)
    if not bool(((u >= 0) & (u <= 1)).all()):
        raise InputError("uniform must hold numbers in [0, 1).")
    return u


def _uniform_or_rand(u, n, generator, device) -> "torch.Tensor":
    return _rand(n, generator, device) if u is None else u


def _normal_or_randn(u, n, generator, device) -> "torch.Tensor":
    """A standard normal draw, or the inverse normal CDF ``sqrt(2) erfinv(2 u - 1)`` of the given ``u``."""
    import torch

    if u is None:
        return _randn(n, generator, device)
    return math.sqrt(2.0) * torch.special.erfinv((2 * u - 1).clamp(-1 + 1e-7, 1 - 1e-7))


# --------------------------------------------------------------------------------------------
# Continuous samplers
# --------------------------------------------------------------------------------------------


class _ContinuousSampler(TimestepSampler):
    """A sampler that draws ``t`` in ``[0, 1]`` and then applies the timestep limits."""

    def sample(
        self,
        batch_size: int,
        *,
        config: TimestepSamplingConfig,
        latent_shape: tuple[int, ...] | None = None,
        generator: "torch.Generator | None" = None,
        device: Any = "cpu",
        uniform: "torch.Tensor | None" = None,
    ) -> "torch.Tensor":
        """Draw ``[batch_size]`` float32 noise levels on ``device`` (see the module docstring)."""
        import torch

        _check_batch_size(batch_size)
        t_min, t_max = validate_config(config)
        lo, hi = t_min / config.num_train_timesteps, t_max / config.num_train_timesteps
        self._check_inputs(config, latent_shape)
        u = None if uniform is None else _given_uniform(uniform, batch_size)
        if u is not None and config.preserve_distribution_shape:
            raise InputError(
                f"timestep sampling {self.name!r}: preserve_distribution_shape rejects draws, which "
                "given uniform numbers (--num_timestep_buckets) cannot do; drop one of the two."
            )

        def draw(n: int) -> "torch.Tensor":
            return self._draw(n, config, latent_shape, generator, device, u)  # [n]

        if not config.preserve_distribution_shape:
            t = draw(batch_size) * (hi - lo) + lo  # [B]
        else:
            t = _rejection_sample(draw, batch_size, lo, hi, self.name)  # [B]
        return t.clamp(lo, hi).to(device=device, dtype=torch.float32)

    def _check_inputs(self, config: TimestepSamplingConfig, latent_shape: tuple[int, ...] | None) -> None:
        """Sampler-specific input checks (none by default)."""

    @abc.abstractmethod
    def _draw(self, n, config, latent_shape, generator, device, u=None) -> "torch.Tensor":
        """``n`` float32 draws of ``t`` in ``[0, 1]``, before the timestep limits (from ``u`` when given)."""


def _rejection_sample(
    draw: Callable[[int], "torch.Tensor"], batch_size: int, lo: float, hi: float, name: str
) -> "torch.Tensor":
    """Keep draws inside ``[lo, hi]`` until ``batch_size`` are found (bounded rounds)."""
    import torch

    chunk = max(batch_size, REJECTION_CHUNK)
    kept: list[torch.Tensor] = []
    found = 0
    for _ in range(MAX_REJECTION_ROUNDS):
        t = draw(chunk)  # [chunk]
        inside = t[(t >= lo) & (t <= hi)]
        kept.append(inside)
        found += inside.numel()
        if found >= batch_size:
            return torch.cat(kept)[:batch_size]  # [B], in draw order
    raise InputError(
        f"timestep sampling {name!r} with preserve_distribution_shape found only {found} of "
        f"{batch_size} draws inside [{lo * 1000:g}, {hi * 1000:g}] (per 1000) after "
        f"{MAX_REJECTION_ROUNDS * chunk} tries: this range has almost no probability under this "
        f"sampler. Widen min_timestep/max_timestep, change the sampler's parameters, or drop "
        f"preserve_distribution_shape."
    )


class UniformSampler(_ContinuousSampler):
    name: ClassVar[str] = "uniform"
    description: ClassVar[str] = "t ~ U[0, 1)"

    def _draw(self, n, config, latent_shape, generator, device, u=None):
        return _uniform_or_rand(u, n, generator, device)  # [n]


class SigmoidSampler(_ContinuousSampler):
    name: ClassVar[str] = "sigmoid"
    description: ClassVar[str] = "t = sigmoid(sigmoid_scale * N(0, 1))"

    def _draw(self, n, config, latent_shape, generator, device, u=None):
        return (config.sigmoid_scale * _normal_or_randn(u, n, generator, device)).sigmoid()  # [n]


class ShiftSampler(_ContinuousSampler):
    name: ClassVar[str] = "shift"
    description: ClassVar[str] = "sigmoid draw shifted by discrete_flow_shift: s t / (1 + (s - 1) t)"

    def _draw(self, n, config, latent_shape, generator, device, u=None):
        t = (config.sigmoid_scale * _normal_or_randn(u, n, generator, device)).sigmoid()  # [n]
        return shift_timesteps(t, float(config.discrete_flow_shift))


class FluxShiftSampler(_ContinuousSampler):
    name: ClassVar[str] = "flux_shift"
    description: ClassVar[str] = "sigmoid draw shifted by exp(mu), mu linear in the latent token count"

    def _check_inputs(self, config, latent_shape):
        if latent_shape is None or len(latent_shape) < 2:
            raise InputError(
                "timestep sampling 'flux_shift' depends on the latent resolution: pass latent_shape "
                f"([B, C, F, H, W]), got {latent_shape!r}."
            )
        height, width = latent_shape[-2:]
        for what, size in (("height", height), ("width", width)):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise InputError(f"latent {what} must be a positive integer, got {size!r}.")

    def _draw(self, n, config, latent_shape, generator, device, u=None):
        shift = math.exp(flux_shift_mu(*latent_shape[-2:]))
        t = (config.sigmoid_scale * _normal_or_randn(u, n, generator, device)).sigmoid()  # [n]
        return shift_timesteps(t, shift)


class LogSnrSampler(_ContinuousSampler):
    name: ClassVar[str] = "logsnr"
    description: ClassVar[str] = "log-SNR lambda ~ N(logit_mean, logit_std), t = sigmoid(-lambda / 2)"

    def _draw(self, n, config, latent_shape, generator, device, u=None):
        logsnr = _normal_or_randn(u, n, generator, device) * config.logit_std + config.logit_mean  # [n]
        return (-logsnr / 2).sigmoid()


# --------------------------------------------------------------------------------------------
# Discrete "sigma" sampler
# --------------------------------------------------------------------------------------------


def _density_draw(
    n: int, config: TimestepSamplingConfig, generator: "torch.Generator | None", device: Any, u=None
) -> "torch.Tensor":
    """``u`` ``[n]`` from the weighting scheme's density (SD3's ``compute_density_for_timestep_sampling``),
    from the given uniform numbers ``u`` when not None."""
    if config.weighting_scheme == "logit_normal":
        return (_normal_or_randn(u, n, generator, device) * config.logit_std + config.logit_mean).sigmoid()
    u = _uniform_or_rand(u, n, generator, device)
    if config.weighting_scheme == "mode":
        u = 1 - u - config.mode_scale * ((math.pi * u / 2).cos() ** 2 - 1 + u)
    return u


def sigma_levels(config: TimestepSamplingConfig) -> "torch.Tensor":
    """The levels ``sigma`` picks from (float64, downwards): ``k / N`` for ``k = N..1`` shifted by
    ``discrete_flow_shift``, those with ``min_timestep <= N t <= max_timestep``."""
    import torch

    t_min, t_max = validate_config(config)
    total = config.num_train_timesteps
    base = torch.arange(total, 0, -1, dtype=torch.float64) / total  # [N], 1 .. 1/N
    levels = shift_timesteps(base, float(config.discrete_flow_shift))
    steps = levels * total
    kept = levels[(steps >= t_min - 1e-9) & (steps <= t_max + 1e-9)]
    if kept.numel() == 0:
        raise InputError(
            f"timestep sampling 'sigma': no level of the {total}-step schedule shifted by "
            f"{config.discrete_flow_shift:g} lies in [{t_min:g}, {t_max:g}]; widen min_timestep/max_timestep."
        )
    return kept


class SigmaSampler(TimestepSampler):
    name: ClassVar[str] = "sigma"
    description: ClassVar[str] = (
        "discrete schedule N..1 shifted by discrete_flow_shift, within the limits, indexed by a "
        "weighting-scheme draw"
    )

    def sample(
        self,
        batch_size: int,
        *,
        config: TimestepSamplingConfig,
        latent_shape: tuple[int, ...] | None = None,
        generator: "torch.Generator | None" = None,
        device: Any = "cpu",
        uniform: "torch.Tensor | None" = None,
    ) -> "torch.Tensor":
        """Draw ``[batch_size]`` float32 noise levels on ``device`` (see the module docstring)."""
        import torch

        _check_batch_size(batch_size)
        levels = sigma_levels(config)  # [n], downwards
        u = None if uniform is None else _given_uniform(uniform, batch_size)
        u = _density_draw(batch_size, config, generator, device, u)  # [B]
        # the clamp only matters for u == 1 (logit_normal rounding) or a mode_scale that pushes u
        # out of [0, 1]
        index = torch.floor(u.double().cpu() * levels.numel()).clamp(0, levels.numel() - 1).long()  # [B]
        return levels[index].to(device=device, dtype=torch.float32)


SAMPLERS: tuple[type[TimestepSampler], ...] = (
    UniformSampler,
    SigmoidSampler,
    ShiftSampler,
    FluxShiftSampler,
    LogSnrSampler,
    SigmaSampler,
)
"""Every sampler this plugin registers, in registration order."""


@hookimpl
def wan_register_timestep_sampling(register):
    for sampler in SAMPLERS:
        register(sampler())
