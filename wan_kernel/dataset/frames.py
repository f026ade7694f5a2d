"""Which frames of a video become training clips (the seed's ``frame_extraction`` modes).

``frame_count`` is the number of frames after the optional ``source_fps`` resampling. For each
``T`` in ``target_frames`` (already ``4n + 1``):

- ``head``: one clip ``(0, T)`` when the video has ``T`` frames;
- ``chunk``: back-to-back clips starting at ``0, T, 2T, ...`` that fit;
- ``slide``: clips starting every ``frame_stride`` frames, ``0 .. F - T``;
- ``uniform``: ``frame_sample`` clips with starts spread evenly over ``0 .. F - T`` (``linspace``
  truncated to integers; repeated starts are kept once);
- ``full``: one clip of the whole video, ``min(F, max_frames)`` rounded down to ``4n + 1``
  (``target_frames`` is not used).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from fractions import Fraction

import numpy as np

from wan_kernel.dataset.config import TARGET_FPS


def extract_clips(
    frame_count: int,
    *,
    target_frames: Iterable[int],
    mode: str = "head",
    frame_stride: int = 1,
    frame_sample: int = 1,
    max_frames: int = 129,
) -> list[tuple[int, int]]:
    """``(start, length)`` of every clip of a ``frame_count``-frame video, in the seed's order."""
    clips: list[tuple[int, int]] = []
    if mode == "full":
        length = min(frame_count, max_frames)
        if length >= 1:
            clips.append((0, (length - 1) // 4 * 4 + 1))
        return clips
    for target in target_frames:
        if frame_count < target:
            continue
        if mode == "head":
            starts = [0]
        elif mode == "chunk":
            starts = list(range(0, frame_count - target + 1, target))
        elif mode == "slide":
            starts = list(range(0, frame_count - target + 1, frame_stride))
        elif mode == "uniform":
            starts = list(
                dict.fromkeys(int(s) for s in np.linspace(0, frame_count - target, frame_sample, dtype=int))
            )
        else:
            raise ValueError(f"unknown frame_extraction {mode!r}")
        clips.extend((start, target) for start in starts)
    return clips


def decode_limit(*, target_frames: Iterable[int], mode: str, max_frames: int) -> int | None:
    """How many (resampled) frames must be decoded at most: ``head`` and ``full`` stop early."""
    if mode == "head":
        return max(target_frames)
    if mode == "full":
        return max_frames
    return None


class FpsResampler:
    """Keeps the frames of a ``source_fps`` video that a ``target_fps`` video would show.

    Frame ``i`` is kept when ``floor(i * target / source)`` moves past the last kept index
    (computed exactly, in rationals: a float running sum drifts and keeps a different frame at
    exact boundaries): 30 -> 16 fps keeps frames 0, 2, 4, ..., 14, 15, 17, ...
    """

    def __init__(self, source_fps: float | None, target_fps: float = TARGET_FPS):
        self.ratio = None if source_fps is None else Fraction(target_fps) / Fraction(source_fps)
        self._index = 0
        self._previous = -1

    def keep(self) -> bool:
        """Call once per decoded frame, in order: whether that frame is kept."""
        if self.ratio is None:
            return True
        target = math.floor(self._index * self.ratio)
        self._index += 1
        if target == self._previous:
            return False
        self._previous = target
        return True


def resampled_indices(count: int, source_fps: float | None, target_fps: float = TARGET_FPS) -> list[int]:
    """Indices of the frames of a ``count``-frame video that :class:`FpsResampler` keeps."""
    resampler = FpsResampler(source_fps, target_fps)
    return [i for i in range(count) if resampler.keep()]
