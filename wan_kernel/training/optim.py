"""Optimizers and learning-rate schedules by the seed trainer's names, from maintained libraries.

Optimizers (``--optimizer_type``, case-insensitive): ``AdamW`` (default, ``torch.optim.AdamW``);
the bitsandbytes ones (``AdamW8bit``, ``PagedAdamW8bit``, ``PagedAdamW``, ``PagedAdamW32bit``,
``Lion8bit``, ``PagedLion8bit``, ``SGDNesterov8bit``; bitsandbytes is imported only when one is
chosen); ``AdaFactor`` (``transformers.optimization.Adafactor``; with its default
``relative_step=True`` the learning rate comes from the optimizer and the schedule must be
``adafactor``); any ``torch.optim`` class name (``SGD``, ``Adam``, ...); any ``module.Class``
path. ``--optimizer_args k=v`` are Python literals passed to the constructor.

Schedules (``--lr_scheduler``): every name of ``transformers.get_scheduler`` (``constant``,
``constant_with_warmup``, ``linear``, ``cosine``, ``cosine_with_restarts``, ``polynomial``,
``inverse_sqrt``, ``cosine_with_min_lr``, ``warmup_stable_decay``, ...) plus ``adafactor``;
``--lr_scheduler_type module.Class`` with ``--lr_scheduler_args`` builds any other.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Sequence
from typing import Any

import torch

from wan_kernel.errors import InputError

BITSANDBYTES = {
    "adamw8bit": "AdamW8bit",
    "pagedadamw8bit": "PagedAdamW8bit",
    "pagedadamw": "PagedAdamW",
    "pagedadamw32bit": "PagedAdamW32bit",
    "lion8bit": "Lion8bit",
    "pagedlion8bit": "PagedLion8bit",
    "sgdnesterov8bit": "SGD8bit",
}


def parse_kv(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=(0.9,0.99)"]`` -> dict; values are Python literals."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{what} takes key=value items, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def _import_class(path: str, what: str) -> type:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"{what} {path!r} cannot be imported: {exc}") from None


def build_optimizer(
    optimizer_type: str | None,
    param_groups: list[dict],
    learning_rate: float,
    optimizer_args: Sequence[str] | None,
) -> tuple[torch.optim.Optimizer, str]:
    """The optimizer and its display name (``module.Class``)."""
    name = (optimizer_type or "AdamW").strip()
    key = name.lower()
    kwargs = parse_kv(optimizer_args, "--optimizer_args")
    if key == "adamw":
        cls = torch.optim.AdamW
    elif key in BITSANDBYTES:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InputError(
                f"--optimizer_type {name} needs bitsandbytes: pip install bitsandbytes (or use AdamW)"
            ) from None
        if key == "sgdnesterov8bit":
            kwargs.setdefault("nesterov", True)
            kwargs.setdefault("momentum", 0.9)
        cls = getattr(bnb.optim, BITSANDBYTES[key])
    elif key == "adafactor":
        from transformers.optimization import Adafactor

        kwargs.setdefault("relative_step", True)
        kwargs.setdefault("scale_parameter", True)
        kwargs.setdefault("warmup_init", False)
        cls = Adafactor
        if kwargs["relative_step"]:
            for group in param_groups:
                group["lr"] = None
            learning_rate = None
    elif "." in name:
        cls = _import_class(name, "--optimizer_type")
    elif hasattr(torch.optim, name):
        cls = getattr(torch.optim, name)
    else:
        raise InputError(
            f"unknown --optimizer_type {name!r}: use AdamW, AdamW8bit (bitsandbytes), AdaFactor, a "
            "torch.optim class name, or a module.Class path"
        )
    try:
        if learning_rate is None:
            optimizer = cls(param_groups, **kwargs)
        else:
            optimizer = cls(param_groups, lr=learning_rate, **kwargs)
    except TypeError as exc:
        raise InputError(f"--optimizer_type {name} rejected its arguments {kwargs}: {exc}") from None
    return optimizer, f"{cls.__module__}.{cls.__name__}"


def warmup_steps(value: str | float | None, total_steps: int) -> int:
    """``--lr_warmup_steps``: an int, a ratio of the total (float < 1) or ``"N%"``."""
    if value is None or value == "":
        return 0
    text = str(value).strip()
    try:
        if text.endswith("%"):
            return int(total_steps * float(text[:-1]) / 100)
        number = float(text)
    except ValueError:
        raise InputError(
            f"--lr_warmup_steps must be an integer, a ratio below 1 or N%, got {value!r}"
        ) from None
    if number < 0:
        raise InputError(f"--lr_warmup_steps must be >= 0, got {value!r}")
    return int(total_steps * number) if number < 1 and "." in text else int(number)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    total_steps: int,
    warmup: str | float | None = 0,
    decay_steps: str | float | None = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    timescale: int | None = None,
    min_lr_ratio: float | None = None,
    scheduler_type: str | None = None,
    scheduler_args: Sequence[str] | None = None,
) -> Any:
    """The LR scheduler (stepped once per optimizer step)."""
    num_warmup = warmup_steps(warmup, total_steps)
    extra = parse_kv(scheduler_args, "--lr_scheduler_args")
    if scheduler_type:
        cls = _import_class(scheduler_type, "--lr_scheduler_type")
        return cls(optimizer, **extra)
    name = (name or "constant").lower()
    if name == "adafactor":
        from transformers.optimization import AdafactorSchedule

        if not hasattr(optimizer, "_get_lr"):
            raise InputError("--lr_scheduler adafactor works only with --optimizer_type AdaFactor")
        return AdafactorSchedule(optimizer)
    from transformers import SchedulerType, get_scheduler

    known = [t.value for t in SchedulerType]
    if name not in known:
        raise InputError(
            f"unknown --lr_scheduler {name!r}; known: {', '.join(known + ['adafactor'])} "
            "(or --lr_scheduler_type module.Class)"
        )
    if optimizer.param_groups[0].get("lr") is None:
        raise InputError(
            "AdaFactor with relative_step=True sets its own learning rate: use --lr_scheduler adafactor, "
            "or pass --optimizer_args relative_step=False scale_parameter=False warmup_init=False"
        )
    specific: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        specific["num_cycles"] = int(num_cycles)
    elif name == "polynomial":
        specific["power"] = float(power)
    elif name == "inverse_sqrt" and timescale is not None:
        specific["timescale"] = int(timescale)
    elif name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        specific["min_lr_rate"] = float(min_lr_ratio if min_lr_ratio is not None else 0.0)
    elif name == "warmup_stable_decay":
        decay = warmup_steps(decay_steps, total_steps)
        specific["num_decay_steps"] = decay
        specific["num_stable_steps"] = max(0, total_steps - num_warmup - decay)
        if min_lr_ratio is not None:
            specific["min_lr_ratio"] = float(min_lr_ratio)
    specific.update(extra)
    kwargs: dict[str, Any] = {"num_warmup_steps": num_warmup, "num_training_steps": total_steps}
    if name == "constant":
        kwargs = {}
    elif name in ("constant_with_warmup", "inverse_sqrt"):
        kwargs = {"num_warmup_steps": num_warmup}
    return get_scheduler(name, optimizer, scheduler_specific_kwargs=specific or None, **kwargs)
