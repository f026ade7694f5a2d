"""Test helpers shared by the kernel's tests and by plugins' tests (including third parties').

``wan_kernel.testing.attention`` holds the attention conformance suite; the pytest plugin
``wan_kernel.testing.pytest_plugin`` (registered through ``pytest11``) exposes its fixtures.
"""
