"""LoRA training for the Wan2.1 DiT (``wan run train``).

- :mod:`~wan_kernel.training.network`: the trainable LoRA (kohya layout, the seed's targets);
- :mod:`~wan_kernel.training.flow_matching`: the objective and the model's timestep input;
- :mod:`~wan_kernel.training.data`: the cached latents and text embeddings, batched by bucket;
- :mod:`~wan_kernel.training.optim`: optimizers and LR schedules by the seed's names;
- :mod:`~wan_kernel.training.checkpoint`: LoRA files and resumable state folders, written atomically;
- :mod:`~wan_kernel.training.trainer`: the loop on ``accelerate`` (:func:`train`).

Submodules import torch; this package module does not import them eagerly.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "wan_kernel.training.config",
    "train": "wan_kernel.training.trainer",
    "Trainer": "wan_kernel.training.trainer",
    "TrainResult": "wan_kernel.training.trainer",
    "TrainingStopped": "wan_kernel.training.trainer",
    "LoraNetwork": "wan_kernel.training.network",
    "NetworkConfig": "wan_kernel.training.network",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wan_kernel.training' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
