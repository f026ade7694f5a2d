"""Writing output files safely: checked before the work, whole or not at all, never over another.

Every command that writes (videos, images, latents, caches, checkpoints, LoRAs) goes through
here:

- :func:`check_output_folder` / :func:`check_output_file` run at set-up, before any model loads:
  the location must be a folder (or creatable under one), actually writable (probed by creating
  a file, which also catches read-only and immutable folders and read-only filesystems, even
  for root), and not nearly full. They also remove what crashed runs left there
  (:func:`clean_stale_temporaries`).
- :class:`AtomicOutput` writes to a hidden temporary beside the target (same filesystem), then
  publishes it: with ``exclusive=True`` under a name nobody else holds (``os.link`` fails if the
  name exists, so two concurrent runs never overwrite each other; a taken name gets ``_1``,
  ``_2``, ... before the suffix), otherwise with ``os.replace``. Any failure (an exception,
  Ctrl-C, ``SIGTERM`` handled as Ctrl-C) removes the temporary. A ``kill -9`` leaves it, named
  ``.<name>.wan-<host>-<pid>-<random>.partial<suffix>``, and the next run in that folder deletes
  it once process ``<pid>`` of this machine is gone (another machine's temporaries are left alone).
- The first write into a folder in a process removes what killed runs left there, so even a
  command without a set-up check (a library call, ``wan lora``) cleans up after a ``kill -9``.
- :func:`save_safetensors` is the one safetensors writer (caches, LoRAs, merged and quantized
  models, latents).
- A full disk, a quota, a read-only filesystem or a permission problem met while writing is an
  :class:`~wan_kernel.errors.OutputError` naming the path and the reason.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from wan_kernel.errors import OutputError

TEMP_MARK = ".wan-"
PARTIAL = ".partial"
_TEMP_RE = re.compile(r"^\..+\.wan-(?P<host>[A-Za-z0-9_]*)-(?P<pid>\d+)-[0-9a-f]{8}\.partial[^/]*$")


def _host() -> str:
    """This machine's name as it goes into temporary names (a run on another machine sharing the
    folder is never mistaken for a dead one of ours)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32]


def temporary_name(stem: str, suffix: str = "") -> str:
    """``.<stem>.wan-<host>-<pid>-<random>.partial<suffix>``: hidden, and telling which process on
    which machine writes it (:func:`clean_stale_temporaries` reads that back)."""
    return f".{stem}{TEMP_MARK}{_host()}-{os.getpid()}-{secrets.token_hex(4)}{PARTIAL}{suffix}"


MIN_FREE_BYTES = 1 << 20
"""Set-up refuses a folder whose filesystem has less free space than this (1 MiB)."""
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_WORDS = ("No space left", "StorageFull", "os error 28", "code: 28", "Disk quota exceeded")


# --------------------------------------------------------------------------------------------
# Reasons
# --------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """Why a write failed, in words a user acts on."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in _DISK_FULL_ERRNOS or any(word in text for word in _DISK_FULL_WORDS):
        return "the disk is full (no space left on the device); free some space or write elsewhere"
    if code == errno.EROFS:
        return "the filesystem is mounted read-only; write somewhere else"
    if code == errno.EACCES:
        return "permission denied; write to a folder you own or fix its permissions"
    if code == errno.EPERM:
        return "operation not permitted (an immutable folder? see lsattr); write somewhere else"
    if code == errno.ENOTDIR:
        return "a part of the path is a file, not a folder"
    if code == errno.EISDIR:
        return "it is a folder"
    if code == errno.ENAMETOOLONG:
        return "the name is too long"
    strerror = getattr(exc, "strerror", None)
    return strerror or f"{type(exc).__name__}: {text}"


