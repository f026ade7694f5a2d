"""Block swap (name ``blockswap``): keep ``blocks_to_swap`` transformer blocks in host memory.

``blocks_to_swap = N`` of ``L`` blocks leaves room on the GPU for ``L - N`` blocks: the first ones
stay there, and the rest stream through two reused slot buffers, each copied from (pinned) host
memory on a side CUDA stream while the previous block computes. Training works too: hooks bring
each block back before its backward (and before gradient checkpointing recomputes it); trainable
(LoRA) parameters stay on the GPU. fp8 weights and their scale buffers move together.

Usage::

    offloader = resolve("offload", "blockswap")
    runner = offloader.attach(dit.blocks, device=torch.device("cuda"), blocks_to_swap=20)
    move_except_blocks(dit, dit.blocks, "cuda")   # from wan_offload_blockswap.runner
    runner.prepare()
    dit.set_block_runner(runner)

Per-block ``torch.compile``: compile each block's ``forward`` (``block.forward =
torch.compile(block.forward)``); the runner's hooks run outside the compiled code.

This entry module does not import torch (``wan plugins`` stays fast); the mover lives in
:mod:`wan_offload_blockswap.runner` and the schedule, pure logic, in
:mod:`wan_offload_blockswap.schedule`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from wan_kernel import hookimpl
from wan_kernel.errors import InputError, PluginUnavailableError
from wan_kernel.interfaces import Availability, Offloader
from wan_kernel.machine import gpu_driver_present, installed_torch_version

from .schedule import SwapSchedule

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from torch import nn

    from .runner import BlockSwapRunner

__all__ = ["BlockSwapOffloader", "SwapSchedule"]

NO_CUDA = (
    "needs a CUDA GPU (it moves blocks between host memory and the GPU); "
    "this machine has none, so run without block swap"
)


class BlockSwapOffloader(Offloader):
    name = "blockswap"
    aliases = ("block_swap",)
    description = "swap transformer blocks between pinned host memory and the GPU (inference and training)"
    install_hint = "block swap needs a CUDA build of torch and a GPU"

    def availability(self) -> Availability:
        # ruled out without importing torch when no GPU driver is visible (`wan plugins` stays fast)
        if installed_torch_version() is None:
            return Availability.no("torch is not installed")
        if not gpu_driver_present():
            return Availability.no(NO_CUDA)
        import torch

        if not torch.cuda.is_available():
            return Availability.no(NO_CUDA)
        return Availability.yes()

    def attach(
        self,
        blocks: "nn.ModuleList",
        *,
        device: "torch.device | str",
        blocks_to_swap: int,
        training: bool = False,
        pin_memory: bool = True,
        _allow_cpu_for_tests: bool = False,
    ) -> "BlockSwapRunner":
        """Take charge of ``blocks`` and return the runner; nothing moves until ``prepare()``.

        :param blocks: the model's transformer blocks (``dit.blocks``), weights loaded.
        :param device: the CUDA device the blocks run on.
        :param blocks_to_swap: ``1 .. len(blocks) - 1`` blocks kept in host memory.
        :param training: the model will be trained (backward passes); the hooks that make
            backward correct are installed either way.
        :param pin_memory: keep the swapped weights in pinned host memory (faster, asynchronous
            copies; costs page-locked RAM).
        :param _allow_cpu_for_tests: run the same code with ``device="cpu"`` (tests only).
        :raises InputError: bad ``blocks``, ``blocks_to_swap`` or ``device``.
        :raises PluginUnavailableError: no CUDA here.
        """
        import torch
        from torch import nn

        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise InputError(
                f"blocks must be a list of modules (e.g. dit.blocks), got one {type(blocks).__name__}"
            )
        try:
            blocks = list(blocks)
        except TypeError:
            raise InputError(
                f"blocks must be a list of modules (e.g. dit.blocks), got {type(blocks).__name__}"
            ) from None
        for i, block in enumerate(blocks):
            if not isinstance(block, nn.Module):
                raise InputError(f"blocks[{i}] is a {type(block).__name__}, not a torch module")
        if len({id(b) for b in blocks}) != len(blocks):
            raise InputError("the same block module appears twice in blocks; each block must be distinct")
        try:
            schedule = SwapSchedule.create(len(blocks), blocks_to_swap)
        except ValueError as error:
            raise InputError(f"{error}. Use 0 or leave it unset to disable block swap.") from None
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InputError(f"device {device!r} is not a torch device") from None
        if device.type == "cuda":
            available = self.availability()
            if not available.ok:
                raise PluginUnavailableError("offload", self.name, available.reason)
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        elif not (_allow_cpu_for_tests and device.type == "cpu"):
            raise InputError(
                f"block swap moves blocks between host memory and a CUDA device, got device={str(device)!r}; "
                "pass device='cuda'"
            )

        from .runner import BlockSwapRunner

        return BlockSwapRunner(
            blocks,
            device=device,
            schedule=schedule,
            training=bool(training),
            pin_memory=pin_memory,
            _allow_cpu_for_tests=_allow_cpu_for_tests,
        )


@hookimpl
def wan_register_offload(register: Any) -> None:
    register(BlockSwapOffloader())
