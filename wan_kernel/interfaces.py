"""The interfaces plugin implementations follow, one per swappable concern.

Every implementation object has a ``name`` (what the user types), optional ``aliases``, and an
``availability()`` method that says whether it can run on this machine and, if not, why. Plugin
entry modules construct these objects cheaply: heavy libraries (xformers, flash-attn, ...) are
imported inside ``availability()`` or at first call, never at import time.

This module does not import torch, so that discovery (``wan plugins``, ``wan --help``) stays fast.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import attrs

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn


@attrs.frozen
class Availability:
    """Whether an implementation can run here; ``reason`` says why not (empty when it can)."""

    ok: bool
    reason: str = ""

    @classmethod
    def yes(cls) -> "Availability":
        return cls(True, "")

    @classmethod
    def no(cls, reason: str) -> "Availability":
        return cls(False, reason)


class Implementation(abc.ABC):
    """Common base: a named, self-describing implementation of one concern."""

    name: ClassVar[str]
    """The name the user types (``sdpa``, ``fp8_scaled``, ``blockswap``, ``shift``, ``late``)."""

    aliases: ClassVar[tuple[str, ...]] = ()
    """Other names that select this implementation (e.g. ``torch`` for ``sdpa``)."""

    description: ClassVar[str] = ""
    """One line shown by ``wan plugins``."""

    install_hint: ClassVar[str] = ""
    """What to install when ``availability()`` says no (e.g. ``pip install xformers``)."""

    def availability(self) -> Availability:
        """Say whether this implementation can run on this machine (default: yes)."""
        return Availability.yes()


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


class AttentionBackend(Implementation):
    """Multi-head attention in Wan's layout.

    ``backend(q, k, v, k_lens=None)``:

    - ``q``: ``[B, Lq, H, D]``; ``k``, ``v``: ``[B, Lk, H, D]``; any float dtype.
    - ``k_lens``: ``None`` or an integer tensor ``[B]``; for sample ``b`` the keys at index
      ``>= k_lens[b]`` are ignored (they get zero attention weight). Query rows are never masked.
    - Softmax scale ``1/sqrt(D)``, no causal mask, no dropout.
    - Returns ``[B, Lq, H, D]`` in ``q``'s dtype. Backends whose kernels need half precision
      cast fp32 inputs down and the result back up.

    ``supports_backward`` says whether gradients flow through the backend (training).
    """

    supports_backward: ClassVar[bool] = True

    @abc.abstractmethod
    def __call__(
        self,
        q: "torch.Tensor",
        k: "torch.Tensor",
        v: "torch.Tensor",
        k_lens: "torch.Tensor | None" = None,
    ) -> "torch.Tensor": ...


# --------------------------------------------------------------------------------------------
# Weight quantization
# --------------------------------------------------------------------------------------------


class Quantizer(Implementation):
    """Transforms a model and its state dict at load time (gpt-fast's ``QuantHandler`` shape).

    The loader builds the model on the ``meta`` device, then calls, in order:

    1. ``convert_for_runtime(model, target=...)``: swap the modules that will hold quantized
       weights (e.g. ``nn.Linear`` -> an fp8 linear) while the model is still on ``meta``;
    2. ``quantize_state_dict(state_dict, target=...)``: turn the high-precision tensors of those
       modules into the stored form (fp8 weights plus scale tensors), leaving every other tensor
       as it is; tensors already in stored form (a pre-quantized file) pass through;
    3. ``model.load_state_dict(state_dict, assign=True)``.

    ``target`` is ``"dit"`` or ``"t5"``; ``supported_targets`` lists which this quantizer handles.
    ``device`` is where the model will run: quantizers quantize there when it is faster.
    """

    supported_targets: ClassVar[tuple[str, ...]] = ("dit",)

    @abc.abstractmethod
    def convert_for_runtime(self, model: "nn.Module", *, target: str) -> "nn.Module": ...

    @abc.abstractmethod
    def quantize_state_dict(
        self, state_dict: dict[str, "torch.Tensor"], *, target: str, device: "torch.device | str" = "cpu"
    ) -> dict[str, "torch.Tensor"]: ...


# --------------------------------------------------------------------------------------------
# Memory offload
# --------------------------------------------------------------------------------------------


class BlockRunner(abc.ABC):
    """Drives a model's transformer-block loop with some blocks kept off the compute device.

    The model's forward does ``for block in runner.forward_blocks(): x = block(x, ...)``. The
    runner guarantees each yielded block's weights are on the compute device when it is yielded
    and may start moving the next ones (and evicting earlier ones) asynchronously. In training the
    backward pass visits blocks in reverse; the runner registers whatever hooks it needs on the
    blocks so that a block is resident again when its backward runs. Parameters that require
    gradients (LoRA) stay on the compute device.
    """

    @abc.abstractmethod
    def forward_blocks(self) -> Iterator["nn.Module"]: ...

    def prepare(self) -> None:
        """Place the resident blocks on the compute device before the first step."""

    def release(self) -> None:
        """Move everything the runner manages back to host memory and drop buffers."""


class Offloader(Implementation):
    """Memory offload of transformer blocks (block swap)."""

    @abc.abstractmethod
    def attach(
        self,
        blocks: "nn.ModuleList",
        *,
        device: "torch.device",
        blocks_to_swap: int,
        training: bool = False,
        pin_memory: bool = True,
    ) -> BlockRunner:
        """Take charge of ``blocks`` (currently on the host) and return the runner for them."""


# --------------------------------------------------------------------------------------------
# Training timestep sampling
# --------------------------------------------------------------------------------------------


WEIGHTING_SCHEMES: tuple[str, ...] = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
"""The accepted ``weighting_scheme`` values (the seed trainer's)."""


def weighting_scheme_loss_weights(sigmas: "torch.Tensor", weighting_scheme: str) -> "torch.Tensor":
    """Per-sample loss weights of a weighting scheme for noise levels ``sigmas`` (any shape; float32,
    same shape).

    ``sigma_sqrt``: ``sigma^-2``; ``cosmap``: ``2 / (pi (1 - 2 sigma + 2 sigma^2))``; the other
    schemes (``none``, ``logit_normal``, ``mode``: they only change how ``sigma`` is drawn) weigh
    every sample 1.
    """
    import math

    import torch

    from wan_kernel.errors import InputError

    if weighting_scheme not in WEIGHTING_SCHEMES:
        raise InputError(
            f"unknown weighting_scheme {weighting_scheme!r}; choose one of: {', '.join(WEIGHTING_SCHEMES)}."
        )
    sigmas = sigmas.float()
    if weighting_scheme == "sigma_sqrt":
        return sigmas**-2.0
    if weighting_scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigmas + 2.0 * sigmas**2))
    return torch.ones_like(sigmas)


