"""Checkpoints of a training run: LoRA files (kohya layout + metadata) and resumable state folders.

Names (``NAME`` = ``--output_name``, all in ``--output_dir``):

- ``NAME-{epoch:06d}.safetensors`` / ``NAME-step{step:08d}.safetensors``: LoRA after that epoch / step;
- ``NAME.safetensors``: the final LoRA;
- ``NAME-{epoch:06d}-state`` / ``NAME-step{step:08d}-state`` / ``NAME-state``: state folders
  (``accelerator.save_state`` output: LoRA weights, optimizer, LR scheduler, RNG states of every
  process; plus ``train_state.json``: global step, epoch, position within the epoch, seed).

Everything is written under a hidden temporary name in the same folder and renamed when complete
(``os.replace`` / ``os.rename``), so a crash or ``kill -9`` at any moment leaves every earlier
file and folder whole; leftovers of an interrupted write are hidden ``.*.tmp*`` names.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from wan_kernel.errors import InputError

TRAIN_STATE_FILE = "train_state.json"
TRAIN_STATE_VERSION = 1


def epoch_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


def step_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync, rename."""
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_lora(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> Path:
    """Write a LoRA file atomically with ``wan_kernel.lora``'s writer (``sshs_*`` hashes added to the
    metadata); ``metadata=None`` writes none at all (``--no_metadata``). Refuses non-finite tensors."""
    from wan_kernel.lora.formats import save_lora_file, save_safetensors_atomic

    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InputError(f"refusing to save {path.name}: {key} holds NaN or infinite values")
    if metadata is None:
        return save_safetensors_atomic(path, tensors, None, overwrite=True)
    return save_lora_file(path, tensors, metadata, overwrite=True)


def write_json_atomic(path: Path, value: object) -> None:
    write_bytes_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def new_state_dir(final: Path) -> Path:
    """A fresh, empty temporary folder beside ``final`` for a state being written."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_state_dir(tmp: Path, final: Path) -> None:
    """Rename the completed ``tmp`` folder to ``final`` (an older ``final`` is replaced)."""
    for f in tmp.iterdir():  # make the folder's files durable before it becomes visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_train_state(state_dir: Path) -> dict:
    """The ``train_state.json`` of a state folder, checked."""
    state_dir = Path(state_dir)
    path = state_dir / TRAIN_STATE_FILE
    if not state_dir.is_dir():
        raise InputError(f"--resume {state_dir}: no such state folder")
    if not path.exists():
        raise InputError(
            f"--resume {state_dir}: it has no {TRAIN_STATE_FILE}; pass a folder written by "
            "wan run train --save_state (NAME-step<step>-state)"
        )
    state = json.loads(path.read_text())
    for key in ("global_step", "epoch", "batches_done_in_epoch", "seed"):
        if key not in state:
            raise InputError(f"{path} lacks {key!r}; it is not a wan training state")
    return state


def prune(
    output_dir: Path, output_name: str, *, kind: str, keep: int | None, current: int, state: bool
) -> list[Path]:
    """Delete older checkpoints (``kind`` ``epoch``: keep the last ``keep`` epochs saved; ``step``: keep
    those whose step is > ``current - keep``). Returns what was deleted."""
    if not keep:
        return []
    suffix = "-state" if state else ".safetensors"
    if kind == "epoch":
        pattern = re.compile(rf"^{re.escape(output_name)}-(\d{{6}}){re.escape(suffix)}$")
    else:
        pattern = re.compile(rf"^{re.escape(output_name)}-step(\d{{8}}){re.escape(suffix)}$")
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir() if (m := pattern.match(p.name)))
    if kind == "epoch":
        doomed = [p for _, p in found[:-keep]] if len(found) > keep else []
    else:
        doomed = [p for n, p in found if n <= current - keep]
    for p in doomed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return doomed


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
