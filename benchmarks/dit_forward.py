"""Time one DiT forward (and optionally forward+backward): ours vs diffusers' ``WanTransformer3DModel``.

Both models share the SAME weights (random, non-trivial; converted to diffusers names with
``wan_kernel.models.dit_keys.dit_state_dict_to``; the diffusers model adopts our tensors, so the
weights are held once), get the same inputs (text context zero-padded to 512 rows, as both
pipelines do) and the same attention kernel (PyTorch SDPA). Prints the median time of each
after warm-up, the ratio, and the largest difference between the two outputs.

    python benchmarks/dit_forward.py                                  # tiny model on CPU, seconds
    python benchmarks/dit_forward.py --config 1.3B --device cuda      # 832x480x81, bfloat16
    python benchmarks/dit_forward.py --config 14B --model-type i2v --backward --checkpointing

``--backward`` times forward + backward of a squared-output loss to the input latents with the
weights frozen (the memory and compute pattern of LoRA training, minus the adapters).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _common import latent_grid, random_dit, timed

from wan_kernel.models.dit import WanDiT
from wan_kernel.models.dit_config import PRESETS, DiTConfig
from wan_kernel.models.dit_keys import diffusers_config, dit_state_dict_to
from wan_kernel.models.dit_loading import resolve_dtype

TINY = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)
DEFAULT_SIZES = {"tiny": "64x64x9", "1.3B": "832x480x81", "14B": "832x480x81"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["tiny", "1.3B", "14B"], default="tiny")
    p.add_argument("--model-type", choices=["t2v", "i2v", "flf2v"], default="t2v")
    p.add_argument(
        "--size", help="video size WxHxF in pixels/frames (default: 64x64x9 tiny, 832x480x81 otherwise)"
    )
    p.add_argument("--dtype", help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backward", action="store_true", help="time forward + backward (to the input latents)")
    p.add_argument("--checkpointing", action="store_true", help="per-block gradient checkpointing in both")
    p.add_argument("--skip-diffusers", action="store_true", help="time our model only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def model_config(name: str, model_type: str) -> DiTConfig:
    import attrs

    base = TINY if name == "tiny" else PRESETS["t2v-1.3B" if name == "1.3B" else "t2v-14B"]
    return attrs.evolve(base, model_type=model_type, in_dim=16 if model_type == "t2v" else 36)


def build_diffusers(ours: WanDiT, device: torch.device):
    from diffusers import WanTransformer3DModel

    kwargs = diffusers_config(ours.config)
    with torch.device("meta"):
        theirs = WanTransformer3DModel(**kwargs)
    # its RoPE table is a non-persistent buffer: rebuild it for real
    theirs.rope = type(theirs.rope)(ours.config.head_dim, kwargs["patch_size"], 1024).to(device)
    theirs.load_state_dict(dit_state_dict_to("diffusers", ours.state_dict()), strict=True, assign=True)
    return theirs.eval().requires_grad_(False)


def make_inputs(cfg: DiTConfig, batch: int, grid: tuple[int, int, int], device, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    f, h, w = grid

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    inputs = {
        "x": randn(batch, 16, f, h, w),
        "t": torch.linspace(900.0, 100.0, batch, device=device),
        "context": [randn(20 + 7 * i, cfg.text_dim) for i in range(batch)],
    }
    if cfg.has_image_input:
        images = 2 if cfg.model_type == "flf2v" else 1
        inputs["clip_fea"] = randn(images * batch, 257, 1280)
        inputs["y"] = randn(batch, cfg.in_dim - 16, f, h, w)
    return inputs


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = model_config(args.config, args.model_type)
    grid = latent_grid(args.size or DEFAULT_SIZES[args.config])
    tokens = grid[0] * (grid[1] // 2) * (grid[2] // 2)
    torch.manual_seed(args.seed)

    ours = random_dit(cfg, device, dtype, args.seed)
    ours.enable_gradient_checkpointing(args.checkpointing)
    inputs = make_inputs(cfg, args.batch, grid, device, args.seed)
    ctx_padded = torch.zeros(args.batch, cfg.text_len, cfg.text_dim, device=device)
    for i, c in enumerate(inputs["context"]):
        ctx_padded[i, : c.shape[0]] = c

    def run_ours(x):
        return ours(x, inputs["t"], inputs["context"], clip_fea=inputs.get("clip_fea"), y=inputs.get("y"))

    def run_theirs(x):
        xin = x if "y" not in inputs else torch.cat([x, inputs["y"]], dim=1)
        return theirs(
            xin.to(dtype),
            inputs["t"],
            ctx_padded.to(dtype),
            encoder_hidden_states_image=None if "clip_fea" not in inputs else inputs["clip_fea"].to(dtype),
            return_dict=False,
        )[0].float()

    def make(fn):
        """A no-argument callable running one timed step of ``fn``."""

        def forward():
            with torch.no_grad():
                return fn(inputs["x"])

        def forward_backward():
            x = inputs["x"].detach().requires_grad_(True)
            out = fn(x)
            out.float().pow(2).mean().backward()
            return out.detach()

        return forward_backward if args.backward else forward

    ours_times, ours_out = timed(make(run_ours), args.runs, args.warmup, device)
    result = {
        "config": args.config,
        "model_type": cfg.model_type,
        "dim": cfg.dim,
        "layers": cfg.num_layers,
        "latent_fhw": list(grid),
        "tokens": tokens,
        "batch": args.batch,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "mode": "forward+backward" if args.backward else "forward",
        "checkpointing": args.checkpointing,
        "runs": args.runs,
        "warmup": args.warmup,
        "ours_median_ms": 1000 * statistics.median(ours_times),
    }
    if not args.skip_diffusers:
        theirs = build_diffusers(ours, device)
        if args.checkpointing:
            theirs.enable_gradient_checkpointing()
            theirs.train()  # diffusers only checkpoints in training mode
        theirs_times, theirs_out = timed(make(run_theirs), args.runs, args.warmup, device)
        diff = (ours_out.float() - theirs_out.float()).abs()
        result.update(
            {
                "diffusers_median_ms": 1000 * statistics.median(theirs_times),
                "ratio_ours_over_diffusers": statistics.median(ours_times) / statistics.median(theirs_times),
                "max_abs_diff": diff.max().item(),
                "max_abs_output": theirs_out.abs().max().item(),
            }
        )
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30

    width = max(len(k) for k in result)
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
