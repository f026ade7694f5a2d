"""Seconds per LoRA training step and peak memory at real sizes, with random weights.

    python benchmarks/train_step.py --config 1.3B     # t2v-1.3B, 832x480x81, bf16, sdpa, checkpointing
    python benchmarks/train_step.py --config 14B-image  # t2v-14B, one 1280x720 frame, fp8_scaled + block swap
    python benchmarks/train_step.py --config tiny     # a 2-block toy on the CPU (checks the script runs)

One step is what ``wan run train`` does per optimizer step with batch size 1: draw noise and a
timestep (``shift`` sampling), the flow-matching forward through the frozen DiT with the float32
LoRA (rank 32) hooked in, backward, gradient clipping, AdamW step. The pieces are the trainer's
own (``wan_kernel.training.network`` / ``flow_matching``, the quantization and offload plugins);
the DiT is built in memory with random weights instead of read from a file. Text context: 128
random tokens. Prints the median of ``--steps`` timed steps after ``--warmup`` untimed ones and the
peak memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: process RSS).

Goals (issue 13, H100-class GPU): 1.3B <= 2.5 s/step in <= 16 GB; 14B 1280x720 image LoRA in <= 24 GB.
The seed trainer (musubi-tuner) is not measured here: it is not installed by this project.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys

import torch
from _common import latent_grid, random_dit, synchronize, timed

from wan_kernel.interfaces import TimestepSamplingConfig
from wan_kernel.models.dit_config import PRESETS, DiTConfig
from wan_kernel.training.flow_matching import (
    flow_matching_loss,
    model_timesteps,
    noisy_latents,
    velocity_target,
)
from wan_kernel.training.network import LoraNetwork, NetworkConfig

CONFIGS = {
    "1.3B": dict(preset="t2v-1.3B", size="832x480x81", quant=None, blocks_to_swap=0),
    "14B-image": dict(preset="t2v-14B", size="1280x720x1", quant="fp8_scaled", blocks_to_swap=20),
    "tiny": dict(preset=None, size="64x64x5", quant=None, blocks_to_swap=0),
}
TINY = DiTConfig(
    model_type="t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=64
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="1.3B")
    parser.add_argument("--size", default=None, help="WxHxF override, e.g. 832x480x81")
    parser.add_argument("--blocks_to_swap", type=int, default=None)
    parser.add_argument("--quant", default=None, help="fp8 / fp8_scaled / none")
    parser.add_argument("--no_checkpointing", action="store_true")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from wan_kernel.pipelines.model_sources import quantize_module
    from wan_kernel.plugins import resolve

    setup = CONFIGS[args.config]
    device = torch.device(args.device)
    if args.config != "tiny" and device.type != "cuda":
        sys.exit(f"--config {args.config} needs a CUDA GPU (try --config tiny on the CPU)")
    cfg = TINY if setup["preset"] is None else PRESETS[setup["preset"]]
    size = args.size or setup["size"]
    quant = setup["quant"] if args.quant is None else (None if args.quant == "none" else args.quant)
    swap = setup["blocks_to_swap"] if args.blocks_to_swap is None else args.blocks_to_swap
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    build_device = torch.device("cpu") if swap else device
    dit = random_dit(cfg, build_device, dtype, seed=0)
    if quant:
        dit = quantize_module(dit, resolve("quantization", quant), target="dit", device=device)
    network = LoraNetwork(dit, NetworkConfig(dim=args.rank, alpha=args.rank)).to(device)
    network.attach(dit)
    dit.enable_gradient_checkpointing(not args.no_checkpointing)
    if swap:
        for name, child in dit.named_children():
            if name != "blocks":
                child.to(device)
        runner = resolve("offload", "blockswap").attach(
            dit.blocks, device=device, blocks_to_swap=swap, training=True
        )
        dit.set_block_runner(runner)
        runner.prepare()
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    sampler = resolve("timestep_sampling", "shift")
    tconfig = TimestepSamplingConfig(discrete_flow_shift=3.0)

    f, h, w = latent_grid(size)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, f, h, w, generator=g).to(device)
    context = [torch.randn(128, cfg.text_dim, generator=g).to(device, dtype)]

    def step() -> float:
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = sampler.sample(1, config=tconfig, generator=g).to(device)
        pred = dit(noisy_latents(x0, noise, t), model_timesteps(t), context)
        loss = flow_matching_loss(pred, velocity_target(x0, noise))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, _ = timed(step, args.steps, args.warmup, device)
    synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        where = "GPU max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        where = "process RSS"
    tokens = f * (h // 2) * (w // 2)
    print(
        f"train_step {args.config}: {size} ({tokens} tokens), dtype {str(dtype).removeprefix('torch.')}, "
        f"quant {quant or 'none'}, blocks_to_swap {swap}, checkpointing {not args.no_checkpointing}, "
        f"LoRA rank {args.rank} on {len(network.loras)} modules"
    )
    print(
        f"  {statistics.median(times):.3f} s/step (median of {len(times)}, min {min(times):.3f}), "
        f"peak memory {peak:.2f} GiB ({where}), device {device}"
    )


if __name__ == "__main__":
    main()
