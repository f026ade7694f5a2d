"""SageAttention backend (name ``sageattn``): 8-bit attention for inference.

``sageattention.sageattn`` quantizes Q and K to int8 (and, on sm89/sm90/sm120 with
SageAttention 2, P and V to fp8), so it is faster than the 16-bit kernels and a little less
exact; the conformance tests use looser tolerances for it. It has no backward pass: calling it
with tensors that require gradients raises ``PluginUnavailableError`` (the training path should
pick a backend whose ``supports_backward`` is true).

The kernel takes no mask and no per-sample key lengths. When ``k_lens`` pads some sample's keys
the batch is run one sample at a time with that sample's keys cut to ``k_lens[b]`` (so the mask is
honoured exactly, never dropped); when nothing is padded the whole batch goes in one call.

fp32 inputs are cast to bf16 and the result back. Head dims 64, 96 and 128 are supported (Wan's
is 128). SageAttention is imported when the backend is selected or first called, never when the
plugin is discovered (``wan_kernel.attention_kernels.KernelAttention`` does the lazy import, the
availability verdict and the input checks). The per-sample loop is plain torch, tested on CPU
with a stand-in kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from wan_kernel import hookimpl
from wan_kernel.attention_inputs import key_lengths
from wan_kernel.attention_kernels import KernelAttention
from wan_kernel.errors import PluginUnavailableError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

DISTRIBUTION = "wan-attention-sage"
HEAD_DIMS = (64, 96, 128)
SAGE2_ARCHITECTURES = ((8, 0), (8, 6), (8, 9), (9, 0), (12, 0))
"""The compute capabilities SageAttention 2's ``sageattn`` dispatches to a kernel for."""

SageKernel = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]
"""``kernel(q, k, v) -> out`` without a mask; ``q`` ``[B, Lq, H, D]``, ``k``/``v`` ``[B, Lk, H, D]``."""


# --------------------------------------------------------------------------------------------
# Pure-torch masking by slicing (no sageattention needed)
# --------------------------------------------------------------------------------------------


def per_sample_attention(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    k_lens: "torch.Tensor | None",
    *,
    kernel: SageKernel,
) -> "torch.Tensor":
    """Masked attention through a mask-less ``kernel``; ``[B, Lq, H, D]`` out.

    No padding: one batched call. Padding: one call per sample ``b`` on
    ``q[b]`` and ``k[b, :k_lens[b]]``, ``v[b, :k_lens[b]]``.
    """
    import torch

    lengths = key_lengths(k_lens, q.shape[0], k.shape[1])
    if lengths is None:
        return kernel(q, k, v)  # [B, Lq, H, D]
    outs = [kernel(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n]) for i, n in enumerate(lengths)]
    return torch.cat(outs)  # [B, Lq, H, D]


def check_inference_only(q: "torch.Tensor", k: "torch.Tensor", v: "torch.Tensor") -> None:
    """SageAttention has no backward: refuse tensors that would need one."""
    import torch

    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise PluginUnavailableError(
            "attention",
            SageAttention.name,
            "SageAttention has no backward pass, so it cannot be used for training (it got tensors that "
            "require gradients); use sdpa, xformers, flash2 or flash3 for training",
            DISTRIBUTION,
        )


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class SageAttention(KernelAttention):
    name = "sageattn"
    description = "SageAttention 8-bit kernels (CUDA sm80+, inference only; pip install sageattention)"
    install_hint = (
        "on a CUDA machine: pip install sageattention (1.x, Triton kernels), or build SageAttention 2 "
        "from the thu-ml/SageAttention repository for its faster CUDA kernels"
    )
    supports_backward = False
    module_name = "sageattention"
    distribution = DISTRIBUTION

    def capability_problem(self, capability, *, version=None):
        """SageAttention 2 (``version`` 2+) has kernels for sm80, sm86, sm89, sm90 and sm120 only;
        1.x (Triton) needs sm80 or newer."""
        major, minor = capability
        if tuple(capability) < (8, 0):
            return (
                f"SageAttention needs an Ampere or newer GPU (compute capability 8.0+), this one is "
                f"sm{major}{minor}; use the xformers or sdpa backend"
            )
        if version is not None and _major(version) >= 2 and tuple(capability) not in SAGE2_ARCHITECTURES:
            listed = ", ".join(f"sm{a}{b}" for a, b in SAGE2_ARCHITECTURES)
            return (
                f"SageAttention {version} has kernels for {listed} only, this GPU is sm{major}{minor}; "
                "use the flash2, xformers or sdpa backend"
            )
        return None

    def head_dim_problem(self, head_dim):
        if head_dim not in HEAD_DIMS:
            return (
                f"supports head dims {', '.join(map(str, HEAD_DIMS))}; got {head_dim}. "
                "Use the sdpa or flash2 attention backend for this model"
            )
        return None

    def check_call(self, q, k, v):
        check_inference_only(q, k, v)

    def load_kernel(self) -> SageKernel:
        """Import SageAttention and wrap ``sageattn`` (layout ``NHD`` = ``[B, L, H, D]``)."""
        from sageattention import sageattn

        def kernel(q, k, v):
            return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

        return kernel

    def attend(self, q, k, v, k_lens, *, kernel):
        return per_sample_attention(q, k, v, k_lens, kernel=kernel)


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


@hookimpl
def wan_register_attention(register):
    register(SageAttention())
