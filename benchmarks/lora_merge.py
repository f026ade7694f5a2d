"""LoRA merge speed: ``LoraMerge`` (the state-dict transform load_dit runs) against a bare loop.

Builds a random DiT state dict of a released size (bf16, official names) and a random kohya LoRA
on every block linear, then times merging it (float32 math, cast back to bf16). The peer is the
plain loop ``W += scale * up @ down`` over the same weights, measured in the same run, so the
figure shows what reading the file, matching names and checking shapes cost on top.

    python benchmarks/lora_merge.py --model t2v-1.3B --layers 30 --rank 32 [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import attrs
import torch
from _common import timed
from safetensors.torch import save_file

from wan_kernel.lora import LoraMerge
from wan_kernel.models.dit_config import PRESETS
from wan_kernel.models.dit_keys import IN_BLOCK_MODULES

LINEARS = [m for m in IN_BLOCK_MODULES if m.split(".")[-1] in ("q", "k", "v", "o", "0", "2")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t2v-1.3B", choices=sorted(PRESETS))
    parser.add_argument(
        "--layers", type=int, default=4, help="blocks to build (the released model: 30 or 40)"
    )
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cfg = attrs.evolve(PRESETS[args.model], num_layers=args.layers)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shapes = {
        "self_attn": (cfg.dim, cfg.dim),
        "cross_attn": (cfg.dim, cfg.dim),
        "ffn.0": (cfg.ffn_dim, cfg.dim),
        "ffn.2": (cfg.dim, cfg.ffn_dim),
    }
    sd, lora = {}, {}
    for i in range(cfg.num_layers):
        for module in LINEARS:
            if module.endswith(("k_img", "v_img")) and cfg.model_type == "t2v":
                continue
            out_f, in_f = shapes[module if module.startswith("ffn") else module.split(".")[0]]
            name = f"blocks.{i}.{module}"
            sd[name + ".weight"] = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
            stem = "lora_unet_" + name.replace(".", "_")
            lora[stem + ".lora_down.weight"] = torch.randn(args.rank, in_f, generator=g) * 0.01
            lora[stem + ".lora_up.weight"] = torch.randn(out_f, args.rank, generator=g) * 0.01
            lora[stem + ".alpha"] = torch.tensor(float(args.rank) / 2)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        save_file(lora, str(path))
        merge = LoraMerge([path], device=device)
        times, _ = timed(lambda: merge(dict(sd)), args.runs, 1, device)

        def bare():
            out = dict(sd)
            for key, w in sd.items():
                stem = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
                up = lora[stem + ".lora_up.weight"].to(device)
                down = lora[stem + ".lora_down.weight"].to(device)
                merged = w.to(device, torch.float32) + (up @ down) * 0.5
                out[key] = merged.to("cpu", torch.bfloat16)
            return out

        peer, _ = timed(bare, args.runs, 1, device)
    params = sum(t.numel() for t in sd.values()) / 1e9
    print(
        f"{args.model} x{cfg.num_layers} blocks ({params:.2f}B merged parameters, {len(sd)} weights), "
        f"rank {args.rank}, {device}: LoraMerge median {statistics.median(times):.2f} s, "
        f"bare loop median {statistics.median(peer):.2f} s ({args.runs} runs after 1 warm-up)"
    )


if __name__ == "__main__":
    main()
