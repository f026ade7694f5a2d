"""Cheap facts about this machine that plugins' ``availability()`` can use without importing torch.

``wan plugins`` and discovery must stay fast (importing torch costs about a second), so a plugin
first rules itself out with these probes and imports torch only when they cannot decide.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

GPU_DEVICE_FILES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
"""Files a GPU driver creates: NVIDIA's, and ROCm's ``/dev/kfd`` (torch.cuda also covers ROCm)."""


def installed_torch_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the installed torch distribution, or ``None`` when it is absent."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def gpu_driver_present() -> bool:
    """Whether a GPU driver is visible. ``False`` means torch cannot see a CUDA device either;
    ``True`` still needs ``torch.cuda.is_available()`` to confirm."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return any(Path(path).exists() for path in GPU_DEVICE_FILES)
