"""Whether the models of one run fit each other, checked where they meet.

The DiT takes the T5's hidden states (``text_dim`` wide) and, for image-to-video, CLIP features
(``1280`` wide). A T5 or CLIP of another width would fail deep inside a Linear with a tensor
shape; :func:`check_compatible` says instead which model does not fit which, in the widths.
"""

from __future__ import annotations

from wan_kernel.errors import WeightsError
from wan_kernel.models.dit_config import IMAGE_DIM


def check_compatible(
    *,
    dit_text_dim: int | None = None,
    text_width: int | None = None,
    image_width: int | None = None,
    dit_image_dim: int = IMAGE_DIM,
    t5: str = "this T5",
    clip: str = "this CLIP",
    dit: str = "this DiT",
) -> None:
    """Raise a :class:`WeightsError` when the text encoder's or image encoder's output width is not
    what the DiT takes. Widths left ``None`` are not checked.

    :param dit_text_dim: the DiT's ``text_dim`` (``text_embedding.0`` input width).
    :param text_width: the text encoder's hidden size (its embeddings' last dimension).
    :param image_width: the CLIP features' last dimension.
    :param dit_image_dim: what the DiT's image projection (``img_emb``) takes.
    :param t5, clip, dit: how to name the models in the message (e.g. their files).
    """
    if dit_text_dim is not None and text_width is not None and int(text_width) != int(dit_text_dim):
        raise WeightsError(
            f"{t5} does not fit {dit} (text width {text_width} vs {dit_text_dim}): the DiT was trained "
            "with another text encoder; pass the T5 that belongs to this DiT "
            "(umt5-xxl, 4096 wide, for Wan2.1)"
        )
    if image_width is not None and int(image_width) != int(dit_image_dim):
        raise WeightsError(
            f"{clip} does not fit {dit} (image feature width {image_width} vs {dit_image_dim}): pass the "
            "CLIP that belongs to this DiT (open-clip xlm-roberta-large ViT-H/14 for Wan2.1)"
        )
