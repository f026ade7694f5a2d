"""fp8 weight quantization of the DiT: error, weight memory and speed of each mode against bf16.

For every mode of the ``quant_fp8`` plugin (fp8, fp8_scaled, fp8_fast where available) the same
random bf16 weights (``wan_quant_fp8.testing.randomize_``: outlier rows, small q/k weights) are
quantized the way ``load_dit`` does it (meta model -> ``convert_for_runtime`` ->
``quantize_state_dict`` -> ``load_state_dict(assign=True)``), and the script prints

- the relative L2 error of the DiT output against the bf16 model (and against float32 on CPU),
- the weight memory (bytes of parameters + buffers) and its ratio to bf16,
- on CUDA: the median forward time after warm-up, bf16 timed in the same run, and a Linear
  micro-benchmark (fp8_fast's ``torch._scaled_mm`` path, activation quantization included,
  vs bf16 ``F.linear`` and vs fp8_scaled's up-cast) on the model's Linear shapes.

    python benchmarks/quant.py                                     # tiny DiT on CPU, seconds
    python benchmarks/quant.py --config 1.3B --device cuda         # 832x480x81, random weights
    python benchmarks/quant.py --config 14B --device cuda --size 832x480x21
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from _common import latent_grid, timed
from wan_quant_fp8 import Fp8FastQuantizer, Fp8Quantizer, Fp8ScaledQuantizer
from wan_quant_fp8.testing import randomize_, relative_error, state_bytes

from wan_kernel.models.dit import WanDiT
from wan_kernel.models.dit_config import PRESETS, DiTConfig

TINY = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64)
DEFAULT_SIZES = {"tiny": "64x64x9", "1.3B": "832x480x81", "14B": "832x480x81"}
QUANTIZERS = [Fp8Quantizer(), Fp8ScaledQuantizer(), Fp8FastQuantizer()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["tiny", "1.3B", "14B"], default="tiny")
    p.add_argument(
        "--size", help="video WxHxF in pixels/frames (default: 64x64x9 tiny, 832x480x81 otherwise)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32760, help="rows M of the Linear micro-benchmark (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def median_time(fn, device: torch.device, runs: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``runs`` calls after ``warmup`` calls."""
    return statistics.median(timed(fn, runs, warmup, device)[0])


def build_inputs(config: DiTConfig, size: str, device: torch.device, seed: int):
    latent = (1, config.in_dim, *latent_grid(size))  # [B, C, F, H, W]
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(latent, generator=g, device=device)
    t = torch.tensor([700.0], device=device)
    context = [torch.randn(64, config.text_dim, generator=g, device=device)]
    return x, t, context


def quantized_copy(reference: torch.nn.Module, quantizer, device: torch.device, build) -> torch.nn.Module:
    """What ``load_dit(quant=...)`` builds, from the reference model's tensors.

    ``build()`` makes the architecture; built on ``meta``, swapped, then every tensor is adopted
    (``assign=True`` keeps each stored tensor's dtype: fp8, float32 scales, the rest as stored).
    The tensors kept in high precision are shared with ``reference``.
    """
    with torch.device("meta"):
        model = build()
    quantizer.convert_for_runtime(model, target="dit")
    stored = quantizer.quantize_state_dict(reference.state_dict(), target="dit", device=device)
    model.load_state_dict(stored, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _one_linear(k: int, n: int) -> torch.nn.Module:
    """A module whose only Linear is named like a DiT block's ``blocks.0.ffn.0``."""
    root = torch.nn.Module()
    root.blocks = torch.nn.ModuleList([torch.nn.Module()])
    root.blocks[0].ffn = torch.nn.Sequential(torch.nn.Linear(k, n, dtype=torch.bfloat16))
    return root


def linear_benchmark(
    config: DiTConfig, tokens: int, device: torch.device, runs: int, warmup: int
) -> list[dict]:
    """bf16 ``F.linear`` vs fp8_scaled (up-cast) vs fp8_fast on the DiT's Linear shapes [M, K] -> [M, N]."""
    shapes = [
        ("attn q/k/v/o", config.dim, config.dim),
        ("ffn.0", config.dim, config.ffn_dim),
        ("ffn.2", config.ffn_dim, config.dim),
    ]
    rows = []
    for label, k, n in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(tokens, k, generator=g, device=device, dtype=torch.bfloat16)
        reference = _one_linear(k, n).to(device)
        linear = reference.blocks[0].ffn[0]
        linear.weight.data = (torch.randn(n, k, generator=g, device=device) / k**0.5).to(torch.bfloat16)
        linear.bias.data.zero_()
        flops = 2.0 * tokens * k * n
        row = {"layer": label, "M": tokens, "K": k, "N": n}
        with torch.no_grad():
            t_bf16 = median_time(lambda f=linear, a=x: f(a), device, runs, warmup)
            row["bf16_ms"] = t_bf16 * 1e3
            row["bf16_tflops"] = flops / t_bf16 / 1e12
            exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())
            for quantizer in (Fp8ScaledQuantizer(), Fp8FastQuantizer()):
                if not quantizer.availability().ok:
                    continue
                layer = (
                    quantized_copy(reference, quantizer, device, lambda k=k, n=n: _one_linear(k, n))
                    .blocks[0]
                    .ffn[0]
                )
                t = median_time(lambda f=layer, a=x: f(a), device, runs, warmup)
                row[f"{quantizer.name}_ms"] = t * 1e3
                row[f"{quantizer.name}_tflops"] = flops / t / 1e12
                row[f"{quantizer.name}_speedup_vs_bf16"] = t_bf16 / t
                row[f"{quantizer.name}_rel_err"] = relative_error(layer(x), exact)
        rows.append(row)
    return rows


