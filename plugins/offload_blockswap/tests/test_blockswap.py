"""Block swap: registration, errors, and forward/backward equal to no swap, bit for bit.

On CPU the runner runs with ``_allow_cpu_for_tests=True``: the same code without streams, evicted
weights pointing at NaN bytes, so a block used while not resident poisons the output.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wan_kernel.errors import InputError, PluginUnavailableError
from wan_kernel.plugins import PluginManager
from wan_kernel.models.attention import sdpa_attention
from wan_kernel.testing import REFERENCE_FIXTURES, randomize_weights
from wan_offload_blockswap import BlockSwapOffloader
from wan_offload_blockswap.runner import move_except_blocks

FIXTURES = REFERENCE_FIXTURES


# --------------------------------------------------------------------------------------------
# A toy block stack: frozen linears, a norm, a buffer, an fp8 linear with its scale, LoRA
# --------------------------------------------------------------------------------------------


class Fp8Linear(nn.Module):
    """Like the quantization plugin's: float8 weight + scale buffer, dequantised in forward."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        w = torch.randn(d_out, d_in) / d_in**0.5
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        self.weight = nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.register_buffer("scale_weight", scale)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return nn.functional.linear(x, self.weight.float() * self.scale_weight, self.bias)


class LoRA(nn.Module):
    """Wraps a frozen linear with a trainable low-rank update (a LoRA-like trainable param)."""

    def __init__(self, base: nn.Module, d_in: int, d_out: int, rank: int = 2):
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, d_in) * 0.3)
        self.up = nn.Parameter(torch.randn(d_out, rank) * 0.3)

    def forward(self, x):
        return self.base(x) + x @ self.down.t() @ self.up.t()


class ToyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.a = LoRA(nn.Linear(d, 2 * d), d, 2 * d)
        self.b = Fp8Linear(2 * d, d)
        self.register_buffer("gate", torch.rand(d) + 0.5)

    def forward(self, x, context):
        return x + self.b(torch.tanh(self.a(self.norm(x)))) * self.gate + context.mean(1, keepdim=True)


def toy_stack(layers: int, d: int = 8, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    blocks = nn.ModuleList([ToyBlock(d) for _ in range(layers)])
    for name, p in blocks.named_parameters():
        p.requires_grad_(name.endswith(("down", "up")))
    return blocks


def run_stack(blocks, runner, x, context, checkpointing):
    for block in blocks if runner is None else runner.forward_blocks():
        x = checkpoint(block, x, context, use_reentrant=False) if checkpointing else block(x, context)
    return x


def attach_cpu(blocks, n, training=True):
    return BlockSwapOffloader().attach(
        blocks, device="cpu", blocks_to_swap=n, training=training, _allow_cpu_for_tests=True
    )


def trainable_grads(blocks):
    return [p.grad.clone() for p in blocks.parameters() if p.requires_grad]


def record_residency(runner):
    """Per call of each block: was it resident when it ran (hook registered after the runner's)."""
    seen = []
    for i, block in enumerate(runner.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, i in runner.resident_blocks())))
    return seen


# --------------------------------------------------------------------------------------------
# Registration and errors
# --------------------------------------------------------------------------------------------


def test_registered_and_entry_module_is_torch_free():
    pm = PluginManager()
    assert "blockswap" in pm.names("offload")
    assert isinstance(pm.lookup("offload", "block_swap").impl, BlockSwapOffloader)
    code = "import sys, wan_offload_blockswap; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    from wan_kernel.machine import gpu_driver_present

    if not gpu_driver_present():  # with no driver, availability() decides without torch too
        code = (
            "import sys, wan_offload_blockswap as m; ok = m.BlockSwapOffloader().availability().ok; "
            "sys.exit(ok or 'torch' in sys.modules)"
        )
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_selecting_it_without_cuda_is_a_clear_error():
    offloader = BlockSwapOffloader()
    assert not offloader.availability().ok and "CUDA" in offloader.availability().reason
    with pytest.raises(PluginUnavailableError, match="blockswap.*needs a CUDA GPU"):
        PluginManager().get("offload", "blockswap")
    with pytest.raises(PluginUnavailableError, match="needs a CUDA GPU"):
        offloader.attach(toy_stack(3), device="cuda", blocks_to_swap=1)


