"""Plugin implementations for tests, obtained the public way (``wan_kernel.plugins.resolve``).

Kernel tests that need an implementation (the fp8 quantizer, an attention backend) ask for it by
concern and name instead of importing a plugin package, so they keep testing the kernel and skip
cleanly where that plugin is not installed (or not usable on this machine).
"""

from __future__ import annotations

from typing import Any


def plugin_or_skip(concern: str, name: str) -> Any:
    """``wan_kernel.plugins.resolve(concern, name)``, or skip the calling test when no installed
    plugin provides it or it is unavailable here. A plugin that fails to load is still an error."""
    import pytest

    from wan_kernel.errors import PluginUnavailableError, UnknownPluginError
    from wan_kernel.plugins import resolve

    try:
        return resolve(concern, name)
    except (UnknownPluginError, PluginUnavailableError) as error:
        pytest.skip(f"{concern} {name!r} is not usable here: {error}")
