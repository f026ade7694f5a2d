"""The models' default attention: PyTorch's ``scaled_dot_product_attention`` in Wan's layout.

Loaders use it when no attention implementation is handed to them (``attention=None``); the
pipelines hand them the implementation the user picked, resolved from the attention plugins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None = None
) -> torch.Tensor:
    """``q`` ``[B, Lq, H, D]``, ``k``/``v`` ``[B, Lk, H, D]`` -> ``[B, Lq, H, D]`` in ``q``'s dtype.

    Keys at index >= ``k_lens[b]`` are ignored for sample ``b`` (a boolean mask ``[B, 1, 1, Lk]``).
    """
    mask = None
    if k_lens is not None:
        k_lens = k_lens.to(device=q.device)
        keep = torch.arange(k.shape[1], device=q.device)[None, :] < k_lens[:, None]  # [B, Lk]
        if not bool(keep.all()):
            mask = keep[:, None, None, :]  # [B, 1, 1, Lk], broadcast over heads and queries
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # [B, H, Lq, D]
    return out.transpose(1, 2).to(q.dtype)  # [B, Lq, H, D]
