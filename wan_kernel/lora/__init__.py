"""LoRA files for the Wan2.1 DiT: read and write the layouts Wan tools use, and merge them.

Submodules, one job each:

- :mod:`~wan_kernel.lora.spec`: :class:`LoraSpec`, what to merge (file, strength, patterns);
- :mod:`~wan_kernel.lora.keys`: tensor names -> (module, role) and module names -> official paths;
- :mod:`~wan_kernel.lora.adapters`: :class:`LoraModule`, the weight change of LoRA, LoHa, LoKr,
  DoRA and full-delta modules;
- :mod:`~wan_kernel.lora.formats`: reading files (:func:`read_lora`), writing the kohya, ComfyUI
  and diffusers layouts (:func:`layout_state_dict`, :func:`save_lora_file`), hashes;
- :mod:`~wan_kernel.lora.merge`: :class:`LoraMerge` (the state-dict transform ``load_dit`` runs
  before quantization), :func:`apply_loras` (a built, unquantized model) and
  :func:`~wan_kernel.lora.merge.merge_into_dit` (``wan lora merge --dit``);
- :mod:`~wan_kernel.lora.convert` (``wan lora convert``, ``wan lora merge`` into one LoRA),
  :mod:`~wan_kernel.lora.info`, :mod:`~wan_kernel.lora.resize`, :mod:`~wan_kernel.lora.ema`:
  the other ``wan lora`` commands.

Models never import this package: ``load_dit(path, quant=..., state_dict_transform=LoraMerge(specs))``.
"""

from __future__ import annotations

from wan_kernel.lora.adapters import LoraModule
from wan_kernel.lora.formats import (
    LAYOUTS,
    LoraFile,
    detect_layout,
    factors_state_dict,
    kohya_hashes,
    layout_state_dict,
    parse_lora,
    read_lora,
    save_lora_file,
)
from wan_kernel.lora.keys import kohya_name, official_path
from wan_kernel.lora.merge import LoraMerge, LoraReport, LoraWarning, apply_loras
from wan_kernel.lora.spec import LoraSpec, SpecLike, specs_from_options

__all__ = [
    "LAYOUTS",
    "LoraFile",
    "LoraMerge",
    "LoraModule",
    "LoraReport",
    "LoraSpec",
    "LoraWarning",
    "SpecLike",
    "apply_loras",
    "detect_layout",
    "factors_state_dict",
    "kohya_hashes",
    "kohya_name",
    "layout_state_dict",
    "official_path",
    "parse_lora",
    "read_lora",
    "save_lora_file",
    "specs_from_options",
]
