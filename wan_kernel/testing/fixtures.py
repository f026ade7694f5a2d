"""Where the reference fixtures live: golden tensors from the official Wan2.1 code (tiny configs,
random weights), shared by the kernel's and the plugins' tests.

``WAN_REFERENCE_FIXTURES`` overrides the location; the default is the checkout's sibling
``shared/fixtures/wan21_reference`` (``<repo>/../shared/...``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]

REFERENCE_FIXTURES: Path = Path(
    os.environ.get("WAN_REFERENCE_FIXTURES") or _REPO.parent / "shared" / "fixtures" / "wan21_reference"
)
"""The folder of reference cases (``dit_t2v/``, ``t5/``, ``vae/``, ...)."""


def reference_case(name: str) -> Path:
    """The folder of one reference case (``REFERENCE_FIXTURES / name``)."""
    return REFERENCE_FIXTURES / name


def read_reference_case(case: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reference case's ``case.json`` (settings, tolerances) and ``case.safetensors`` (inputs and
    expected outputs, as tensors); ``case`` is a name under :data:`REFERENCE_FIXTURES` or a folder."""
    import json

    from safetensors.torch import load_file

    folder = reference_case(case) if isinstance(case, str) else Path(case)
    return json.loads((folder / "case.json").read_text()), load_file(str(folder / "case.safetensors"))


def skip_without_fixtures():
    """A pytest ``skipif`` marker for modules that need the reference fixtures."""
    import pytest

    return pytest.mark.skipif(
        not REFERENCE_FIXTURES.is_dir(), reason=f"reference fixtures not found at {REFERENCE_FIXTURES}"
    )
