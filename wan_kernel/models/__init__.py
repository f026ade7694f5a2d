"""The Wan2.1 models and their weight loaders (see ``CONTRACT.md``).

- :func:`load_dit` -> the diffusion transformer (t2v / i2v / flf2v, any size), from
  ``wan_kernel.models.dit_loading`` through ``wan_kernel.loading`` (``quant`` may be a plugin name);
- :func:`load_vae` -> the 3-D causal VAE, from ``wan_kernel.models.vae_loading``;
- :func:`load_t5` -> the umt5-xxl text encoder, from ``wan_kernel.models.t5`` through
  ``wan_kernel.loading`` (``quant`` may be a plugin name);
- :func:`load_clip_vision` -> the CLIP ViT-H/14 image tower, from ``wan_kernel.models.clip``.

Each loader takes a ``.safetensors`` file, a folder of shards or a ``.pth``/``.pt`` file,
infers the architecture from tensor names and shapes, and accepts ``device=`` and ``dtype=``.
Names are imported on first use so that ``import wan_kernel.models`` stays cheap.
"""

from __future__ import annotations

from wan_kernel.lazy import lazy_exports

_EXPORTS = {
    # the contract's loaders accept plugin names: wan_kernel.loading resolves them, then calls
    # the models' own loaders with objects (models never import the plugin manager)
    "load_dit": "wan_kernel.loading",
    "load_vae": "wan_kernel.models.vae_loading",
    "load_t5": "wan_kernel.loading",
    "load_clip_vision": "wan_kernel.models.clip",
    "load_tokenizer": "wan_kernel.models.tokenizer",
    "encode_prompts": "wan_kernel.models.t5",
    "vae_state_dict_to": "wan_kernel.models.vae_loading",
    "vae_state_dict_from": "wan_kernel.models.vae_loading",
    "dit_state_dict_to": "wan_kernel.models.dit_keys",
    "dit_state_dict_from": "wan_kernel.models.dit_keys",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
