"""Block swap: peak GPU memory and step time against ``blocks_to_swap``, next to the no-swap step.

For each model (1.3B: 30 blocks, 14B: 40 blocks; random non-trivial weights, built on ``meta``
and filled on the GPU), each video size (default 832x480x81 and 1280x720x81) and each weight
format (bf16, and fp8_scaled when the ``wan-quant-fp8`` plugin is installed), the script times
one DiT step without swap (``N = 0``, the whole model on the GPU; skipped with a note when it does
not fit) and then with block swap for each ``N``; every figure comes from the same run. A step is
a forward (``--mode infer``, under ``no_grad``) or a forward + backward with per-block gradient
checkpointing and trainable modulation tables, a stand-in for LoRA (``--mode train``). Each is
warmed up, then timed several times; the table gives medians, the peak of
``torch.cuda.max_memory_allocated`` over the timed steps (and, as "resident", what is allocated
between steps: the weights on the GPU plus the inputs), the slowdown against ``N = 0``, the
host -> device traffic per step, and the largest difference of the output from the ``N = 0`` one
(block swap only moves weights, so it should be 0).

    python benchmarks/blockswap.py                                    # everything (long)
    python benchmarks/blockswap.py --models 1.3B --sizes 832x480x81 --swap 0,10,20,29
    python benchmarks/blockswap.py --models 14B --sizes 1280x720x81 --formats bf16,fp8_scaled \\
        --swap 0,10,20,30,39 --mode train --json blockswap.json

Without CUDA the script says so and runs a tiny CPU smoke of the same code path (no streams, no
meaningful timings) so that it is exercised in CI.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys

import torch
from _common import latent_grid, random_dit, timed

from wan_kernel.models.dit import WanDiT
from wan_kernel.models.dit_config import PRESETS, DiTConfig
from wan_offload_blockswap import BlockSwapOffloader
from wan_offload_blockswap.runner import move_except_blocks

MODELS = {"1.3B": PRESETS["t2v-1.3B"], "14B": PRESETS["t2v-14B"]}
TINY = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=6, text_dim=32)
DEFAULT_SWAP = {"1.3B": "0,5,10,20,29", "14B": "0,10,20,30,39", "tiny": "0,1,3,5"}
GiB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="1.3B,14B", help="comma list of 1.3B, 14B")
    p.add_argument("--sizes", default="832x480x81,1280x720x81", help="comma list of WxHxF")
    p.add_argument("--formats", default="bf16,fp8_scaled", help="bf16 and/or fp8_scaled")
    p.add_argument("--swap", help="comma list of blocks_to_swap (0 = no swap); default per model")
    p.add_argument("--mode", choices=["infer", "train"], default="infer")
    p.add_argument("--no-pin", action="store_true", help="pageable host memory instead of pinned")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


@torch.no_grad()
def build_model(cfg: DiTConfig, device: torch.device, fmt: str, seed: int) -> WanDiT:
    """A DiT on ``device`` in bf16 (modulation fp32, as ``load_dit`` keeps it) with random weights."""
    model = random_dit(cfg, device, torch.bfloat16, seed)
    if fmt == "fp8_scaled":
        from wan_quant_fp8.checkpoint import quantize_model

        quantize_model(model, "fp8_scaled", target="dit", device=device)
    return model.eval().requires_grad_(False)


def make_inputs(cfg: DiTConfig, grid, device, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed + 1)
    f, h, w = grid
    return {
        "x": torch.randn(1, cfg.in_dim, f, h, w, generator=g, device=device),
        "t": torch.tensor([700.0], device=device),
        "context": [torch.randn(40, cfg.text_dim, generator=g, device=device)],
    }


def step_fn(model: WanDiT, inputs: dict, mode: str):
    if mode == "infer":

        def step():
            with torch.no_grad():
                return model(inputs["x"], inputs["t"], inputs["context"])

    else:
        trainable = [b.modulation for b in model.blocks]

        def step():
            for p in trainable:
                p.grad = None
            out = model(inputs["x"], inputs["t"], inputs["context"])
            out.float().square().mean().backward()
            return out.detach()

    return step


def measure(step, runs: int, warmup: int, device: torch.device) -> dict:
    """Median and peak GPU memory of ``runs`` steps after ``warmup`` (peak from the first timed one)."""
    timed(step, 0, warmup, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, out = timed(step, runs, 0, device)
    peak = torch.cuda.max_memory_allocated(device) if cuda else 0
    return {"median_s": statistics.median(times), "times_s": times, "peak_bytes": peak, "output": out}


def run_case(cfg, cfg_name, size, fmt, swaps, args, device) -> list[dict]:
    grid = latent_grid(size, "--sizes")
    model = build_model(cfg, device, fmt, args.seed)
    if args.mode == "train":
        model.enable_gradient_checkpointing(True)
        for block in model.blocks:
            block.modulation.requires_grad_(True)
    inputs = make_inputs(cfg, grid, device, args.seed)
    step = step_fn(model, inputs, args.mode)
    rows = []
    baseline = reference = None
    for n in swaps:
        row = {"model": cfg_name, "size": size, "format": fmt, "mode": args.mode, "blocks_to_swap": n}
        runner = None
        try:
            if n:
                runner = BlockSwapOffloader().attach(
                    model.blocks,
                    device=device,
                    blocks_to_swap=n,
                    training=args.mode == "train",
                    pin_memory=not args.no_pin,
                    _allow_cpu_for_tests=device.type == "cpu",
                )
                move_except_blocks(model, model.blocks, device)
                runner.prepare()
                model.set_block_runner(runner)
            else:
                model.to(device)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            cuda = device.type == "cuda"
            row["weights_on_device_bytes"] = torch.cuda.memory_allocated(device) if cuda else 0
            copies_before = runner.bytes_copied if runner else 0
            row.update(measure(step, args.runs, args.warmup, device))
            out = row.pop("output")
            if n == 0:
                reference = out
            elif reference is not None:
                row["max_abs_diff_vs_no_swap"] = (out.float() - reference.float()).abs().max().item()
            if runner:
                steps = args.runs + args.warmup
                row["gb_copied_per_step"] = (runner.bytes_copied - copies_before) / 1e9 / steps
                row["late_loads"] = runner.late_loads
            if n == 0:
                baseline = row["median_s"]
            if baseline:
                row["vs_no_swap"] = row["median_s"] / baseline
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of GPU memory"
        finally:
            model.set_block_runner(None)
            if runner is not None:
                runner.release()  # everything back to the host; the next N starts from there
        if n == 0 and "error" in row:
            model.to("cpu")  # the whole model does not fit: the swapped runs start from the host
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print_row(row)
        rows.append(row)
    del model, inputs, step, reference
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


HEADER = f"{'model':>5} {'size':>12} {'format':>10} {'N':>3} {'resident GiB':>12} {'peak GiB':>9} " \
    f"{'step s':>8} {'vs N=0':>7} {'GB/step':>8} {'max|diff|':>9}"


def print_row(row: dict) -> None:
    if "error" in row:
        where = f"{row['model']:>5} {row['size']:>12} {row['format']:>10} {row['blocks_to_swap']:>3}"
        print(f"{where}  {row['error']}")
        return
    vs = f"{row['vs_no_swap']:.2f}x" if "vs_no_swap" in row else "-"
    gb = f"{row.get('gb_copied_per_step', 0.0):.1f}"
    diff = f"{row['max_abs_diff_vs_no_swap']:.1e}" if "max_abs_diff_vs_no_swap" in row else "-"
    print(
        f"{row['model']:>5} {row['size']:>12} {row['format']:>10} {row['blocks_to_swap']:>3} "
        f"{row['weights_on_device_bytes'] / GiB:>12.2f} {row['peak_bytes'] / GiB:>9.2f} "
        f"{row['median_s']:>8.3f} {vs:>7} {gb:>8} {diff:>9}",
        flush=True,
    )


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "blockswap benchmark: block swap needs a CUDA GPU and this machine has none; the figures "
            "need one. Running a tiny CPU smoke of the same code path instead (timings meaningless).",
            flush=True,
        )
        device = torch.device("cpu")
        cases = [("tiny", TINY, "64x64x5", "bf16")]
        args.runs, args.warmup = 1, 0
        swaps_by_model = {"tiny": [int(v) for v in (args.swap or DEFAULT_SWAP["tiny"]).split(",")]}
    else:
        device = torch.device("cuda")
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        if "fp8_scaled" in formats:
            try:
                import wan_quant_fp8  # noqa: F401
            except ImportError:
                print("note: wan-quant-fp8 is not installed; skipping fp8_scaled", flush=True)
                formats.remove("fp8_scaled")
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        for name in names:
            if name not in MODELS:
                sys.exit(f"--models: unknown model {name!r}; known: {', '.join(MODELS)}")
        cases = [(m, MODELS[m], s, f) for m in names for s in args.sizes.split(",") for f in formats]
        swaps_by_model = {m: [int(v) for v in (args.swap or DEFAULT_SWAP[m]).split(",")] for m in names}
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, mode {args.mode}, "
              f"pinned {not args.no_pin}, {args.runs} runs after {args.warmup} warm-up", flush=True)
    print(HEADER, flush=True)
    rows = []
    for name, cfg, size, fmt in cases:
        for n in swaps_by_model[name]:
            if not 0 <= n < cfg.num_layers:
                sys.exit(f"--swap {n}: must be between 0 and {cfg.num_layers - 1} for {name}")
        rows += run_case(cfg, name, size, fmt, swaps_by_model[name], args, device)
    if args.json:
        meta = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
        if device.type == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(device)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
