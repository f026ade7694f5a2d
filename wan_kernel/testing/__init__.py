"""Test helpers shared by the kernel's tests and by plugins' tests (including third parties').

- :data:`REFERENCE_FIXTURES` (and :func:`reference_case`, :func:`read_reference_case`,
  :func:`skip_without_fixtures`): the golden tensors of the official Wan2.1 code.
- :func:`randomize_weights`: non-trivial random weights for any module.
- :func:`plugin_or_skip`: a plugin implementation by concern and name, or skip the test.
- ``wan_kernel.testing.attention``: the attention conformance suite.

The pytest plugin ``wan_kernel.testing.pytest_plugin`` (registered through ``pytest11``) exposes
these as fixtures. Importing this package does not import torch.
"""

from __future__ import annotations

from typing import Any

from wan_kernel.testing.fixtures import (
    REFERENCE_FIXTURES,
    read_reference_case,
    reference_case,
    skip_without_fixtures,
)
from wan_kernel.testing.plugins import plugin_or_skip


def randomize_weights(*args: Any, **kwargs: Any):
    """See :func:`wan_kernel.testing.weights.randomize_weights` (imported on first use: it needs torch)."""
    from wan_kernel.testing.weights import randomize_weights as randomize

    return randomize(*args, **kwargs)


__all__ = [
    "REFERENCE_FIXTURES",
    "plugin_or_skip",
    "randomize_weights",
    "read_reference_case",
    "reference_case",
    "skip_without_fixtures",
]
