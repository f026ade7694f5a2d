"""The block-swap schedule as pure logic: which block sits where, and which copies to issue.

No torch here: the mover (:mod:`wan_offload_blockswap.runner`) asks this class what to do, and
the tests check the plan on any machine.

Layout. ``L`` blocks, ``N = blocks_to_swap`` of them kept off the device, so the device holds
storage for exactly ``R = L - N`` blocks (the memory ``blocks_to_swap`` promises, as in
musubi-tuner). That storage is split into

- ``P = R - K`` *pinned* blocks ``0 .. P-1`` that live on the device for good, and
- ``K = min(2, R)`` *slots* through which the ``N + K`` *streamed* blocks ``P .. L-1`` rotate.
  Block ``b`` always uses slot ``(b - P) % K``.

Two slots give double buffering: while block ``b`` computes in one slot, block ``b + 1`` is copied
into the other. With ``R = 1`` (the most swapping allowed) there is one slot and copies cannot
overlap compute.

A pass visits the blocks in order (forward ``0 .. L-1``, backward ``L-1 .. 0``). At its start the
first ``K`` streamed blocks of the pass are loaded into their slots (those already there are not
copied again). When a streamed block is done, the next streamed block of the pass that uses the
same slot is loaded into it (forward: ``b + K``; backward: ``b - K``). Copies only go host ->
device: streamed weights are frozen, the host keeps the master copy, and evicting is just
forgetting.

Because a block always comes back to the *same* slot, tensors autograd saved during the forward
(views of the slot's storage) hold that block's weights again when its backward runs, with or
without gradient checkpointing. A forward leaves the slots holding the first ``K`` streamed blocks
of the backward order, and a backward leaves them holding the first ``K`` of the forward order,
so training steps issue exactly ``N`` copies per pass and none at the pass boundaries.
"""

from __future__ import annotations

from typing import Sequence

import attrs

FORWARD = "forward"
BACKWARD = "backward"
DIRECTIONS = (FORWARD, BACKWARD)

MAX_SLOTS = 2
"""Slots used for streaming: two is double buffering (copy the next block while this one runs)."""


@attrs.frozen
class Load:
    """Copy ``block``'s weights host -> device into ``slot``, evicting ``evicts`` (``None``: empty)."""

    block: int
    slot: int
    evicts: int | None


@attrs.frozen
class Step:
    """One block of a pass: the loads issued before it and after it, and the slot contents around it.

    ``slots_before`` is what the slots hold when the block starts (every load issued before it has
    been applied); ``slots_after`` once the loads issued after it are applied.
    """

    block: int
    loads_before: tuple[Load, ...]
    loads_after: tuple[Load, ...]
    slots_before: tuple[int | None, ...]
    slots_after: tuple[int | None, ...]


