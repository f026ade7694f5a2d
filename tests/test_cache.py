"""Caching end to end on tiny models: what is written equals what the loaders' encoders compute.

The VAE and T5 are the demo's tiny models saved to files and read back with ``load_vae`` /
``load_t5`` (as ``wan run cache`` does); CLIP is the reference fixture's tiny tower.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from wan_kernel.dataset.buckets import resize_to_bucket
from wan_kernel.dataset.cache_files import (
    parse_latent_cache_name,
    read_cache,
    read_latent_cache,
    read_text_cache,
)
from wan_kernel.dataset.config import load_dataset_config
from wan_kernel.dataset.media import read_image_array, read_video
from wan_kernel.errors import InputError
from wan_kernel.testing.bad_input import killed_run_temporary, leftover_temporaries
from wan_kernel.pipelines.cache import (
    CacheSettings,
    LatentEncoder,
    TextEncoder,
    cache_latents,
    cache_text,
    dry_run,
)
from wan_kernel.pipelines.media import write_image, write_video
from wan_kernel.testing import reference_case, skip_without_fixtures

SETTINGS = CacheSettings(num_workers=0, progress=False)


# --------------------------------------------------------------------------------------------
# Tiny models and a tiny dataset
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    from wan_kernel.demo import build_demo_t5, build_demo_vae

    folder = tmp_path_factory.mktemp("weights")
    vae = build_demo_vae()
    save_file({k: v.contiguous() for k, v in vae.model.state_dict().items()}, folder / "vae.safetensors")
    state = {k: v.clone() for k, v in build_demo_t5().state_dict().items()}
    state.pop("encoder.embed_tokens.weight")  # tied to shared.weight
    save_file(state, folder / "t5.safetensors")
    return folder


@pytest.fixture(scope="module")
def vae(weights):
    from wan_kernel.models import load_vae

    return load_vae(weights / "vae.safetensors", dtype=torch.float32)


@pytest.fixture(scope="module")
def t5(weights):
    from wan_kernel.models import load_t5, load_tokenizer

    return load_t5(weights / "t5.safetensors"), load_tokenizer("builtin:bytes")


def make_dataset(
    root: Path, *, images=("a.png", "b.jpg", "c.png"), videos=("clip.mp4",), target_frames: str = "[1, 5]"
) -> Path:
    rng = np.random.default_rng(0)
    sizes = [(24, 40), (64, 64), (50, 30), (40, 40), (40, 40), (40, 40), (40, 40), (40, 40)]
    img = root / "data" / "img"
    img.mkdir(parents=True, exist_ok=True)
    for name, (h, w) in zip(images, sizes * 4):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(img / name)
        (img / f"{Path(name).stem}.txt").write_text(f"a picture called {name}\n")
    vid = root / "data" / "vid"
    vid.mkdir(parents=True, exist_ok=True)
    for name in videos:
        write_video(vid / name, rng.integers(0, 256, (20, 32, 48, 3), dtype=np.uint8), fps=30)
        (vid / f"{Path(name).stem}.txt").write_text(f"a video called {name}")
    toml = root / "dataset.toml"
    text = f"""
[general]
resolution = [32, 16]
caption_extension = ".txt"
enable_bucket = true

[[datasets]]
image_directory = "{img.as_posix()}"
cache_directory = "{(root / "cache" / "img").as_posix()}"
batch_size = 2
"""
    if videos:
        text += f"""