@attrs.frozen
class TimestepSamplingConfig:
    """Parameters of training timestep sampling, with the seed trainer's names and defaults."""

    discrete_flow_shift: float = 1.0
    sigmoid_scale: float = 1.0
    weighting_scheme: str = "none"  # logit_normal | mode | cosmap | sigma_sqrt | none
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    min_timestep: float | None = None  # 0..1000
    max_timestep: float | None = None  # 0..1000
    preserve_distribution_shape: bool = False
    num_train_timesteps: int = 1000


class TimestepSampler(Implementation):
    """Draws training timesteps for flow matching.

    ``sampler.sample(batch_size, config=..., latent_shape=..., generator=...)`` returns a float32
    tensor ``[batch_size]`` of noise levels ``t`` in ``[0, 1]`` (``sigma``; the model is fed
    ``t * 1000``), honouring ``config.min_timestep``/``max_timestep``. ``latent_shape`` is
    ``[B, C, F, H, W]`` of the latents, for resolution-dependent samplers. Pure functions of the
    generator: the same seed gives the same draw. ``uniform=`` (float32 ``[batch_size]`` in
    ``[0, 1)``) replaces the sampler's own random numbers: it maps those ``u`` (samplers that need
    normals use the inverse CDF ``sqrt(2) erfinv(2u - 1)``); the trainer passes its stratified
    ``--num_timestep_buckets`` draws this way.

    ``sampler.loss_weights(sigmas, config=...)`` gives the per-sample loss weights the trainer
    multiplies the loss by (override it for a sampler that needs its own weighting).
    """

    @abc.abstractmethod
    def sample(
        self,
        batch_size: int,
        *,
        config: TimestepSamplingConfig,
        latent_shape: tuple[int, ...] | None = None,
        generator: "torch.Generator | None" = None,
        device: Any = "cpu",
        uniform: "torch.Tensor | None" = None,
    ) -> "torch.Tensor": ...

    def loss_weights(self, sigmas: "torch.Tensor", *, config: TimestepSamplingConfig) -> "torch.Tensor":
        """Per-sample weights of the training loss for the noise levels ``sigmas`` this sampler drew
        (any shape; float32, same shape). Default: ``config.weighting_scheme``'s weights
        (:func:`weighting_scheme_loss_weights`: ones for ``none``, ``logit_normal``, ``mode``)."""
        return weighting_scheme_loss_weights(sigmas, config.weighting_scheme)


# --------------------------------------------------------------------------------------------
# CFG scheduling
# --------------------------------------------------------------------------------------------


class CfgSchedule(Implementation):
    """Decides, per denoising step, whether classifier-free guidance is applied.

    ``schedule.applies(step, num_steps, apply_ratio)`` is ``True`` when step ``step``
    (0-based, in denoising order) runs the unconditional pass and combines
    ``u + g * (c - u)``; ``False`` means the step uses the conditional prediction alone.
    ``apply_ratio`` in ``[0, 1]`` is the share of steps that apply guidance.
    """

    @abc.abstractmethod
    def applies(self, step: int, num_steps: int, apply_ratio: float) -> bool: ...

    def pattern(self, num_steps: int, apply_ratio: float) -> str:
        """The whole schedule as a string, ``A`` for applied and ``S`` for skipped."""
        return "".join("A" if self.applies(i, num_steps, apply_ratio) else "S" for i in range(num_steps))


CONCERNS: dict[str, type[Implementation]] = {
    "attention": AttentionBackend,
    "quantization": Quantizer,
    "offload": Offloader,
    "timestep_sampling": TimestepSampler,
    "cfg_schedule": CfgSchedule,
}
"""Each concern's name (as used in messages and ``wan plugins``) and its interface."""
