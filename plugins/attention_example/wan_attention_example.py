"""An example third-party attention backend for wan: exact softmax attention in plain PyTorch.

Copy this folder to start a backend of your own: rename the distribution (``wan-attention-<you>``),
the module, the entry point and the class, put your kernel in ``__call__``, say in
``availability()`` what it needs, and keep the conformance test.
"""

from __future__ import annotations

import importlib.util
import math

from wan_kernel import hookimpl
from wan_kernel.interfaces import AttentionBackend, Availability


class ExampleAttention(AttentionBackend):
    """Masked softmax attention with two matmuls in float32 (exact, trainable, any device)."""

    name = "example"
    aliases = ("example_math",)
    description = "plain PyTorch matmul attention (the third-party plugin template)"
    install_hint = "pip install torch"
    supports_backward = True

    def availability(self) -> Availability:
        # Probe without importing anything heavy: `wan plugins` calls this for every backend.
        if importlib.util.find_spec("torch") is None:
            return Availability.no("torch is not installed")
        return Availability.yes()

    def __call__(self, q, k, v, k_lens=None):
        import torch  # heavy libraries are imported on first use, never at import time

        d = q.shape[-1]
        lk = k.shape[1]
        qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        logits = qf @ kf.transpose(-1, -2) / math.sqrt(d)  # [B, H, Lq, Lk]
        if k_lens is not None:
            keep = torch.arange(lk, device=q.device)[None, :] < k_lens.to(q.device)[:, None]  # [B, Lk]
            logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = logits.softmax(dim=-1) @ vf  # [B, H, Lq, D]
        return out.transpose(1, 2).to(q.dtype)  # [B, Lq, H, D]


@hookimpl
def wan_register_attention(register):
    register(ExampleAttention())
