"""The weight change each kind of LoRA module makes, in float32.

One :class:`LoraModule` holds the tensors a file stores for one target module, by role (see
:mod:`wan_kernel.lora.keys`). The change it makes to a weight ``W [out, in, *k]``:

- LoRA: ``dW = scale * up @ down`` (``down [r, in, *k]``, ``up [out, r, *1]``), ``scale = alpha / r``;
  no alpha means ``alpha = r`` (scale 1), as kohya, ComfyUI and diffusers read it.
- LoHa (LyCORIS, musubi-tuner ``networks.loha``): ``dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r`` with
  ``r = w1b.shape[0]``; with Tucker cores ``hada_t1``/``hada_t2`` each product is
  ``einsum("ijkl,jr,ip->prkl", t, wb, wa)``.
- LoKr (LyCORIS, musubi-tuner ``networks.lokr``): ``dW = kron(w1, w2) * scale`` with ``w1 = lokr_w1``
  or ``lokr_w1_a @ lokr_w1_b``, ``w2 = lokr_w2`` or ``lokr_w2_a @ lokr_w2_b`` (Tucker
  ``lokr_t2``). ``scale = alpha / r`` where ``r`` is the rank of the factorised part (``w2`` first,
  as LyCORIS and ComfyUI); with both parts full, LyCORIS and ComfyUI use scale 1, musubi-tuner
  ``alpha / max(w2.shape)`` (its files carry a ``lokr_factor`` tensor, and we follow the trainer
  that wrote the file).
- ``diff`` adds a full weight delta, ``diff_b`` a bias delta; a PEFT ``lora_B.bias`` adds
  ``scale * bias``.
- DoRA (weight-decomposed) rescales the merged weight ``V = W + dW`` so that its norms equal the
  stored magnitude ``m``: ``W' = m * V / ||V||``. PEFT/diffusers (``lora_magnitude_vector``, ``m [out]``)
  take the norm of each output row (over the input dimension, no epsilon), as
  ``peft.tuners.lora.dora.DoraLinearLayer.get_weight_norm``; LyCORIS/ComfyUI (``dora_scale``) take it
  per output row when ``dora_scale`` is ``[out, 1]`` and per input column (over the output
  dimension) when it is ``[1, in]``, plus ``finfo(float32).eps``. A multiplier ``s`` gives
  ``W + s * (W' - W)`` (ComfyUI's rule; exact at ``s = 1`` for every tool).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch

__all__ = ["LoraModule"]

_LORA = ("down", "up")
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR_W1 = ("lokr_w1", "lokr_w1_a", "lokr_w1_b")
_LOKR_W2 = ("lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS ``rebuild_tucker``: ``[out, in, k...]`` from a core ``[r, r, k...]``, ``wa [r, out]``,
    ``wb [r, in]``."""
    return torch.einsum("ij...,jr,ip->pr...", core, wb, wa)


