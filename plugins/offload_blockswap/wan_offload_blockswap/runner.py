"""The block-swap mover: host masters, device slots, copies on a side CUDA stream, autograd hooks.

:class:`BlockSwapRunner` follows :class:`~wan_offload_blockswap.schedule.SwapSchedule`:

- every *frozen* tensor (parameters without ``requires_grad`` and all buffers, fp8 weights and
  their scale buffers included) of a streamed block is packed, once, into one flat host buffer
  (pinned when asked) at fixed byte offsets; the block's parameters then point into it;
- each slot is one flat ``uint8`` device buffer, allocated once; loading block ``b`` is a single
  host -> device copy of ``b``'s flat buffer into its slot on a dedicated stream, after which
  ``b``'s tensors are re-pointed (``tensor.data = view``) at the same offsets inside the slot,
  and the evicted block's tensors back at their host master;
- trainable parameters (LoRA) of every block stay on the device and keep their gradients.

Ordering on CUDA: before a copy overwrites a slot, the copy stream waits for an event recorded on
the compute stream after the evicted block's last kernel was queued; before a block runs, the
compute stream waits for its copy's event. Nothing blocks the host.

Hooks make every call safe, whoever drives it: a forward pre-hook loads a block that is not in
its slot (and waits for it) before it runs, also when gradient checkpointing recomputes it in
backward; a forward hook puts a tensor hook on the block's output, which fires when the backward
reaches the block, so the block is loaded again before its backward and the slots of the blocks
whose backward is done are refilled with the next ones of the backward order.

``_allow_cpu_for_tests=True`` runs the same code with ``device="cpu"`` and no streams; evicted
tensors then point at a buffer of ``0xFF`` bytes (NaN in every float format), so a block used
while not resident poisons the result instead of passing silently.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn

from wan_kernel.errors import InputError
from wan_kernel.interfaces import BlockRunner

from .schedule import BACKWARD, FORWARD, SwapSchedule

ALIGN = 256
"""Byte alignment of every tensor inside the flat buffers (enough for vectorised kernels)."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _frozen_tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The block's tensors that are streamed: parameters without grad, then all buffers."""
    out = [(name, p) for name, p in block.named_parameters() if not p.requires_grad]
    out += [(name, b) for name, b in block.named_buffers() if b is not None]
    return out


def _trainable(block: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in block.parameters() if p.requires_grad]