def is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is the filesystem refusing a write (an ``OSError``, or a library error that
    wraps one: safetensors' ``SafetensorError``, PyAV's ``FFmpegError`` subclasses)."""
    if isinstance(exc, OSError):
        return True
    return any(word in str(exc) for word in (*_DISK_FULL_WORDS, "Read-only file system", "Permission denied"))


# --------------------------------------------------------------------------------------------
# Set-up checks
# --------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and not current.is_symlink():
        if current.parent == current:
            break
        current = current.parent
    return current


def check_output_folder(folder: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Check (before any work) that files can be created in ``folder``; return it as a Path.

    A folder that does not exist yet is checked through its nearest existing ancestor (it will
    be created when the first file is written). Stale temporaries of crashed runs are removed.

    :raises OutputError: naming the path and the reason: a part of it is a regular file, it is
        not writable (permission, immutable, read-only filesystem), or its disk is (nearly) full.
    """
    folder = Path(folder).expanduser()
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        if existing == folder:
            raise OutputError(
                f"{what} {folder} is a file, not a folder; pass a folder, or a file name with a suffix "
                "this command writes"
            )
        raise OutputError(
            f"cannot create the {what} {folder}: {existing} is a file, not a folder; choose another path"
        )
    label = (
        f"the {what} {folder}"
        if existing == folder
        else f"{existing} (where the {what} {folder} would be created)"
    )
    probe_folder(existing, label=label)
    if existing == folder:
        clean_stale_temporaries(folder)
    return folder


