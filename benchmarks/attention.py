"""Attention backends at Wan's shapes: throughput and error against an fp32 reference.

Every installed attention backend that is available here is run (``sdpa`` always is) on the
attention calls Wan makes: self-attention over the video tokens and cross-attention to the 512
text tokens, for the 1.3B model (12 heads, 832x480x81 -> 32,760 tokens) and the 14B model (40
heads, 1280x720x81 -> 75,600 tokens), head dim 128, bf16. Each call is warmed up, then timed
several times; the table shows medians and TFLOP/s = 4 * B * H * Lq * Lk * D / time. The error is
the largest absolute difference from attention computed in fp32 (no TF32), chunked over heads and
query rows so it fits in memory, from the same bf16 inputs.

On a machine without CUDA a tiny shape is run on the CPU so the script finishes in seconds.

    python benchmarks/attention.py                     # every available backend, Wan shapes
    python benchmarks/attention.py --backends sdpa,flash2 --runs 10 --json attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import attrs
import torch

from wan_kernel.plugins import PluginManager


@attrs.frozen
class Shape:
    name: str
    batch: int
    q_len: int
    k_len: int
    heads: int
    head_dim: int = 128

    @property
    def flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.q_len * self.k_len * self.head_dim


WAN_SHAPES = [
    Shape("1.3B self 480p", 1, 32_760, 32_760, 12),
    Shape("1.3B cross text", 1, 32_760, 512, 12),
    Shape("14B self 720p", 1, 75_600, 75_600, 40),
    Shape("14B cross text", 1, 75_600, 512, 40),
]
CPU_SHAPES = [
    Shape("tiny self", 1, 1024, 1024, 2),
    Shape("tiny cross text", 1, 1024, 512, 2),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@contextmanager
def exact_fp32_matmul():
    """Matmuls in true fp32 (no TF32) for the reference, restoring the setting afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def reference_fp32(q, k, v, *, rows: torch.Tensor | None = None, chunk_elements: int = 1 << 28):
    """Softmax attention in fp32 for the query rows ``rows`` (all when ``None``): ``[B, R, H, D]``.

    One head and ``chunk_elements / Lk`` query rows at a time, so the logits never take more than
    ``chunk_elements`` floats (1 GiB by default).
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    if rows is not None:
        q = q[:, rows]  # [B, R, H, D]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    step = max(1, chunk_elements // lk)
    scale = 1.0 / math.sqrt(d)
    with exact_fp32_matmul():
        for bi in range(b):
            for hi in range(h):
                kh = k[bi, :, hi].float()  # [Lk, D]
                vh = v[bi, :, hi].float()
                for start in range(0, q.shape[1], step):
                    qc = q[bi, start : start + step, hi].float()  # [R_chunk, D]
                    weights = torch.softmax((qc @ kh.T) * scale, dim=-1)  # [R_chunk, Lk]
                    out[bi, start : start + step, hi] = weights @ vh
    return out


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, *, warmup: int, runs: int) -> list[float]:
    """Seconds per call for ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def select_backends(manager: PluginManager, wanted: list[str] | None):
    """``(runnable [(name, impl)], skipped [(name, reason)])`` among the installed backends."""
    entries = manager.implementations("attention")
    if wanted:
        entries = [manager.lookup("attention", name) for name in wanted]
    runnable, skipped = [], []
    for entry in entries:
        verdict = entry.availability()
        if verdict.ok:
            runnable.append((entry.name, entry.impl))
        else:
            skipped.append((entry.name, verdict.reason))
    return runnable, skipped


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    shapes = WAN_SHAPES if device.type == "cuda" and not args.tiny else CPU_SHAPES
    backends, skipped = select_backends(PluginManager(), args.backends.split(",") if args.backends else None)
    records = []
    for shape in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        q_shape = (shape.batch, shape.q_len, shape.heads, shape.head_dim)  # [B, Lq, H, D]
        k_shape = (shape.batch, shape.k_len, shape.heads, shape.head_dim)  # [B, Lk, H, D]
        q, k, v = (
            torch.randn(s, generator=g, device=device, dtype=dtype) for s in (q_shape, k_shape, k_shape)
        )
        rows = None
        if args.error_rows and args.error_rows < shape.q_len:
            rows = torch.linspace(0, shape.q_len - 1, args.error_rows, device=device).round().long()
        expected = reference_fp32(q, k, v, rows=rows)
        for name, backend in backends:
            record = {"backend": name, "case": attrs.asdict(shape), "dtype": args.dtype}
            try:
                with torch.inference_mode():
                    out = backend(q, k, v)
                    got = out if rows is None else out[:, rows]
                    record["max_abs_error"] = float((got.float() - expected).abs().max())
                    del out, got
                    times = time_call(lambda: backend(q, k, v), device, warmup=args.warmup, runs=args.runs)
                median = statistics.median(times)
                record.update(median_ms=median * 1e3, tflops=shape.flops / median / 1e12, runs=len(times))
            except torch.cuda.OutOfMemoryError:
                record["error"] = "out of memory"
            except Exception as exc:  # report and go on with the other backends
                record["error"] = f"{type(exc).__name__}: {exc}"
            records.append(record)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del q, k, v, expected
    return {
        "device": describe_device(device),
        "torch": torch.__version__,
        "warmup": args.warmup,
        "runs": args.runs,
        "error_rows": args.error_rows or "all",
        "records": records,
        "skipped": [{"backend": n, "reason": r} for n, r in skipped],
    }


def print_table(result: dict, out=sys.stdout) -> None:
    print(
        f"device: {result['device']}  torch {result['torch']}  warm-up {result['warmup']}, "
        f"median of {result['runs']} runs; error rows: {result['error_rows']}",
        file=out,
    )
    header = (
        f"{'backend':<10} {'case':<17} {'B':>2} {'Lq':>7} {'Lk':>7} {'H':>3} {'D':>4} {'dtype':<5} "
        f"{'median ms':>10} {'TFLOP/s':>8} {'max err':>9}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in result["records"]:
        c = r["case"]
        head = (
            f"{r['backend']:<10} {c['name']:<17} {c['batch']:>2} {c['q_len']:>7} {c['k_len']:>7} "
            f"{c['heads']:>3} {c['head_dim']:>4} {r['dtype']:<5}"
        )
        if "error" in r:
            print(f"{head} failed: {r['error']}", file=out)
        else:
            print(f"{head} {r['median_ms']:>10.3f} {r['tflops']:>8.2f} {r['max_abs_error']:>9.2e}", file=out)
    for s in result["skipped"]:
        print(f"not run: {s['backend']}: {s['reason']}", file=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", help="comma-separated names (default: every installed backend)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--error-rows", type=int, default=0,
                        help="compare this many evenly spaced query rows with the reference (0: all rows)")
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU shapes, on any device")
    parser.add_argument("--json", help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