def test_bad_arguments():
    offloader = BlockSwapOffloader()
    blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(30)])
    for n in (0, 30, -2):
        with pytest.raises(InputError, match="between 1 and 29 for this model"):
            offloader.attach(blocks, device="cpu", blocks_to_swap=n, _allow_cpu_for_tests=True)
    with pytest.raises(InputError, match="must be an integer"):
        offloader.attach(blocks, device="cpu", blocks_to_swap=2.0, _allow_cpu_for_tests=True)
    with pytest.raises(InputError, match="CUDA device"):
        offloader.attach(blocks, device="cpu", blocks_to_swap=3)
    with pytest.raises(InputError, match="list of modules"):
        offloader.attach(nn.Linear(2, 2), device="cpu", blocks_to_swap=1, _allow_cpu_for_tests=True)
    with pytest.raises(InputError, match=r"blocks\[1\]"):
        offloader.attach([nn.Linear(2, 2), 3], device="cpu", blocks_to_swap=1, _allow_cpu_for_tests=True)
    with pytest.raises(InputError, match="appears twice"):
        offloader.attach([blocks[0], blocks[0]], device="cpu", blocks_to_swap=1, _allow_cpu_for_tests=True)
    with pytest.raises(InputError, match="at least 2 blocks"):
        offloader.attach(blocks[:1], device="cpu", blocks_to_swap=1, _allow_cpu_for_tests=True)
    with torch.device("meta"):
        meta = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    with pytest.raises(InputError, match="meta device.*load the weights"):
        offloader.attach(meta, device="cpu", blocks_to_swap=2, _allow_cpu_for_tests=True)


# --------------------------------------------------------------------------------------------
# CPU-path integration: the toy stack
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_training_equals_no_swap(n, checkpointing):
    layers = 5
    ref, swapped = toy_stack(layers), toy_stack(layers)
    x = torch.randn(2, 3, 8)
    context = torch.randn(2, 4, 8, requires_grad=True)
    out_ref = run_stack(ref, None, x, context, checkpointing)
    out_ref.square().sum().backward()
    grads_ref, context_grad = trainable_grads(ref), context.grad.clone()

    runner = attach_cpu(swapped, n)
    seen = record_residency(runner)
    schedule = runner.schedule
    for step in (1, 2):  # two steps accumulate gradients: the slots must be right at each boundary
        context.grad = None
        out = run_stack(swapped, runner, x, context, checkpointing)
        assert torch.equal(out, out_ref)
        out.square().sum().backward()
        for g, g_ref in zip(trainable_grads(swapped), grads_ref):
            assert torch.equal(g, step * g_ref)
        assert torch.equal(context.grad, context_grad)
        assert runner.slots == schedule.initial_slots()  # the backward left the forward's layout
    assert seen and all(resident for _, resident in seen)
    assert len(seen) == layers * (4 if checkpointing else 2)  # recomputation runs every block again
    assert runner.late_loads == 0  # every copy was a prefetch
    assert runner.copies == schedule.num_slots + 2 * 2 * n  # prepare, then N per pass
    # trainable parameters never left the device (here: stayed the same tensors, with gradients)
    assert all(p.grad is not None for p in swapped.parameters() if p.requires_grad)


def test_inference_and_no_grad_forwards():
    ref, swapped = toy_stack(6), toy_stack(6)
    runner = attach_cpu(swapped, 4, training=False)
    x, context = torch.randn(1, 3, 8), torch.randn(1, 2, 8)
    with torch.no_grad():
        expected = run_stack(ref, None, x, context, False)
        for _ in range(3):
            assert torch.equal(run_stack(swapped, runner, x, context, False), expected)
    assert runner.late_loads == 0
    # 6 blocks, 4 swapped: 2 slots, all 6 stream: 2 at prepare, then 4 + 6 + 6
    assert runner.copies == 2 + 4 + 6 + 6


def test_a_block_used_out_of_turn_is_loaded_not_poisoned():
    # calling blocks directly (no forward_blocks) still works: the pre-hook loads on demand
    ref, swapped = toy_stack(4), toy_stack(4)
    runner = attach_cpu(swapped, 3)
    runner.prepare()
    x, context = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    with torch.no_grad():
        for i in (3, 0, 2, 2, 1):
            assert torch.equal(swapped[i](x, context), ref[i](x, context))
    assert runner.late_loads > 0


def test_evicted_weights_are_poisoned_on_the_cpu_path():
    # the test mode must be able to fail: a non-resident block computes NaN
    swapped = toy_stack(4)
    runner = attach_cpu(swapped, 3)
    runner.prepare()
    evicted = next(i for i in range(4) if i not in runner.resident_blocks())
    assert torch.isnan(swapped[evicted].norm.weight).all()
    assert torch.isnan(swapped[evicted].b.weight.float()).all()  # fp8 NaN
    assert torch.isnan(swapped[evicted].b.scale_weight).all()  # the scale buffer moves with it