def probe_folder(folder: Path, *, label: str | None = None) -> None:
    """Create and delete an empty hidden file in ``folder``: the only check that is right for root,
    immutable folders and read-only filesystems alike; then look at the free space."""
    label = label or f"the folder {folder}"
    probe = folder / temporary_name("probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputError(f"cannot write to {label}: {_reason(exc)}") from None
    os.close(fd)
    with _suppress_oserror():
        os.unlink(probe)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < MIN_FREE_BYTES:
        raise OutputError(
            f"cannot write to {label}: the disk is full ({free} bytes free); "
            "free some space or write elsewhere"
        )


def check_output_file(path: str | os.PathLike, *, what: str = "output file") -> Path:
    """Check (before any work) that a file can be written at ``path``: it is not a folder, its
    folder can take files. A taken name is fine: :class:`AtomicOutput` picks a free one.

    :raises OutputError: naming the path and the reason.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(
            f"{what} {path} is an existing folder; pass a new file name, or the folder alone to get "
            "generated names in it"
        )
    check_output_folder(path.parent, what=f"folder for {what} {path.name},")
    return path


class _suppress_oserror:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, OSError)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that runs killed in ``folder`` left behind (their process is gone);
    return what was removed. Temporaries of live processes (a concurrent run) are kept."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None or match["host"] != _host() or _pid_alive(int(match["pid"])):
            continue
        path = Path(entry.path)
        with _suppress_oserror():
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


_CLEANED: set[tuple[int, str]] = set()


def _clean_once(folder: Path) -> None:
    """:func:`clean_stale_temporaries` on the first write into ``folder`` by this process (a cache
    folder gets thousands of writes: scanning it each time would cost more than the writes)."""
    key = (os.getpid(), os.path.abspath(folder))
    if key in _CLEANED:
        return
    _CLEANED.add(key)
    clean_stale_temporaries(folder)


# --------------------------------------------------------------------------------------------
# Atomic, exclusive writes
# --------------------------------------------------------------------------------------------


def numbered(path: Path, number: int) -> Path:
    """``out.mp4`` -> ``out_1.mp4`` (``number`` 0 is the path itself); folders get ``_N`` at the end."""
    if number == 0:
        return path
    if path.suffix and not path.name.startswith("."):
        return path.with_name(f"{path.stem}_{number}{path.suffix}")
    return path.with_name(f"{path.name}_{number}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicOutput:
    """Context manager: ``with AtomicOutput(path) as out: write(out.tmp)``; then ``out.final`` is
    where the result is (``path``, or ``path`` with ``_N`` when ``exclusive`` and it was taken).

    :param path: the wanted final path.
    :param directory: the temporary is a folder (a folder of frames).
    :param exclusive: never replace an existing file or non-empty folder: publish under the first
        free name ``path``, ``path_1``, ... (``os.link`` for files: atomic, no race between runs).
        ``False`` replaces ``path`` (``os.replace``), for files a command rewrites on purpose.
    :raises OutputError: the folder cannot be created or written, or the disk filled up (the
        temporary is removed first).
    """

    def __init__(self, path: str | os.PathLike, *, directory: bool = False, exclusive: bool = True):
        self.path = Path(path)
        self.directory = directory
        self.exclusive = exclusive
        self.tmp: Path | None = None
        self.final: Path | None = None

    def _temporary_name(self) -> Path:
        suffix = "" if self.directory else self.path.suffix
        stem = self.path.name if self.directory else self.path.stem
        name = temporary_name(stem, suffix)
        return self.path.parent / name

    def __enter__(self) -> "AtomicOutput":
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {parent}: {_reason(exc)}") from None
        _clean_once(parent)
        tmp = self._temporary_name()
        try:
            if self.directory:
                os.mkdir(tmp, 0o700)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {_reason(exc)}") from None
        self.tmp = tmp
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            try:
                os.chmod(self.tmp, (0o777 if self.directory else 0o666) & ~_umask())
                self.final = self._publish()
                return False
            except BaseException as error:  # noqa: BLE001 - clean up, then report
                self._remove_tmp()
                if isinstance(error, OSError):
                    raise OutputError(f"cannot write {self.path}: {_reason(error)}") from None
                raise
        self._remove_tmp()
        if exc is not None and not isinstance(exc, OutputError) and is_write_failure(exc):
            raise OutputError(f"cannot write {self.path}: {_reason(exc)}") from None
        return False

    def _remove_tmp(self) -> None:
        tmp = self.tmp
        if tmp is None:
            return
        with _suppress_oserror():
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            elif tmp.exists() or tmp.is_symlink():
                tmp.unlink()

    def _publish(self) -> Path:
        assert self.tmp is not None
        if not self.exclusive:
            if self.directory and self.path.is_dir():
                if any(self.path.iterdir()):
                    raise OutputError(f"output folder {self.path} already exists and is not empty")
                self.path.rmdir()
            os.replace(self.tmp, self.path)
            return self.path
        for number in range(100000):
            candidate = numbered(self.path, number)
            if self.directory:
                if candidate.exists() or candidate.is_symlink():
                    if not (candidate.is_dir() and not any(candidate.iterdir())):
                        continue
                os.replace(self.tmp, candidate)  # onto nothing or an empty folder
                return candidate
            try:
                os.link(self.tmp, candidate)  # fails if the name exists: exclusive, atomic
            except FileExistsError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                # no hard links here (FAT, some network filesystems): reserve the name, then move over it
                try:
                    os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                except FileExistsError:
                    continue
                os.replace(self.tmp, candidate)
                return candidate
            os.unlink(self.tmp)
            return candidate
        raise OutputError(f"no free name for {self.path} (tried {self.path} and 99999 numbered ones)")


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
    *,
    exclusive: bool = True,
) -> Path:
    """Write ``tensors`` (name -> torch tensor) as a safetensors file through :class:`AtomicOutput`;
    return where it went (``path``, or ``path_N`` when ``exclusive`` and ``path`` was taken).

    Tensors are moved to the CPU and made contiguous; metadata values are stored as strings.

    :param exclusive: see :class:`AtomicOutput` (``False``: replace ``path``).
    :raises OutputError: the folder cannot be written, or the disk filled up; no temporary is left.
    """
    from safetensors.torch import save_file

    data = {str(k): v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with AtomicOutput(path, exclusive=exclusive) as out:
        save_file(data, str(out.tmp), metadata=meta)
    assert out.final is not None
    return out.final


def check_save_path(
    save_path: str | os.PathLike, *, file_suffixes: tuple[str, ...], option: str = "--save_path"
) -> Path:
    """Check an output option that is either a file name (ending in one of ``file_suffixes``) or a
    folder, before any work: see :func:`check_output_file` and :func:`check_output_folder`.

    :raises OutputError: naming the option, the path and the reason.
    """
    raw = os.fspath(save_path)
    if not raw.strip():
        raise OutputError(f"{option} is empty; pass a folder or a file name")
    path = Path(raw).expanduser()
    if path.suffix.lower() in file_suffixes:
        return check_output_file(path, what=f"{option}")
    return check_output_folder(path, what=f"{option} folder")
