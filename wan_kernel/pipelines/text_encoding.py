"""Stage: encode prompts with the T5 text encoder."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from wan_kernel.models.t5 import encode_prompts


def encode_texts(t5, tokenizer, texts: Iterable[str], *, device: torch.device) -> dict[str, torch.Tensor]:
    """T5 embeddings of every distinct text: ``{text: [L, text_dim] float32 on the CPU}``.

    Each text is encoded on its own (real tokens only, as :func:`encode_prompts` returns them), so a
    text's embedding does not depend on which others share the run.
    """
    embeddings: dict[str, torch.Tensor] = {}
    for text in dict.fromkeys(texts):
        embeddings[text] = encode_prompts(t5, tokenizer, [text], device=device)[0].float().cpu()
    return embeddings


__all__ = ["encode_texts"]
