"""Checking, before any work, that an output folder can take files (cache directories, LoRA files).

A folder that does not exist yet is checked through its nearest existing ancestor (it is created
when the first file is written). The only check that is right for root, immutable folders and
read-only filesystems alike is to create (and delete) an empty file there, so that is what is done.

(The hardening branch's ``wan_kernel.files.check_output_folder`` does the same for generation's
outputs; once both are in one tree, one of them should call the other.)
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from wan_kernel.errors import InputError

_REASONS = {
    errno.EACCES: "not writable (permission denied); write to a folder you own or fix its permissions",
    errno.EPERM: "not writable (operation not permitted: an immutable folder? see lsattr)",
    errno.EROFS: "not writable (the filesystem is mounted read-only)",
    errno.ENOSPC: "not writable (the disk is full)",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
}


def write_failure(path: str | os.PathLike, exc: OSError) -> InputError:
    """The user-facing error for an ``OSError`` raised while writing ``path``."""
    reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
    return InputError(f"cannot write {path}: {reason}")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable_folder(folder: str | os.PathLike, *, what: str = "output folder") -> Path:
    """``folder`` (as a Path) when files can be created in it (or in what will become it).

    :raises InputError: naming the folder and the reason (a part of the path is a regular file, the
        folder is not writable, its filesystem is read-only).
    """
    folder = Path(folder).expanduser()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        if existing == folder:
            raise InputError(f"the {what} {folder} is a file, not a folder")
        raise InputError(f"cannot create the {what} {folder}: {existing} is a file, not a folder")
    label = f"the {what} {folder}" if existing == folder else f"{existing} (to create the {what} {folder})"
    probe = existing / f".wan-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        reason = _REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        raise InputError(f"cannot write to {label}: {reason}") from None
    try:
        os.unlink(probe)
    except OSError:
        pass
    return folder
