"""wan_kernel: the Wan2.1 models, loaders, samplers and pipelines, plus the plugin hook specs.

Importing this package is cheap: it does not import torch. Heavy modules (``wan_kernel.models``,
``wan_kernel.sampling``) import torch when they are imported themselves.
"""

import pluggy

__version__ = "0.1.0"

PROJECT_NAME = "wan_kernel"
"""The pluggy project name, and the entry-point group every plugin registers under."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker for plugin hook implementations: ``@hookimpl def wan_register_attention(register): ...``."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

__all__ = ["__version__", "PROJECT_NAME", "hookimpl", "hookspec"]
