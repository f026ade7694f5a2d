"""Where a pipeline gets its models: a :class:`ModelSource`.

:class:`FileModels` loads the user's weight files (``--dit --vae --t5 --clip``; the DiT file is
read once, for its config and then for its weights); :class:`PrebuiltDiT` serves a DiT module that
is already built (the model being trained, for samples during training) and takes the other models
from another source; ``wan_kernel.demo.DemoModels`` builds tiny ones; tests inject their own.

Sources receive resolved plugin objects (an attention callable, a ``Quantizer``), never names.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch

from wan_kernel.errors import InputError, WeightsError


@attrs.frozen
class ModelInfo:
    """What the pipeline needs to know about the DiT before loading it (to pick the task)."""

    model_type: str
    dim: int
    num_layers: int
    description: str
    text_dim: int | None = None
    """Width of the text context the DiT takes (checked against the T5's output)."""
    head_dim: int | None = None
    """Attention head size (the attention plugin is probed with it at set-up)."""


class DiTSource(Protocol):
    """Anything :func:`~wan_kernel.pipelines.dit_builder.build_dit` can build a DiT from: every
    :class:`ModelSource`, and :class:`ReadDiT` (training needs only the DiT)."""

    def load_dit(
        self, *, device: torch.device, dtype: torch.dtype | None, attention, quant, state_dict_transform=None
    ) -> torch.nn.Module: ...


class ReadDiT:
    """A DiT file already read with :func:`~wan_kernel.models.dit_loading.read_dit` (its config
    inspected first, e.g. training's check of the caches against it), loaded once by ``load_dit``:
    the file is not read again.

    :param dit_file: the :class:`~wan_kernel.models.dit_loading.DiTFile`.
    :param task: the task the file must fit (``load_dit``'s ``task``), or ``None``.
    """

    def __init__(self, dit_file, *, task: str | None = None):
        self._dit_file = dit_file
        self.task = task

    def load_dit(self, *, device, dtype, attention, quant, state_dict_transform=None):
        from wan_kernel.models.dit_loading import load_dit

        if self._dit_file is None:
            raise RuntimeError("ReadDiT.load_dit was called twice: its file is loaded once")
        dit_file, self._dit_file = self._dit_file, None  # its (maybe memory-mapped) tensors go with it
        return load_dit(
            dit_file,
            device=device,
            dtype=dtype,
            quant=quant,
            attention=attention,
            task=self.task,
            state_dict_transform=state_dict_transform,
        )


class ModelSource(abc.ABC):
    """Where the pipeline gets its models. Each ``load_*`` builds a fresh model (the pipeline
    frees it after its stage unless it keeps models loaded).

    ``shares_dit`` is true for a source whose DiT belongs to someone else (:class:`PrebuiltDiT`):
    the pipeline then uses it as it is (no quantization, LoRA merge, offload or compile).
    """

    name: str = "models"
    shares_dit: bool = False

    @abc.abstractmethod
    def dit_info(self) -> ModelInfo: ...

    @abc.abstractmethod
    def load_dit(
        self, *, device: torch.device, dtype: torch.dtype | None, attention, quant, state_dict_transform=None
    ) -> torch.nn.Module:
        """The DiT. ``state_dict_transform`` (passed only when LoRAs are asked for) runs on its
        official-layout state dict before quantization, as ``load_dit``'s."""

    @abc.abstractmethod
    def load_vae(self, *, device: torch.device, dtype: torch.dtype | None, cache_device: str | None): ...

    @abc.abstractmethod
    def load_text_encoder(self, *, device: torch.device, dtype: torch.dtype | None, quant) -> tuple[Any, Any]:
        """``(t5, tokenizer)``."""

    @abc.abstractmethod
    def load_clip(self, *, device: torch.device, dtype: torch.dtype | None, attention) -> Any: ...

    def check(self, *, needs_dit: bool, needs_t5: bool, needs_vae: bool, needs_clip: bool) -> None:
        """Raise a clear error now when something a stage will need is missing."""

    def metadata(self) -> dict[str, Any]:
        return {}


def _missing(option: str, what: str, why: str) -> WeightsError:
    return WeightsError(f"{why} needs the {what}: pass {option} PATH")


class FileModels(ModelSource):
    """Models loaded from the paths of a :class:`~wan_kernel.pipelines.config.GenerateConfig`."""

    name = "files"

    def __init__(self, config):
        self.config = config
        self._dit_file = None  # read by dit_info(), consumed by load_dit(): the file is read once
        self._info: ModelInfo | None = None

    def check(self, *, needs_dit: bool, needs_t5: bool, needs_vae: bool, needs_clip: bool) -> None:
        cfg = self.config
        wanted = [
            (needs_dit, cfg.dit, "--dit", "the DiT (diffusion model) weights", "generating"),
            (needs_t5, cfg.t5, "--t5", "the T5 text encoder weights", "encoding the prompt"),
            (needs_vae, cfg.vae, "--vae", "the VAE weights", "decoding and image conditioning"),
            (needs_clip, cfg.clip, "--clip", "the CLIP image encoder weights", "image-to-video"),
        ]
        for needed, path, option, what, why in wanted:
            if not needed:
                continue
            if not path:
                raise _missing(option, what, why)
            if not Path(path).expanduser().exists():
                raise WeightsError(f"{option} {path}: file not found ({what})")

    def _read_dit(self):
        from wan_kernel.models.dit_loading import read_dit

        try:  # memory-mapped where the format allows: nothing is copied until load_dit
            return read_dit(self.config.dit, num_heads=self.config.num_heads)
        except WeightsError as exc:
            raise WeightsError(f"--dit {exc}") from None

    def dit_info(self) -> ModelInfo:
        if self._info is None:
            self._dit_file = self._read_dit()
            config = self._dit_file.config
            self._info = ModelInfo(
                config.model_type,
                config.dim,
                config.num_layers,
                config.describe(),
                text_dim=config.text_dim,
                head_dim=config.head_dim,
            )
        return self._info

    def load_dit(self, *, device, dtype, attention, quant, state_dict_transform=None):
        from wan_kernel.models.dit_loading import load_dit

        dit_file, self._dit_file = self._dit_file, None
        return load_dit(
            dit_file if dit_file is not None else self._read_dit(),
            device=device,
            dtype=dtype,
            quant=quant,
            attention=attention,
            state_dict_transform=state_dict_transform,
        )

    def load_vae(self, *, device, dtype, cache_device):
        from wan_kernel.models.vae_loading import load_vae

        vae = load_vae(self.config.vae, device=device, dtype=dtype)
        if cache_device is not None:
            vae.cache_device = cache_device
        return vae

    def load_text_encoder(self, *, device, dtype, quant):
        from wan_kernel.models.t5 import load_t5
        from wan_kernel.models.tokenizer import DEFAULT_TOKENIZER, load_tokenizer

        tokenizer = load_tokenizer(self.config.t5_tokenizer or DEFAULT_TOKENIZER)
        # quantized while loading (built on meta): never the full-precision encoder and its fp8 copy at once
        t5 = load_t5(self.config.t5, device=device, dtype=dtype, quant=quant)
        return t5, tokenizer

    def load_clip(self, *, device, dtype, attention):
        from wan_kernel.models.clip import load_clip_vision

        return load_clip_vision(self.config.clip, device=device, dtype=dtype, attention=attention)

    def metadata(self) -> dict[str, Any]:
        cfg = self.config
        return {
            k: Path(v).name
            for k, v in (("dit", cfg.dit), ("vae", cfg.vae), ("t5", cfg.t5), ("clip", cfg.clip))
            if v
        }


class PrebuiltDiT(ModelSource):
    """A source whose DiT is an already-built module (e.g. the model being trained, for samples
    during training); the T5, VAE and CLIP come from ``others`` (default: the config's files).

    The module is used as it is and never freed by the pipeline: a quantizer, LoRA weights,
    offload or compile given for the run are refused (apply them to the module yourself).

    :param dit: a :class:`~wan_kernel.models.dit.WanDiT` (anything with ``.config``, a
        :class:`~wan_kernel.models.dit_config.DiTConfig`, and the DiT's call signature).
    :param others: where the other models come from.
    :param description: how messages name the module.
    """

    name = "prebuilt"
    shares_dit = True

    def __init__(self, dit: torch.nn.Module, others: ModelSource, *, description: str = "the given DiT"):
        self.dit = dit
        self.others = others
        self.description = description

    def dit_info(self) -> ModelInfo:
        config = self.dit.config
        return ModelInfo(
            config.model_type,
            config.dim,
            config.num_layers,
            f"{self.description}: {config.describe()}",
            text_dim=config.text_dim,
            head_dim=config.head_dim,
        )

    def load_dit(self, *, device, dtype, attention, quant, state_dict_transform=None):
        if quant is not None:
            raise InputError(f"{self.description} is already built: it cannot be quantized while loading")
        if state_dict_transform is not None:
            raise InputError(
                f"{self.description} is already built: LoRA files are merged while a DiT is loaded, "
                "so pass them to whatever built it"
            )
        return self.dit

    def load_vae(self, *, device, dtype, cache_device):
        return self.others.load_vae(device=device, dtype=dtype, cache_device=cache_device)

    def load_text_encoder(self, *, device, dtype, quant):
        return self.others.load_text_encoder(device=device, dtype=dtype, quant=quant)

    def load_clip(self, *, device, dtype, attention):
        return self.others.load_clip(device=device, dtype=dtype, attention=attention)

    def check(self, *, needs_dit: bool, needs_t5: bool, needs_vae: bool, needs_clip: bool) -> None:
        self.others.check(needs_dit=False, needs_t5=needs_t5, needs_vae=needs_vae, needs_clip=needs_clip)

    def metadata(self) -> dict[str, Any]:
        return {**self.others.metadata(), "dit": self.description}


def quantize_module(model: torch.nn.Module, quantizer, *, target: str, device) -> torch.nn.Module:
    """Quantize a loaded model in place with a resolved ``Quantizer`` (used by the demo's models)."""
    state = model.state_dict()
    model = quantizer.convert_for_runtime(model, target=target)
    state = quantizer.quantize_state_dict(state, target=target, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    return model


__all__ = ["DiTSource", "FileModels", "ModelInfo", "ModelSource", "PrebuiltDiT", "ReadDiT", "quantize_module"]
