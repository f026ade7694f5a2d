"""Checks that stop a run before it writes garbage: non-finite numbers and numeric option values.

A NaN anywhere (NaN/Inf in the DiT or VAE weights, a LoRA holding NaN, ``--lora_multiplier nan``,
a float16 overflow, a broken attention kernel) spreads through the whole sample, and the VAE turns
it into an all-black video. :func:`check_finite` is called on the latents before decoding and on
the frames before writing; its error names what was checked and the likely causes, which the
caller gathers lazily (``causes`` is only called on failure, so looking for NaN in weights costs
nothing when all is well). :func:`nonfinite_tensors` is the scan such a diagnosis uses.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

from wan_kernel.errors import InputError, NonFiniteError

SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds ``torch.Generator.manual_seed`` accepts (a negative seed is used as its 64-bit two's
complement)."""


def count_nonfinite(tensor) -> tuple[int, int]:
    """``(NaN count, ±Inf count)`` of a tensor (0, 0 for non-float tensors)."""
    import torch

    if not (tensor.is_floating_point() or tensor.is_complex()):
        return 0, 0
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return nan, inf


def nonfinite_tensors(
    tensors: Mapping[str, object] | Iterable[tuple[str, object]], limit: int = 3
) -> list[str]:
    """Names (at most ``limit``) of the floating-point tensors holding NaN or Inf; fp8 tensors are
    checked through float32, meta tensors skipped."""
    import torch

    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    found: list[str] = []
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta or not tensor.is_floating_point():
            continue
        value = tensor if tensor.dtype.itemsize > 1 else tensor.float()
        if not bool(torch.isfinite(value).all()):
            found.append(str(name))
            if len(found) >= limit:
                break
    return found


def check_finite(
    tensor,
    *,
    what: str,
    causes: Callable[[], Sequence[str]] | Sequence[str] = (),
    written: str = "nothing was written",
) -> None:
    """Raise :class:`NonFiniteError` when ``tensor`` holds NaN or Inf.

    :param what: what the tensor is, for the message (``the latents of prompt 2``).
    :param causes: likely causes, most likely first (or a callable returning them, called only on
        failure).
    :param written: what the caller did about outputs (the default says nothing was written).
    """
    nan, inf = count_nonfinite(tensor)
    if not nan and not inf:
        return
    found = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (inf, "Inf")) if n)
    listed = list(causes() if callable(causes) else causes)
    message = f"{what} hold {found} values (of {tensor.numel()}); {written}."
    if listed:
        message += (
            "\nLikely cause" + ("s" if len(listed) > 1 else "") + ":\n" + "\n".join(f"- {c}" for c in listed)
        )
    raise NonFiniteError(message)


def check_finite_number(value: float | None, option: str) -> None:
    """Reject a NaN or infinite option value (``--guidance_scale nan``) with an :class:`InputError`."""
    if value is not None and not math.isfinite(value):
        raise InputError(f"{option} must be a finite number, got {value}")


def check_seed(seed: object, where: str = "--seed") -> None:
    """Reject a seed torch cannot take, saying the range."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"{where} must be an integer, got {seed!r}")
    if not low <= seed <= high:
        raise InputError(
            f"{where} {seed} is out of range: torch takes seeds from {low} (-2**63) to {high} (2**64 - 1)"
        )


# -- likely causes, gathered only when a check fails ------------------------------------------------


def _module_nonfinite(module) -> list[str]:
    if module is None or not hasattr(module, "named_parameters"):
        return []
    return nonfinite_tensors([*module.named_parameters(), *module.named_buffers()])


def _lora_nonfinite(path: str) -> list[str]:
    from wan_kernel.models.weights import load_state_dict

    try:
        return nonfinite_tensors(load_state_dict(path, what="LoRA file"))  # not "LoRA": that raises
    except Exception:  # noqa: BLE001 - diagnosis only: an unreadable LoRA failed earlier already
        return []


def denoise_causes(
    *,
    dit=None,
    dit_source: str = "the DiT",
    loras: Sequence[tuple[str, float]] = (),
    dtype=None,
    attention: str | None = None,
    conditioning=None,
) -> list[str]:
    """Likely causes of non-finite latents after the denoising loop, most likely first: a LoRA file
    holding NaN/Inf, the DiT's weights holding NaN/Inf, the image conditioning, a float16 overflow,
    a non-default attention backend. Looks into the weights (called only after a failure)."""
    import torch

    causes: list[str] = []
    bad_lora = False
    for path, multiplier in loras:
        names = _lora_nonfinite(path)
        if names:
            bad_lora = True
            causes.append(
                f"the LoRA {path} holds NaN/Inf values (in {', '.join(names)}): remove or re-train it"
            )
        elif not math.isfinite(multiplier):
            bad_lora = True
            causes.append(f"the LoRA {path} has multiplier {multiplier}")
    names = _module_nonfinite(dit)
    if names and not bad_lora:
        causes.append(
            f"the DiT weights ({dit_source}) hold NaN/Inf values (in {', '.join(names)}): "
            "the file is damaged; "
            "download or convert it again"
        )
    if conditioning is not None:
        bad = [n for n, t in conditioning.items() if t is not None and not bool(torch.isfinite(t).all())]
        if bad:
            causes.append(
                f"the image conditioning ({', '.join(bad)}) is not finite: check the VAE and CLIP weights"
            )
    if dtype == torch.float16:
        causes.append("a float16 overflow in the DiT: try --dit_dtype bfloat16")
    if attention and attention not in ("sdpa", "torch"):
        causes.append(f"the attention backend {attention!r}: try --attn sdpa")
    if not causes:
        causes.append(
            f"the DiT ({dit_source}) or the settings (guidance scale, flow shift): the weights themselves "
            "are finite; try --dit_dtype float32 to rule out a precision problem"
        )
    return causes


def decode_causes(*, vae=None, vae_source: str = "the VAE", dtype=None) -> list[str]:
    """Likely causes of non-finite frames from finite latents: the VAE's weights, its dtype."""
    import torch

    causes: list[str] = []
    model = getattr(vae, "model", vae)
    names = _module_nonfinite(model)
    if names:
        causes.append(
            f"the VAE weights ({vae_source}) hold NaN/Inf values (in {', '.join(names)}): "
            "the file is damaged; "
            "download it again"
        )
    if dtype == torch.float16:
        causes.append("a float16 overflow in the VAE: try --vae_dtype bfloat16 or float32")
    if not causes:
        causes.append(f"the VAE ({vae_source}): its weights are finite; try --vae_dtype float32")
    return causes