def test_release_restores_host_weights_and_prepare_again():
    ref, swapped = toy_stack(5), toy_stack(5)
    runner = attach_cpu(swapped, 3)
    x, context = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    with torch.no_grad():
        run_stack(swapped, runner, x, context, False)
    runner.release()
    assert not runner.prepared and runner.device_bytes() == 0 and runner.resident_blocks() == frozenset()
    for a, b in zip(ref.state_dict().values(), swapped.state_dict().values()):
        assert torch.equal(a.float(), b.float())
    with torch.no_grad():  # hooks are gone: the blocks run as plain modules ...
        expected = run_stack(ref, None, x, context, False)
        assert torch.equal(run_stack(swapped, None, x, context, False), expected)
        # ... and the runner can take charge again
        assert torch.equal(run_stack(swapped, runner, x, context, False), expected)


def test_weights_changed_between_release_and_prepare_are_used():
    ref, swapped = toy_stack(4), toy_stack(4)
    runner = attach_cpu(swapped, 3)
    x, context = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    with torch.no_grad():
        run_stack(swapped, runner, x, context, False)
        runner.release()
        for a, b in zip(ref.parameters(), swapped.parameters()):  # e.g. weights reloaded or moved
            if a.dtype == torch.float32:
                a.mul_(1.5)
                b.data = b.data * 1.5
        expected = run_stack(ref, None, x, context, False)
        assert torch.equal(run_stack(swapped, runner, x, context, False), expected)


def test_slots_are_reused_not_reallocated():
    swapped = toy_stack(6)
    runner = attach_cpu(swapped, 4)
    x, context = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    with torch.no_grad():
        run_stack(swapped, runner, x, context, False)
        pointers = {id(f): f.data_ptr() for f in runner._slot_flats}
        addresses = set()
        for _ in range(2):
            for block in runner.forward_blocks():
                addresses.add(block.norm.weight.data_ptr())
                x = block(x, context)
        assert {id(f): f.data_ptr() for f in runner._slot_flats} == pointers
    # every block ran from one of the two slots (all 6 stream: room for 2)
    slot_ranges = [(f.data_ptr(), f.data_ptr() + f.numel()) for f in runner._slot_flats]
    assert all(any(lo <= a < hi for lo, hi in slot_ranges) for a in addresses)
    per_block = max(runner._host[i].nbytes for i in runner.schedule.streamed)
    assert runner.device_bytes() == 2 * per_block


def test_per_block_compile_on_cpu():
    # dynamo traces each block's forward; the runner's hooks stay outside the compiled code
    ref, swapped = toy_stack(4), toy_stack(4)
    for block in swapped:
        block.forward = torch.compile(block.forward, backend="aot_eager")
    runner = attach_cpu(swapped, 2)
    x, context = torch.randn(1, 2, 8), torch.randn(1, 2, 8, requires_grad=True)
    out_ref = run_stack(ref, None, x, context, False)
    out_ref.sum().backward()
    for _ in range(2):
        out = run_stack(swapped, runner, x, context, False)
        torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-6)
        for block in swapped:
            for p in block.parameters():
                p.grad = None
        out.sum().backward()
        for g, g_ref in zip(trainable_grads(swapped), trainable_grads(ref)):
            torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# CPU-path integration: the Wan DiT
# --------------------------------------------------------------------------------------------


def _add_lora(dit):
    torch.manual_seed(123)
    for block in dit.blocks:
        d = block.self_attn.q.in_features
        block.self_attn.q = LoRA(block.self_attn.q, d, d)


def _dit_inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 3, 4, 4, generator=g)
    context = [torch.randn(5, cfg.text_dim, generator=g)]
    return x, torch.tensor([500.0]), context


def _dit_equal_with_swap(make_dit, n, checkpointing):
    ref, swapped = make_dit(), make_dit()
    for model in (ref, swapped):
        _add_lora(model)
        model.enable_gradient_checkpointing(checkpointing)
    x, t, context = _dit_inputs(ref.config)
    out_ref = ref(x, t, context)
    out_ref.square().mean().backward()

    runner = attach_cpu(swapped.blocks, n)
    move_except_blocks(swapped, swapped.blocks, "cpu")
    runner.prepare()
    swapped.set_block_runner(runner)
    for step in (1, 2):
        out = swapped(x, t, context)
        assert torch.equal(out, out_ref)
        out.square().mean().backward()
        for (name, p), p_ref in zip(swapped.named_parameters(), ref.parameters()):
            if p.requires_grad:
                assert torch.equal(p.grad, step * p_ref.grad), name
    assert runner.late_loads == 0
    with torch.no_grad():
        assert torch.equal(swapped(x, t, context), out_ref)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_fixture_dit_equals_no_swap(checkpointing):
    if not (FIXTURES / "dit_t2v" / "weights.safetensors").exists():
        pytest.skip(f"fixtures not found at {FIXTURES}")
    from wan_kernel.models.dit_loading import load_dit

    def make():
        return load_dit(FIXTURES / "dit_t2v" / "weights.safetensors", dtype=torch.float32)

    _dit_equal_with_swap(make, 1, checkpointing)


