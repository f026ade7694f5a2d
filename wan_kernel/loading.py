"""The public weight loaders of ``CONTRACT.md``, which accept plugin names.

The contract's ``load_dit(path, quant="fp8_scaled")`` takes a quantization plugin's *name*. The
model loaders in :mod:`wan_kernel.models` take resolved objects only (models never look plugins up),
so the names ``wan_kernel.models.load_dit`` and ``wan_kernel.models.load_t5`` point here: a name is
resolved once through the plugin manager and checked against the model it is for, then the
models' own loader runs with the object. Objects and ``None`` pass straight through.
"""

from __future__ import annotations

import functools
from typing import Any

from wan_kernel.models import dit_loading, t5


def _resolved(quant: Any, target: str) -> Any:
    if isinstance(quant, str):
        from wan_kernel.pipelines.plugin_setup import resolve_quantizer

        return resolve_quantizer(quant, target=target)
    return quant


@functools.wraps(dit_loading.load_dit)
def load_dit(path, *, quant: Any = None, **kwargs: Any):
    return dit_loading.load_dit(path, quant=_resolved(quant, "dit"), **kwargs)


@functools.wraps(t5.load_t5)
def load_t5(path, *, quant: Any = None, **kwargs: Any):
    return t5.load_t5(path, quant=_resolved(quant, "t5"), **kwargs)


_NAME_NOTE = (
    "\n\n    Through ``wan_kernel.models`` (this wrapper), ``quant`` may also be a quantization plugin's"
    " name (``\"fp8\"``, ``\"fp8_scaled\"``, ...), resolved through the installed plugins.\n"
)
load_dit.__doc__ = (dit_loading.load_dit.__doc__ or "") + _NAME_NOTE
load_t5.__doc__ = (t5.load_t5.__doc__ or "") + _NAME_NOTE
