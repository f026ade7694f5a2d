"""The dataset TOML: defaults, inheritance, every kind of error naming the dataset and key, Windows paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from wan_kernel.dataset.config import DEFAULT_RESOLUTION, load_dataset_config
from wan_kernel.errors import InputError


def _images(folder: Path, names=("a.png",)) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (32, 32)).save(folder / name)
    return folder


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _fails(tmp_path: Path, text: str, *fragments: str) -> str:
    with pytest.raises(InputError) as info:
        load_dataset_config(_write(tmp_path, text))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_defaults_general_inheritance_and_rounding(tmp_path):
    _images(tmp_path / "img")
    (tmp_path / "vid").mkdir()
    (tmp_path / "vid" / "v.mp4").write_bytes(b"")
    path = _write(
        tmp_path,
        f"""
[general]
resolution = 512
caption_extension = ".txt"
batch_size = 2
enable_bucket = true

[[datasets]]
image_directory = "{(tmp_path / "img").as_posix()}"
num_repeats = 3

[[datasets]]
video_directory = "vid"
cache_directory = "cache/v"
resolution = [832, 480]
target_frames = [1, 25, 26, 45, 45]
frame_extraction = "slide"
frame_stride = 10
source_fps = 30
""",
    )
    group = load_dataset_config(path)
    images, videos = group.datasets
    assert images.resolution == (512, 512) and images.batch_size == 2 and images.num_repeats == 3
    assert images.enable_bucket and not images.is_video and images.caption_extension == ".txt"
    assert images.cache_directory == tmp_path / "img"  # defaults to the image folder
    assert videos.is_video and videos.resolution == (832, 480) and videos.num_repeats == 1
    assert videos.target_frames == (1, 25, 45)  # 4n+1, deduplicated, sorted
    assert videos.frame_extraction == "slide" and videos.frame_stride == 10 and videos.source_fps == 30.0
    # relative paths: from the TOML's folder when they do not exist from the current one
    assert videos.directory == tmp_path / "vid"
    assert videos.cache_directory == tmp_path / "cache" / "v"
    assert isinstance(videos.cache_directory, Path)


def test_seed_defaults(tmp_path):
    _images(tmp_path / "img")
    group = load_dataset_config(
        _write(
            tmp_path, f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\ncaption_extension = ".txt"\n'
        )
    )
    (d,) = group.datasets
    assert d.resolution == DEFAULT_RESOLUTION == (960, 544)
    assert (d.batch_size, d.num_repeats, d.enable_bucket, d.bucket_no_upscale) == (1, 1, False, False)


def test_unknown_key_names_the_closest(tmp_path):
    _images(tmp_path / "img")
    _fails(
        tmp_path,
        f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\ncaption_extension = ".txt"\n'
        "resoluton = 512\n",
        "datasets[0]",
        "'resoluton'",
        "did you mean 'resolution'",
    )
    _fails(
        tmp_path,
        '[general]\nbatch_sise = 2\n[[datasets]]\nimage_directory = "x"\n',
        "[general]",
        "batch_size",
    )
    _fails(tmp_path, "[general]\ntarget_frames = [1]\n", "[general]", "target_frames", "[[datasets]]")
    _fails(tmp_path, '[[datasets]]\nimage_dir = "x"\n', "datasets[0]", "did you mean 'image_directory'")
    _fails(tmp_path, '[[dataset]]\nimage_directory = "x"\n', "'dataset'", "did you mean 'datasets'")


def test_wrong_type_names_dataset_and_key(tmp_path):
    _images(tmp_path / "img")
    head = f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\ncaption_extension = ".txt"\n'
    _fails(tmp_path, head * 2 + 'batch_size = "2"\n', "datasets[1]", "batch_size", "integer", "'2'")
    _fails(tmp_path, head + "enable_bucket = 1\n", "datasets[0]", "enable_bucket", "true or false")
    _fails(tmp_path, head + "resolution = [512]\n", "resolution", "[width, height]")
    _fails(
        tmp_path,
        f'[[datasets]]\nvideo_directory = "{tmp_path / "img"}"\ncaption_extension = ".txt"\n'
        'frame_extraction = "middle"\n',
        "frame_extraction",
        "head, chunk, slide, uniform, full",
    )
    # an image dataset does not take video keys
    _fails(tmp_path, head + "target_frames = [1]\n", "datasets[0]", "target_frames", "different kind")


def test_missing_directory_empty_dataset_and_sources(tmp_path):
    _fails(
        tmp_path, '[[datasets]]\nimage_directory = "nowhere"\n', "datasets[0]", "image_directory", "nowhere"
    )
    (tmp_path / "empty").mkdir()
    _fails(
        tmp_path,
        f'[[datasets]]\nvideo_directory = "{tmp_path / "empty"}"\ncaption_extension = ".txt"\n',
        "datasets[0]",
        "video_directory",
        "empty",
    )
    _fails(tmp_path, "[general]\nbatch_size = 1\n", "no [[datasets]]")
    _fails(tmp_path, '[[datasets]]\nimage_directory = "a"\nvideo_directory = "b"\n', "exactly one of")
    _images(tmp_path / "img")
    _fails(
        tmp_path, f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\n', "caption_extension is required"
    )


def test_jsonl_needs_cache_directory_and_valid_lines(tmp_path):
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text('{"image_path": "a.png", "caption": "x"}\nnot json\n')
    _fails(tmp_path, f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\n', "cache_directory is required")
    _fails(
        tmp_path,
        f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "c"\n',
        "datasets[0]",
        "items.jsonl:2",
        "not valid JSON",
    )
    jsonl.write_text('{"video_path": "a.mp4"}\n')
    _fails(tmp_path, f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "c"\n', "image_path")
    jsonl.write_text("\n\n")
    _fails(tmp_path, f'[[datasets]]\nimage_jsonl_file = "{jsonl}"\ncache_directory = "c"\n', "empty")


def test_windows_paths(tmp_path):
    # single-quoted (literal) and escaped double-quoted strings are standard TOML
    message = _fails(tmp_path, "[[datasets]]\nimage_directory = 'C:\\data\\images'\n", "datasets[0]")
    assert "C:\\data\\images" in message
    message = _fails(tmp_path, '[[datasets]]\nimage_directory = "C:\\\\data\\\\images"\n', "datasets[0]")
    assert "C:\\data\\images" in message
    # a bare backslash in double quotes is invalid TOML; it is read as the Windows path it is
    message = _fails(tmp_path, '[[datasets]]\nimage_directory = "D:\\data\\images"\n', "image_directory")
    assert "D:\\data\\images" in message
    # ... unless it forms an escape (\n, \t): then the path is refused with how to write it
    _fails(tmp_path, '[[datasets]]\nimage_directory = "C:\\new\\images"\n', "single quotes")


def test_unused_seed_keys_are_accepted_and_listed(tmp_path):
    _images(tmp_path / "img")
    group = load_dataset_config(
        _write(
            tmp_path,
            f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\ncaption_extension = ".txt"\n'
            "fp_latent_window_size = 9\nfp_1f_clean_indices = [0]\n",
        )
    )
    assert group.datasets[0].unused == ("fp_latent_window_size", "fp_1f_clean_indices")


def test_not_toml(tmp_path):
    _fails(tmp_path, "[[datasets]\nfoo", "not valid TOML")
    with pytest.raises(InputError, match="not found"):
        load_dataset_config(tmp_path / "missing.toml")


def test_readme_example_uses_only_known_keys():
    import re
    import sys

    from wan_kernel.dataset.config import GENERAL_KEYS, KEYS

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block, "the README's Training section shows a dataset TOML"
    data = tomllib.loads(block.group(1))
    assert set(data["general"]) <= set(GENERAL_KEYS)
    for entry in data["datasets"]:
        assert set(entry) <= set(KEYS)
