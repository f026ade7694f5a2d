"""The trainable LoRA network for the Wan2.1 DiT (the seed trainer's ``networks.lora_wan``).

Targets: every ``nn.Linear`` inside the transformer blocks, i.e. per block ``self_attn.{q,k,v,o}``,
``cross_attn.{q,k,v,o}``, ``cross_attn.{k_img,v_img}`` (image-to-video models) and ``ffn.0``,
``ffn.2``: 10 modules per block for text-to-video, 12 for image-to-video. ``include_patterns`` /
``exclude_patterns`` (Python regular expressions, **fullmatch** on the official module path such
as ``blocks.3.ffn.0``, as the seed) narrow or widen the choice; an include match overrides an
exclude match.

Names, shapes and initialisation are kohya's: module ``lora_unet_<path with . -> _>`` holding
``lora_down`` ``[r, in]`` (kaiming-uniform, ``a = sqrt(5)``), ``lora_up`` ``[out, r]`` (zeros) and
``alpha`` (a float32 scalar buffer). The forward of a target Linear becomes

    y = W x + multiplier * (alpha / r) * up(dropout(down(x)))

computed in float32 (the LoRA parameters are float32) and added to the base output in the base
output's dtype. ``network_dropout`` drops elements of ``down(x)``; ``rank_dropout`` drops whole
rank channels (kept ones scaled by ``1 / (1 - p)``); ``module_dropout`` skips a module's LoRA for
the whole step with probability ``p``. All three act in training mode only and use torch's global
RNG (saved and restored with the training state).

The base model is never modified: the LoRA is attached with forward hooks (:meth:`LoraNetwork.attach`),
so parameter names, quantized (fp8) Linears and block swapping are untouched, and
:meth:`LoraNetwork.detach` restores the plain model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import attrs
import torch
from torch import nn

from wan_kernel.errors import InputError
from wan_kernel.lora import kohya_name

DEFAULT_EXCLUDE = r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*"
"""The seed's built-in exclusion (never matches inside the blocks' Linears, kept for parity)."""


@attrs.frozen
class NetworkConfig:
    """Shape and regularisation of the trained LoRA (the seed's ``--network_*`` options)."""

    dim: int = 4
    alpha: float = 1.0
    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    include_patterns: tuple[str, ...] = ()
    exclude_patterns: tuple[str, ...] = ()
    loraplus_lr_ratio: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.dim < 1:
            raise InputError(f"--network_dim must be a positive integer, got {self.dim}")
        for what, p in (
            ("network_dropout", self.dropout),
            ("rank_dropout", self.rank_dropout),
            ("module_dropout", self.module_dropout),
        ):
            if p is not None and not 0.0 <= p < 1.0:
                raise InputError(f"{what} must be in [0, 1), got {p}")
        if self.loraplus_lr_ratio is not None and self.loraplus_lr_ratio <= 0:
            raise InputError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")
        for pattern in (*self.include_patterns, *self.exclude_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InputError(f"network_args pattern {pattern!r} is not a regular expression: {exc}")


def target_modules(model: nn.Module, config: NetworkConfig) -> list[tuple[str, nn.Linear]]:
    """The ``(official path, Linear)`` pairs a LoRA is trained on, in model order."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise InputError("the model has no 'blocks': not a Wan DiT")
    excludes = [re.compile(DEFAULT_EXCLUDE), *map(re.compile, config.exclude_patterns)]
    includes = [re.compile(p) for p in config.include_patterns]
    found = []
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if not isinstance(module, nn.Linear):  # also quantized Linears (subclasses)
                continue
            path = f"blocks.{index}.{sub}"
            excluded = any(p.fullmatch(path) for p in excludes)
            included = any(p.fullmatch(path) for p in includes)
            if included or not excluded:
                found.append((path, module))
    if not found:
        raise InputError("no Linear of the DiT is selected for LoRA: check include_patterns/exclude_patterns")
    return found


class LoraModule(nn.Module):
    """``lora_down`` / ``lora_up`` / ``alpha`` for one Linear; :meth:`delta` is the LoRA's output."""

    def __init__(
        self,
        name: str,
        in_features: int,
        out_features: int,
        dim: int,
        alpha: float,
        *,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = name
        self.lora_dim = dim
        self.lora_down = nn.Linear(in_features, dim, bias=False, dtype=torch.float32)
        self.lora_up = nn.Linear(dim, out_features, bias=False, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(dim if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / dim
        self.multiplier = 1.0
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """``multiplier * scale * up(down(x))`` in float32 (``x`` ``[..., in]``); ``None`` if dropped."""
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return None
        h = self.lora_down(x.to(self.lora_down.weight.dtype))  # [..., r]
        scale = self.scale
        if self.training and self.dropout:
            h = nn.functional.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout:
            keep = (
                torch.rand(h.shape[0], *([1] * (h.ndim - 2)), h.shape[-1], device=h.device)
                > self.rank_dropout
            ).to(h.dtype)  # [B, 1.., r]
            h = h * keep
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(h) * (self.multiplier * scale)  # [..., out]


class LoraNetwork(nn.Module):
    """All :class:`LoraModule` s of one DiT, keyed by their kohya names (``lora_unet_...``)."""

    def __init__(
        self,
        model: nn.Module,
        config: NetworkConfig,
        *,
        dims: Mapping[str, int] | None = None,
        alphas: Mapping[str, float] | None = None,
    ):
        """A LoRA on ``model``'s targets; ``dims``/``alphas`` per module (``--dim_from_weights``)."""
        super().__init__()
        self.config = config
        self.loras = nn.ModuleDict()
        self._targets: dict[str, str] = {}
        for path, linear in target_modules(model, config):
            name = kohya_name(path)
            dim = int((dims or {}).get(name, config.dim))
            alpha = (alphas or {}).get(name, config.alpha)
            self.loras[name] = LoraModule(
                name,
                linear.in_features,
                linear.out_features,
                dim,
                alpha,
                dropout=config.dropout,
                rank_dropout=config.rank_dropout,
                module_dropout=config.module_dropout,
            )
            self._targets[name] = path
        self._hooks: list = []

    @property
    def module_paths(self) -> dict[str, str]:
        """kohya name -> official module path."""
        return dict(self._targets)

    # -- attaching to the model -----------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Add each LoRA's output to its Linear's output (forward hooks); idempotent."""
        self.detach()
        modules = dict(model.named_modules())
        for name, path in self._targets.items():
            target = modules.get(path)
            if target is None:
                raise InputError(f"the model has no module {path!r} for LoRA {name}")
            self._hooks.append(target.register_forward_hook(_hook(self.loras[name])))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def set_multiplier(self, multiplier: float) -> None:
        for lora in self.loras.values():
            lora.multiplier = float(multiplier)

    # -- weights --------------------------------------------------------------------------------

    def kohya_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``{name}.lora_down.weight``, ``{name}.lora_up.weight``, ``{name}.alpha`` in ``dtype`` on CPU."""
        out = {}
        for name, lora in self.loras.items():
            out[f"{name}.lora_down.weight"] = lora.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.lora_up.weight"] = lora.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = lora.alpha.detach().to("cpu", dtype)
        return out

    def load_kohya_state_dict(self, sd: Mapping[str, torch.Tensor], *, source: str = "weights") -> list[str]:
        """Copy matching ``lora_down``/``lora_up``/``alpha`` in; returns the file's modules with no target.

        :raises InputError: a module's shapes do not fit, or nothing in ``sd`` matches.
        """
        unmatched, matched = [], 0
        names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
        for name in sorted(names):
            lora = self.loras[name] if name in self.loras else None
            if lora is None:
                unmatched.append(name)
                continue
            down, up = sd.get(f"{name}.lora_down.weight"), sd.get(f"{name}.lora_up.weight")
            if down is None or up is None:
                raise InputError(f"{source}: module {name} lacks lora_down or lora_up")
            if tuple(down.shape) != tuple(lora.lora_down.weight.shape) or tuple(up.shape) != tuple(
                lora.lora_up.weight.shape
            ):
                raise InputError(
                    f"{source}: {name} has down {list(down.shape)} / up {list(up.shape)}, but the network "
                    f"has {list(lora.lora_down.weight.shape)} / {list(lora.lora_up.weight.shape)}; pass "
                    "--dim_from_weights to take the ranks from the file, or the matching --network_dim"
                )
            with torch.no_grad():
                lora.lora_down.weight.copy_(down.float())
                lora.lora_up.weight.copy_(up.float())
                if f"{name}.alpha" in sd:
                    alpha = float(sd[f"{name}.alpha"])
                    lora.alpha.fill_(alpha)
                    lora.scale = alpha / lora.lora_dim
            matched += 1
        if not matched:
            raise InputError(f"{source}: none of its modules is a LoRA target of this DiT")
        return unmatched

    def param_groups(self, learning_rate: float) -> list[dict]:
        """Optimizer groups: all LoRA weights at ``learning_rate``; with LoRA+ the ``lora_up`` ones
        get ``learning_rate * loraplus_lr_ratio``."""
        ratio = self.config.loraplus_lr_ratio
        if not ratio:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": learning_rate}]
        down = [m.lora_down.weight for m in self.loras.values()]
        up = [m.lora_up.weight for m in self.loras.values()]
        return [{"params": down, "lr": learning_rate}, {"params": up, "lr": learning_rate * ratio}]


def _hook(lora: LoraModule):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = lora.delta(args[0])
        if delta is None:
            return output
        return (output.float() + delta).to(output.dtype)

    return hook


def dims_from_weights(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module ranks and alphas of a kohya state dict (``--dim_from_weights``)."""
    dims, alphas = {}, {}
    for key, tensor in sd.items():
        if key.endswith(".lora_down.weight"):
            dims[key[: -len(".lora_down.weight")]] = int(tensor.shape[0])
        elif key.endswith(".alpha"):
            alphas[key[: -len(".alpha")]] = float(tensor)
    return dims, alphas


def parse_network_args(items: Sequence[str] | None) -> dict[str, object]:
    """``["rank_dropout=0.1", "exclude_patterns=[r'.*ffn.*']", "verbose=True"]`` -> a dict.

    Values are Python literals (``ast.literal_eval``, as the seed); a bare word stays a string.
    """
    import ast

    out: dict[str, object] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--network_args takes key=value items, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


NETWORK_ARG_KEYS = (
    "rank_dropout",
    "module_dropout",
    "include_patterns",
    "exclude_patterns",
    "loraplus_lr_ratio",
    "verbose",
)


def network_config_from_args(
    dim: int | None, alpha: float | None, dropout: float | None, network_args: Iterable[str] | None
) -> NetworkConfig:
    """The :class:`NetworkConfig` of the seed's ``--network_dim/_alpha/_dropout/_args`` options."""
    args = parse_network_args(list(network_args or ()))
    unknown = sorted(set(args) - set(NETWORK_ARG_KEYS))
    if unknown:
        hint = (
            " (conv_dim/conv_alpha: the Wan DiT has no convolution inside its blocks)"
            if {"conv_dim", "conv_alpha"} & set(unknown)
            else ""
        )
        raise InputError(
            f"unknown --network_args {', '.join(unknown)}; known: {', '.join(NETWORK_ARG_KEYS)}{hint}"
        )

    def patterns(key: str) -> tuple[str, ...]:
        value = args.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise InputError(f"network_args {key} must be a list of regular expressions, got {value!r}")

    def number(key: str) -> float | None:
        value = args.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"network_args {key} must be a number, got {value!r}")
        return float(value)

    return NetworkConfig(
        dim=4 if dim is None else int(dim),
        alpha=1.0 if alpha is None else float(alpha),
        dropout=dropout,
        rank_dropout=number("rank_dropout"),
        module_dropout=number("module_dropout"),
        include_patterns=patterns("include_patterns"),
        exclude_patterns=patterns("exclude_patterns"),
        loraplus_lr_ratio=number("loraplus_lr_ratio"),
    )
