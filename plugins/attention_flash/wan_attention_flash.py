"""FlashAttention backends: ``flash2`` (alias ``flash``) and ``flash3``.

Both call the library's *varlen* kernel, which takes the whole batch as one packed sequence per
tensor plus ``cu_seqlens`` (cumulative lengths, int32 ``[B + 1]``) saying where each sample
starts. Queries are never masked, so every sample keeps all ``Lq`` query rows
(``cu_seqlens_q = [0, Lq, 2 Lq, ...]``); keys are packed down to their first ``k_lens[b]`` rows
(``cu_seqlens_k`` from ``k_lens``), so masked keys are never read. Without padding the packing
is a free reshape.

- ``flash2``: ``flash_attn.flash_attn_varlen_func`` (FlashAttention-2, ``pip install flash-attn``),
  Ampere or newer (sm80+), forward and backward.
- ``flash3``: ``flash_attn_interface.flash_attn_varlen_func`` (FlashAttention-3, built from the
  ``hopper/`` folder of the flash-attention repository), Hopper (sm90) only, forward and backward.

The kernels take fp16/bf16 only: fp32 inputs are cast to bf16 and the result back to fp32. Head
dims must be multiples of 8 up to 256. The library is imported when the backend is selected or
first called, never when the plugin is discovered (``wan_kernel.attention_kernels.KernelAttention``
does the lazy import, the availability verdict and the input checks).

The packing helpers (``cu_seqlens``, ``pack_varlen``, ``varlen_attention``) are plain torch so
they are tested on CPU with a stand-in kernel.
"""

from __future__ import annotations

import importlib
import itertools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

from wan_kernel import hookimpl
from wan_kernel.attention_inputs import key_lengths
from wan_kernel.attention_kernels import KernelAttention

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

DISTRIBUTION = "wan-attention-flash"
MAX_HEAD_DIM = 256

VarlenKernel = Callable[..., "torch.Tensor"]
"""``kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> out``.

``q`` is ``[Tq, H, D]``, ``k``/``v`` are ``[Tk, H, D]`` (samples packed one after the other),
``cu_seqlens_*`` int32 ``[B + 1]``, ``max_seqlen_*`` Python ints; ``out`` is ``[Tq, H, D]``.
"""


# --------------------------------------------------------------------------------------------
# Pure-torch packing (no flash-attn needed)
# --------------------------------------------------------------------------------------------


def cu_seqlens(lengths: Sequence[int], device: Any = "cpu") -> "torch.Tensor":
    """Cumulative lengths ``[0, n0, n0 + n1, ...]``, int32 ``[B + 1]``, as varlen kernels take them."""
    import torch

    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


class VarlenBatch(NamedTuple):
    """A batch packed for a varlen kernel."""

    q: "torch.Tensor"  # [B * Lq, H, D]
    k: "torch.Tensor"  # [sum(k_lens), H, D]
    v: "torch.Tensor"  # [sum(k_lens), H, D]
    cu_seqlens_q: "torch.Tensor"  # [B + 1] int32
    cu_seqlens_k: "torch.Tensor"  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int


def pack_varlen(
    q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", lengths: Sequence[int] | None
) -> VarlenBatch:
    """Pack ``q`` ``[B, Lq, H, D]`` whole and ``k``/``v`` ``[B, Lk, H, D]`` cut to ``lengths``.

    ``lengths`` is the output of :func:`key_lengths` (``None``: every key is used, and the keys
    are reshaped without a copy).
    """
    import torch

    b, lq, h, d = q.shape
    lk = k.shape[1]
    q_packed = q.reshape(b * lq, h, d)  # [B * Lq, H, D]
    if lengths is None:
        lengths = [lk] * b
        k_packed = k.reshape(b * lk, h, d)  # [B * Lk, H, D]
        v_packed = v.reshape(b * lk, h, d)
    else:
        k_packed = torch.cat([k[i, :n] for i, n in enumerate(lengths)])  # [sum(k_lens), H, D]
        v_packed = torch.cat([v[i, :n] for i, n in enumerate(lengths)])
    return VarlenBatch(
        q=q_packed,
        k=k_packed,
        v=v_packed,
        cu_seqlens_q=cu_seqlens([lq] * b, q.device),
        cu_seqlens_k=cu_seqlens(lengths, q.device),
        max_seqlen_q=lq,
        max_seqlen_k=max(lengths),
    )


def varlen_attention(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    k_lens: "torch.Tensor | None",
    *,
    kernel: VarlenKernel,
) -> "torch.Tensor":
    """Attention in Wan's layout through a varlen ``kernel``; ``[B, Lq, H, D]`` out, ``q``'s dtype."""
    b, lq, h, d = q.shape
    batch = pack_varlen(q, k, v, key_lengths(k_lens, b, k.shape[1]))
    out = kernel(
        batch.q, batch.k, batch.v,
        batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k,
    )  # [B * Lq, H, D]
    return out.reshape(b, lq, h, d)


# --------------------------------------------------------------------------------------------
# The backends
# --------------------------------------------------------------------------------------------


class _FlashVarlenAttention(KernelAttention):
    """Shared body of ``flash2`` and ``flash3``; subclasses say which module and which GPUs."""

    supports_backward = True
    distribution = DISTRIBUTION

    def head_dim_problem(self, head_dim):
        if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
            return (
                f"supports head dims that are multiples of 8 up to {MAX_HEAD_DIM}; got {head_dim}. "
                "Use the sdpa attention backend for this model"
            )
        return None

    def load_kernel(self) -> VarlenKernel:
        """Import the library and return its varlen function wrapped as a :data:`VarlenKernel`."""
        function = importlib.import_module(self.module_name).flash_attn_varlen_func

        def kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
            out = function(
                q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale=q.shape[-1] ** -0.5, causal=False,
            )
            # FlashAttention-3 builds before mid-2025 return (out, softmax_lse)
            return out[0] if isinstance(out, tuple) else out

        return kernel

    def attend(self, q, k, v, k_lens, *, kernel):
        return varlen_attention(q, k, v, k_lens, kernel=kernel)


class FlashAttention2(_FlashVarlenAttention):
    name = "flash2"
    aliases = ("flash",)
    description = "FlashAttention-2 varlen kernels (CUDA sm80+, trains; pip install flash-attn)"
    install_hint = "on a CUDA machine: pip install flash-attn --no-build-isolation"
    module_name = "flash_attn"
    library = "flash-attn (FlashAttention-2)"

    def capability_problem(self, capability, *, version=None):
        if tuple(capability) < (8, 0):
            major, minor = capability
            return (
                f"FlashAttention-2 needs an Ampere or newer GPU (compute capability 8.0+), this one is "
                f"sm{major}{minor}; use the xformers or sdpa backend"
            )
        return None


class FlashAttention3(_FlashVarlenAttention):
    name = "flash3"
    description = "FlashAttention-3 varlen kernels (Hopper sm90 only, trains; build flash-attention/hopper)"
    install_hint = (
        "build FlashAttention-3 on the Hopper machine: "
        "clone the Dao-AILab/flash-attention repository, then "
        "cd flash-attention/hopper && python setup.py install"
    )
    module_name = "flash_attn_interface"
    library = "FlashAttention-3"

    def capability_problem(self, capability, *, version=None):
        if tuple(capability)[0] != 9:
            major, minor = capability
            return (
                f"FlashAttention-3 runs on Hopper GPUs only (H100/H800, compute capability 9.0), this one is "
                f"sm{major}{minor}; use flash2 instead"
            )
        return None


@hookimpl
def wan_register_attention(register):
    register(FlashAttention2())
    register(FlashAttention3())
