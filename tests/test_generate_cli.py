"""``wan run generate`` through click: option spellings, help, errors (exit 1, nothing written)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from wan_cli.main import cli

from wan_kernel.testing import REFERENCE_FIXTURES

FIXTURES = REFERENCE_FIXTURES
needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(), reason=f"reference fixtures not found at {FIXTURES}"
)
SMALL = ["--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2"]


def _run(args, input=None):
    return CliRunner().invoke(cli, ["run", "generate", *args], input=input)


def _fails(result, fragment: str, save: Path | None = None) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.stderr.startswith("error: ") or "\nerror: " in result.stderr, result.stderr
    assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output
    if save is not None:
        assert not save.exists() or not any(save.iterdir())


def test_help_documents_every_option_with_its_default():
    result = _run(["--help"])
    assert result.exit_code == 0
    text = result.output
    for option in (
        "--attn, --attn_mode",
        "--fp8, --fp8_base",
        "--fp8_scaled",
        "--fp8_fast",
        "--fp8_t5",
        "--video_size",
        "--video_length",
        "--infer_steps",
        "--cfg_skip_mode",
        "--cfg_apply_ratio",
        "--output_type",
        "--latent_path",
        "--from_file",
        "--interactive",
        "--blocks_to_swap",
        "--vae_cache_cpu",
        "--compile",
        "--trim_tail_frames",
        "--end_image_path",
        "--preset",
        "--t5_tokenizer",
    ):
        assert option in text, option
    assert "[default: sdpa]" in text and "[default: video]" in text and "[default: 480 832]" in text


def test_from_file_runs_every_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two clips\na fox --d 3 --w 48\na cat --d 4 --f 9\n", encoding="utf-8")
    save = tmp_path / "out"
    result = _run(["--preset", "demo", "--from_file", str(prompts), "--save_path", str(save), *SMALL])
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.stdout.split()]
    assert len(written) == 2 and all(p.suffix == ".mp4" and p.parent == save for p in written)
    from wan_kernel.pipelines.media import read_video

    shapes = sorted(read_video(p)[0].shape for p in written)
    assert shapes == [(5, 32, 48, 3), (9, 32, 32, 3)]
    assert "text encoder" in result.stderr and "decode" in result.stderr  # the stage summary


def test_interactive_reads_stdin_until_eof_and_reports_bad_lines(tmp_path):
    save = tmp_path / "out"
    result = _run(
        ["--preset", "demo", "--interactive", "--save_path", str(save), "--output_type", "latent", *SMALL],
        input="first --d 1\n--oops\nsecond --d 2\n",
    )
    assert result.exit_code == 1  # one line failed
    assert "stdin line 2" in result.stderr
    assert len(list(save.glob("*_latent.safetensors"))) == 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--video_size", "30", "32"], "multiples of 16"),
        (["--video_length", "6"], "4n+1"),
        (["--attn", "nosuch"], "unknown attention implementation 'nosuch'"),
        (["--attn_mode", "xformers"], "cannot run here"),
        (["--cfg_skip_mode", "sometimes"], "unknown cfg_schedule implementation"),
        (["--quant", "nosuch"], "unknown quantization implementation 'nosuch'"),
        (["--quant", "fp8", "--fp8_scaled"], "disagrees"),
        (["--device", "cuda"], "no CUDA"),
        (["--blocks_to_swap", "2"], "needs a CUDA device"),
        (["--dit", "x.safetensors"], "cannot take --dit"),
    ],
)
def test_bad_options_exit_1_with_a_clear_message(tmp_path, args, fragment):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    save = tmp_path / "out"
    result = _run(["--preset", "demo", "--prompt", "p", "--save_path", str(save), *SMALL, *args])
    _fails(result, fragment, save)


def test_malformed_prompt_file_names_the_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("good prompt\nbad prompt --s many\n", encoding="utf-8")
    save = tmp_path / "out"
    _fails(_run(["--preset", "demo", "--from_file", str(prompts), "--save_path", str(save)]), "line 2", save)


def test_nothing_to_do_and_conflicting_modes():
    _fails(_run([]), "nothing to do")
    _fails(_run(["--prompt", "a", "--interactive"]), "only one of")


def test_missing_weights(tmp_path):
    save = tmp_path / "out"
    _fails(_run(["--prompt", "p", "--save_path", str(save)]), "pass --dit PATH", save)
    _fails(_run(["--prompt", "p", "--dit", str(tmp_path / "none.safetensors")]), "file not found")


@needs_fixtures
def test_seed_t2v_command_line_is_accepted(tmp_path):
    """The seed's T2V example, with `python wan_generate_video.py` replaced: options parse; the run
    fails only because the files in it do not exist."""
    line = (
        "--fp8 --task t2v-1.3B --video_size  832 480 --video_length 81 --infer_steps 20 "
        '--prompt "prompt for the video" --save_path path/to/save.mp4 --output_type both '
        "--dit path/to/wan2.1_t2v_1.3B_bf16_etc.safetensors --vae path/to/wan_2.1_vae.safetensors "
        "--t5 path/to/models_t5_umt5-xxl-enc-bf16.pth --attn_mode torch"
    )
    result = _run(shlex.split(line))
    assert result.exit_code == 1, result.output  # not 2: every option is known
    assert "No such option" not in result.output


@needs_fixtures
class TestWeightsAndImages:
    """Errors that need real (fixture) weight files: what the file is, i2v inputs."""

    def i2v(self, tmp_path, *extra):
        return [
            "--prompt", "p", "--save_path", str(tmp_path / "out"),
            "--dit", str(FIXTURES / "dit_i2v" / "weights.safetensors"),
            "--t5", str(FIXTURES / "t5" / "weights.safetensors"),
            "--vae", str(FIXTURES / "vae" / "weights.safetensors"),
            *extra,
        ]  # fmt: skip

    def test_a_vae_file_passed_as_dit(self, tmp_path):
        _fails(_run(["--prompt", "p", "--dit", str(FIXTURES / "vae" / "weights.safetensors")]), "looks like")

    def test_task_that_disagrees_with_the_weights(self, tmp_path):
        _fails(_run(self.i2v(tmp_path, "--task", "t2v-1.3B")), "the --dit file is an i2v")

    def test_i2v_without_clip(self, tmp_path):
        _fails(_run(self.i2v(tmp_path)), "pass --clip PATH", tmp_path / "out")

    def test_i2v_without_image(self, tmp_path):
        clip = ["--clip", str(FIXTURES / "clip_visual" / "weights.safetensors")]
        _fails(_run(self.i2v(tmp_path, *clip)), "needs a start image", tmp_path / "out")

    def test_unreadable_image(self, tmp_path):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"definitely not a png")
        clip = ["--clip", str(FIXTURES / "clip_visual" / "weights.safetensors")]
        _fails(
            _run(self.i2v(tmp_path, *clip, "--image_path", str(bad))), "cannot read image", tmp_path / "out"
        )


def test_seed_multi_value_options_expand_to_repeats():
    from wan_cli.generate import expand_multi_value_options

    args = ["--lora_weight", "a.safetensors", "b.safetensors", "--lora_multiplier", "1.0", "-0.5",
            "--include_patterns", "blocks\\.1", "--prompt", "p", "--", "--lora_weight", "x"]  # fmt: skip
    assert expand_multi_value_options(args) == [
        "--lora_weight", "a.safetensors", "--lora_weight", "b.safetensors",
        "--lora_multiplier", "1.0", "--lora_multiplier", "-0.5",
        "--include_patterns", "blocks\\.1", "--prompt", "p", "--", "--lora_weight", "x",
    ]  # fmt: skip
    assert expand_multi_value_options(["--lora_weight"]) == ["--lora_weight"]


def test_seed_multi_value_lora_spelling_reaches_the_loader(tmp_path):
    """`--lora_weight A B --lora_multiplier 1.0 0.5` (the seed's spelling) reads both files: the
    second, missing one is reported by name."""
    first = tmp_path / "first.safetensors"
    first.write_bytes(b"")
    missing = tmp_path / "second.safetensors"
    result = _run(
        ["--preset", "demo", "--prompt", "p", "--save_path", str(tmp_path / "out"), *SMALL,
         "--lora_weight", str(first), str(missing), "--lora_multiplier", "1.0", "0.5"]  # fmt: skip
    )
    assert result.exit_code == 1, result.output
    assert "No such option" not in result.output and "Got unexpected extra argument" not in result.output
    assert "first.safetensors" in result.stderr or "second.safetensors" in result.stderr, result.stderr
