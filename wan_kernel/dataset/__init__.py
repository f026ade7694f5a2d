"""The training data: the dataset TOML, buckets, frame extraction, media reading, cache files.

Public API (the trainer reads caches through these):

- :func:`load_dataset_config` -> :class:`DatasetGroupConfig` (``.datasets``: :class:`DatasetConfig`
  with ``cache_directory``, ``batch_size``, ``num_repeats``, ``is_video``, ``enable_bucket``,
  ``resolution`` (W, H), ...);
- :class:`BucketSelector` / :func:`resize_to_bucket` (``wan_kernel.dataset.buckets``);
- :func:`extract_clips`, :class:`FpsResampler` (``wan_kernel.dataset.frames``);
- :mod:`wan_kernel.dataset.cache_files`: cache names, tensor names, readers and writers;
- :mod:`wan_kernel.dataset.items`: sources, captions and the items a source yields.
"""

from wan_kernel.dataset.buckets import BucketSelector, resize_to_bucket
from wan_kernel.dataset.config import DatasetConfig, DatasetGroupConfig, load_dataset_config
from wan_kernel.dataset.frames import FpsResampler, extract_clips

__all__ = [
    "BucketSelector",
    "DatasetConfig",
    "DatasetGroupConfig",
    "FpsResampler",
    "extract_clips",
    "load_dataset_config",
    "resize_to_bucket",
]
