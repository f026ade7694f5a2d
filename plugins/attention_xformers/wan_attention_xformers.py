"""Attention through xformers' ``memory_efficient_attention`` (name ``xformers``).

xformers takes Wan's ``[B, L, H, D]`` layout as it is. Without key padding the batch goes to the
kernel in one call with no mask. With padding (``k_lens[b] < Lk`` for some sample) the batch is
packed into a single sequence of batch size 1: the queries of every sample one after the other
(``B * Lq`` rows, never masked) and the keys/values cut to their first ``k_lens[b]`` rows, and a
``BlockDiagonalMask.from_seqlens(q_seqlen=[Lq] * B, kv_seqlen=k_lens)`` lets each sample's
queries see only its own valid keys. Forward and backward, on any CUDA GPU xformers supports.

fp32 inputs are cast to bf16 (like the other fused backends; Wan runs in bf16) and the result
back to fp32. xformers is imported when the backend is selected or first called, never when the
plugin is discovered (``wan_kernel.attention_kernels.KernelAttention`` does the lazy import, the
availability verdict and the input checks). The packing helpers are plain torch, tested on CPU
with a stand-in kernel.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable, Sequence

from wan_kernel import hookimpl
from wan_kernel.attention_inputs import key_lengths
from wan_kernel.attention_kernels import KernelAttention

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

DISTRIBUTION = "wan-attention-xformers"

BlockDiagonalKernel = Callable[..., "torch.Tensor"]
"""``kernel(q, k, v, q_seqlen, kv_seqlen) -> out``, tensors ``[B, L, H, D]``.

With ``q_seqlen``/``kv_seqlen`` ``None`` it is plain batched attention; with two lists of ints the
batch size is 1 and the sequences are packed: query block ``i`` (``q_seqlen[i]`` rows) attends
only to key block ``i`` (``kv_seqlen[i]`` rows).
"""


# --------------------------------------------------------------------------------------------
# Pure-torch packing (no xformers needed)
# --------------------------------------------------------------------------------------------


def pack_block_diagonal(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor", lengths: Sequence[int]):
    """Pack a padded batch into one sequence: ``(q1, k1, v1, q_seqlen, kv_seqlen)``.

    ``q1`` is ``[1, B * Lq, H, D]`` (every query row), ``k1``/``v1`` are ``[1, sum(lengths), H, D]``
    (each sample's first ``lengths[b]`` keys), ``q_seqlen = [Lq] * B``, ``kv_seqlen = lengths``.
    """
    import torch

    b, lq, h, d = q.shape
    q1 = q.reshape(1, b * lq, h, d)  # [1, B * Lq, H, D]
    k1 = torch.cat([k[i, :n] for i, n in enumerate(lengths)])[None]  # [1, sum(k_lens), H, D]
    v1 = torch.cat([v[i, :n] for i, n in enumerate(lengths)])[None]
    return q1, k1, v1, [lq] * b, list(lengths)


def block_diagonal_attention(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    k_lens: "torch.Tensor | None",
    *,
    kernel: BlockDiagonalKernel,
) -> "torch.Tensor":
    """Attention in Wan's layout through ``kernel``; ``[B, Lq, H, D]`` out, in the kernel's dtype."""
    b, lq, h, d = q.shape
    lengths = key_lengths(k_lens, b, k.shape[1])
    if lengths is None:
        return kernel(q, k, v, None, None)  # [B, Lq, H, D], nothing masked
    q1, k1, v1, q_seqlen, kv_seqlen = pack_block_diagonal(q, k, v, lengths)
    out = kernel(q1, k1, v1, q_seqlen, kv_seqlen)  # [1, B * Lq, H, D]
    return out.reshape(b, lq, h, d)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class XformersAttention(KernelAttention):
    name = "xformers"
    description = "xformers memory_efficient_attention (CUDA, trains; pip install xformers)"
    install_hint = (
        "on a CUDA machine: pip install xformers from the PyTorch wheel index of your CUDA build "
        "(cu<XY> = your torch's CUDA build, e.g. cu128; the xformers wheel must match your torch version)"
    )
    supports_backward = True
    module_name = "xformers"
    distribution = DISTRIBUTION

    def load_kernel(self) -> BlockDiagonalKernel:
        """Import xformers and wrap ``memory_efficient_attention`` as a :data:`BlockDiagonalKernel`."""
        from xformers.ops import memory_efficient_attention
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        # older xformers build the mask on the CPU and have no device argument
        takes_device = "device" in inspect.signature(BlockDiagonalMask.from_seqlens).parameters

        def kernel(q, k, v, q_seqlen, kv_seqlen):
            bias = None
            if q_seqlen is not None:
                where = {"device": q.device} if takes_device else {}
                bias = BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen, **where)
            return memory_efficient_attention(q, k, v, attn_bias=bias)

        return kernel

    def attend(self, q, k, v, k_lens, *, kernel):
        return block_diagonal_attention(q, k, v, k_lens, kernel=kernel)


@hookimpl
def wan_register_attention(register):
    register(XformersAttention())
