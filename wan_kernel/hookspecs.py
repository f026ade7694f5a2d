"""Hook specifications: one registry hook per swappable concern.

A plugin is a module with functions marked ``@wan_kernel.hookimpl`` whose names are the hooks
below, exposed through an entry point in the group ``wan_kernel``. Each hook is called once, at
set-up, with a ``register`` callable; the plugin calls ``register(impl)`` for every
implementation it provides. The kernel keeps the implementations in a table per concern, rejects
duplicate names, and hands the chosen one to the models as a plain object: no hook is called in
a model's forward.

The interfaces the registered objects follow live in :mod:`wan_kernel.interfaces`.
"""

from __future__ import annotations

from typing import Callable

from wan_kernel import hookspec
from wan_kernel.interfaces import (
    CONCERNS,
    AttentionBackend,
    CfgSchedule,
    Offloader,
    Quantizer,
    TimestepSampler,
)

# -- Attention --------------------------------------------------------------------------------


@hookspec
def wan_register_attention(register: Callable[[AttentionBackend], None]) -> None:
    """Register attention backends.

    Call ``register(backend)`` once per backend. ``backend`` is an
    :class:`~wan_kernel.interfaces.AttentionBackend`: it has ``name`` (``"sdpa"``,
    ``"sageattn"``, ...), ``aliases``, ``availability()``, ``supports_backward``, and is callable
    as ``backend(q, k, v, k_lens=None)`` with ``q`` ``[B, Lq, H, D]``, ``k``/``v``
    ``[B, Lk, H, D]`` and ``k_lens`` ``None`` or int ``[B]`` (keys at index ``>= k_lens[b]``
    ignored); it returns ``[B, Lq, H, D]`` in ``q``'s dtype.

    :param register: adds one backend to the kernel's attention table.
    """


# -- Weight quantization ----------------------------------------------------------------------


@hookspec
def wan_register_quantization(register: Callable[[Quantizer], None]) -> None:
    """Register weight quantizers.

    Call ``register(quantizer)`` once per mode. ``quantizer`` is a
    :class:`~wan_kernel.interfaces.Quantizer`: ``name`` (``"fp8"``, ``"fp8_scaled"``, ...),
    ``supported_targets`` (``"dit"``, ``"t5"``), ``availability()``,
    ``convert_for_runtime(model, target=)`` (swap modules on the meta device) and
    ``quantize_state_dict(state_dict, target=, device=)`` (produce the stored tensors), which
    the loader calls before ``load_state_dict(assign=True)``.

    :param register: adds one quantizer to the kernel's quantization table.
    """


# -- Memory offload ---------------------------------------------------------------------------


@hookspec
def wan_register_offload(register: Callable[[Offloader], None]) -> None:
    """Register memory offloaders.

    Call ``register(offloader)`` once per strategy. ``offloader`` is an
    :class:`~wan_kernel.interfaces.Offloader`: ``name`` (``"blockswap"``), ``availability()``,
    and ``attach(blocks, device=, blocks_to_swap=, training=, pin_memory=)`` returning a
    :class:`~wan_kernel.interfaces.BlockRunner` whose ``forward_blocks()`` the model iterates in
    its block loop (forward; in training the runner also handles the reverse order of backward).

    :param register: adds one offloader to the kernel's offload table.
    """


# -- Timestep sampling ------------------------------------------------------------------------


@hookspec
def wan_register_timestep_sampling(register: Callable[[TimestepSampler], None]) -> None:
    """Register training timestep samplers.

    Call ``register(sampler)`` once per method. ``sampler`` is a
    :class:`~wan_kernel.interfaces.TimestepSampler`: ``name`` (``"uniform"``, ``"sigmoid"``,
    ``"shift"``, ...), ``availability()`` and
    ``sample(batch_size, config=, latent_shape=, generator=, device=, uniform=)`` returning float32
    ``[batch_size]`` noise levels in ``[0, 1]``.

    :param register: adds one sampler to the kernel's timestep-sampling table.
    """


# -- CFG scheduling ---------------------------------------------------------------------------


@hookspec
def wan_register_cfg_schedule(register: Callable[[CfgSchedule], None]) -> None:
    """Register classifier-free-guidance schedules.

    Call ``register(schedule)`` once per schedule. ``schedule`` is a
    :class:`~wan_kernel.interfaces.CfgSchedule`: ``name`` (``"none"``, ``"early"``, ``"late"``,
    ...), ``availability()`` and ``applies(step, num_steps, apply_ratio)`` returning whether
    step ``step`` (0-based) runs the unconditional pass.

    :param register: adds one schedule to the kernel's CFG-schedule table.
    """


REGISTRY_HOOKS: dict[str, str] = {concern: f"wan_register_{concern}" for concern in CONCERNS}
"""Concern name -> the registry hook that fills its table."""