@pytest.mark.parametrize("n", [1, 3])
def test_four_layer_dit_equals_no_swap(n):
    from wan_kernel.models.dit import WanDiT
    from wan_kernel.models.dit_config import DiTConfig

    cfg = DiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=4, text_dim=16, freq_dim=32)

    def make():
        torch.manual_seed(0)
        model = WanDiT(cfg, sdpa_attention)
        # the official init zeroes the head: make every weight count
        return randomize_weights(model).requires_grad_(False)

    _dit_equal_with_swap(make, n, checkpointing=True)


def test_fp8_scaled_dit_from_the_quant_plugin_equals_no_swap():
    quant = pytest.importorskip("wan_quant_fp8.checkpoint", reason="wan-quant-fp8 is not installed")
    from wan_kernel.models.dit import WanDiT
    from wan_kernel.models.dit_config import DiTConfig

    cfg = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=3, text_dim=16, freq_dim=32)

    def make():
        torch.manual_seed(0)
        model = WanDiT(cfg, sdpa_attention)
        randomize_weights(model)
        quant.quantize_model(model, "fp8_scaled", target="dit", device="cpu")
        return model.requires_grad_(False)

    model = make()
    linear = model.blocks[0].ffn[0]  # 3 blocks, 2 swapped: one slot, holding block 0 after prepare
    assert linear.weight.dtype == torch.float8_e4m3fn and linear.scale_weight is not None
    runner = attach_cpu(model.blocks, 2)
    runner.prepare()
    # the streamed block's fp8 weight and its scale moved together into the slot
    slot = runner._slot_flats[runner.schedule.slot_of(0)]
    for tensor in (linear.weight, linear.scale_weight):
        assert slot.data_ptr() <= tensor.data_ptr() < slot.data_ptr() + slot.numel()
    runner.release()
    _dit_equal_with_swap(make, 2, checkpointing=False)


def test_benchmark_cpu_smoke(tmp_path):
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "blockswap.py"
    out = tmp_path / "bs.json"
    result = subprocess.run(
        [sys.executable, str(script), "--mode", "train", "--swap", "0,3", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in result.stdout
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [r["blocks_to_swap"] for r in rows] == [0, 3]
    assert rows[1]["max_abs_diff_vs_no_swap"] == 0.0


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_cuda_training_equals_no_swap(cuda_device, checkpointing):
    layers, d = 6, 256
    ref, swapped = toy_stack(layers, d), toy_stack(layers, d)
    ref.to(cuda_device)
    x = torch.randn(4, 512, d, device=cuda_device)
    context = torch.randn(4, 8, d, device=cuda_device, requires_grad=True)
    out_ref = run_stack(ref, None, x, context, checkpointing)
    out_ref.square().sum().backward()
    grads_ref = trainable_grads(ref)
    for n in range(1, layers):
        blocks = copy.deepcopy(swapped)
        runner = BlockSwapOffloader().attach(blocks, device=cuda_device, blocks_to_swap=n, training=True)
        runner.prepare()
        assert all(runner._host[i].flat.is_pinned() for i in runner.schedule.streamed)
        for step in (1, 2):
            out = run_stack(blocks, runner, x, context, checkpointing)
            assert torch.equal(out, out_ref), n
            out.square().sum().backward()
            for g, g_ref in zip(trainable_grads(blocks), grads_ref):
                assert g.device.type == "cuda" and torch.equal(g, step * g_ref), n
        assert runner.late_loads == 0
        runner.release()


@pytest.mark.cuda
def test_cuda_peak_memory_falls_as_more_blocks_swap(cuda_device):
    layers, d = 8, 1024
    blocks = toy_stack(layers, d)
    x = torch.randn(1, 64, d, device=cuda_device)
    context = torch.randn(1, 8, d, device=cuda_device)
    peaks, outputs = [], []
    for n in range(1, layers):
        runner = BlockSwapOffloader().attach(blocks, device=cuda_device, blocks_to_swap=n)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(cuda_device)
        with torch.no_grad():
            outputs.append(run_stack(blocks, runner, x, context, False))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated(cuda_device))
        runner.release()
        del runner
    assert all(a > b for a, b in zip(peaks, peaks[1:])), peaks
    assert all(torch.equal(o, outputs[0]) for o in outputs)