[[datasets]]
video_directory = "{vid.as_posix()}"
cache_directory = "{(root / "cache" / "vid").as_posix()}"
target_frames = {target_frames}
source_fps = 30.0
"""
    toml.write_text(text)
    return toml


def _cache_files(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for path in sorted((root / "cache").rglob("*.safetensors")):
        out[str(path.relative_to(root))] = read_cache(path)[0]
    return out


def _assert_same(left: dict, right: dict) -> None:
    assert sorted(left) == sorted(right)
    for name in left:
        assert sorted(left[name]) == sorted(right[name]), name
        for key in left[name]:
            assert torch.equal(left[name][key], right[name][key]), (name, key)


def _video_tensor(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)[None]


# --------------------------------------------------------------------------------------------
# What is written
# --------------------------------------------------------------------------------------------


def test_latents_equal_load_vae_encode(tmp_path, vae):
    toml = make_dataset(tmp_path)
    report = cache_latents(load_dataset_config(toml), LatentEncoder(vae), SETTINGS)
    assert report.ok and report.cached == 3 + 2  # 3 images; clips (0, 1) and (0, 5) of the video
    names = sorted(p.name for p in (tmp_path / "cache" / "img").iterdir())
    assert names == [
        "a_0040x0024_wan.safetensors",
        "b_0064x0064_wan.safetensors",
        "c_0030x0050_wan.safetensors",
    ]

    # an image: read, bucketed (40x24 -> 32x16, the nearest aspect ratio), encoded on its own
    pixels = resize_to_bucket(read_image_array(tmp_path / "data/img/a.png"), (32, 16))
    expected = vae.encode(_video_tensor(pixels[None]))[0]
    path = tmp_path / "cache/img/a_0040x0024_wan.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["latents_1x2x4_float32"]
        assert handle.metadata() == {
            "architecture": "wan",
            "format_version": "1.0.1",
            "width": "40",
            "height": "24",
        }
    assert torch.equal(read_latent_cache(path)["latents"], expected)
    # the tall image goes to the 16x32 bucket
    c = read_latent_cache(tmp_path / "cache/img/c_0030x0050_wan.safetensors")["latents"]
    assert c.shape == (16, 1, 4, 2)

    # a video clip: 30 -> 16 fps keeps frames 0, 2, 4, 6, 8 of the first five; head clips (0, 1), (0, 5)
    frames = read_video(tmp_path / "data/vid/clip.mp4").frames[[0, 2, 4, 6, 8]]
    clip = np.stack([resize_to_bucket(f, (32, 16)) for f in frames])
    expected = vae.encode(_video_tensor(clip))[0]
    path = tmp_path / "cache/vid/clip_00000-005_0048x0032_wan.safetensors"
    assert torch.equal(read_latent_cache(path)["latents"], expected)
    assert read_cache(path)[1]["frame_count"] == "5"
    parsed = parse_latent_cache_name(path)
    assert (parsed.base, parsed.start, parsed.frames, parsed.width, parsed.height) == ("clip", 0, 5, 48, 32)


def test_text_equals_load_t5_cut_at_the_token_count(tmp_path, t5):
    model, tokenizer = t5
    toml = make_dataset(tmp_path)
    report = cache_text(load_dataset_config(toml), TextEncoder(model, tokenizer), SETTINGS)
    assert report.ok and report.cached == 4
    caption = "a picture called b.jpg"
    batch = tokenizer([caption], padding="max_length", truncation=True, max_length=512, return_tensors="pt")
    with torch.no_grad():
        hidden = model(batch["input_ids"], batch["attention_mask"]).last_hidden_state[0]
    tokens = len(caption.encode()) + 1  # bytes + </s>
    path = tmp_path / "cache/img/b_wan_te.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert list(handle.keys()) == ["varlen_t5_float32"]
        assert handle.metadata() == {"architecture": "wan", "caption1": caption, "format_version": "1.0.1"}
    cached = read_text_cache(path)
    assert cached.shape == (tokens, 32)
    torch.testing.assert_close(cached, hidden[:tokens], rtol=1e-5, atol=1e-6)
    # skip_existing recomputes a text cache whose caption changed, and nothing else
    (tmp_path / "data/img/a.txt").write_text("new words")
    again = cache_text(
        load_dataset_config(toml),
        TextEncoder(model, tokenizer),
        CacheSettings(num_workers=0, progress=False, skip_existing=True),
    )
    assert (again.cached, again.skipped) == (1, 3)
    assert read_cache(tmp_path / "cache/img/a_wan_te.safetensors")[1]["caption1"] == "new words"
    # a caption file removed: the item leaves the training set and its text cache goes
    (tmp_path / "data/img/c.txt").unlink()
    gone = cache_text(load_dataset_config(toml), TextEncoder(model, tokenizer), SETTINGS)
    assert gone.removed == 1 and [Path(d.what).name for d in gone.dropped] == ["c.png"]
    assert not (tmp_path / "cache/img/c_wan_te.safetensors").exists()


@skip_without_fixtures()
def test_i2v_conditioning_equals_the_generation_formula(tmp_path, vae):
    from wan_kernel.models import load_clip_vision
    from wan_kernel.pipelines.conditioning import clip_features, frame_mask

    clip = load_clip_vision(reference_case("clip_visual") / "weights.safetensors", num_heads=4)
    toml = make_dataset(tmp_path, images=("a.png",))
    report = cache_latents(load_dataset_config(toml), LatentEncoder(vae, clip=clip), SETTINGS)
    assert report.ok
    # image-to-video conditioning as generation builds it: mask + VAE latent of [first frame, zeros]
    frames = read_video(tmp_path / "data/vid/clip.mp4", source_fps=30.0).frames
    first = _video_tensor(resize_to_bucket(frames[0], (32, 16))[None])[0, :, 0]  # [3, H, W]
    video = torch.cat([first[:, None], torch.zeros(3, 4, 16, 32)], dim=1)
    expected_y = torch.cat([frame_mask(5, 2, 4), vae.encode(video[None])[0]])
    tensors = read_latent_cache(tmp_path / "cache/vid/clip_00000-005_0048x0032_wan.safetensors")
    assert sorted(tensors) == ["clip", "latents", "latents_image"]
    assert tensors["latents_image"].shape == (20, 2, 2, 4)
    assert torch.equal(tensors["latents_image"], expected_y)
    torch.testing.assert_close(tensors["clip"], clip_features(clip, first[None])[0], rtol=0, atol=0)
    with safe_open(str(tmp_path / "cache/vid/clip_00000-005_0048x0032_wan.safetensors"), framework="pt") as h:
        assert sorted(h.keys()) == ["clip_float32", "latents_2x2x4_float32", "latents_image_2x2x4_float32"]


@skip_without_fixtures()
def test_i2v_cache_job_holds_one_model_at_a_time_and_writes_the_same_values(tmp_path, vae, monkeypatch):
    import gc
    import weakref

    import wan_kernel.models.clip as clip_module
    import wan_kernel.models.vae_loading as vae_module
    from wan_kernel.pipelines.cache import CacheJob, run_cache

    clip_path = reference_case("clip_visual") / "weights.safetensors"
    real_clip, real_vae = clip_module.load_clip_vision, vae_module.load_vae
    clips: list = []
    loads: list[str] = []

    def load_clip(path, **kwargs):
        model = real_clip(path, num_heads=4, **kwargs)
        clips.append(weakref.ref(model))
        loads.append("clip")
        return model

    def load_vae(path, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in clips), "CLIP is still in memory while the VAE loads"
        loads.append("vae")
        return real_vae(path, **kwargs)

    monkeypatch.setattr(clip_module, "load_clip_vision", load_clip)
    monkeypatch.setattr(vae_module, "load_vae", load_vae)
    vae_path = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in vae.model.state_dict().items()}, vae_path)

    def job(root: Path, **settings) -> CacheJob:
        return CacheJob(
            dataset_config=str(make_dataset(root, images=("a.png", "b.jpg"), videos=())),
            vae=str(vae_path),
            vae_dtype="float32",
            clip=str(clip_path),
            device="cpu",
            settings=CacheSettings(num_workers=0, progress=False, **settings),
        )

    (report,) = run_cache(job(tmp_path / "two"), log=lambda m: None)
    assert report.ok and report.cached == 2 and loads == ["clip", "vae"]
    # the values are those of one pass with both models loaded (generation's own conditioning path)
    one = cache_latents(
        load_dataset_config(make_dataset(tmp_path / "one", images=("a.png", "b.jpg"), videos=())),
        LatentEncoder(vae, clip=real_clip(clip_path, num_heads=4)),
        SETTINGS,
    )
    assert one.ok
    _assert_same(_cache_files(tmp_path / "two"), _cache_files(tmp_path / "one"))
    # --skip_existing: only the missing cache is computed (CLIP included), to the same values
    first = _cache_files(tmp_path / "two")
    gone = tmp_path / "two/cache/img/b_0064x0064_wan.safetensors"
    gone.unlink()
    (again,) = run_cache(job(tmp_path / "two", skip_existing=True), log=lambda m: None)
    assert (again.cached, again.skipped) == (1, 1) and gone.exists()
    _assert_same(_cache_files(tmp_path / "two"), first)


def test_non_finite_output_is_an_error_naming_the_item(tmp_path, vae):
    class NaNVAE:
        dtype = torch.float32
        device = torch.device("cpu")

        def encode(self, video):
            out = vae.encode(video)
            out[0, 0, 0, 0, 0] = float("nan")
            return out

    toml = make_dataset(tmp_path, images=("a.png",), videos=())
    report = cache_latents(load_dataset_config(toml), LatentEncoder(NaNVAE()), SETTINGS)
    assert not report.ok and report.cached == 0
    assert "a.png" in report.failed[0].what and "non-finite" in report.failed[0].reason
    assert not list((tmp_path / "cache/img").glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# Bad input, names, skip/keep
# --------------------------------------------------------------------------------------------


def test_bad_files_are_reported_and_the_rest_cached(tmp_path, vae):
    toml = make_dataset(tmp_path, images=("a.png", "b.png", "c.png"))
    (tmp_path / "data/vid/broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100)
    (tmp_path / "data/vid/broken.txt").write_text("broken")
    (tmp_path / "data/img/b.png").write_bytes((tmp_path / "data/img/b.png").read_bytes()[:200])  # truncated
    (tmp_path / "data/img/c.txt").write_text("   \n")  # empty caption
    (tmp_path / "data/img/d.png").write_bytes((tmp_path / "data/img/a.png").read_bytes())  # no caption file
    report = cache_latents(load_dataset_config(toml), LatentEncoder(vae), SETTINGS)
    failed = {Path(f.what.split(" [")[0]).name: f.reason for f in report.failed}
    assert sorted(failed) == ["b.png", "broken.mp4", "c.png"]
    assert "empty caption" in failed["c.png"] and "broken.mp4" in failed["broken.mp4"]
    assert [Path(d.what).name for d in report.dropped] == ["d.png"]
    assert report.cached == 1 + 2  # a.png and both clips of clip.mp4
    assert "FAILED" in report.summary() and "b.png" in report.summary()


def test_same_base_name_is_refused(tmp_path, vae):
    toml = make_dataset(tmp_path, images=("a.png", "a.jpg"), videos=())
    with pytest.raises(InputError) as info:
        cache_latents(load_dataset_config(toml), LatentEncoder(vae), SETTINGS)
    assert "a.jpg" in str(info.value) and "a.png" in str(info.value)


def test_skip_existing_and_stale_caches(tmp_path, vae):
    toml = make_dataset(tmp_path, images=("a.png", "b.png"), videos=())
    group = load_dataset_config(toml)
    cache_latents(group, LatentEncoder(vae), SETTINGS)
    first = (tmp_path / "cache/img/a_0040x0024_wan.safetensors").stat().st_mtime_ns
    killed_run_temporary(tmp_path / "cache/img/x_0040x0024_wan.safetensors")  # a killed run's
    skip = CacheSettings(num_workers=0, progress=False, skip_existing=True)
    report = cache_latents(group, LatentEncoder(vae), skip)
    assert (report.cached, report.skipped) == (0, 2)
    assert (tmp_path / "cache/img/a_0040x0024_wan.safetensors").stat().st_mtime_ns == first
    assert not leftover_temporaries(tmp_path / "cache/img")
    # asking for more than the cache holds (i2v) recomputes it
    assert cache_latents(group, LatentEncoder(vae, image_conditioning=True), skip).cached == 2
    # without --skip_existing everything is rewritten
    assert cache_latents(group, LatentEncoder(vae), SETTINGS).cached == 2
    # an item gone from the dataset: its cache goes too, unless --keep_cache
    (tmp_path / "data/img/b.png").unlink()
    cache_latents(group, LatentEncoder(vae), CacheSettings(num_workers=0, progress=False, keep_cache=True))
    assert (tmp_path / "cache/img/b_0040x0024_wan.safetensors").exists() or (
        tmp_path / "cache/img/b_0064x0064_wan.safetensors"
    ).exists()
    report = cache_latents(group, LatentEncoder(vae), skip)
    assert report.removed == 1
    assert sorted(p.name for p in (tmp_path / "cache/img").glob("*_wan.safetensors")) == [
        "a_0040x0024_wan.safetensors"
    ]
    # a source that fails to read keeps its earlier cache (the failure is reported, nothing is lost)
    (tmp_path / "data/img/a.png").write_bytes(b"broken")
    report = cache_latents(group, LatentEncoder(vae), SETTINGS)
    assert len(report.failed) == 1 and report.removed == 0
    assert (tmp_path / "cache/img/a_0040x0024_wan.safetensors").exists()


def test_dry_run_lists_files_buckets_clips_and_drops(tmp_path):
    toml = make_dataset(tmp_path, target_frames="[5, 9]")
    write_video(tmp_path / "data/vid/short.mp4", np.zeros((6, 32, 48, 3), np.uint8), fps=30)  # 3 at 16 fps
    (tmp_path / "data/vid/short.txt").write_text("short")
    (tmp_path / "data/img/d.png").write_bytes((tmp_path / "data/img/a.png").read_bytes())
    lines: list[str] = []
    report = dry_run(load_dataset_config(toml), log=lines.append)
    text = "\n".join(lines)
    assert "a.png: 3.0 kB, 40x24 -> bucket 32x16" in text
    assert (
        "clip.mp4: " in text
        and "30.00 fps, 11 frames (resampled), 48x32 -> bucket 32x16, clips (0, 5) (0, 9)" in text
    )
    assert "short.mp4: " in text and "dropped: 3 frames, fewer than the shortest target_frames (5)" in text
    assert "d.png: no caption file d.txt" in text
    assert "datasets[1] 32x16x5: 1 items, 1 per epoch" in text and "datasets[0] 16x32x1: 2 items" in text
    assert report.cached == 3 + 2 and not report.failed
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# The command line: one run does both, kill-and-resume, two ranks
# --------------------------------------------------------------------------------------------


def _cli(*args):
    from wan_cli.main import cli

    return CliRunner().invoke(cli, ["run", *args], catch_exceptions=False)


def _cache_args(toml: Path, weights: Path) -> list[str]:
    return [
        "--dataset_config", str(toml), "--vae", str(weights / "vae.safetensors"), "--vae_dtype", "float32",
        "--t5", str(weights / "t5.safetensors"), "--t5_tokenizer", "builtin:bytes", "--device", "cpu",
        "--num_workers", "0", "--no_progress",
    ]  # fmt: skip


def test_cli_cache_writes_both_and_fails_on_a_bad_file(tmp_path, weights):
    toml = make_dataset(tmp_path, images=("a.png",))
    result = _cli("cache", *_cache_args(toml, weights))
    assert result.exit_code == 0, result.output
    files = _cache_files(tmp_path)
    assert "cache/img/a_wan_te.safetensors" in files and "cache/img/a_0040x0024_wan.safetensors" in files
    assert len(files) == 1 + 1 + 2 + 1
    (tmp_path / "data/vid/bad.mp4").write_bytes(b"not a video")
    (tmp_path / "data/vid/bad.txt").write_text("bad")
    result = _cli("cache-latents", *_cache_args(toml, weights)[:6], "--num_workers", "0", "--skip_existing")
    assert result.exit_code == 1
    assert "bad.mp4" in result.output and "1 item(s) failed" in result.output
    assert "0 written, 3 already cached" in result.output
    result = _cli("cache-text", "--dataset_config", str(toml), "--t5", str(weights / "t5.safetensors"),
                  "--t5_tokenizer", "builtin:bytes", "--device", "cpu", "--skip_existing")  # fmt: skip
    assert result.exit_code == 0 and "1 written, 2 already cached" in result.output


def test_cli_needs_something_to_do(tmp_path):
    toml = make_dataset(tmp_path, images=("a.png",), videos=())
    result = _cli("cache", "--dataset_config", str(toml))
    assert result.exit_code == 1 and "nothing to cache" in result.output
    result = _cli("cache-latents", "--dataset_config", str(toml))
    assert result.exit_code == 1 and "--vae is required" in result.output
    result = _cli("cache", "--dataset_config", str(toml), "--dry-run")
    assert result.exit_code == 0 and "bucket 32x16" in result.output


def _wan(args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "wan_cli.main", "run", *args],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **kwargs,
    )


def _latent_args(root: Path, weights: Path) -> list[str]:
    return [*_cache_args(root / "dataset.toml", weights)[:6], "--device", "cpu", "--no_progress"]


@pytest.mark.slow
def test_kill_and_resume_equals_a_clean_run(tmp_path, weights):
    names = tuple(f"im{i:02d}.png" for i in range(8))
    clean_root, killed_root = tmp_path / "clean", tmp_path / "killed"
    for root in (clean_root, killed_root):
        make_dataset(root, images=names, videos=())

    def args(root):
        return [*_latent_args(root, weights), "--num_workers", "0", "--batch_size", "1"]

    # the killed run writes one cache every 0.2 s, so the kill always lands mid-way
    slow = (
        "import sys, time\n"
        "import wan_kernel.pipelines.cache as cache\n"
        "write = cache.write_latent_cache\n"
        "def slow(*args, **kwargs):\n"
        "    out = write(*args, **kwargs)\n"
        "    time.sleep(0.2)\n"
        "    return out\n"
        "cache.write_latent_cache = slow\n"
        "from wan_cli.main import main\n"
        "main(sys.argv[1:])\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", slow, "run", "cache-latents", *args(killed_root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = killed_root / "cache/img"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(folder.glob("*_wan.safetensors"))) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(folder.glob("*_wan.safetensors")))
    assert 3 <= done < len(names), "the run was not interrupted mid-way"
    resumed = _cli("cache-latents", *args(killed_root), "--skip_existing")
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(names) - done} written, {done} already cached" in resumed.output
    assert _cli("cache-latents", *args(clean_root)).exit_code == 0
    _assert_same(_cache_files(killed_root), _cache_files(clean_root))
    assert not list(folder.glob(".*"))  # no temporary left behind


def test_a_full_disk_stops_the_cache_with_a_clean_error(tmp_path, weights, monkeypatch):
    """ENOSPC while writing a cache: a clean error naming the file, no temporary, no half cache."""
    import errno

    import safetensors.torch

    make_dataset(tmp_path, images=("a.png", "b.png"), videos=())

    def full_disk(tensors, name, metadata=None):
        Path(name).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    result = _cli("cache-latents", *_latent_args(tmp_path, weights), "--num_workers", "0")
    assert result.exit_code != 0 and "disk is full" in result.output, result.output
    assert "_wan.safetensors" in result.output and "Traceback" not in result.output
    folder = tmp_path / "cache/img"
    assert not leftover_temporaries(folder) and not list(folder.glob("*.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, weights):
    """Two processes (gloo on CPU, as under torchrun) write exactly what one writes."""
    one, two = tmp_path / "one", tmp_path / "two"
    names = ("a.png", "b.png", "c.png", "d.png", "e.png")
    for root in (one, two):
        make_dataset(root, images=names)

    def args(root):
        return ["cache-latents", *_latent_args(root, weights)]

    port = str(_free_port())
    ranks = [
        _wan(
            [*args(two), "--num_workers", "1"],  # media read in a worker process there, in-line here
            env={
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in (0, 1)
    ]
    assert _cli(*args(one), "--num_workers", "0").exit_code == 0  # meanwhile, one process
    outputs = [p.communicate(timeout=300)[0].decode() for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    assert "latent caches: 7 written" in outputs[0]  # rank 0 prints the merged summary
    _assert_same(_cache_files(one), _cache_files(two))


def test_jsonl_datasets_and_folders_of_frames(tmp_path):
    """JSONL entries (paths beside the JSONL file, a folder of frames as a video) plan like directories."""
    make_dataset(tmp_path, images=("a.png",))
    frames = tmp_path / "data" / "frames"
    for i in range(9):
        write_image(frames / f"{i:03d}.png", np.full((16, 32, 3), 20 * i, np.uint8))
    (tmp_path / "videos.jsonl").write_text(
        '{"video_path": "data/vid/clip.mp4", "caption": "a clip"}\n'
        '{"video_path": "data/frames", "caption": "frames"}\n'
        '{"video_path": "data/missing.mp4", "caption": "gone"}\n'
        '{"video_path": "data/frames", "caption": ""}\n'
    )
    (tmp_path / "images.jsonl").write_text('{"image_path": "data/img/a.png", "caption": "an image"}\n')
    toml = tmp_path / "jsonl.toml"
    toml.write_text(
        '[[datasets]]\nimage_jsonl_file = "images.jsonl"\ncache_directory = "cache/j_img"\n'
        '[[datasets]]\nvideo_jsonl_file = "videos.jsonl"\ncache_directory = "cache/j_vid"\n'
        "target_frames = [1, 9]\nresolution = [32, 16]\n"
    )
    lines: list[str] = []
    report = dry_run(load_dataset_config(toml), log=lines.append)
    text = "\n".join(lines)
    assert "clip.mp4: " in text and "20 frames" in text and "clips (0, 1) (0, 9)" in text
    assert "frames: " in text and "9 frames, 32x16 -> bucket 32x16, clips (0, 1) (0, 9)" in text
    assert "videos.jsonl:3 data/missing.mp4: file not found" in text
    assert [d.reason for d in report.failed] == ["empty caption"]  # the 4th line: an empty caption is a fault
    assert report.cached == 1 + 2 + 2


def test_debug_mode_writes_the_bucketed_inputs(tmp_path):
    toml = make_dataset(tmp_path, images=("a.png",))
    result = _cli(
        "cache-latents", "--dataset_config", str(toml), "--debug_mode", "video", "--num_workers", "0"
    )
    assert result.exit_code == 0, result.output
    debug = tmp_path / "cache"
    written = sorted(p.relative_to(debug).as_posix() for p in debug.rglob(".wan_debug/*"))
    assert written == [
        "img/.wan_debug/a_0040x0024_wan.png",
        "vid/.wan_debug/clip_00000-001_0048x0032_wan.png",
        "vid/.wan_debug/clip_00000-005_0048x0032_wan.mp4",
    ]
    assert np.asarray(Image.open(debug / "img/.wan_debug/a_0040x0024_wan.png")).shape == (16, 32, 3)
    assert not list(debug.rglob("*.safetensors"))
    # the seed's console options: --console_num_images limits the items, the other two are announced
    shutil.rmtree(debug)
    result = _cli(
        "cache-latents", "--dataset_config", str(toml), "--debug_mode", "image", "--num_workers", "0",
        "--console_num_images", "2", "--console_width", "120", "--console_back", "black",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list(debug.rglob(".wan_debug/*"))) == 2
    assert (
        "--console_width has no effect" in result.output and "--console_back has no effect" in result.output
    )


@pytest.mark.parametrize("command", ["cache", "cache-latents", "cache-text"])
def test_help_documents_every_option(command):
    from wan_cli.main import cli

    result = CliRunner().invoke(cli, ["run", command, "--help"])
    assert result.exit_code == 0
    import wan_cli.cache as module

    click_command = getattr(module, command.replace("-", "_"))
    for param in click_command.params:
        assert param.help and param.help.strip(), param.name
        assert param.opts[0] in result.output
    seed = {
        "--dataset_config",
        "--device",
        "--batch_size",
        "--num_workers",
        "--skip_existing",
        "--keep_cache",
    }
    seed |= (
        {
            "--vae",
            "--vae_dtype",
            "--vae_cache_cpu",
            "--clip",
            "--i2v",
            "--debug_mode",
            "--disable_cudnn_backend",
            "--console_width",
            "--console_back",
            "--console_num_images",
        }
        if command != "cache-text"
        else set()
    )
    seed |= {"--t5", "--fp8_t5", "--t5_tokenizer"} if command != "cache-latents" else set()
    assert seed <= {opt for p in click_command.params for opt in p.opts}


def test_cli_i2v_without_clip_and_option_checks(tmp_path, weights):
    toml = make_dataset(tmp_path, images=("a.png",), videos=())
    toml.write_text(toml.read_text() + "fp_latent_window_size = 9\n")  # a seed key Wan2.1 does not use
    result = _cli(
        "cache-latents", *_cache_args(toml, weights)[:6], "--device", "cpu", "--i2v", "--no_progress"
    )
    assert result.exit_code == 0, result.output
    assert "datasets[0] (" in result.output and "ignoring fp_latent_window_size" in result.output
    with safe_open(str(tmp_path / "cache/img/a_0040x0024_wan.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["latents_1x2x4_float32", "latents_image_1x2x4_float32"]
    result = _cli("cache", "--dataset_config", str(toml), "--clip", "clip.pth", "--t5", "t5.pth")
    assert result.exit_code == 1 and "--clip is used with the latent caches: give --vae too" in result.output
