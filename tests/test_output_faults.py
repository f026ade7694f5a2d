"""Fault injection on the output side: a full disk, a read-only folder, SIGTERM and ``kill -9``
while writing, two runs into one folder at once. Whatever happens, an output is whole or absent,
no temporary stays visible, and nothing another run wrote is lost.

A full or read-only filesystem is a real tmpfs where the test can mount one (root with
CAP_SYS_ADMIN), else the writers are made to fail with the same ``OSError`` (monkeypatched).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from wan_kernel import files
from wan_kernel.errors import OutputError
from wan_kernel.pipelines import media
from wan_kernel.testing.bad_input import leftover_temporaries, output_files

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "--preset",
    "demo",
    "--video_size",
    "32",
    "32",
    "--video_length",
    "5",
    "--infer_steps",
    "2",
    "--seed",
    "7",
]
FRAMES = np.zeros((5, 32, 32, 3), np.uint8)


@contextlib.contextmanager
def tmpfs(folder: Path, *, size: str, readonly: bool = False):
    """Mount a tmpfs at ``folder`` for the block; skip when this machine does not let us."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
        )
    except FileNotFoundError:
        done = None
    if done is None or done.returncode != 0:
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> None:
    """Fill the filesystem of ``folder`` to the last byte."""
    with open(folder / "filler", "wb", buffering=0) as f:
        for size in (65536, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass


class _FullDiskContainer:
    """A PyAV output container whose every ``mux`` fails like a full disk (after some bytes)."""

    def __init__(self, inner, path):
        self._inner, self._path = inner, path

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def mux(self, packet):
        Path(self._path).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder whose disk is full: a filled tmpfs, or writers failing with ENOSPC."""
    folder = tmp_path / "full"
    with tmpfs(folder, size="2m") as mounted:
        if mounted:
            monkeypatch.setattr(files, "MIN_FREE_BYTES", 0)  # let set-up pass: the failure is the write's
            fill(folder)
            (folder / "filler").rename(folder / "filler.keep")
        else:
            import av
            import safetensors.torch

            real_open, real_save = av.open, safetensors.torch.save_file

            def full_open(path, mode="r", **kwargs):
                container = real_open(path, mode, **kwargs)
                return _FullDiskContainer(container, path) if mode == "w" else container

            def full_save(tensors, path, metadata=None):
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(av, "open", full_open)
            monkeypatch.setattr(safetensors.torch, "save_file", full_save)
            folder.mkdir(exist_ok=True)
        yield folder


def _only_filler(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "filler.keep")


def test_full_disk_mp4_and_latent_are_clean_errors(full_disk):
    with pytest.raises(OutputError, match="disk is full") as caught:
        media.write_video(full_disk / "v.mp4", FRAMES)
    assert "v.mp4" in str(caught.value)
    with pytest.raises(OutputError, match="disk is full"):
        media.save_latent(full_disk / "l.safetensors", torch.zeros(16, 2, 4, 4))
    assert _only_filler(full_disk) == []  # no temporary, no half file


def saved_latent(folder: Path) -> Path:
    """A small latent file for ``--latent_path`` runs (VAE decode + mp4 only: no T5, no DiT)."""
    path = folder / "in.safetensors"
    media.save_latent(
        path, torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0)), exclusive=False
    )
    return path


def test_full_disk_during_a_run(full_disk, tmp_path):
    from wan_cli.main import cli

    latent = saved_latent(tmp_path)
    for what in (["--latent_path", str(latent)], ["--prompt", "p", "--output_type", "latent"]):
        result = CliRunner().invoke(cli, ["run", "generate", *SMALL, *what, "--save_path", str(full_disk)])
        assert result.exit_code == 1, result.output
        assert "disk is full" in result.stderr and "Traceback" not in result.output
        assert _only_filler(full_disk) == []


def test_read_only_folder(tmp_path, monkeypatch):
    from wan_cli.main import cli

    folder = tmp_path / "ro"
    with tmpfs(folder, size="1m", readonly=True) as mounted:
        if not mounted:
            if os.geteuid() == 0:
                pytest.skip("cannot mount a read-only tmpfs here, and root ignores folder permissions")
            folder.chmod(0o555)
        result = CliRunner().invoke(
            cli, ["run", "generate", *SMALL, "--prompt", "p", "--save_path", str(folder / "x")]
        )
        assert result.exit_code == 1, result.output
        assert str(folder) in result.stderr
        assert ("read-only" if mounted else "permission denied") in result.stderr
        assert "Traceback" not in result.output
        assert list(folder.iterdir()) == []


# -- signals and concurrency (real processes) ---------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import os, sys, time

    if os.environ.get("WAN_TEST_READY"):  # stop inside the mp4 write, its temporary open
        import av

        real_open = av.open

        def slow_open(path, mode="r", **kwargs):
            container = real_open(path, mode, **kwargs)
            if mode == "w":
                open(os.environ["WAN_TEST_READY"], "w").close()
                time.sleep(120)
            return container

        av.open = slow_open
    from wan_cli.main import main
    main(sys.argv[1:])
    """
)


