"""``wan run cache|cache-latents|cache-text`` and ``wan lora convert|merge|info|resize|ema`` against
hostile input, one table, rows grouped by the classes of issue 11.

Each row is a :class:`wan_kernel.testing.bad_input.Case` run in-process with the real command
line; it asserts the exit code (1 for a user error, 2 for a usage error, 0 for an input that must
work), that the message names the problem (each fragment appears, and no ``Traceback``), and the
output folder's state afterwards: no temporary left, no output from a failing run (nothing
partial, nothing stale) and an existing output's bytes untouched. Run this file as a script to
print the count matrix (cases tried / clean / tracebacks / silent wrong)::

    .venv/bin/python tests/test_bad_input_cache_lora.py
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_kernel.testing import REFERENCE_FIXTURES
from wan_kernel.testing.bad_input import Case, Outcome, count_matrix, format_matrix, make_fifo, run_cli_case

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
AS_ROOT = "root reads whatever the permissions say"
T2V = REFERENCE_FIXTURES / "dit_t2v" / "weights.safetensors"
pytestmark = pytest.mark.skipif(not T2V.is_file(), reason=f"reference fixtures not found at {T2V}")


def run_case(case: Case, tmp_path: Path) -> Outcome:
    """:func:`run_cli_case` (the case's args are the whole command line), plus: files already in
    the output folder before the run must be byte for byte the same after it."""
    out = tmp_path / "out"
    out.mkdir(parents=True, exist_ok=True)
    args = case.args(tmp_path) if callable(case.args) else case.args
    case = Case(case.klass, case.name, list(args), case.exit_code, case.message, case.outputs, skip=case.skip)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    try:
        outcome = run_cli_case(case, tmp_path, command=[], out_option=None, timeout=60)
    finally:
        for path in tmp_path.rglob("immutable"):  # undo chattr +i of the read-only-folder cases
            subprocess.run(["chattr", "-i", str(path)], check=False)
    changed = [p.name for p, data in before.items() if not p.is_file() or p.read_bytes() != data]
    if changed and case.exit_code != 0:  # a failing run must leave what was there alone
        outcome.wrong = f"existing outputs changed: {changed}"
    return outcome


# --------------------------------------------------------------------------------------------
# Inputs: tiny models, a one-image dataset, LoRAs for the fixture DiT (written once per process)
# --------------------------------------------------------------------------------------------

_FILES: dict[str, Path] = {}


def files() -> dict[str, Path]:
    """``vae``, ``t5``, ``clip``, ``dit``, ``lora`` (kohya, on the fixture DiT), ``lora2``."""
    if _FILES:
        return _FILES
    from wan_kernel.demo import build_demo_t5, build_demo_vae

    root = Path(tempfile.mkdtemp(prefix="wan-bad-input-cache-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    save_file(
        {k: v.contiguous() for k, v in build_demo_vae().model.state_dict().items()}, root / "vae.safetensors"
    )
    t5 = {k: v.clone() for k, v in build_demo_t5().state_dict().items()}
    t5.pop("encoder.embed_tokens.weight")  # tied to shared.weight
    save_file(t5, root / "t5.safetensors")
    dit = load_file(T2V)
    for name, seed in (("lora", 0), ("lora2", 1)):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for block in range(2):
            for module in ("self_attn.q", "cross_attn.o", "ffn.0"):
                w = dit[f"blocks.{block}.{module}.weight"]
                stem = f"lora_unet_blocks_{block}_{module.replace('.', '_')}"
                tensors[f"{stem}.lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.3
                tensors[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.3
                tensors[f"{stem}.alpha"] = torch.tensor(2.0)
        save_file(tensors, root / f"{name}.safetensors", metadata={"ss_network_dim": "4"})
    _FILES.update(
        vae=root / "vae.safetensors",
        t5=root / "t5.safetensors",
        clip=REFERENCE_FIXTURES / "clip_visual" / "weights.safetensors",
        dit=T2V,
        lora=root / "lora.safetensors",
        lora2=root / "lora2.safetensors",
    )
    return _FILES


def dataset(tmp: Path, *, cache: Path | None = None, extra: str = "", toml: str | None = None) -> Path:
    """A one-image dataset (``a.png`` + caption) whose caches go to ``tmp/out`` (or ``cache``)."""
    from PIL import Image

    data = tmp / "data"
    data.mkdir(exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(
        data / "a.png"
    )
    (data / "a.txt").write_text("a picture")
    cache = cache or tmp / "out"
    path = tmp / "dataset.toml"
    path.write_text(
        toml
        if toml is not None
        else f'[general]\nresolution = [32, 16]\ncaption_extension = ".txt"\n\n[[datasets]]\n'
        f'image_directory = "{data.as_posix()}"\ncache_directory = "{cache.as_posix()}"\n{extra}'
    )
    return path


def garbage(path: Path) -> Path:
    path.write_bytes(os.urandom(4096))
    return path


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def truncated(path: Path, source: Path) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def with_nan(path: Path, source: Path, *, key_part: str = "") -> Path:
    """``source`` with its first floating tensor (whose key holds ``key_part``) set to NaN."""
    state = load_file(source)
    key = next(k for k, v in state.items() if v.is_floating_point() and key_part in k and v.numel() > 1)
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path)
    return path


def immutable(tmp: Path) -> Path:
    """A folder nobody (not even root) can write into: ``chattr +i`` (undone after the case)."""
    folder = tmp / "immutable"
    folder.mkdir()
    if subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    return folder


def unreadable(path: Path, source: Path) -> Path:
    shutil.copy(source, path)
    path.chmod(0)
    return path


def a_file(tmp: Path, name: str = "file") -> Path:
    path = tmp / name
    path.write_text("not a folder")
    return path


# --------------------------------------------------------------------------------------------
# The cache commands
# --------------------------------------------------------------------------------------------

QUIET = ["--device", "cpu", "--num_workers", "0", "--no_progress"]


def cache(tmp: Path, *, toml: Path | None = None, **models: object) -> list[str]:
    """``wan run cache`` with the tiny VAE and T5 (``models`` overrides: a path, or ``None`` to drop)."""
    paths = {"vae": files()["vae"], "t5": files()["t5"], **models}
    args = ["run", "cache", "--dataset_config", toml or dataset(tmp), *QUIET, "--vae_dtype", "float32"]
    for option, path in paths.items():
        if path is not None:
            args += [f"--{option}", path]
    return args + ["--t5_tokenizer", "builtin:bytes"]


def latents(tmp: Path, vae: object = None, **more: object) -> list[str]:
    args = ["run", "cache-latents", "--dataset_config", dataset(tmp), *QUIET, "--vae_dtype", "float32"]
    args += ["--vae", vae or files()["vae"]]
    for option, value in more.items():
        args += [f"--{option}", value]
    return args


def text(tmp: Path, t5: object = None) -> list[str]:
    args = ["run", "cache-text", "--dataset_config", dataset(tmp), *QUIET, "--t5_tokenizer", "builtin:bytes"]
    return args + ["--t5", t5 or files()["t5"]]


CACHED = ["a_0040x0024_wan.safetensors", "a_wan_te.safetensors"]

CACHE_CASES = [
    # files: missing, garbage, malformed, of the wrong kind, unreadable
    Case(
        "files",
        "cache-vae-missing",
        lambda t: cache(t, vae=t / "nope.safetensors"),
        message="nope.safetensors",
    ),
    Case(
        "files",
        "cache-t5-garbage",
        lambda t: cache(t, t5=garbage(t / "t5.safetensors")),
        message="t5.safetensors",
    ),
    Case(
        "files",
        "latents-vae-garbage",
        lambda t: latents(t, garbage(t / "v.safetensors")),
        message="v.safetensors",
    ),
    Case(
        "files",
        "latents-vae-truncated",
        lambda t: latents(t, truncated(t / "v.safetensors", files()["vae"])),
        message="v.safetensors",
    ),
    Case(
        "files",
        "latents-vae-header-entry-not-a-record",
        lambda t: latents(t, raw_safetensors(t / "v.safetensors", {"w": 3})),
        message="v.safetensors",
    ),
    Case(
        "files",
        "latents-vae-negative-shape",
        lambda t: latents(
            t,
            raw_safetensors(
                t / "v.safetensors", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
        ),
        message="v.safetensors",
    ),
    Case(
        "files", "latents-vae-is-a-t5", lambda t: latents(t, files()["t5"]), message=("t5.safetensors", "VAE")
    ),
    Case(
        "files",
        "text-t5-is-a-vae",
        lambda t: text(t, files()["vae"]),
        message=("vae.safetensors", "text encoder"),
    ),
    Case(
        "files",
        "latents-clip-is-a-vae",
        lambda t: latents(t, clip=files()["vae"]),
        message=("vae.safetensors", "CLIP"),
    ),
    Case("files", "latents-vae-directory", lambda t: latents(t, t / "data"), message="data"),
    Case(
        "files",
        "latents-vae-fifo",
        lambda t: latents(t, make_fifo(t / "v.safetensors")),
        message="v.safetensors",
    ),
    Case(
        "files", "text-t5-fifo", lambda t: text(t, make_fifo(t / "t5.safetensors")), message="t5.safetensors"
    ),
    Case(
        "files",
        "text-t5-no-permission",
        lambda t: text(t, unreadable(t / "t5.safetensors", files()["t5"])),
        message="t5.safetensors",
        skip=AS_ROOT if ROOT else None,
    ),
    Case(
        "files",
        "cache-config-fifo",
        lambda t: cache(t, toml=make_fifo(t / "dataset.toml")),
        message=("dataset.toml", "not a regular file"),
    ),
    Case(
        "files", "cache-config-directory", lambda t: cache(t, toml=t), exit_code=2, message="is a directory"
    ),
    Case("files", "cache-config-missing", lambda t: cache(t, toml=t / "nope.toml"), message="nope.toml"),
    Case(
        "files",
        "skip-existing-over-garbage-caches",
        lambda t: [*cache(t, toml=_with_garbage_caches(t)), "--skip_existing"],
        exit_code=0,
        outputs=2,  # both recomputed: a cache that does not read back is not "existing"
    ),
    # config: the dataset TOML
    Case(
        "config",
        "toml-syntax",
        lambda t: cache(t, toml=dataset(t, toml="[general\nx = 1")),
        message="not valid TOML",
    ),
    Case(
        "config",
        "toml-not-utf8",
        lambda t: cache(t, toml=(t / "d.toml", (t / "d.toml").write_bytes(b"\xff\xfe[general]"))[0]),
        message="d.toml",
    ),
    Case(
        "config",
        "toml-unknown-key",
        lambda t: cache(t, toml=dataset(t, extra="num_repeat = 2\n")),
        message=("num_repeat", "did you mean 'num_repeats'"),
    ),
    Case(
        "config",
        "toml-wrong-type",
        lambda t: cache(t, toml=dataset(t, extra='batch_size = "2"\n')),
        message=("datasets[0]", "batch_size must be an integer"),
    ),
    Case(
        "config",
        "toml-cache-directory-is-a-file",
        lambda t: cache(t, toml=dataset(t, cache=a_file(t))),
        message=("cache_directory", "not a directory"),
    ),
    # options
    Case("options", "cache-nothing-to-do", lambda t: cache(t, vae=None, t5=None), message="nothing to cache"),
    Case("options", "latents-vae-dtype", lambda t: latents(t, vae_dtype="float8"), message="float8"),
    Case(
        "options",
        "latents-batch-size-0",
        lambda t: latents(t, batch_size="0"),
        exit_code=2,
        message="batch_size",
    ),
    # media: a bad source is reported and skipped, the rest is cached, the exit code says so
    Case(
        "media",
        "cache-truncated-image",
        lambda t: cache(t, toml=_with_bad_image(t)),
        message=("b.png", "1 item(s) failed"),
        outputs=3,  # a's two caches, and b's text cache (its caption is fine)
    ),
    # non-finite numbers in the weights: refused when loaded, nothing written
    Case(
        "nonfinite",
        "latents-nan-vae",
        lambda t: latents(t, with_nan(t / "v.safetensors", files()["vae"], key_part="encoder.conv1.weight")),
        message=("v.safetensors", "NaN or Inf"),
    ),
    Case(
        "nonfinite",
        "text-nan-t5",
        lambda t: text(t, with_nan(t / "t5.safetensors", files()["t5"], key_part="shared")),
        message=("t5.safetensors", "NaN or Inf"),
    ),
    # outputs: the cache directory cannot be written
    Case(
        "outputs",
        "cache-directory-read-only",
        lambda t: cache(t, toml=dataset(t, cache=immutable(t))),
        message=("immutable", "cannot write", "not permitted"),
    ),
    Case(
        "outputs",
        "cache-directory-under-a-file",
        lambda t: cache(t, toml=dataset(t, cache=a_file(t) / "cache")),
        message="cache",
    ),
]


def _with_garbage_caches(tmp: Path) -> Path:
    toml = dataset(tmp)
    (tmp / "out").mkdir(exist_ok=True)
    for name in CACHED:
        garbage(tmp / "out" / name)
    return toml


def _with_bad_image(tmp: Path) -> Path:
    toml = dataset(tmp)
    (tmp / "data" / "b.png").write_bytes((tmp / "data" / "a.png").read_bytes()[:60])
    (tmp / "data" / "b.txt").write_text("broken")
    return toml


# --------------------------------------------------------------------------------------------
# The LoRA tools
# --------------------------------------------------------------------------------------------


def out_file(tmp: Path, name: str = "o.safetensors") -> Path:
    return tmp / "out" / name


def convert(tmp: Path, source: object = None, output: object = None, *more: object) -> list[str]:
    return [
        "lora",
        "convert",
        "--input",
        source or files()["lora"],
        "--output",
        output or out_file(tmp),
        *more,
    ]


def merge(tmp: Path, *more: object, loras: Sequence[object] = ()) -> list[str]:
    args = ["lora", "merge"]
    for lora in loras or (files()["lora"],):
        args += ["--lora_weight", lora]
    return args + [*more] + (["--output", out_file(tmp)] if "--output" not in more else [])


def resize(tmp: Path, source: object = None, *more: object) -> list[str]:
    return [
        "lora",
        "resize",
        "--input",
        source or files()["lora"],
        "--output",
        out_file(tmp),
        "--rank",
        "2",
        *more,
    ]


def ema(tmp: Path, *paths: object, more: Sequence[object] = ()) -> list[str]:
    paths = paths or (files()["lora"], files()["lora2"])
    return ["lora", "ema", *paths, "--output_file", out_file(tmp), *more]


def existing(tmp: Path) -> Path:
    path = out_file(tmp)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"keep me")
    return path


def nan_lora(tmp: Path) -> Path:
    return with_nan(tmp / "nan.safetensors", files()["lora"], key_part="lora_up")


LORA_CASES = [
    # files
    Case(
        "files", "convert-missing", lambda t: convert(t, t / "nope.safetensors"), message="nope.safetensors"
    ),
    Case(
        "files",
        "convert-garbage",
        lambda t: convert(t, garbage(t / "g.safetensors")),
        message="g.safetensors",
    ),
    Case(
        "files",
        "convert-truncated",
        lambda t: convert(t, truncated(t / "g.safetensors", files()["lora"])),
        message="g.safetensors",
    ),
    Case(
        "files",
        "info-header-no-offsets",
        lambda t: [
            "lora",
            "info",
            raw_safetensors(t / "g.safetensors", {"w": {"dtype": "F32", "shape": [1]}}),
        ],
        message="g.safetensors",
    ),
    Case("files", "info-directory", lambda t: ["lora", "info", t], exit_code=2, message="is a directory"),
    Case(
        "files",
        "info-fifo",
        lambda t: ["lora", "info", make_fifo(t / "f.safetensors")],
        message="f.safetensors",
    ),
    Case(
        "files",
        "convert-fifo",
        lambda t: convert(t, make_fifo(t / "f.safetensors")),
        message="f.safetensors",
    ),
    Case(
        "files",
        "convert-no-permission",
        lambda t: convert(t, unreadable(t / "g.safetensors", files()["lora"])),
        message="g.safetensors",
        skip=AS_ROOT if ROOT else None,
    ),
    Case(
        "files",
        "info-a-dit",
        lambda t: ["lora", "info", files()["dit"]],
        message=("weights.safetensors", "LoRA"),
    ),
    Case(
        "files",
        "convert-a-dit",
        lambda t: convert(t, files()["dit"]),
        message=("weights.safetensors", "LoRA"),
    ),
    Case("files", "merge-lora-is-a-dit", lambda t: merge(t, loras=[files()["dit"]]), message="LoRA"),
    Case(
        "files",
        "merge-dit-is-a-lora",
        lambda t: merge(t, "--dit", files()["lora"]),
        message="lora.safetensors",
    ),
    Case(
        "files", "merge-dit-is-a-vae", lambda t: merge(t, "--dit", files()["vae"]), message="vae.safetensors"
    ),
    Case(
        "files",
        "merge-dit-fifo",
        lambda t: merge(t, "--dit", make_fifo(t / "d.safetensors")),
        message="d.safetensors",
    ),
    Case(
        "files",
        "merge-lora-for-another-model",
        lambda t: merge(t, "--dit", files()["dit"], loras=[_wrong_shape_lora(t)]),
        message=("wide.safetensors", "does not fit"),
    ),
    Case(
        "files", "resize-garbage", lambda t: resize(t, garbage(t / "g.safetensors")), message="g.safetensors"
    ),
    Case(
        "files",
        "ema-one-missing",
        lambda t: ema(t, files()["lora"], t / "nope.safetensors"),
        message="nope.safetensors",
    ),
    Case("files", "ema-a-dit", lambda t: ema(t, files()["lora"], files()["dit"]), message="not a LoRA"),
    # options
    Case(
        "options",
        "merge-multiplier-nan",
        lambda t: merge(t, "--lora_multiplier", "nan"),
        exit_code=2,
        message="nan",
    ),
    Case(
        "options",
        "merge-multiplier-inf",
        lambda t: merge(t, "--lora_multiplier", "inf"),
        exit_code=2,
        message="inf",
    ),
    Case("options", "resize-rank-0", lambda t: resize(t, None, "--rank", "0"), exit_code=2, message="rank"),
    Case("options", "resize-dtype", lambda t: resize(t, None, "--dtype", "float8"), message="float8"),
    Case("options", "ema-beta-nan", lambda t: ema(t, more=["--beta", "nan"]), exit_code=2, message="beta"),
    Case("options", "ema-beta-2", lambda t: ema(t, more=["--beta", "2"]), exit_code=2, message="beta"),
    Case("options", "ema-beta2-inf", lambda t: ema(t, more=["--beta2", "inf"]), exit_code=2, message="beta2"),
    Case(
        "options", "ema-sigma-rel-negative", lambda t: ema(t, more=["--sigma_rel", "-1"]), message="sigma_rel"
    ),
    # non-finite numbers in a LoRA: refused, nothing written
    Case(
        "nonfinite",
        "merge-nan-lora",
        lambda t: merge(t, loras=[files()["lora2"], nan_lora(t)]),
        message=("nan.safetensors", "NaN"),
    ),
    Case(
        "nonfinite",
        "merge-nan-lora-into-dit",
        lambda t: merge(t, "--dit", files()["dit"], loras=[nan_lora(t)]),
        message=("nan.safetensors", "NaN"),
    ),
    Case(
        "nonfinite", "convert-nan-lora", lambda t: convert(t, nan_lora(t)), message=("nan.safetensors", "NaN")
    ),
    Case(
        "nonfinite", "resize-nan-lora", lambda t: resize(t, nan_lora(t)), message=("nan.safetensors", "NaN")
    ),
    Case(
        "nonfinite",
        "ema-nan-lora",
        lambda t: ema(t, files()["lora"], nan_lora(t)),
        message=("nan.safetensors", "NaN"),
    ),
    # outputs
    Case(
        "outputs",
        "convert-output-exists",
        lambda t: convert(t, None, existing(t)),
        message="--overwrite",
        outputs=1,
    ),
    Case(
        "outputs",
        "merge-output-exists",
        lambda t: merge(t, "--output", existing(t)),
        message="--overwrite",
        outputs=1,
    ),
    Case(
        "outputs",
        "resize-output-exists",
        lambda t: ["lora", "resize", "--input", files()["lora"], "--output", existing(t), "--rank", "2"],
        message="--overwrite",
        outputs=1,
    ),
    Case(
        "outputs",
        "ema-output-exists",
        lambda t: ["lora", "ema", files()["lora"], files()["lora2"], "--output_file", existing(t)],
        message="--overwrite",
        outputs=1,
    ),
    Case(
        "outputs",
        "convert-output-is-a-directory",
        lambda t: convert(t, None, t / "out"),
        exit_code=2,
        message="directory",
    ),
    Case(
        "outputs",
        "merge-output-is-a-directory-with-overwrite",
        lambda t: merge(t, "--output", t / "out", "--overwrite"),
        exit_code=2,
        message="directory",
    ),
    Case(
        "outputs",
        "convert-output-under-a-file",
        lambda t: convert(t, None, a_file(t / "out") / "o.safetensors"),
        message="file",
        outputs=1,  # the file in the way, untouched
    ),
    Case(
        "outputs",
        "resize-output-read-only",
        lambda t: [
            "lora",
            "resize",
            "--input",
            files()["lora"],
            "--output",
            immutable(t) / "o.safetensors",
            "--rank",
            "2",
        ],
        message=("immutable", "cannot write", "not permitted"),
    ),
    Case(
        "outputs",
        "merge-dit-output-read-only",
        lambda t: merge(t, "--dit", files()["dit"], "--output", immutable(t) / "o.safetensors"),
        message=("immutable", "cannot write", "not permitted"),
    ),
]


def _wrong_shape_lora(tmp: Path) -> Path:
    """A LoRA for a wider model (its up/down do not fit the fixture DiT's blocks)."""
    tensors = {
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 96),
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(96, 4),
        "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0),
    }
    save_file(tensors, tmp / "wide.safetensors")
    return tmp / "wide.safetensors"


# --------------------------------------------------------------------------------------------
# The tests, and the matrix
# --------------------------------------------------------------------------------------------

CASES = CACHE_CASES + LORA_CASES


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path):
    run_case(case, tmp_path).check()


def test_good_inputs_still_work(tmp_path):
    """The tables' good side: the same helpers with valid inputs cache and convert (exit 0)."""
    done = run_case(Case("outputs", "cache-ok", cache, exit_code=0, outputs=2), tmp_path / "c")
    done.check()
    assert [p.name for p in done.files] == CACHED
    done = run_case(Case("outputs", "convert-ok", convert, exit_code=0, outputs=1), tmp_path / "l")
    done.check()
    assert [p.name for p in done.files] == ["o.safetensors"]


if __name__ == "__main__":  # the count matrix of issue 11
    import types

    outcomes = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                outcome = run_case(case, Path(tmp))
            except pytest.skip.Exception as skipped:
                print(f"skip         {case.id}: {skipped}")
                continue
            seen = types.SimpleNamespace(case=case, verdict=outcome.verdict, problems=outcome.problems)
        outcomes.append(seen)
        print(f"{seen.verdict:<12} {case.id}" + (f": {'; '.join(seen.problems)}" if seen.problems else ""))
    print(format_matrix(count_matrix(outcomes)))
    sys.exit(0)
