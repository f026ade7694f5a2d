"""Prompt lines with inline overrides (``--from_file`` / ``--interactive``)."""

from __future__ import annotations

import pytest

from wan_kernel.errors import InputError
from wan_kernel.pipelines.prompts import iter_prompt_lines, parse_prompt_line, read_prompt_file


def test_every_override_is_parsed_with_its_type():
    spec = parse_prompt_line(
        "a fox in snow --w 832 --h 480 --f 81 --d 42 --s 20 --g 6.5 --fs 3.0 --n blurry, dark "
        "--i a.png --ei b.png"
    )
    assert spec.prompt == "a fox in snow"
    assert (spec.width, spec.height, spec.frames, spec.seed, spec.steps) == (832, 480, 81, 42, 20)
    assert spec.guidance_scale == 6.5 and spec.flow_shift == 3.0
    assert spec.negative_prompt == "blurry, dark"
    assert (spec.image_path, spec.end_image_path) == ("a.png", "b.png")
    assert spec.overrides()["seed"] == 42 and "width" not in spec.overrides()


def test_l_is_the_seed_spelling_of_guidance_and_unset_fields_stay_none():
    spec = parse_prompt_line("a cat --l 4.0")
    assert spec.guidance_scale == 4.0
    assert spec.seed is None and spec.steps is None and spec.negative_prompt is None


def test_file_skips_blanks_and_comments_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# header\n\nfirst prompt --d 1\n  \nsecond prompt\n", encoding="utf-8")
    specs = read_prompt_file(path)
    assert [(s.prompt, s.line, s.seed) for s in specs] == [("first prompt", 3, 1), ("second prompt", 5, None)]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("a cat --d abc", "--d 'abc' is not an integer seed"),
        ("a cat --s 2.5", "--s '2.5' is not an integer number of steps"),
        ("a cat --zz 3", "unknown option --zz"),
        ("a cat --w", "--w needs a value"),
        ("a cat --f 0", "--f must be positive"),
        ("a cat --ci ctrl.png", "not supported"),
        ("--w 64 a cat", "starts with an option"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, line, fragment):
    path = tmp_path / "p.txt"
    path.write_text("fine prompt\n# comment\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_prompt_file(path)
    assert f"{path} line 3" in str(info.value)
    assert fragment in str(info.value)


def test_empty_and_missing_files_are_input_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(InputError, match="has no prompts"):
        read_prompt_file(empty)
    with pytest.raises(InputError, match="not found"):
        read_prompt_file(tmp_path / "missing.txt")


def test_stdin_lines_are_parsed_lazily():
    lines = iter(["one --d 3\n", "# skip\n", "two --s 4\n"])
    specs = list(iter_prompt_lines(lines, source="stdin"))
    assert [(s.prompt, s.line) for s in specs] == [("one", 1), ("two", 3)]