def released_sizes() -> list[dict]:
    """Weight memory of the released DiTs under each mode, counted on ``meta`` (no allocation)."""
    rows = []
    for preset in ("t2v-1.3B", "t2v-14B", "i2v-14B"):

        def build(config=PRESETS[preset]):
            with torch.device("meta"):
                return WanDiT(config, attention=lambda q, k, v, k_lens=None: q).to(torch.bfloat16)

        bf16 = state_bytes(build())
        row = {"preset": preset, "bf16_bytes": bf16}
        for quantizer in QUANTIZERS:
            row[f"{quantizer.name}_bytes"] = state_bytes(quantizer.convert_for_runtime(build(), target="dit"))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    config = TINY if args.config == "tiny" else PRESETS["t2v-1.3B" if args.config == "1.3B" else "t2v-14B"]
    size = args.size or DEFAULT_SIZES[args.config]
    from wan_attention_sdpa import SdpaAttention

    attention = SdpaAttention()
    with torch.device("meta"):
        reference = WanDiT(config, attention=attention)
    reference = reference.to_empty(device=device)
    randomize_(reference, args.seed, device=device)
    inputs = build_inputs(config, size, device, args.seed)

    results: dict = {"config": args.config, "size": size, "device": str(device), "modes": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    with torch.no_grad():
        fp32_out = reference(*inputs) if device.type == "cpu" else None
        reference.to(torch.bfloat16)
        for block in reference.blocks:  # the loader keeps the modulation tables in float32
            block.modulation.data = block.modulation.data.float()
        reference.head.modulation.data = reference.head.modulation.data.float()
        bf16_bytes = state_bytes(reference)
        bf16_out = reference(*inputs)
        row = {"mode": "bf16", "weight_bytes": bf16_bytes, "ratio": 1.0, "rel_err_vs_bf16": 0.0}
        if fp32_out is not None:
            row["rel_err_vs_fp32"] = relative_error(bf16_out, fp32_out)
        if device.type == "cuda":
            bf16_time = median_time(lambda: reference(*inputs), device, args.runs, args.warmup)
            row["forward_s"] = bf16_time
        results["modes"].append(row)

        for quantizer in QUANTIZERS:
            available = quantizer.availability()
            if not available.ok:
                results["modes"].append({"mode": quantizer.name, "skipped": available.reason})
                continue
            model = quantized_copy(reference, quantizer, device, lambda: WanDiT(config, attention=attention))
            out = model(*inputs)
            row = {
                "mode": quantizer.name,
                "weight_bytes": state_bytes(model),
                "ratio": state_bytes(model) / bf16_bytes,
                "rel_err_vs_bf16": relative_error(out, bf16_out),
            }
            if fp32_out is not None:
                row["rel_err_vs_fp32"] = relative_error(out, fp32_out)
            if device.type == "cuda":
                row["forward_s"] = median_time(lambda m=model: m(*inputs), device, args.runs, args.warmup)
                row["speedup_vs_bf16"] = results["modes"][0]["forward_s"] / row["forward_s"]
            results["modes"].append(row)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()

    results["released_sizes"] = released_sizes()
    if device.type == "cuda":
        del reference
        torch.cuda.empty_cache()
        results["linear"] = linear_benchmark(config, args.tokens, device, args.runs * 4, args.warmup * 2)

    print(
        f"DiT {args.config} ({config.dim} wide, {config.num_layers} layers), video {size}, device {device}"
        + (f" ({results['gpu']})" if "gpu" in results else "")
    )
    head = (
        f"{'mode':<11}{'weights MiB':>12}{'vs bf16':>9}{'err vs bf16':>13}"
        f"{'err vs fp32':>13}{'forward s':>11}{'speed-up':>10}"
    )
    print(head)
    for r in results["modes"]:
        if "skipped" in r:
            print(f"{r['mode']:<11}skipped: {r['skipped']}")
            continue
        fp32 = f"{r['rel_err_vs_fp32']:.4f}" if "rel_err_vs_fp32" in r else "-"
        fwd = f"{r['forward_s']:.4f}" if "forward_s" in r else "-"
        speed = f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else "-"
        print(
            f"{r['mode']:<11}{r['weight_bytes'] / 2**20:>12.2f}{r['ratio']:>9.3f}"
            f"{r['rel_err_vs_bf16']:>13.4f}{fp32:>13}{fwd:>11}{speed:>10}"
        )
    print("weight memory of the released DiTs (GiB, ratio to bf16):")
    for r in results["released_sizes"]:
        parts = [f"bf16 {r['bf16_bytes'] / 2**30:.2f}"]
        for q in QUANTIZERS:
            b = r[f"{q.name}_bytes"]
            parts.append(f"{q.name} {b / 2**30:.2f} ({b / r['bf16_bytes']:.3f})")
        print(f"  {r['preset']:<9} " + ", ".join(parts))
    if "linear" in results:
        print("Linear micro-benchmark (bf16 activations, median after warm-up):")
    for r in results.get("linear", []):
        shape = f"{r['layer']:<13} M={r['M']} K={r['K']} N={r['N']}"
        parts = [f"{shape}: bf16 {r['bf16_ms']:.3f} ms ({r['bf16_tflops']:.0f} TFLOP/s)"]
        for name in ("fp8_scaled", "fp8_fast"):
            if f"{name}_ms" in r:
                parts.append(
                    f"{name} {r[f'{name}_ms']:.3f} ms ({r[f'{name}_tflops']:.0f} TFLOP/s, "
                    f"{r[f'{name}_speedup_vs_bf16']:.2f}x, err {r[f'{name}_rel_err']:.4f})"
                )
        print("  " + "; ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