def _move(tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        tensor.data = tensor.data.to(device)
        grad = getattr(tensor, "grad", None)
        if grad is not None and grad.device != device:
            tensor.grad = grad.to(device)


def _check_loaded(blocks: Sequence[nn.Module]) -> None:
    for index, block in enumerate(blocks):
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if tensor.device.type == "meta":
                raise InputError(
                    f"block {index} tensor {name!r} is on the meta device (no weights); "
                    "load the weights before attaching block swap"
                )


def _graph_task_id() -> int | None:
    """Which backward pass is running (``None`` when this torch cannot say)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return None if current is None else int(current())


def _views(flat: torch.Tensor, layout: Sequence["_Entry"]) -> list[torch.Tensor]:
    return [flat[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in layout]


class _Entry:
    """Where one tensor of a streamed block lives inside the flat buffers."""

    __slots__ = ("name", "tensor", "offset", "nbytes", "dtype", "shape")

    def __init__(self, name: str, tensor: torch.Tensor, offset: int):
        self.name = name
        self.tensor = tensor
        self.offset = offset
        self.nbytes = tensor.numel() * tensor.element_size()
        self.dtype = tensor.dtype
        self.shape = tuple(tensor.shape)


class _HostBlock:
    """A streamed block's frozen tensors, packed into one flat host buffer."""

    def __init__(self, block: nn.Module, pin_memory: bool):
        layout, offset = [], 0
        for name, tensor in _frozen_tensors(block):
            layout.append(_Entry(name, tensor, offset))
            offset = _align(offset + layout[-1].nbytes)
        self.layout: list[_Entry] = layout
        self.nbytes = offset
        # pinned host memory is what lets the copies run asynchronously on the copy stream
        self.flat = torch.empty(max(offset, 1), dtype=torch.uint8, pin_memory=pin_memory)
        self.views = _views(self.flat, layout)
        for entry, view in zip(layout, self.views):
            view.copy_(entry.tensor.data)
            entry.tensor.data = view  # the master copy; the original (maybe mmap-ed) tensor is dropped

    def point_at(self, views: Sequence[torch.Tensor]) -> None:
        for entry, view in zip(self.layout, views):
            entry.tensor.data = view

    def still_current(self, block: nn.Module) -> bool:
        """Whether ``block`` still holds exactly these tensors, pointing at this buffer (not moved since)."""
        tensors = _frozen_tensors(block)
        return len(tensors) == len(self.layout) and all(
            t is e.tensor and t.device.type == "cpu" and t.data_ptr() == v.data_ptr() and t.shape == v.shape
            for (_, t), e, v in zip(tensors, self.layout, self.views)
        )


class _InlineMover:
    """Synchronous copies on the current device; the CPU test path."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)
        return None

    def wait(self, event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _CudaMover:
    """Host -> device copies on a dedicated stream, ordered against the compute stream by events."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> "torch.cuda.Event":
        compute = torch.cuda.current_stream(self.device)
        free = torch.cuda.Event()
        free.record(compute)  # everything queued so far (the evicted block's kernels) is before this
        self.stream.wait_event(free)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            loaded = torch.cuda.Event()
            loaded.record(self.stream)
        return loaded

    def wait(self, event: "torch.cuda.Event | None") -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        self.stream.synchronize()
        torch.cuda.current_stream(self.device).synchronize()


class BlockSwapRunner(BlockRunner):
    """Runs ``blocks`` with ``schedule.blocks_to_swap`` of them kept in host memory.

    Build it through the plugin (``resolve("offload", "blockswap").attach(...)``), which checks
    its arguments. :meth:`prepare` (called by the first :meth:`forward_blocks` if not before)
    moves the pinned blocks and every trainable parameter to the device, packs the streamed
    blocks into host buffers and allocates the slots; :meth:`release` undoes it.

    Keep the rest of the model on the device yourself (:func:`move_except_blocks`) and do not
    call ``model.to(...)`` while attached: it would move the streamed blocks' host masters.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        *,
        device: torch.device,
        schedule: SwapSchedule,
        training: bool = False,
        pin_memory: bool = True,
        _allow_cpu_for_tests: bool = False,
    ):
        self.blocks = list(blocks)
        _check_loaded(self.blocks)
        self.device = torch.device(device)
        self.schedule = schedule
        self.training = training
        self.pin_memory = bool(pin_memory) and self.device.type == "cuda"
        self._cpu_test_mode = _allow_cpu_for_tests and self.device.type == "cpu"
        self._mover = _CudaMover(self.device) if self.device.type == "cuda" else _InlineMover()
        self._host: dict[int, _HostBlock] = {}
        self._slot_views: dict[int, list[torch.Tensor]] = {}
        self._evicted_views: dict[int, list[torch.Tensor]] = {}
        self._slot_flats: list[torch.Tensor] = []
        self._slot_events: list[Any] = []
        self._slots: list[int | None] = [None] * schedule.num_slots
        self._hooks: list[Any] = []
        self._phase: str | None = None
        self._backward_task: int | None = None
        self._backward_started: list[int] = []
        self._prepared = False
        self.copies = 0
        """Block copies issued since construction (host -> device)."""
        self.bytes_copied = 0
        self.late_loads = 0
        """Copies issued only when a block was about to run (not prefetched): 0 in steady state."""

    # -- public state --------------------------------------------------------------------------

    @property
    def prepared(self) -> bool:
        return self._prepared

    @property
    def slots(self) -> tuple[int | None, ...]:
        """Which block each slot holds now (``None``: empty)."""
        return tuple(self._slots)

    def resident_blocks(self) -> frozenset[int]:
        """Blocks whose frozen weights are on the device now (empty before :meth:`prepare`)."""
        return self.schedule.resident(self._slots) if self._prepared else frozenset()

    def device_bytes(self) -> int:
        """Bytes of device memory the slots take (pinned blocks and trainable parameters not counted)."""
        return sum(int(f.numel()) for f in self._slot_flats)

    # -- BlockRunner ---------------------------------------------------------------------------

    def forward_blocks(self) -> Iterator[nn.Module]:
        """Yield the blocks in order, each on the device; prefetch the next while it runs."""
        self.prepare()
        self._phase = FORWARD
        self._backward_started = []
        for load in self.schedule.loads_at_start(FORWARD, self._slots):
            self._load(load.block)
        for index, block in enumerate(self.blocks):
            self._ensure_resident(index)
            yield block
            # the caller has queued block `index` (or its checkpointed call): its slot can be refilled
            after = self.schedule.load_after(FORWARD, index)
            if after is not None:
                self._load(after.block)

    def prepare(self) -> None:
        if self._prepared:
            return
        schedule = self.schedule
        _check_loaded(self.blocks)
        try:
            for index in schedule.pinned:
                block = self.blocks[index]
                for tensor in [*block.parameters(), *block.buffers()]:
                    _move(tensor, self.device)
            for index in schedule.streamed:
                host = self._host.get(index)
                # new, or its weights were changed or moved since release()
                if host is None or not host.still_current(self.blocks[index]):
                    self._host[index] = _HostBlock(self.blocks[index], self.pin_memory)
                for param in _trainable(self.blocks[index]):
                    _move(param, self.device)
            self._allocate_slots()
        except BaseException:
            self._evict_all_to_host()
            raise
        for index in schedule.streamed:
            self._host[index].point_at(self._evicted_views[index])
        self._install_hooks()
        self._slots = [None] * schedule.num_slots
        self._slot_events = [None] * schedule.num_slots
        self._prepared = True
        for load in schedule.loads_at_start(FORWARD, self._slots):
            self._load(load.block)

    def release(self) -> None:
        if not self._prepared:
            return
        self._mover.synchronize()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._evict_all_to_host()
        self._slots = [None] * self.schedule.num_slots
        self._slot_events = []
        self._slot_flats = []
        self._slot_views = {}
        self._evicted_views = {}
        self._phase = None
        self._backward_started = []
        self._prepared = False

    # -- internals -------------------------------------------------------------------------------

    def _allocate_slots(self) -> None:
        schedule = self.schedule
        sizes = [1] * schedule.num_slots
        for index in schedule.streamed:
            slot = schedule.slot_of(index)
            sizes[slot] = max(sizes[slot], self._host[index].nbytes)
        self._slot_flats = [torch.empty(n, dtype=torch.uint8, device=self.device) for n in sizes]
        poison = None
        if self._cpu_test_mode:
            poison = torch.full((max(sizes),), 0xFF, dtype=torch.uint8)  # NaN in every float format
        for index in schedule.streamed:
            host = self._host[index]
            self._slot_views[index] = _views(self._slot_flats[schedule.slot_of(index)], host.layout)
            self._evicted_views[index] = host.views if poison is None else _views(poison, host.layout)

    def _evict_all_to_host(self) -> None:
        cpu = torch.device("cpu")
        for index in self.schedule.pinned:
            block = self.blocks[index]
            for tensor in [*block.parameters(), *block.buffers()]:
                _move(tensor, cpu)
        for index in self.schedule.streamed:
            if index in self._host:
                self._host[index].point_at(self._host[index].views)
            for param in _trainable(self.blocks[index]):
                _move(param, cpu)

    def _install_hooks(self) -> None:
        disable = getattr(torch.compiler, "disable", lambda fn, **_: fn)
        for index in self.schedule.streamed:
            block = self.blocks[index]
            pre = disable(self._make_pre_hook(index))
            post = disable(self._make_post_hook(index))
            self._hooks.append(block.register_forward_pre_hook(pre))
            self._hooks.append(block.register_forward_hook(post))

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            if self._prepared:
                self._ensure_resident(index)

        return pre_hook

    def _make_post_hook(self, index: int):
        def on_output_grad(grad):
            self._on_backward_reaches(index)

        def post_hook(module, args, output):
            if not torch.is_grad_enabled():
                return None
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for tensor in outputs:
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(on_output_grad)
            return None

        return post_hook

    def _on_backward_reaches(self, index: int) -> None:
        """The gradient of block ``index``'s output is ready: its backward (and recomputation) is next.

        Every block after it in the forward order has finished its backward by now (autograd runs
        the later-created nodes first), so their slots go to the next blocks of the backward order.
        """
        if not self._prepared:
            return
        task = _graph_task_id()
        if self._phase != BACKWARD or task != self._backward_task:
            self._phase = BACKWARD
            self._backward_task = task
            self._backward_started = []
            for load in self.schedule.loads_at_start(BACKWARD, self._slots):
                self._load(load.block)
        for done in [b for b in self._backward_started if b > index]:
            self._backward_started.remove(done)
            after = self.schedule.load_after(BACKWARD, done)
            if after is not None:
                self._load(after.block)
        if index not in self._backward_started:
            self._backward_started.append(index)
        self._ensure_resident(index)

    def _ensure_resident(self, index: int) -> None:
        slot = self.schedule.slot_of(index)
        if slot is None:
            return
        if self._slots[slot] != index:
            self.late_loads += 1
            self._load(index)
        self._mover.wait(self._slot_events[slot])

    def _load(self, index: int) -> None:
        """Copy block ``index`` into its slot (no-op when it is there) and re-point both blocks."""
        slot = self.schedule.slot_of(index)
        evicted = self._slots[slot]
        if evicted == index:
            return
        host = self._host[index]
        flat = self._slot_flats[slot]
        self._slot_events[slot] = self._mover.copy(flat[: host.nbytes], host.flat[: host.nbytes])
        if evicted is not None:
            self._host[evicted].point_at(self._evicted_views[evicted])
        host.point_at(self._slot_views[index])
        self._slots[slot] = index
        self.copies += 1
        self.bytes_copied += host.nbytes


def move_except_blocks(model: nn.Module, blocks: Sequence[nn.Module], device: torch.device | str) -> None:
    """Move every parameter and buffer of ``model`` to ``device`` except those inside ``blocks``.

    Use it with block swap instead of ``model.to(device)``, which would pull every block onto
    the device. Tensor identities are kept (``tensor.data`` is replaced), so optimisers stay valid.
    """
    device = torch.device(device)
    skip = {id(t) for block in blocks for t in [*block.parameters(), *block.buffers()]}
    inside = {id(m) for block in blocks for m in block.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) not in skip:
                _move(tensor, device)
