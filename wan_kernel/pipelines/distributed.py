"""Which share of the work this process does when several run together.

``accelerate launch`` and ``torchrun`` start one process per GPU and set ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :class:`Ranks` reads them;
with more than one process it joins a gloo process group (CPU tensors only: it is used to
exchange small Python objects and to wait for each other, never for the models).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import attrs

from wan_kernel.errors import InputError

T = TypeVar("T")


@attrs.frozen
class Ranks:
    """This process's ``rank`` among ``world_size`` (``local_rank`` picks its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """From ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (one process when they are not set)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise InputError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
        if world < 1 or not 0 <= rank < world:
            raise InputError(f"RANK={rank} is not within WORLD_SIZE={world}")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world_size``-th, starting at ``rank``."""
        return list(items[self.rank :: self.world_size])

    def _group(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
                raise InputError(
                    f"WORLD_SIZE={self.world_size} but MASTER_ADDR/MASTER_PORT are not set: "
                    "start several processes with `accelerate launch` or `torchrun`"
                )
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world_size)
        return dist

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (all ranks get the list)."""
        if self.world_size == 1:
            return [value]
        dist = self._group()
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            self._group().barrier()
