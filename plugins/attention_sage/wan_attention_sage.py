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
plugin is discovered. The per-sample loop is plain torch, tested on CPU with a stand-in kernel.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import TYPE_CHECKING, Callable, Sequence

from wan_kernel import hookimpl
from wan_kernel.attention_inputs import check_attention_inputs, half_precision, key_lengths
from wan_kernel.errors import InputError, PluginUnavailableError
from wan_kernel.interfaces import AttentionBackend, Availability

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


def check_head_dim(head_dim: int, *, backend: str) -> None:
    if head_dim not in HEAD_DIMS:
        raise InputError(
            f"{backend} attention supports head dims {', '.join(map(str, HEAD_DIMS))}; got {head_dim}. "
            "Use the sdpa or flash2 attention backend for this model"
        )


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class SageAttention(AttentionBackend):
    name = "sageattn"
    description = "SageAttention 8-bit kernels (CUDA sm80+, inference only; pip install sageattention)"
    install_hint = (
        "on a CUDA machine: pip install sageattention (1.x, Triton kernels), or build SageAttention 2 "
        "from the thu-ml/SageAttention repository for its faster CUDA kernels"
    )
    supports_backward = False

    def __init__(self) -> None:
        self._kernel: SageKernel | None = None

    def judge(
        self,
        *,
        library_found: bool,
        cuda_available: bool,
        capability: tuple[int, int] | None,
        version: str | None = None,
    ) -> Availability:
        """The availability verdict from what was probed (a pure function, tested on CPU).

        SageAttention 2 (``version`` 2+) has kernels for sm80, sm86, sm89, sm90 and sm120 only;
        1.x (Triton) needs sm80 or newer.
        """
        problems = []
        if not library_found:
            problems.append(f"sageattention is not installed; {self.install_hint}")
        if not cuda_available:
            problems.append("it needs a CUDA GPU and torch sees none (torch.cuda.is_available() is False)")
        elif capability is not None:
            major, minor = capability
            sage2 = version is not None and _major(version) >= 2
            if tuple(capability) < (8, 0):
                problems.append(
                    f"SageAttention needs an Ampere or newer GPU (compute capability 8.0+), this one is "
                    f"sm{major}{minor}; use the xformers or sdpa backend"
                )
            elif sage2 and tuple(capability) not in SAGE2_ARCHITECTURES:
                listed = ", ".join(f"sm{a}{b}" for a, b in SAGE2_ARCHITECTURES)
                problems.append(
                    f"SageAttention {version} has kernels for {listed} only, this GPU is sm{major}{minor}; "
                    "use the flash2, xformers or sdpa backend"
                )
        return Availability.no("; ".join(problems)) if problems else Availability.yes()

    def availability(self) -> Availability:
        if self._kernel is not None:
            return Availability.yes()
        try:
            found = importlib.util.find_spec("sageattention") is not None
        except (ImportError, ValueError):
            found = False
        if not found:  # say so without importing torch: `wan plugins` stays fast
            return self.judge(library_found=False, cuda_available=True, capability=None)
        import torch

        try:
            version = importlib.metadata.version("sageattention") if found else None
        except importlib.metadata.PackageNotFoundError:
            version = None
        cuda = torch.cuda.is_available()
        capability = tuple(torch.cuda.get_device_capability()) if cuda else None
        verdict = self.judge(library_found=found, cuda_available=cuda, capability=capability, version=version)
        if not verdict.ok:
            return verdict
        try:
            self._kernel = self.load_kernel()
        except Exception as exc:  # a build for another torch/CUDA fails here
            return Availability.no(
                f"sageattention is installed but fails to import ({type(exc).__name__}: {exc}); reinstall it "
                f"for torch {torch.__version__} ({self.install_hint})"
            )
        return verdict

    def load_kernel(self) -> SageKernel:
        """Import SageAttention and wrap ``sageattn`` (layout ``NHD`` = ``[B, L, H, D]``)."""
        from sageattention import sageattn

        def kernel(q, k, v):
            return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

        return kernel

    def kernel(self) -> SageKernel:
        """The loaded kernel; raises ``PluginUnavailableError`` saying what to install when it cannot run."""
        if self._kernel is None:
            verdict = self.availability()
            if not verdict.ok:
                raise PluginUnavailableError("attention", self.name, verdict.reason, DISTRIBUTION)
        assert self._kernel is not None
        return self._kernel

    def __call__(self, q, k, v, k_lens=None):
        """Attention of ``q`` ``[B, Lq, H, D]`` over ``k``/``v`` ``[B, Lk, H, D]`` (CUDA tensors).

        Returns ``[B, Lq, H, D]`` in ``q``'s dtype; keys at index ``>= k_lens[b]`` get no weight.
        """
        check_inference_only(q, k, v)
        check_attention_inputs(q, k, v, backend=self.name)
        check_head_dim(q.shape[-1], backend=self.name)
        kernel = self.kernel()
        qh, kh, vh = half_precision(q, k, v)
        return per_sample_attention(qh, kh, vh, k_lens, kernel=kernel).to(q.dtype)


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


@hookimpl
def wan_register_attention(register):
    register(SageAttention())
