"""pytest plugin (entry point ``pytest11``) giving plugin authors the kernel's shared checks.

Fixtures:

- ``attention_conformance``: a function ``(backend, **kwargs)`` that runs the attention
  conformance suite and fails the test with every case out of tolerance.
- ``cuda_device``: ``"cuda"``, or skips the test with the reason when no CUDA GPU is present.
- ``reference_fixtures``: the folder of the official golden tensors (skips when it is absent).

Marker ``cuda``: tests marked ``@pytest.mark.cuda`` skip with a reason on machines without CUDA.
"""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped on machines without one)")


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU; this machine has none"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            reason = reason or _cuda_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def cuda_device() -> str:
    reason = _cuda_reason()
    if reason:
        pytest.skip(reason)
    return "cuda"


@pytest.fixture
def attention_conformance():
    from wan_kernel.testing.attention import check_attention_backend

    return check_attention_backend


@pytest.fixture(scope="session")
def reference_fixtures():
    """The reference fixtures folder (:data:`wan_kernel.testing.REFERENCE_FIXTURES`); skips without it."""
    from wan_kernel.testing import REFERENCE_FIXTURES

    if not REFERENCE_FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE_FIXTURES}")
    return REFERENCE_FIXTURES