@attrs.define
class LoraModule:
    """The tensors a LoRA file holds for one module (``name`` as spelled in the file).

    :param tensors: role -> tensor (roles of :data:`wan_kernel.lora.keys.ROLES` but ``alpha``).
    :param alpha: the module's alpha (``None``: none stored).
    :param keys: the file's tensor names of this module (for reports).
    :param musubi_lokr: the file is a musubi-tuner LoKr (full-matrix scale rule, see above).
    """

    name: str
    tensors: dict[str, torch.Tensor] = attrs.Factory(dict)
    alpha: float | None = None
    keys: list[str] = attrs.Factory(list)
    musubi_lokr: bool = False

    def get(self, role: str) -> torch.Tensor | None:
        return self.tensors.get(role)

    @property
    def kind(self) -> str:
        """``lora``, ``loha``, ``lokr`` or ``diff`` (only full deltas)."""
        if "down" in self.tensors:
            return "lora"
        if "hada_w1_a" in self.tensors:
            return "loha"
        if any(r in self.tensors for r in (*_LOKR_W1, *_LOKR_W2)):
            return "lokr"
        return "diff"

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.tensors or "magnitude" in self.tensors

    @property
    def rank(self) -> int | None:
        """The rank the alpha divides (``None`` for full deltas and full-matrix LoKr)."""
        t = self.tensors
        if "down" in t:
            return int(t["down"].shape[0])
        if "hada_w1_b" in t:
            return int(t["hada_w1_b"].shape[0])
        if "lokr_w2_b" in t:
            return int(t["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in t:
            return int(t["lokr_w1_b"].shape[0])
        return None

    @property
    def scale(self) -> float:
        """The factor the product is multiplied by (``alpha / rank``; 1 without an alpha)."""
        if self.alpha is None:
            return 1.0
        rank = self.rank
        if rank is None:
            if self.kind == "lokr" and self.musubi_lokr and "lokr_w2" in self.tensors:
                return self.alpha / max(self.tensors["lokr_w2"].shape)
            return 1.0
        return self.alpha / rank

    def problems(self) -> list[str]:
        """What is missing or inconsistent in the stored tensors (empty when the module is usable)."""
        t = self.tensors
        kind = self.kind
        if kind == "lora":
            if "up" not in t:
                return ["has a down matrix but no up matrix"]
            down, up = t["down"], t["up"]
            if down.dim() < 2 or up.dim() < 2 or up[0].numel() != down.shape[0]:
                return [f"has down {list(down.shape)} and up {list(up.shape)}, whose ranks do not agree"]
        elif "up" in t:
            return ["has an up matrix but no down matrix"]
        if kind == "loha":
            missing = [r for r in _LOHA if r not in t]
            if missing:
                return [f"is a LoHa without {', '.join(missing)}"]
        if kind == "lokr":
            if "lokr_w1" not in t and not {"lokr_w1_a", "lokr_w1_b"} <= t.keys():
                return ["is a LoKr without lokr_w1 (or lokr_w1_a and lokr_w1_b)"]
            if "lokr_w2" not in t and not {"lokr_w2_a", "lokr_w2_b"} <= t.keys():
                return ["is a LoKr without lokr_w2 (or lokr_w2_a and lokr_w2_b)"]
        if kind == "diff" and not ({"diff", "diff_b", "bias"} & t.keys()):
            return ["has no weights (only " + ", ".join(sorted(t) or ["alpha"]) + ")"]
        return []

    # ----------------------------------------------------------------------------------------
    # deltas
    # ----------------------------------------------------------------------------------------

    def product(self, device: torch.device | None = None) -> torch.Tensor | None:
        """The unscaled low-rank product in float32 on ``device`` (default: where the tensors are),
        2-D ``[out, in * k]`` (LoKr: as ``kron`` gives it)."""
        t = {k: v.to(device, torch.float32) for k, v in self.tensors.items()}
        kind = self.kind
        if kind == "lora":
            return t["up"].flatten(1) @ t["down"].flatten(1)
        if kind == "loha":
            if "hada_t1" in t:
                m1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
                m2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
                return (m1 * m2).flatten(1)
            return (t["hada_w1_a"] @ t["hada_w1_b"].flatten(1)) * (t["hada_w2_a"] @ t["hada_w2_b"].flatten(1))
        if kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.dim() > 2:
                w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - 2)))
            return torch.kron(w1, w2)
        return None

    def delta_numel_ok(self, shape: Sequence[int]) -> bool:
        """Whether the delta can be reshaped to a weight of ``shape`` (checked without computing it)."""
        numel = math.prod(shape)
        t = self.tensors
        kind = self.kind
        if kind == "lora":
            return t["up"].shape[0] == shape[0] and t["down"][0].numel() * t["up"].shape[0] == numel
        if kind == "loha":
            if "hada_t1" in t:  # Tucker: w1a [r, out], w1b [r, in], core [r, r, k...]
                out, inner = t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1] * t["hada_t1"][0, 0].numel()
            else:
                out, inner = t["hada_w1_a"].shape[0], t["hada_w1_b"][0].numel()
            return out == shape[0] and out * inner == numel
        if kind == "lokr":
            w1 = t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
            if "lokr_w2" in t:
                w2 = tuple(t["lokr_w2"].shape)
            elif "lokr_t2" in t:
                w2 = (t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1], *t["lokr_t2"].shape[2:])
            else:
                w2 = (t["lokr_w2_a"].shape[0], t["lokr_w2_b"].shape[1])
            return w1[0] * w2[0] == shape[0] and math.prod(w1) * math.prod(w2) == numel
        return "diff" not in t or t["diff"].numel() == numel

    def weight_delta(self, shape: Sequence[int], device: torch.device | None = None) -> torch.Tensor | None:
        """``scale * product + diff`` in float32 on ``device``, shaped like the weight; ``None`` if none."""
        delta = None
        product = self.product(device)
        if product is not None:
            delta = product.reshape(shape) * self.scale
        if "diff" in self.tensors:
            diff = self.tensors["diff"].to(device, torch.float32).reshape(shape)
            delta = diff if delta is None else delta + diff
        return delta

    def bias_delta(self) -> torch.Tensor | None:
        """``diff_b + scale * lora_B.bias`` in float32, or ``None``."""
        delta = None
        if "diff_b" in self.tensors:
            delta = self.tensors["diff_b"].float().flatten()
        if "bias" in self.tensors:
            b = self.tensors["bias"].float().flatten() * self.scale
            delta = b if delta is None else delta + b
        return delta

    def dora_shape_ok(self, shape: Sequence[int]) -> bool:
        if "magnitude" in self.tensors:
            return self.tensors["magnitude"].numel() == shape[0]
        if "dora_scale" in self.tensors:
            n = self.tensors["dora_scale"].numel()
            return n == shape[0] or (
                len(shape) > 1 and n == shape[1] and self.tensors["dora_scale"].shape[0] == 1
            )
        return True

    def merged_weight(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        """``weight`` (float32) with this module merged at strength ``multiplier``, in float32."""
        delta = self.weight_delta(weight.shape, weight.device)
        if not self.is_dora:
            return weight if delta is None else weight.add(delta, alpha=multiplier)
        merged = weight if delta is None else weight + delta  # V = W + dW
        v = merged.reshape(weight.shape[0], -1)  # [out, in * k]
        if "magnitude" in self.tensors:  # PEFT: norm of each output row, over the inputs
            m = self.tensors["magnitude"].to(weight.device, torch.float32).reshape(-1, 1)
            norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
            decomposed = (m / norm) * v
        else:
            m = self.tensors["dora_scale"].to(weight.device, torch.float32)
            if m.numel() == weight.shape[0] and not (m.dim() > 1 and m.shape[0] == 1 and m.shape[1] != 1):
                norm = torch.linalg.vector_norm(v, dim=1, keepdim=True) + torch.finfo(torch.float32).eps
                decomposed = (m.reshape(-1, 1) / norm) * v
            else:  # [1, in]: norm of each input column, over the outputs
                columns = merged.transpose(0, 1).reshape(merged.shape[1], -1)  # [in, out * k]
                norm = torch.linalg.vector_norm(columns, dim=1) + torch.finfo(torch.float32).eps  # [in]
                scale = m.flatten() / norm  # [in]
                decomposed = (merged * scale.reshape(1, -1, *([1] * (merged.dim() - 2)))).reshape_as(v)
        decomposed = decomposed.reshape(weight.shape)
        return weight + multiplier * (decomposed - weight)