def _spawn(tmp_path: Path, args: list[str], *, ready: Path | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WAN_DEBUG", None)
    if ready is not None:
        env["WAN_TEST_READY"] = str(ready)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return subprocess.Popen(
        [sys.executable, str(driver), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kwargs,
    )


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited early ({process.returncode}): {process.stderr.read().decode()}")
        if time.monotonic() > end:
            process.kill()
            raise AssertionError("the writer never started")
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "kill-9"])
def test_signal_while_writing_the_mp4(tmp_path, sig):
    out, ready = tmp_path / "out", tmp_path / "ready"
    args = ["run", "generate", *SMALL, "--latent_path", str(saved_latent(tmp_path)), "--save_path", str(out)]
    process = _spawn(tmp_path, args, ready=ready)
    _wait_for(ready, process)
    temporaries = leftover_temporaries(out)
    assert len(temporaries) == 1 and temporaries[0].name.startswith(".")  # hidden while being written
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert output_files(out) == []
    if sig == signal.SIGTERM:
        assert process.returncode == 1, stderr.decode()
        assert b"SIGTERM" in stderr and b"Traceback" not in stderr
        assert leftover_temporaries(out) == []
    else:
        assert process.returncode == -signal.SIGKILL
        assert leftover_temporaries(out) == temporaries  # nothing can clean up after kill -9 ...
        files.check_output_folder(out)  # ... but the next run's set-up in that folder does
        assert leftover_temporaries(out) == []


def test_two_concurrent_runs_into_one_folder_keep_both_results(tmp_path):
    out = tmp_path / "out"
    latent = saved_latent(tmp_path)
    args = ["run", "generate", *SMALL, "--latent_path", str(latent), "--save_path", str(out / "clip.mp4")]
    first, second = _spawn(tmp_path, args), _spawn(tmp_path, args)
    reported = []
    for process in (first, second):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()
        reported.append(Path(stdout.decode().strip().splitlines()[-1]))
    assert sorted(p.name for p in reported) == ["clip.mp4", "clip_1.mp4"]
    assert sorted(p.name for p in output_files(out)) == ["clip.mp4", "clip_1.mp4"]
    assert leftover_temporaries(out) == []
    frames = [media.read_video(p)[0] for p in reported]
    # the same video twice, both whole (CPU convolutions under load may differ in the last bit)
    assert frames[0].shape == frames[1].shape == (5, 32, 32, 3)
    assert np.abs(frames[0].astype(int) - frames[1].astype(int)).mean() < 2


def test_interactive_with_stdin_closed(tmp_path):
    process = _spawn(
        tmp_path,
        ["run", "generate", *SMALL, "--interactive", "--save_path", str(tmp_path / "out")],
        preexec_fn=lambda: os.close(0),
    )
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 1, stderr.decode()
    assert b"standard input, which is closed" in stderr and b"Traceback" not in stderr


def test_unique_names_under_threads(tmp_path):
    """Many writers racing for one name: each result lands under its own name (os.link is exclusive)."""
    import threading

    results, errors = [], []

    def write(i):
        try:
            results.append(
                media.save_latent(tmp_path / "same.safetensors", torch.full((16, 1, 2, 2), float(i)))
            )
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 8 and len(output_files(tmp_path)) == 8
    values = sorted(int(media.load_latent(p)[0][0, 0, 0, 0]) for p in results)
    assert values == list(range(8))


def test_immutable_folder(tmp_path):
    """chattr +i stops even root: the set-up probe (creating a file) sees it, os.access would not."""
    from wan_cli.main import cli

    folder = tmp_path / "frozen"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on ext4/xfs/btrfs)")
    try:
        result = CliRunner().invoke(
            cli, ["run", "generate", *SMALL, "--prompt", "p", "--save_path", str(folder)]
        )
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    assert result.exit_code == 1, result.output
    assert str(folder) in result.stderr and "not permitted" in result.stderr
    assert "Traceback" not in result.output and list(folder.iterdir()) == []


def test_only_dead_writers_temporaries_of_this_machine_are_cleaned(tmp_path):
    host = files._host()
    dead = tmp_path / f".a.wan-{host}-999999999-0123abcd.partial.mp4"
    live = tmp_path / f".b.wan-{host}-{os.getpid()}-0123abcd.partial.mp4"
    elsewhere = tmp_path / ".c.wan-otherhost-999999999-0123abcd.partial.mp4"
    mine = tmp_path / "keep.mp4"
    for path in (dead, live, elsewhere, mine):
        path.write_bytes(b"x")
    assert files.clean_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, elsewhere, mine))
