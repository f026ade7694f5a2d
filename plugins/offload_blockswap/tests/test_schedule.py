"""The swap schedule as pure logic: layout, residency around each step, copies, both directions."""

from __future__ import annotations

import pytest

from wan_offload_blockswap.schedule import BACKWARD, FORWARD, Load, SwapSchedule

SIZES = [(L, N) for L in (2, 3, 4, 5, 7, 30, 40) for N in range(1, L)]


def test_small_case_by_hand():
    # 5 blocks, 3 swapped: room for 2 on the device, both used as slots, every block streams
    s = SwapSchedule.create(5, 3)
    assert (s.device_blocks, s.num_slots, list(s.pinned), list(s.streamed)) == (2, 2, [], [0, 1, 2, 3, 4])
    assert [s.slot_of(b) for b in range(5)] == [0, 1, 0, 1, 0]
    assert s.initial_slots() == (0, 1)

    fwd = s.plan(FORWARD)
    assert [st.block for st in fwd] == [0, 1, 2, 3, 4]
    # a slot counts as holding a block from the moment its copy is issued
    assert [st.slots_before for st in fwd] == [(0, 1), (2, 1), (2, 3), (4, 3), (4, 3)]
    assert [st.loads_after for st in fwd] == [
        (Load(2, 0, 0),), (Load(3, 1, 1),), (Load(4, 0, 2),), (), ()
    ]
    assert fwd[-1].slots_after == (4, 3)

    bwd = s.plan(BACKWARD, fwd[-1].slots_after)
    assert [st.block for st in bwd] == [4, 3, 2, 1, 0]
    assert all(st.loads_before == () for st in bwd)  # the forward left the right blocks in place
    assert [st.slots_before for st in bwd] == [(4, 3), (2, 3), (2, 1), (0, 1), (0, 1)]
    assert [st.loads_after for st in bwd] == [
        (Load(2, 0, 4),), (Load(1, 1, 3),), (Load(0, 0, 2),), (), ()
    ]
    assert bwd[-1].slots_after == s.initial_slots()


def test_pinned_blocks_and_one_slot():
    s = SwapSchedule.create(6, 1)  # room for 5: blocks 0-2 pinned, 3-5 stream through 2 slots
    assert list(s.pinned) == [0, 1, 2] and list(s.streamed) == [3, 4, 5]
    assert s.slot_of(2) is None and [s.slot_of(b) for b in (3, 4, 5)] == [0, 1, 0]
    s = SwapSchedule.create(4, 3)  # the most swapping: room for one block, a single slot
    assert s.num_slots == 1 and list(s.streamed) == [0, 1, 2, 3]
    fwd = s.plan(FORWARD)
    assert [st.slots_before for st in fwd] == [(0,), (1,), (2,), (3,)]
    assert s.plan(BACKWARD, fwd[-1].slots_after)[-1].slots_after == (0,)


def test_released_sizes():
    for layers, most in ((40, 39), (30, 29)):  # 14B and 1.3B: the maxima musubi documents
        s = SwapSchedule.create(layers, most)
        assert s.device_blocks == 1
        with pytest.raises(ValueError, match=f"between 1 and {most} for this model"):
            SwapSchedule.create(layers, most + 1)


@pytest.mark.parametrize("bad", [0, -1, 5, 1.5, True, "3", None])
def test_out_of_range_or_not_an_integer(bad):
    with pytest.raises(ValueError):
        SwapSchedule.create(5, bad)


def test_needs_two_blocks():
    with pytest.raises(ValueError, match="at least 2 blocks"):
        SwapSchedule.create(1, 1)


def _check_pass(s: SwapSchedule, direction: str, slots):
    """Invariants of one pass; returns the slot contents at its end."""
    steps = s.plan(direction, slots)
    order = list(s.order(direction))
    assert [st.block for st in steps] == order
    done: set[int] = set()
    for st in steps:
        # the block is on the device when it runs, and so is every pinned block
        assert st.block in s.resident(st.slots_before)
        assert set(s.pinned) <= s.resident(st.slots_before)
        for load in st.loads_before + st.loads_after:
            assert s.slot_of(load.block) == load.slot
            assert load.block not in done  # never bring back a block whose turn is over
        for load in st.loads_after:
            assert load.evicts == st.block  # a slot is refilled only once its block is done
        done.add(st.block)
        # device memory never exceeds the promise: R blocks
        assert len(s.resident(st.slots_after)) <= s.device_blocks
    return steps[-1].slots_after


@pytest.mark.parametrize("L,N", SIZES)
def test_invariants_over_training_and_inference(L, N):
    s = SwapSchedule.create(L, N)
    assert len(s.pinned) + s.num_slots == L - N
    assert len(s.streamed) == N + s.num_slots
    # training: forward, backward, forward, backward ...
    slots = s.initial_slots()
    for _ in range(2):
        after_fwd = _check_pass(s, FORWARD, slots)
        assert s.loads_at_start(BACKWARD, after_fwd) == ()
        assert s.copies_per_pass(FORWARD, slots) == N
        assert s.copies_per_pass(BACKWARD, after_fwd) == N
        slots = _check_pass(s, BACKWARD, after_fwd)
        assert slots == s.initial_slots()
    # inference: forwards back to back; each one after the first reloads the first slots too
    # (unless a slot serves a single block: 3 streamed blocks in 2 slots)
    slots = _check_pass(s, FORWARD, s.initial_slots())
    reused = sum(1 for slot in range(s.num_slots) if len(s.streamed[slot :: s.num_slots]) == 1)
    assert s.copies_per_pass(FORWARD, slots) == N + s.num_slots - reused
    assert _check_pass(s, FORWARD, slots) == slots


@pytest.mark.parametrize("L,N", SIZES)
def test_a_block_always_returns_to_its_own_slot(L, N):
    # what keeps autograd's saved views of a slot valid between a block's forward and backward
    s = SwapSchedule.create(L, N)
    seen: dict[int, set[int]] = {}
    slots = s.initial_slots()
    for direction in (FORWARD, BACKWARD, FORWARD):
        for st in s.plan(direction, slots):
            for slot, block in enumerate(st.slots_before):
                seen.setdefault(block, set()).add(slot)
        slots = st.slots_after
    assert all(len(v) == 1 for v in seen.values())


@pytest.mark.parametrize("L,N", [(5, 3), (7, 2), (30, 28)])
def test_loads_overlap_the_previous_block(L, N):
    # with two slots, the copy of the next streamed block is issued before the current one runs
    s = SwapSchedule.create(L, N)
    assert s.num_slots == 2
    for st in s.plan(FORWARD):
        if st.block + 1 in s.streamed and st.block >= s.streamed.start:
            assert st.block + 1 in s.resident(st.slots_before)


def test_bad_queries():
    s = SwapSchedule.create(5, 2)
    with pytest.raises(ValueError, match="direction"):
        s.plan("sideways")
    with pytest.raises(ValueError, match="outside"):
        s.slot_of(5)
    with pytest.raises(ValueError, match="cannot be in slot"):
        s.plan(FORWARD, (3, 3))
    with pytest.raises(ValueError, match="expected 2 slot entries"):
        s.loads_at_start(FORWARD, (None,))
