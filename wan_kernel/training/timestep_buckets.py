"""``--num_timestep_buckets B``: stratified uniform numbers for the timestep sampler, per epoch.

As the seed trainer does: for the ``N`` samples one process trains on in an epoch, build
``ceil(N / B)`` uniform numbers in each of the ``B`` strata ``[i / B, (i + 1) / B)``, shuffle them
and hand them out in order, one slice per batch. The timestep sampler maps these ``u`` instead of
drawing its own (``TimestepSampler.sample(..., uniform=u)``), so every stratum of the sampler's
distribution is visited equally often in an epoch.

The numbers are a pure function of ``(seed, epoch, process, batch sizes)``, so a resumed run sees
the very numbers an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

__all__ = ["epoch_uniforms", "stratified_uniforms"]

def stratified_uniforms(n: int, num_buckets: int, generator: torch.Generator) -> torch.Tensor:
    """``ceil(n / num_buckets) * num_buckets`` float32 numbers in ``[0, 1)``, the same count in each
    stratum ``[i / num_buckets, (i + 1) / num_buckets)``, in shuffled order."""
    if num_buckets < 2:
        raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
    per_bucket = math.ceil(n / num_buckets)
    strata = torch.arange(num_buckets, dtype=torch.float64).repeat_interleave(per_bucket)  # [M]
    offsets = torch.rand(strata.numel(), generator=generator, dtype=torch.float64)  # [M]
    u = ((strata + offsets) / num_buckets).to(torch.float32)  # [M]
    # float32 rounding must not move a number up into the next stratum (or to 1)
    upper = ((strata + 1) / num_buckets).to(torch.float32)  # [M]
    u = torch.minimum(u, torch.nextafter(upper, torch.zeros_like(upper)))
    return u[torch.randperm(u.numel(), generator=generator)]


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    digest = hashlib.sha256(f"wan-train-timestep-buckets:{seed}:{epoch}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_uniforms(
    batch_sizes: Sequence[int], num_buckets: int, *, seed: int, epoch: int, rank: int = 0
) -> list[torch.Tensor]:
    """The stratified numbers of one process's epoch, sliced per batch: one float32 ``[b]`` per
    entry ``b`` of ``batch_sizes`` (the batches in the order they are trained)."""
    generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch, rank))
    u = stratified_uniforms(sum(batch_sizes), num_buckets, generator)
    slices, start = [], 0
    for size in batch_sizes:
        slices.append(u[start : start + size])
        start += size
    return slices
