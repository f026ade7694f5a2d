"""``wan run generate`` and the loaders against hostile input, one table per class (issue 11).

Each row is a :class:`wan_kernel.testing.bad_input.Case`: the command line (or Python call), the
exit code, message fragments, and the output folder's state afterwards (nothing partial, nothing
stale). Weight files are the demo models saved once per session (a few hundred KB). Run this
file as a script to print the count matrix (cases tried / clean / tracebacks / silent wrong)::

    .venv/bin/python tests/test_bad_input_generate.py
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_kernel.errors import InputError, WanError, WeightsError
from wan_kernel.testing.bad_input import (
    Case,
    Outcome,
    WrongResult,
    count_matrix,
    format_matrix,
    make_fifo,
    run_api_case,
    run_cli_case,
)

SMALL = ["--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2", "--seed", "7"]
DEMO = ["--preset", "demo", *SMALL]
GENERATE = ["run", "generate"]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
AS_ROOT = "root reads and writes whatever the permissions say"

# --------------------------------------------------------------------------------------------
# Tiny weight files (the demo models), written once per process
# --------------------------------------------------------------------------------------------

_WEIGHTS: dict[str, Path] = {}


def weights() -> dict[str, Path]:
    """``{"dit", "t5", "vae"}`` -> a ``weights.safetensors`` of the demo model (in its own folder)."""
    if _WEIGHTS:
        return _WEIGHTS
    from wan_kernel.demo import DEMO_DIT, build_demo_dit, build_demo_t5, build_demo_vae

    root = Path(tempfile.mkdtemp(prefix="wan-bad-input-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    models = {
        "dit": build_demo_dit(lambda *a, **k: None).state_dict(),
        "t5": build_demo_t5().state_dict(),
        "vae": build_demo_vae().model.state_dict(),
    }
    for name, state in models.items():
        (root / name).mkdir()
        save_file(
            {k: v.detach().clone().contiguous() for k, v in state.items()},
            root / name / "weights.safetensors",
        )
        _WEIGHTS[name] = root / name / "weights.safetensors"
    (root / "dit" / "config.json").write_text(json.dumps(DEMO_DIT.to_official_json()))
    return _WEIGHTS


def file_models(tmp: Path, **override: object) -> list[str]:
    """``--dit --t5 --vae`` (the demo weights unless overridden) and the small sizes."""
    paths = {**weights(), **override}
    return [
        "--dit", str(paths["dit"]), "--t5", str(paths["t5"]), "--vae", str(paths["vae"]),
        "--t5_tokenizer", "builtin:bytes", *SMALL,
    ]  # fmt: skip


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def dit_with_header(header: object, data: bytes = b""):
    def build(tmp: Path) -> list[str]:
        return [
            "--prompt",
            "p",
            *file_models(tmp, dit=raw_safetensors(tmp / "dit.safetensors", header, data)),
        ]

    return build


def dit_beside_config(config: bytes):
    """The demo DiT copied into a folder with this ``config.json``."""

    def build(tmp: Path) -> list[str]:
        folder = tmp / "dit"
        folder.mkdir()
        shutil.copy(weights()["dit"], folder / "weights.safetensors")
        (folder / "config.json").write_bytes(config)
        return ["--prompt", "p", *file_models(tmp, dit=folder / "weights.safetensors")]

    return build


def shard_index(index: object):
    def build(tmp: Path) -> list[str]:
        folder = tmp / "dit"
        folder.mkdir()
        shutil.copy(weights()["dit"], folder / "model-00001-of-00001.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return ["--prompt", "p", *file_models(tmp, dit=folder)]

    return build


def special(kind: str, which: str):
    """``which`` model (dit / t5 / vae) given as a FIFO, a folder, or a file without permission."""

    def build(tmp: Path) -> list[str]:
        path = tmp / f"{which}.safetensors"
        if kind == "fifo":
            make_fifo(path)
        elif kind == "folder":
            path.mkdir()
        else:
            shutil.copy(weights()[which], path)
            path.chmod(0)
        return ["--prompt", "p", *file_models(tmp, **{which: path})]

    return build


def state_of(which: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(weights()[which]).items()}


def changed(which: str, change, suffix: str = ".safetensors"):
    """``which`` model's tensors after ``change(state)`` (returning the new state or None)."""

    def build(tmp: Path) -> list[str]:
        state = state_of(which)
        state = change(state) or state
        path = tmp / f"{which}{suffix}"
        if suffix == ".safetensors":
            save_file(state, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(state, f)
        return ["--prompt", "p", *file_models(tmp, **{which: path})]

    return build


def _nan_in(key_part: str, value: float = float("nan")):
    def change(state):
        key = next(k for k in state if key_part in k and state[k].is_floating_point() and state[k].ndim >= 2)
        state[key].view(-1)[:3] = value

    return change


def _scaled_fp8_without_one_scale(state):
    keys = [k for k in state if k.startswith("blocks.") and k.endswith(".weight") and state[k].ndim == 2][:3]
    for key in keys:
        weight = state[key].float()
        scale = weight.abs().amax().clamp(min=1e-8) / 448.0
        state[key] = (weight / scale).to(torch.float8_e4m3fn)
        state[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
    del state[keys[1][: -len(".weight")] + ".scale_weight"]


def narrow_t5(tmp: Path) -> list[str]:
    """A umt5 encoder 16 wide for the demo DiT, which takes 32-wide text."""
    import attrs
    from transformers import UMT5EncoderModel

    from wan_kernel.demo import DEMO_T5
    from wan_kernel.models.t5 import T5Spec

    spec: T5Spec = attrs.evolve(DEMO_T5, dim=16, dim_attn=16)
    model = UMT5EncoderModel(spec.to_config())
    path = tmp / "t5_narrow.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
    return ["--prompt", "p", *file_models(tmp, t5=path)]


def nan_lora(tmp: Path) -> list[str]:
    path = tmp / "nan_lora.safetensors"
    save_file(
        {
            "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.full((4, 64), float("nan")),
            "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.ones(64, 4),
            "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0),
        },
        path,
    )
    return ["--prompt", "p", *DEMO, "--lora_weight", str(path)]


def huge_lora(tmp: Path) -> list[str]:
    path = tmp / "lora.safetensors"
    save_file(
        {
            "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.ones(4, 64),
            "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.ones(64, 4),
            "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(4.0),
        },
        path,
    )
    return ["--prompt", "p", *DEMO, "--lora_weight", str(path), "--lora_multiplier", "1e38"]


def nan_latent(tmp: Path) -> list[str]:
    path = tmp / "nan_latent.safetensors"
    save_file({"latent": torch.full((16, 2, 4, 4), float("nan"))}, path)
    return [*DEMO, "--latent_path", str(path)]


def prompt_file(content: bytes, *extra: str):
    def build(tmp: Path) -> list[str]:
        path = tmp / "prompts.txt"
        path.write_bytes(content)
        return [*DEMO, "--output_type", "latent", "--from_file", str(path), *extra]

    return build


def prompt_path(kind: str):
    def build(tmp: Path) -> list[str]:
        path = tmp / "prompts.txt"
        make_fifo(path) if kind == "fifo" else path.mkdir()
        return [*DEMO, "--from_file", str(path)]

    return build


def save_path(kind: str):
    def build(tmp: Path) -> list[str]:
        target = {
            "under-file": tmp / "file.txt" / "sub",
            "file": tmp / "plainfile",
            "dir.mp4": tmp / "taken.mp4",
            "readonly": tmp / "ro",
        }[kind]
        if kind == "under-file":
            (tmp / "file.txt").write_text("x")
        elif kind == "file":
            target.write_text("x")
        elif kind == "dir.mp4":
            target.mkdir()
        elif kind == "readonly":
            target.mkdir()
            target.chmod(0o555)
        return ["--prompt", "p", *DEMO, "--save_path", str(target)]

    return build


def taken_name(tmp: Path) -> list[str]:
    out = tmp / "out"
    out.mkdir()
    (out / "clip.mp4").write_bytes(b"an earlier result")
    return ["--prompt", "p", *DEMO, "--save_path", str(out / "clip.mp4")]


def stale_temporary(tmp: Path) -> list[str]:
    out = tmp / "out"
    out.mkdir()
    from wan_kernel.files import _host

    (out / f".clip.wan-{_host()}-999999999-0123abcd.partial.mp4").write_bytes(b"left by kill -9")
    return ["--prompt", "p", *DEMO, "--output_type", "latent"]


# --------------------------------------------------------------------------------------------
# The command-line tables
# --------------------------------------------------------------------------------------------

FILES = [
    Case(
        "files", "entry-not-a-record", dit_with_header({"w": 5}), message=("dit.safetensors", "not a record")
    ),
    Case(
        "files",
        "missing-data-offsets",
        dit_with_header({"w": {"dtype": "F32", "shape": [1]}}),
        message="data_offsets",
    ),
    Case(
        "files",
        "string-data-offsets",
        dit_with_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, b"\0" * 4),
        message="data_offsets",
    ),
    Case(
        "files",
        "float-data-offsets",
        dit_with_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]}}, b"\0" * 4),
        message="data_offsets",
    ),
    Case(
        "files",
        "reversed-data-offsets",
        dit_with_header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
        message="data_offsets",
    ),
    Case(
        "files",
        "negative-shape",
        dit_with_header({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        message=("dit.safetensors", "shape"),
    ),
    Case(
        "files",
        "boolean-shape",
        dit_with_header({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
        message="shape",
    ),
    Case(
        "files", "metadata-not-strings", dit_with_header({"__metadata__": {"a": 1}}), message="__metadata__"
    ),
    Case("files", "header-a-list", dit_with_header([1, 2]), message="not a JSON object"),
    Case(
        "files",
        "truncated",
        dit_with_header({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, b"\0" * 4),
        message="truncated",
    ),
    Case(
        "files",
        "shard-index-list",
        shard_index({"weight_map": ["model-00001-of-00001.safetensors"]}),
        message=("index.json", "weight_map"),
    ),
    Case("files", "shard-index-not-object", shard_index([1, 2]), message=("index.json", "JSON object")),
    Case(
        "files",
        "shard-index-escapes-folder",
        shard_index({"weight_map": {"w": "../../etc/passwd"}}),
        message="file names in the same folder",
    ),
    Case("files", "dit-fifo", special("fifo", "dit"), message=("dit.safetensors", "named pipe")),
    Case("files", "t5-fifo", special("fifo", "t5"), message=("t5.safetensors", "named pipe")),
    Case("files", "vae-fifo", special("fifo", "vae"), message=("vae.safetensors", "named pipe")),
    Case("files", "dit-folder-without-weights", special("folder", "dit"), message="holds no .safetensors"),
    Case("files", "vae-folder-without-weights", special("folder", "vae"), message="holds no .safetensors"),
    Case(
        "files",
        "dit-no-permission",
        special("noperm", "dit"),
        message="permission denied",
        skip=AS_ROOT if ROOT else None,
    ),
    Case(
        "files",
        "plain-pickle-pth",
        changed("dit", lambda s: None, suffix=".pth"),
        message=("old-style (non-zip) pickle", "refuses", ".safetensors"),
    ),
    Case(
        "files",
        "fp8-scale-missing",
        changed("dit", _scaled_fp8_without_one_scale),
        message=("scaled-fp8", "no scale_weight"),
    ),
    Case("files", "t5-narrower-than-dit", narrow_t5, message="does not fit this DiT (text width 16 vs 32)"),
]

CONFIG = [
    Case(
        "config",
        "num-heads-true",
        dit_beside_config(b'{"dim": 64, "num_heads": true}'),
        message=("config.json", '"num_heads" must be a positive integer, got true'),
    ),
    Case(
        "config",
        "num-heads-float",
        dit_beside_config(b'{"dim": 64, "num_heads": 2.0}'),
        message='"num_heads"',
    ),
    Case(
        "config",
        "dim-string",
        dit_beside_config(b'{"dim": "64", "num_heads": 2}'),
        message='"dim" must be a positive integer',
    ),
    Case("config", "eps-null", dit_beside_config(b'{"dim": 64, "eps": null}'), message='"eps"'),
    Case(
        "config",
        "not-utf8",
        dit_beside_config(b'{"model_type": "t2v\xff"}'),
        message=("config.json", "not UTF-8"),
    ),
    Case("config", "not-an-object", dit_beside_config(b"[64, 2]"), message=("config.json", "JSON object")),
    Case("config", "not-json", dit_beside_config(b"{dim: 64"), message=("config.json", "not valid JSON")),
    Case(
        "config",
        "utf8-bom-is-fine",
        dit_beside_config(b'\xef\xbb\xbf{"dim": 64, "num_heads": 2}'),
        exit_code=0,
        outputs=1,
    ),
]

OPTIONS = [
    Case(
        "options",
        "guidance-nan",
        ["--prompt", "p", *DEMO, "--guidance_scale", "nan"],
        exit_code=2,
        message="not a finite number",
    ),
    Case(
        "options",
        "shift-inf",
        ["--prompt", "p", *DEMO, "--flow_shift", "inf"],
        exit_code=2,
        message="not a finite number",
    ),
    Case(
        "options",
        "cfg-ratio-nan",
        ["--prompt", "p", *DEMO, "--cfg_apply_ratio", "nan"],
        exit_code=2,
        message="not a finite number",
    ),
    Case(
        "options",
        "lora-multiplier-nan",
        ["--prompt", "p", *DEMO, "--lora_weight", "x.safetensors", "--lora_multiplier", "nan"],
        exit_code=2,
        message="not a finite number",
    ),
    Case(
        "options",
        "seed-too-big",
        ["--prompt", "p", *DEMO, "--seed", str(2**64)],
        exit_code=2,
        message=("out of range", "18446744073709551615"),
    ),
    Case(
        "options",
        "seed-too-small",
        ["--prompt", "p", *DEMO, "--seed", str(-(2**63) - 1)],
        exit_code=2,
        message="out of range",
    ),
    Case(
        "options",
        "seed-max-is-fine",
        ["--prompt", "p", *DEMO, "--output_type", "latent", "--seed", str(2**64 - 1)],
        exit_code=0,
        outputs=1,
    ),
    Case("options", "empty-prompt", ["--prompt", "", *DEMO], message="the prompt is empty"),
    Case("options", "blank-prompt", ["--prompt", "   ", *DEMO], message="the prompt is empty"),
    Case(
        "options",
        "prompt-not-utf8",
        ["--prompt", "a fox \udcff", *DEMO],
        message=("--prompt is not valid UTF-8", "0xff"),
    ),
    Case(
        "options",
        "negative-prompt-not-utf8",
        ["--prompt", "p", "--negative_prompt", "\udce9t\udce9", *DEMO],
        message="--negative_prompt is not valid UTF-8",
    ),
    Case(
        "options",
        "latent-path-fifo",
        lambda tmp: [*DEMO, "--latent_path", str(make_fifo(tmp / "l.safetensors"))],
        message="named pipe",
    ),
    Case(
        "options",
        "shift-zero",
        ["--prompt", "p", *DEMO, "--flow_shift", "0"],
        message="--flow_shift must be positive",
    ),
    Case(
        "options",
        "interactive-not-utf8-line",
        [*DEMO, "--interactive", "--output_type", "latent"],
        input=b"\xff\xfe oops\ngood line --d 1\n",
        message="stdin line 1: not valid UTF-8",
        outputs=1,
    ),
]

PROMPTS = [
    Case(
        "prompts",
        "bom-before-comment",
        prompt_file("\ufeff# a comment, not a prompt\nthe only prompt --d 1\n".encode()),
        exit_code=0,
        outputs=1,
    ),
    Case(
        "prompts",
        "tab-separated-options",
        prompt_file(b"a fox\t--d\t3\t--s 1\n"),
        exit_code=0,
        outputs=1,
        message="seed 3:",
    ),
    Case("prompts", "crlf-lines", prompt_file(b"one --d 1\r\ntwo --d 2\r\n"), exit_code=0, outputs=2),
    Case(
        "prompts",
        "line-not-utf8",
        prompt_file(b"fine\nbad \xff line\n"),
        message=("line 2", "not valid UTF-8"),
    ),
    Case(
        "prompts",
        "bad-shift-on-line-3",
        prompt_file(b"one\ntwo\nthree --fs 0\n"),
        message=("line 3", "must be positive"),
    ),
    Case(
        "prompts", "guidance-nan-on-line-2", prompt_file(b"one\ntwo --g nan\n"), message=("line 2", "finite")
    ),
    Case(
        "prompts",
        "seed-out-of-range",
        prompt_file(b"one\ntwo --d 99999999999999999999999\n"),
        message=("line 2", "out of range"),
    ),
    Case("prompts", "options-only", prompt_file(b"\t--d 3\n"), message="put the prompt text first"),
    Case("prompts", "fifo", prompt_path("fifo"), message="not a regular file"),
    Case("prompts", "folder", prompt_path("folder"), message="is a folder"),
]

NONFINITE = [
    Case(
        "nonfinite",
        "nan-dit-weights",
        changed("dit", _nan_in("blocks.0.ffn")),
        message=("dit.safetensors", "NaN or Inf", "blocks.0.ffn"),
    ),
    Case(
        "nonfinite",
        "inf-dit-weights",
        changed("dit", _nan_in("blocks.1.self_attn.q", float("inf"))),
        message=("NaN or Inf", "blocks.1.self_attn.q.weight"),
    ),
    Case(
        "nonfinite",
        "nan-vae-weights",
        changed("vae", _nan_in("decoder.")),
        message=("vae.safetensors", "NaN or Inf"),
    ),
    Case(
        "nonfinite",
        "nan-t5-weights",
        changed("t5", _nan_in("encoder.block.0")),
        message=("t5.safetensors", "NaN or Inf"),
    ),
    Case("nonfinite", "nan-lora", nan_lora, message=("NaN", "nan_lora.safetensors")),
    Case("nonfinite", "lora-multiplier-overflow", huge_lora, message=("NaN or Inf", "LoRAs merged in")),
    Case("nonfinite", "nan-latent-file", nan_latent, message=("nan_latent.safetensors", "NaN")),
]

OUTPUTS = [
    Case(
        "outputs",
        "save-path-under-a-file",
        save_path("under-file"),
        message=("file.txt is a file, not a folder",),
    ),
    Case("outputs", "save-path-a-file", save_path("file"), message=("plainfile is a file, not a folder",)),
    Case(
        "outputs",
        "save-path-mp4-is-a-folder",
        save_path("dir.mp4"),
        message=("taken.mp4 is an existing folder",),
    ),
    Case(
        "outputs",
        "read-only-folder",
        save_path("readonly"),
        message=("ro", "permission denied"),
        skip=AS_ROOT if ROOT else None,
    ),
    Case(
        "outputs",
        "empty-save-path",
        ["--prompt", "p", *DEMO, "--save_path", ""],
        message="--save_path is empty",
    ),
    Case("outputs", "name-taken-gets-a-suffix", taken_name, exit_code=0, outputs=2, message="clip_1.mp4"),
    Case("outputs", "stale-temporary-is-cleaned", stale_temporary, exit_code=0, outputs=1),
]

CLI_CASES = [*FILES, *CONFIG, *OPTIONS, *PROMPTS, *NONFINITE, *OUTPUTS]


def run_generate_case(case: Case, tmp_path: Path) -> Outcome:
    return run_cli_case(case, tmp_path, command=GENERATE)


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.id)
def test_generate_bad_input(case, tmp_path):
    outcome = run_generate_case(case, tmp_path)
    outcome.check()
    if case.name == "name-taken-gets-a-suffix":
        assert (tmp_path / "out" / "clip.mp4").read_bytes() == b"an earlier result"


# --------------------------------------------------------------------------------------------
# The Python API table
# --------------------------------------------------------------------------------------------


_DEMO_DIT = object()


def _load_dit(path: object = _DEMO_DIT, **kwargs):
    def call(tmp: Path):
        from wan_kernel.models import load_dit

        return load_dit(weights()["dit"] if path is _DEMO_DIT else path, **kwargs)

    return call


class _BytesPath:
    def __fspath__(self):
        return b"/tmp/x.safetensors"


def _gray16(tmp: Path, mode: str = "I;16") -> None:
    import numpy as np
    from PIL import Image

    from wan_kernel.pipelines.media import read_image

    path = tmp / ("gray16.png" if mode == "I;16" else "gray32.tif")  # PNG cannot hold mode I
    image = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    (image if mode == "I;16" else image.convert("I")).save(path)
    value = np.asarray(read_image(path))[0, 0, 0]
    if abs(int(value) - 128) > 1:
        raise WrongResult(f"a mid-gray 16-bit PNG (32768 of 65535) read as {value}, not 128")


def _bomb(tmp: Path) -> None:
    from PIL import Image

    from wan_kernel.pipelines.media import read_image

    path = tmp / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # 64 x 64 is then more than twice the limit: PIL's bomb error
    try:
        read_image(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _read_image_at(kind: str):
    def call(tmp: Path) -> None:
        from wan_kernel.pipelines.media import read_image

        path = tmp / "start.png"
        make_fifo(path) if kind == "fifo" else path.mkdir()
        read_image(path)

    return call


def _closed_stdin(tmp: Path) -> None:
    import io

    from wan_kernel.pipelines.prompts import open_stdin_lines

    stream = io.TextIOWrapper(io.BytesIO(b"x"))
    stream.close()
    open_stdin_lines(stream)


def _compat(**kwargs):
    def call(tmp: Path) -> None:
        from wan_kernel.models.compat import check_compatible

        check_compatible(**kwargs)

    return call


def _seed(value):
    def call(tmp: Path) -> None:
        from wan_kernel.pipelines.generate import GenerateConfig

        GenerateConfig(prompt="p", seed=value).check()

    return call


class _PoisonedDemo:
    """The demo models with NaN written into the DiT or the VAE after building (as a model handed
    over by training would be): the loaders' check never sees them, the pipeline's checks must."""

    def __new__(cls, which: str):
        from wan_kernel.demo import DemoModels

        class Poisoned(DemoModels):
            def load_dit(self, **kwargs):
                dit = super().load_dit(**kwargs)
                if which == "dit":
                    dit.blocks[0].ffn[0].weight.data[0, 0] = float("nan")
                return dit

            def load_vae(self, **kwargs):
                vae = super().load_vae(**kwargs)
                if which == "vae":
                    vae.model.decoder.head[-1].weight.data.view(-1)[0] = float("nan")
                return vae

        return Poisoned()


def _poisoned_run(which: str, **options):
    def call(tmp: Path) -> None:
        from wan_kernel.pipelines.generate import GenerateConfig, GenerationPipeline

        config = GenerateConfig(
            prompt="p", video_size=(32, 32), video_length=5, infer_steps=2, seed=1, device="cpu",
            save_path=str(tmp / "out"), **options,
        )  # fmt: skip
        GenerationPipeline(config, models=_PoisonedDemo(which), progress=False, log=lambda m: None).run()

    return call


# -- plugins ------------------------------------------------------------------------------------

ATTENTION_SOURCE = """
import sys
from wan_kernel import hookimpl
from wan_kernel.interfaces import AttentionBackend, Availability
{prelude}

class Backend(AttentionBackend):
    name = {name!r}

    def availability(self):
        return Availability.yes()

    def __call__(self, q, k, v, k_lens=None):
{body}


@hookimpl
def wan_register_attention(register):
    register(Backend())
"""


@contextlib.contextmanager
def fake_distribution(tmp: Path, distribution: str, name: str, *, body: str = "return q", prelude: str = ""):
    """An installed-looking distribution (module + dist-info on sys.path) registering attention ``name``."""
    import uuid

    root = tmp / f"site-{uuid.uuid4().hex[:6]}"
    root.mkdir()
    module = f"wan_fake_{uuid.uuid4().hex[:10]}"
    (root / f"{module}.py").write_text(
        ATTENTION_SOURCE.format(
            prelude=prelude, name=name, body="        " + body.replace("\n", "\n        ")
        )
    )
    info = root / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[wan_kernel]\n{distribution.removeprefix('wan-')} = {module}\n")
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        sys.modules.pop(module, None)


def _manager(*distributions: str):
    from wan_kernel.plugins import LOAD_ENV, PluginManager

    return PluginManager(
        environ={LOAD_ENV: ",".join(("wan-attention-sdpa", "wan-cfg-schedules", *distributions))}
    )


def _sys_exit_at_import(tmp: Path) -> None:
    with fake_distribution(tmp, "wan-attention-quitter", "quitter", prelude="sys.exit(3)"):
        manager = _manager("wan-attention-quitter")  # must not exit
        manager.get("attention", "quitter")


def _builtin_name_taken(tmp: Path) -> None:
    from wan_kernel.errors import DuplicatePluginNameError

    with fake_distribution(tmp, "wan-attention-squatter", "sdpa"):
        try:
            _manager("wan-attention-squatter").get("attention", "sdpa")
        except DuplicatePluginNameError as exc:
            if "pip uninstall wan-attention-sdpa" in str(exc):
                raise WrongResult(f"advises removing wan's own plugin: {exc}") from None
            raise


def _attention_run(name: str, body: str, *, run: bool = False):
    """Set up (and with ``run``, run) the demo pipeline with a third-party attention plugin."""

    def call(tmp: Path) -> None:
        from wan_kernel.demo import DemoModels
        from wan_kernel.pipelines.generate import GenerateConfig, GenerationPipeline

        with fake_distribution(tmp, f"wan-attention-{name}", name, body=body):
            config = GenerateConfig(
                prompt="p", video_size=(32, 32), video_length=5, infer_steps=2, seed=1, device="cpu",
                attn=name, output_type="latent", save_path=str(tmp / "out"),
            )  # fmt: skip
            pipeline = GenerationPipeline(
                config, models=DemoModels(), plugin_manager=_manager(f"wan-attention-{name}"),
                progress=False, log=lambda m: None,
            )  # fmt: skip
            pipeline.run() if run else pipeline.setup()

    return call


PLUGIN_CASES = [
    (
        Case("plugins", "sys-exit-at-import", message=("wan-attention-quitter", "sys.exit(3)")),
        _sys_exit_at_import,
    ),
    (
        Case(
            "plugins",
            "builtin-name-taken",
            message=("pip uninstall wan-attention-squatter", "WAN_DISABLE_PLUGINS=wan-attention-squatter"),
        ),
        _builtin_name_taken,
    ),
    (
        Case(
            "plugins",
            "attention-wrong-shape",
            message=("'narrow' (from wan-attention-narrow)", "returned shape", "--attn sdpa"),
        ),
        _attention_run("narrow", "return q[:, :, :1]"),
    ),
    (
        Case("plugins", "attention-wrong-dtype", message=("returned dtype torch.float64", "--attn sdpa")),
        _attention_run("wide", "return q.double()"),
    ),
    (
        Case("plugins", "attention-nan", message="NaN or Inf"),
        _attention_run("nanny", "return q * float('nan')"),
    ),
    (
        Case(
            "plugins",
            "attention-raises-at-once",
            message=(
                "'boom' (from wan-attention-boom)",
                "failed on a small test input",
                "RuntimeError: kaboom",
            ),
        ),
        _attention_run("boom", "raise RuntimeError('kaboom')"),
    ),
    (
        Case(
            "plugins",
            "attention-raises-mid-run",
            message=(
                "'late' (from wan-attention-late)",
                "failed during the run",
                "ValueError: too long",
                "--attn sdpa",
            ),
        ),
        _attention_run("late", "if k.shape[1] > 64:\n    raise ValueError('too long')\nreturn q", run=True),
    ),
]


def _works(call):
    def run(tmp: Path) -> None:
        result = call(tmp)
        if result is None:
            raise WrongResult("returned None")

    return run


API = [
    (Case("api", "dtype-string-float32", exit_code=0), _works(_load_dit(dtype="float32"))),
    (Case("api", "dtype-string-bf16", exit_code=0), _works(_load_dit(dtype="bf16"))),
    (Case("api", "dtype-int8", message="not dtype int8"), _load_dit(dtype=torch.int8)),
    (Case("api", "dtype-name-int8", message="unknown dtype 'int8'"), _load_dit(dtype="int8")),
    (Case("api", "dtype-number", message="must be a torch.dtype or its name"), _load_dit(dtype=5)),
    (Case("api", "dtype-unknown-name", message="unknown dtype 'float33'"), _load_dit(dtype="float33")),
    (Case("api", "path-a-number", message="must be a str or os.PathLike, got int"), _load_dit(path=12)),
    (Case("api", "path-none", message="got NoneType"), _load_dit(path=None)),
    (Case("api", "pathlike-of-bytes", message="must be a str or os.PathLike"), _load_dit(path=_BytesPath())),
    (
        Case("api", "num-heads-true", message="num_heads for the DiT must be a positive int, got bool"),
        _load_dit(num_heads=True),
    ),
    (Case("api", "num-heads-string", message="got str"), _load_dit(num_heads="2")),
    (Case("api", "num-heads-zero", message="must be positive"), _load_dit(num_heads=0)),
    (Case("api", "device-unknown", message="unknown device 'gpu7'"), _load_dit(device="gpu7")),
    (
        Case("api", "vae-dtype-name", exit_code=0),
        _works(
            lambda tmp: __import__("wan_kernel.models", fromlist=["x"]).load_vae(
                weights()["vae"], dtype="fp16"
            )
        ),
    ),
    (
        Case("api", "t5-path-none", message="T5 text encoder path must be a str"),
        lambda tmp: __import__("wan_kernel.models", fromlist=["x"]).load_t5(None),
    ),
    (
        Case("api", "clip-num-heads-float", message="num_heads for the CLIP vision tower"),
        lambda tmp: __import__("wan_kernel.models", fromlist=["x"]).load_clip_vision(
            "x.safetensors", num_heads=2.0
        ),
    ),
    (
        Case(
            "api",
            "clip-too-narrow",
            message="this CLIP does not fit this DiT (image feature width 1024 vs 1280)",
        ),
        _compat(image_width=1024),
    ),
    (
        Case("api", "t5-too-narrow", message="this T5 does not fit this DiT (text width 32 vs 48)"),
        _compat(text_width=32, dit_text_dim=48),
    ),
    (
        Case(
            "api", "seed-out-of-range", message="from -9223372036854775808 (-2**63) to 18446744073709551615"
        ),
        _seed(2**64),
    ),
    (
        Case(
            "nonfinite",
            "pipeline-nan-dit",
            message=(
                "the latents of prompt 1",
                "DiT weights",
                "blocks.0.ffn.0.weight",
                "nothing was decoded or written",
            ),
        ),
        _poisoned_run("dit"),
    ),
    (
        Case("nonfinite", "pipeline-nan-dit-latent-only", message=("the latents", "DiT weights")),
        _poisoned_run("dit", output_type="latent"),
    ),
    (
        Case(
            "nonfinite",
            "pipeline-nan-vae",
            message=("the decoded frames", "VAE weights", "nothing was written"),
        ),
        _poisoned_run("vae"),
    ),
    (Case("media", "gray16-png-by-range", exit_code=0), _gray16),
    (Case("media", "decompression-bomb", message=("too large to open safely", "MAX_IMAGE_PIXELS")), _bomb),
    (Case("media", "image-fifo", message="named pipe (FIFO)"), _read_image_at("fifo")),
    (Case("media", "image-folder", message="is a folder"), _read_image_at("folder")),
    (Case("media", "gray32-int-tiff-by-range", exit_code=0), lambda tmp: _gray16(tmp, "I")),
    (Case("options", "interactive-stdin-closed", message="standard input, which is closed"), _closed_stdin),
]


API += PLUGIN_CASES


@pytest.mark.parametrize("case, call", API, ids=[c.id for c, _ in API])
def test_python_api_bad_input(case, call, tmp_path):
    run_api_case(case, tmp_path, call, expected=WanError).check()


def test_typed_errors_are_the_documented_ones():
    """Argument problems are InputErrors, file problems WeightsErrors (as the docstrings say)."""
    from wan_kernel.models import load_dit

    with pytest.raises(InputError):
        load_dit(weights()["dit"], num_heads=True)
    with pytest.raises(WeightsError):
        load_dit(Path(weights()["dit"]).parent / "missing.safetensors")


def all_outcomes(tmp_root: Path) -> list[Outcome]:
    """Every case of this module (command line and API), for the count matrix."""
    outcomes = []
    for i, case in enumerate(CLI_CASES):
        if case.skip:
            continue
        folder = tmp_root / f"cli{i}"
        folder.mkdir()
        outcomes.append(run_generate_case(case, folder))
    for i, (case, call) in enumerate(API):
        folder = tmp_root / f"api{i}"
        folder.mkdir()
        outcomes.append(run_api_case(case, folder, call, expected=WanError))
    return outcomes


if __name__ == "__main__":  # the count matrix: python tests/test_bad_input_generate.py
    with tempfile.TemporaryDirectory() as tmp:  # verdicts look at the output folders: inside the block
        results = all_outcomes(Path(tmp))
        for outcome in results:
            if outcome.verdict != "clean":
                print(f"{outcome.case.id}: {outcome.verdict}: {'; '.join(outcome.problems)}", file=sys.stderr)
        print(format_matrix(count_matrix(results)))


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_failing_attention_plugin_on_the_command_line(tmp_path, monkeypatch, verbose):
    """The message names the plugin and suggests --attn sdpa; its traceback only with --verbose."""
    from click.testing import CliRunner
    from wan_cli.main import cli

    from wan_kernel import plugins

    monkeypatch.delenv("WAN_DEBUG", raising=False)
    body = "if k.shape[1] > 64:\n    raise ValueError('too long')\nreturn q"
    with fake_distribution(tmp_path, "wan-attention-late", "late", body=body):
        monkeypatch.setattr(plugins, "_manager", _manager("wan-attention-late"))
        args = [
            "run",
            "generate",
            "--prompt",
            "p",
            *DEMO,
            "--attn",
            "late",
            "--save_path",
            str(tmp_path / "out"),
        ]
        result = CliRunner().invoke(cli, args + (["--verbose"] if verbose else []))
    assert result.exit_code == 1
    if verbose:  # the error propagates with its traceback (as WAN_DEBUG=1), after the plugin's own
        assert "The plugin failed with" in result.output and "ValueError: too long" in result.output
    else:
        assert "Traceback" not in result.output
        assert "'late' (from wan-attention-late)" in result.stderr and "--attn sdpa" in result.stderr
        assert "pass --verbose or set WAN_DEBUG=1" in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
