"""Attention through PyTorch's ``scaled_dot_product_attention`` (names ``sdpa``, ``torch``).

Works on every device PyTorch supports, forward and backward. Without ``k_lens`` PyTorch is free
to pick its fastest kernel (flash / memory-efficient on CUDA); with ``k_lens`` a boolean key mask
``[B, 1, 1, Lk]`` is passed, which the memory-efficient kernel supports.
"""

from __future__ import annotations

from wan_kernel import hookimpl
from wan_kernel.interfaces import AttentionBackend, Availability
from wan_kernel.machine import installed_torch_version


class SdpaAttention(AttentionBackend):
    name = "sdpa"
    aliases = ("torch",)
    description = "torch.nn.functional.scaled_dot_product_attention (any device, trains)"
    supports_backward = True

    def availability(self) -> Availability:
        # Judged from the installed distribution, without importing torch (`wan plugins` stays fast).
        version = installed_torch_version()
        if version is None:
            return Availability.no("torch is not installed; pip install torch")
        if version < (2, 0):
            return Availability.no(
                f"torch {version[0]}.{version[1]} has no scaled_dot_product_attention; install torch>=2.0"
            )
        return Availability.yes()

    def __call__(self, q, k, v, k_lens=None):
        # the models' own default (imported here: it needs torch), so the plugin and a model built
        # without a plugin compute the same thing by the same code
        from wan_kernel.models.attention import sdpa_attention

        return sdpa_attention(q, k, v, k_lens)


@hookimpl
def wan_register_attention(register):
    register(SdpaAttention())
