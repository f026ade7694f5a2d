"""Device, dtype and memory helpers of the pipelines: picking the device, the compute dtypes,
freeing memory between stages and measuring each stage's time and peak memory."""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import time
from typing import Iterator

import torch

from wan_kernel.errors import InputError
from wan_kernel.pipelines.config import StageRecord


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown --device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(
            f"--device {name}: this machine has no CUDA GPU (or this torch build has no CUDA); "
            "use --device cpu"
        )
    return device


def resolve_compute_dtype(name: str | None, device: torch.device, option: str) -> torch.dtype:
    """Compute dtype: the option's, else bfloat16 on CUDA (the official param dtype) and float32 elsewhere.

    :param option: the option's name for messages (``dit_dtype``).
    """
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from wan_kernel.models.dit_loading import resolve_dtype

    try:
        return resolve_dtype(name)
    except InputError as exc:
        raise InputError(f"--{option}: {exc}") from None


def peak_rss_bytes() -> int:
    """The process's peak resident memory in bytes (0 where it cannot be read)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) * (1 if sys.platform == "darwin" else 1024)
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return 0


def free_memory(device: torch.device) -> None:
    """Collect garbage and hand cached CUDA blocks back (after a model was dropped)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


@contextlib.contextmanager
def measure_stage(name: str, device: torch.device, records: list[StageRecord]) -> Iterator[StageRecord]:
    """Time a stage and record its peak memory (CUDA max allocated, or process peak RSS on CPU)."""
    record = StageRecord(name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        yield record
    finally:
        if cuda:
            torch.cuda.synchronize(device)
            record.peak_bytes = int(torch.cuda.max_memory_allocated(device))
        else:
            record.peak_bytes = peak_rss_bytes()
        record.seconds = time.perf_counter() - start
        records.append(record)


def stage_summary(records: list[StageRecord], device: torch.device) -> str:
    """Stage timings and peak memory, one line per stage."""
    if not records:
        return "nothing ran"
    what = "peak GPU memory allocated" if device.type == "cuda" else "peak process memory (RSS)"
    lines = [f"{'stage':<16}{'time':>10}   {what}"]
    for record in records:
        lines.append(f"{record.name:<16}{record.seconds:>9.2f}s   {format_bytes(record.peak_bytes)}")
    total = sum(r.seconds for r in records)
    lines.append(f"{'total':<16}{total:>9.2f}s   {format_bytes(max(r.peak_bytes for r in records))}")
    return "\n".join(lines)


def has_c_compiler() -> bool:
    """Whether a C compiler is on the PATH (torch.compile's inductor needs one on the CPU)."""
    return any(shutil.which(cc) for cc in (os.environ.get("CC", ""), "cc", "gcc", "clang") if cc)
