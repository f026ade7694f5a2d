"""The built-in demo: tiny Wan2.1-shaped models with fixed pseudo-random weights.

``wan run generate --preset demo --prompt "..."`` runs the whole generation pipeline (byte
tokenizer -> T5 -> DiT denoising loop with classifier-free guidance -> VAE decode -> mp4) on
models built here from configs: no files, no downloads, a few seconds on a small CPU. The models
are the real architectures at toy sizes with *untrained* weights (a fixed seed), so the video is
structured noise: the point is to check an install end to end, not to make pictures.

To generate for real, point the same command at the released weights::

    wan run generate --task t2v-1.3B --dit wan2.1_t2v_1.3B_bf16.safetensors \\
        --vae wan_2.1_vae.safetensors --t5 models_t5_umt5-xxl-enc-bf16.pth --prompt "..."
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from wan_kernel.errors import InputError
from wan_kernel.models.dit_config import DiTConfig
from wan_kernel.models.t5 import T5Spec
from wan_kernel.models.vae import VAEConfig
from wan_kernel.pipelines.model_sources import ModelInfo, ModelSource, quantize_module
from wan_kernel.testing.weights import randomize_weights

DEMO_SEED = 20250225
"""Seed of the demo weights (the same models on every machine and run)."""

DEMO_DIT = DiTConfig(
    model_type="t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_dim=16, out_dim=16, text_dim=32
)
DEMO_T5 = T5Spec(vocab=258, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2, num_buckets=32)
DEMO_VAE = VAEConfig(dim=8)
DEMO_TOKENIZER = "builtin:bytes"


@attrs.frozen
class DemoSettings:
    """What ``--preset demo`` sets unless the command line says otherwise (``(height, width)``)."""

    video_size: tuple[int, int] = (64, 64)
    frames: int = 17
    steps: int = 8
    flow_shift: float = 5.0
    guidance_scale: float = 5.0
    fps: int = 16
    seed: int = 42


DEMO_SETTINGS = DemoSettings()

NOTICE = (
    "demo: tiny UNTRAINED smoke-test models (built in, fixed random weights) - the video is noise by design; "
    "it checks that the pipeline runs end to end.\n"
    "      For real videos pass the Wan2.1 weights, e.g.: wan run generate --task t2v-1.3B "
    "--dit wan2.1_t2v_1.3B_bf16.safetensors --vae wan_2.1_vae.safetensors "
    '--t5 models_t5_umt5-xxl-enc-bf16.pth --prompt "..."'
)


def _generator(offset: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(DEMO_SEED + offset)


def build_demo_dit(attention, *, device: str | torch.device = "cpu") -> nn.Module:
    """The demo DiT (:data:`DEMO_DIT`) with fixed weights, using ``attention`` (an attention backend)."""
    from wan_kernel.models.dit import WanDiT

    with torch.device("meta"):
        dit = WanDiT(DEMO_DIT, attention=attention)
    dit = dit.to_empty(device="cpu")
    randomize_weights(dit, generator=_generator(1))
    return dit.to(device).eval().requires_grad_(False)


def build_demo_t5(*, device: str | torch.device = "cpu") -> nn.Module:
    """The demo umt5 encoder (:data:`DEMO_T5`, for the ``builtin:bytes`` tokenizer) with fixed weights."""
    from transformers import UMT5EncoderModel

    config = DEMO_T5.to_config()
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model = model.to_empty(device="cpu")
    randomize_weights(model, generator=_generator(2))
    model.encoder.embed_tokens.weight = model.shared.weight  # tied, as in the real encoder
    return model.to(device).eval().requires_grad_(False)


def build_demo_vae(*, device: str | torch.device = "cpu", cache_device: str | None = None):
    """The demo VAE (the real structure at ``dim=8``) wrapped like ``load_vae``'s result."""
    from wan_kernel.models.vae import WanVAE, WanVAEModel

    with torch.device("meta"):
        model = WanVAEModel(DEMO_VAE)
    model = model.to_empty(device="cpu")
    randomize_weights(model, generator=_generator(3))
    model = model.to(device).eval().requires_grad_(False)
    return WanVAE(model, cache_device=cache_device)


class DemoModels(ModelSource):
    """The demo's :class:`~wan_kernel.pipelines.model_sources.ModelSource`: models built from
    :data:`DEMO_DIT` / :data:`DEMO_T5` / :data:`DEMO_VAE` with fixed weights (no files)."""

    name = "demo"

    def dit_info(self) -> ModelInfo:
        return ModelInfo(
            DEMO_DIT.model_type,
            DEMO_DIT.dim,
            DEMO_DIT.num_layers,
            "the built-in tiny demo DiT",
            text_dim=DEMO_DIT.text_dim,
            head_dim=DEMO_DIT.head_dim,
        )

    def load_dit(self, *, device, dtype, attention, quant, state_dict_transform=None):
        dit = build_demo_dit(attention, device=device)
        if state_dict_transform is not None:  # e.g. LoRAs merged into the float32 weights
            dit.load_state_dict(state_dict_transform(dict(dit.state_dict())))
        if dtype is not None and dtype != torch.float32:
            for name, param in dit.named_parameters():  # the modulation tables stay float32
                if not name.endswith("modulation"):
                    param.data = param.data.to(dtype)
        if quant is not None:
            dit = quantize_module(dit, quant, target="dit", device=device)
        return dit

    def load_vae(self, *, device, dtype, cache_device):
        vae = build_demo_vae(device=device, cache_device=cache_device)
        if dtype is not None:
            vae.model.to(dtype)
        return vae

    def load_text_encoder(self, *, device, dtype, quant):
        from wan_kernel.models.tokenizer import load_tokenizer

        t5 = build_demo_t5(device=device)
        if quant is not None:
            t5 = quantize_module(t5, quant, target="t5", device=device)
        return t5, load_tokenizer(DEMO_TOKENIZER)

    def load_clip(self, *, device, dtype, attention):
        raise InputError("the demo model is text-to-video; it takes no image")

    def metadata(self) -> dict:
        return {"dit": "builtin:demo", "vae": "builtin:demo", "t5": "builtin:demo"}
