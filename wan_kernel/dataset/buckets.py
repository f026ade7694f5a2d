"""Aspect-ratio buckets and the resize that fits an image into one (the seed's ``BucketSelector``).

- With ``enable_bucket``: the buckets keep the area ``W * H`` of ``resolution`` in 16-pixel steps:
  for ``w`` from ``floor16(sqrt(area) / 2)`` to ``sqrt(area)`` (step 16), ``(w, floor16(area / w))``
  and its transpose. An image goes to the bucket of the nearest aspect ratio; with
  ``bucket_no_upscale`` an image no larger than the area keeps its own size floored to 16 px.
- Without: one bucket, ``resolution`` itself.
- Resize: scale to cover the bucket (the larger of the two ratios, rounded), Lanczos when
  enlarging, area averaging when shrinking, then a centre crop. The same for videos (the seed
  ignores ``enable_bucket`` for videos; here it is honoured).
"""

from __future__ import annotations

import math

import attrs
import numpy as np

BUCKET_STEP = 16


def floor_to(value: int, step: int = BUCKET_STEP) -> int:
    return int(value) - int(value) % step


def _bucket_table(resolution: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    area = resolution[0] * resolution[1]
    sqrt_size = int(math.sqrt(area))
    start = max(BUCKET_STEP, floor_to(sqrt_size // 2))
    buckets = set()
    for w in range(start, sqrt_size + BUCKET_STEP, BUCKET_STEP):
        h = floor_to(area // w)
        buckets.add((w, h))
        buckets.add((h, w))
    return tuple(sorted(b for b in buckets if b[0] > 0 and b[1] > 0))


@attrs.frozen
class BucketSelector:
    """Chooses the ``(width, height)`` bucket of a media size."""

    resolution: tuple[int, int]
    enable_bucket: bool = False
    no_upscale: bool = False
    buckets: tuple[tuple[int, int], ...] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        table = _bucket_table(self.resolution) if self.enable_bucket else (tuple(self.resolution),)
        object.__setattr__(self, "buckets", table)

    @classmethod
    def for_dataset(cls, dataset) -> BucketSelector:
        """The selector of a :class:`~wan_kernel.dataset.config.DatasetConfig`."""
        return cls(tuple(dataset.resolution), dataset.enable_bucket, dataset.bucket_no_upscale)

    @property
    def area(self) -> int:
        return self.resolution[0] * self.resolution[1]

    def bucket(self, width: int, height: int) -> tuple[int, int]:
        """The bucket of a ``width x height`` image; ``(0, ...)`` sizes mean "too small" (< 16 px)."""
        if self.enable_bucket and self.no_upscale and width * height <= self.area:
            return floor_to(width), floor_to(height)
        aspect = width / height
        errors = [abs(w / h - aspect) for w, h in self.buckets]
        return self.buckets[int(np.argmin(errors))]


def resize_to_bucket(image: np.ndarray, bucket: tuple[int, int]) -> np.ndarray:
    """``uint8`` ``[H, W, 3]`` -> ``[bucket_h, bucket_w, 3]``: scale to cover, then centre crop."""
    from PIL import Image

    height, width = image.shape[:2]
    bucket_w, bucket_h = bucket
    if (width, height) == (bucket_w, bucket_h):
        return image
    if bucket_w != width and bucket_h != height:
        scale = max(bucket_w / width, bucket_h / height)
        width, height = int(width * scale + 0.5), int(height * scale + 0.5)
        # Lanczos to enlarge; BOX (area averaging, as cv2.INTER_AREA) to shrink
        resample = Image.LANCZOS if scale > 1 else Image.BOX
        image = np.asarray(Image.fromarray(image).resize((width, height), resample))
    left = (width - bucket_w) // 2
    top = (height - bucket_h) // 2
    return np.ascontiguousarray(image[top : top + bucket_h, left : left + bucket_w])