@attrs.frozen
class SwapSchedule:
    """Where each of ``num_blocks`` blocks lives when ``blocks_to_swap`` of them are kept off the device.

    Construct with :meth:`create`, which checks the numbers; see the module docstring for the design.
    """

    num_blocks: int
    blocks_to_swap: int

    @classmethod
    def create(cls, num_blocks: int, blocks_to_swap: int) -> "SwapSchedule":
        """Check ``1 <= blocks_to_swap <= num_blocks - 1`` and build the schedule.

        :raises ValueError: out of range (the plugin turns this into an ``InputError`` for users).
        """
        for what, value in (("num_blocks", num_blocks), ("blocks_to_swap", blocks_to_swap)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{what} must be an integer, got {value!r}")
        if num_blocks < 2:
            raise ValueError(f"block swap needs at least 2 blocks, the model has {num_blocks}")
        if not 1 <= blocks_to_swap <= num_blocks - 1:
            raise ValueError(
                f"blocks_to_swap must be between 1 and {num_blocks - 1} for this model "
                f"({num_blocks} blocks), got {blocks_to_swap}"
            )
        return cls(num_blocks, blocks_to_swap)

    # -- layout ----------------------------------------------------------------------------------

    @property
    def device_blocks(self) -> int:
        """``R``: how many blocks' worth of weights the device holds (pinned + slots)."""
        return self.num_blocks - self.blocks_to_swap

    @property
    def num_slots(self) -> int:
        """``K``: slots the streamed blocks rotate through."""
        return min(MAX_SLOTS, self.device_blocks)

    @property
    def pinned(self) -> range:
        """Blocks that stay on the device the whole time."""
        return range(self.device_blocks - self.num_slots)

    @property
    def streamed(self) -> range:
        """Blocks whose weights live on the host and are copied into a slot when needed."""
        return range(self.device_blocks - self.num_slots, self.num_blocks)

    def is_streamed(self, block: int) -> bool:
        self._check_block(block)
        return block >= self.streamed.start

    def slot_of(self, block: int) -> int | None:
        """The slot ``block`` is always loaded into; ``None`` for pinned blocks."""
        if not self.is_streamed(block):
            return None
        return (block - self.streamed.start) % self.num_slots

    def order(self, direction: str) -> range:
        """The blocks in the order a pass visits them."""
        self._check_direction(direction)
        return range(self.num_blocks) if direction == FORWARD else range(self.num_blocks - 1, -1, -1)

    def initial_slots(self) -> tuple[int | None, ...]:
        """The slot contents after ``prepare()``: the first streamed blocks of the forward order."""
        return tuple(self.streamed[: self.num_slots])

    # -- the plan --------------------------------------------------------------------------------

    def loads_at_start(self, direction: str, slots: Sequence[int | None]) -> tuple[Load, ...]:
        """Loads to issue when a pass in ``direction`` begins, given what the slots hold now."""
        self._check_slots(slots)
        streamed_in_order = [b for b in self.order(direction) if self.is_streamed(b)]
        loads = []
        for block in streamed_in_order[: self.num_slots]:
            slot = self.slot_of(block)
            if slots[slot] != block:
                loads.append(Load(block, slot, slots[slot]))
        return tuple(loads)

    def load_after(self, direction: str, block: int) -> Load | None:
        """The load to issue once ``block`` is done in a pass in ``direction`` (``None``: none).

        The next streamed block of the pass that shares ``block``'s slot replaces it.
        """
        self._check_direction(direction)
        slot = self.slot_of(block)
        if slot is None:
            return None
        successor = block + self.num_slots if direction == FORWARD else block - self.num_slots
        if successor not in self.streamed:
            return None
        return Load(successor, slot, block)

    def plan(self, direction: str, slots: Sequence[int | None] | None = None) -> tuple[Step, ...]:
        """Simulate a whole pass from the slot contents ``slots`` (default :meth:`initial_slots`)."""
        state = list(self.initial_slots() if slots is None else slots)
        self._check_slots(state)
        steps = []
        pending = list(self.loads_at_start(direction, state))
        for block in self.order(direction):
            before = tuple(pending)
            for load in before:
                state[load.slot] = load.block
            slots_before = tuple(state)
            after = self.load_after(direction, block)
            loads_after = () if after is None else (after,)
            for load in loads_after:
                state[load.slot] = load.block
            steps.append(Step(block, before, loads_after, slots_before, tuple(state)))
            pending = []
        return tuple(steps)

    def resident(self, slots: Sequence[int | None]) -> frozenset[int]:
        """The blocks on the device when the slots hold ``slots``."""
        self._check_slots(slots)
        return frozenset(self.pinned) | frozenset(b for b in slots if b is not None)

    def copies_per_pass(self, direction: str, slots: Sequence[int | None] | None = None) -> int:
        """How many block copies a pass issues from ``slots`` (default :meth:`initial_slots`)."""
        return sum(len(s.loads_before) + len(s.loads_after) for s in self.plan(direction, slots))

    # -- checks ----------------------------------------------------------------------------------

    def _check_block(self, block: int) -> None:
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block index {block} is outside 0..{self.num_blocks - 1}")

    def _check_slots(self, slots: Sequence[int | None]) -> None:
        if len(slots) != self.num_slots:
            raise ValueError(f"expected {self.num_slots} slot entries, got {len(slots)}")
        for slot, block in enumerate(slots):
            if block is not None and self.slot_of(block) != slot:
                raise ValueError(f"block {block} cannot be in slot {slot}")

    @staticmethod
    def _check_direction(direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
